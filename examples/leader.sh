#!/bin/sh
# Terminal 1: the original's example leader, six writers and a monitor.
set -e
db=${1:-leader.db}
here=$(dirname "$0")
[ -f "$db" ] || hctserver init "$db" --sql "CREATE TABLE t1(a INTEGER PRIMARY KEY, b, c)"
w="$here/leader_writer.py"
exec hctserver leader "$db" --seconds "${SECONDS_TO_RUN:-30}" \
  --job "$w" --job "$w" --job "$w" --job "$w" --job "$w" --job "$w" \
  --job "$here/leader_monitor.py"
