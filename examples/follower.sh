#!/bin/sh
# Terminal 2: the original's example follower, printing its snapshot.
set -e
exec hctserver follower "${1:-follower.db}" --once --job "$(dirname "$0")/follower_snapshot.py"
