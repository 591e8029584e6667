# A cluster test's writer job: inserts unique keys, one transaction each,
# and logs every acknowledged commit ("key cid time") once transact returned.
import os
import time

acks = os.environ["HCT_TEST_ACKLOG"]
stop = os.environ["HCT_TEST_STOP"]
db.execute("CREATE TABLE IF NOT EXISTS kv(k TEXT PRIMARY KEY, v)")  # noqa: F821
i = 0
run = time.time_ns()  # a process may lead more than once: keys unique across its runs
with open(acks, "a") as log:
    while not timeout() and not os.path.exists(stop):  # noqa: F821
        key = f"{os.getpid()}-{run}-{i}"
        try:
            res = db.transact([("INSERT INTO kv VALUES(?, ?)", (key, i))])  # noqa: F821
        except Exception as e:
            print(f"writer: {type(e).__name__}: {e}", flush=True)
            break  # fenced, or stopping: not acknowledged
        log.write(f"{key} {res.cid} {time.time()}\n")
        log.flush()
        i += 1
