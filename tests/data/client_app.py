"""An application that talks only to one node over the client protocol.

Usage: client_app.py URL LOG STOPFILE. First it checks what an application
needs (an interactive transaction through the DB-API driver, a batch, reads
that see each write as soon as it returns) and logs "ready"; then it writes
one transaction after another, each with its own transaction id, retrying
each (same id) until it is acknowledged: "ack KEY CID" per transaction,
"retry KEY why" per failed attempt, "unseen KEY" if a read on the same node
right after the acknowledgement did not see it. It stops when STOPFILE exists.
"""

import os
import sys
import time

import apsw

from hctserver import dbapi
from hctserver.client.remote import Stream
from hctserver.errors import HctError

url, logpath, stopfile = sys.argv[1:4]
log = open(logpath, "a", buffering=1)  # noqa: SIM115 (the whole run)

con = dbapi.connect(url, timeout=30)
con.execute("CREATE TABLE IF NOT EXISTS app(k TEXT, v INTEGER)")  # no key: duplicates would show
con.commit()
cur = con.cursor()
cur.execute("INSERT INTO app VALUES('interactive', 1)")  # an implicit BEGIN (sqlite3's rule)
cur.execute("SELECT count(*) FROM app WHERE k='interactive'")
assert cur.fetchone() == (1,), "a transaction reads its own write"
con.commit()
local = Stream(url)  # reads with consistency "local": this node alone
assert local.execute("SELECT count(*) FROM app WHERE k='interactive'", None).fetchall() == [(1,)]
done = local.transact([("INSERT INTO app VALUES(?, ?)", ("batch", 2)), "SELECT count(*) FROM app"])
assert done.cid > 0 and done.rows[1] == [(2,)]
assert local.execute("SELECT v FROM app WHERE k='batch'", None).fetchall() == [(2,)]
log.write("ready\n")

writer = Stream(url, timeout=15)
run = time.time_ns()
i = 0
while not os.path.exists(stopfile):
    key = f"w{run}-{i}"
    i += 1
    deadline = time.monotonic() + 120
    while True:
        try:
            res = writer.transact([("INSERT INTO app VALUES(?, ?)", (key, i))], txid=key)
        except (HctError, apsw.Error) as e:
            if time.monotonic() > deadline:
                raise
            log.write(f"retry {key} {type(e).__name__}\n")
            time.sleep(0.05)  # the cluster is failing over: try again shortly
            continue
        log.write(f"ack {key} {res.cid}{' dup' if writer.duplicate else ''}\n")
        seen = local.execute("SELECT count(*) FROM app WHERE k=?", (key,)).fetchall()
        if seen != [(1,)]:  # read your writes, on this node, as soon as the call returned
            log.write(f"unseen {key} {seen}\n")
        break
writer.close()
local.close()
con.close()
