"""An application process writing on one node's file, on one connection for
its whole life, retrying what is refused. It writes only there (the journal
layer's connect, which does not forward a follower's writes to its leader):
so each acknowledgement is the local node's, which the split-brain checks count.

Usage: app_writer.py DB NAME ACKLOG STOPFILE [SECONDS]. Each acknowledged
commit is logged as "ack KEY CID TIME NAME"; each CommitUnknownError as
"unknown KEY CID TIME NAME" (committed here, never acknowledged).
"""

import os
import sys
import time

import apsw

from hctserver.errors import BusyError, CommitUnknownError, ModeError
from hctserver.journal.database import connect

db_path, name, acklog, stopfile = sys.argv[1:5]
seconds = float(sys.argv[5]) if len(sys.argv) > 5 else 600.0
end = time.monotonic() + seconds
db = None
while db is None and not os.path.exists(stopfile):
    try:
        db = connect(db_path)
    except (ModeError, BusyError):
        time.sleep(0.05)
i = 0
run = time.time_ns()
with open(acklog, "a") as log:
    while db is not None and not os.path.exists(stopfile) and time.monotonic() < end:
        key = f"app-{name}-{os.getpid()}-{run}-{i}"
        i += 1
        try:
            res = db.transact([("INSERT INTO kv VALUES(?, ?)", (key, i))])
        except CommitUnknownError as e:
            log.write(f"unknown {key} {e.cid} {time.time()} {name}\n")
            log.flush()
            continue
        except (ModeError, BusyError, apsw.SQLError):
            time.sleep(
                0.01
            )  # not leading now, or kv not there yet (refused before anything was written)
            continue
        log.write(f"ack {key} {res.cid} {time.time()} {name}\n")
        log.flush()
if db is not None:
    db.close()
