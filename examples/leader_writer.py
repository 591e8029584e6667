# The original's example leader job: commit random rows as fast as possible.
#
#   hctserver init leader.db --sql "CREATE TABLE t1(a INTEGER PRIMARY KEY, b, c)"
#   hctserver leader leader.db --seconds 10 --job examples/leader_writer.py (x6) \
#       --job examples/leader_monitor.py
#
# Globals: db (this job's connection) and timeout() (true after --seconds).
# BEGIN CONCURRENT is hctree syntax; here it is an ordinary write transaction.
import apsw

from hctserver.errors import BusyError

while not timeout():  # noqa: F821
    try:
        db.execute("BEGIN CONCURRENT")  # noqa: F821
        db.execute(  # noqa: F821
            "REPLACE INTO t1 VALUES(random() % 10000, randomblob(100), randomblob(100))"
        )
        db.execute("COMMIT")  # noqa: F821
    except (BusyError, apsw.BusyError):  # "database is locked": try again
        if db.in_transaction:  # noqa: F821
            db.execute("ROLLBACK")  # noqa: F821
