# The original's example follower job: print the available snapshot every second.
#
#   hctserver follower follower.db --job examples/follower_snapshot.py
#
# Follower jobs read only: their connection refuses writes (FOLLOWER mode).
while True:
    print(f"snapshot: {db.snapshot()}", flush=True)  # noqa: F821
    if timeout.wait(1.0):  # noqa: F821
        break
