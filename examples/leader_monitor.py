# The original's example monitor job: print the largest cid every second.
while True:
    (cid,) = db.execute("SELECT coalesce(max(cid), 0) FROM hct_journal").fetchone()  # noqa: F821
    print(f"max cid: {cid}", flush=True)
    if timeout.wait(1.0):  # noqa: F821
        break
