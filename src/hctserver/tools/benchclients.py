"""The bench's client section: writes forwarded through a follower against
writes through ``hctserver.connect()`` on the leader's file, in one run.

A leader and a follower run as processes of their own (``hctserver leader``
and ``hctserver follower``, each with ``--http``), as they would in
production; the clients run in the bench's process: ``sessions`` threads,
each committing one INSERT at a time for ``seconds``. A forwarded write
goes to the follower's SQL endpoint, which sends it to the leader and
answers once it has applied it (read your writes).
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..client.connect import connect
from ..client.remote import Stream

SESSIONS = (1, 16)
_URL = re.compile(r"HTTP on (https?://\S+)")


def _start(args: list[str], log: str) -> tuple[subprocess.Popen[bytes], str]:
    err = open(log, "wb")  # noqa: SIM115 (the process writes it while it runs)
    p = subprocess.Popen(
        [sys.executable, "-m", "hctserver", *args, "--http", "127.0.0.1:0"],
        stdout=subprocess.DEVNULL,
        stderr=err,
    )
    err.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        with open(log, errors="replace") as f:
            m = _URL.search(f.read())
        if m:
            return p, m.group(1)
        time.sleep(0.05)  # polling the log for the address, with a deadline
    p.kill()
    raise RuntimeError(f"{args[0]} did not start: see {log}")


def _run(sessions: int, seconds: float, make: Callable[[], Callable[[int], None]]) -> list[float]:
    """Latencies (s) of ``sessions`` threads writing for ``seconds``."""
    out: list[list[float]] = [[] for _ in range(sessions)]
    go = threading.Barrier(sessions + 1)
    stop = threading.Event()

    def worker(i: int) -> None:
        write = make()
        go.wait()
        k = 0
        while not stop.is_set():
            t = time.perf_counter()
            write(i * 10_000_000 + k)
            out[i].append(time.perf_counter() - t)
            k += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    go.wait()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    return [x for xs in out for x in xs]


def _figures(name: str, lat: list[float], seconds: float) -> dict[str, float]:
    lat.sort()

    def pick(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000

    return {
        f"{name}_commits_per_s": len(lat) / seconds,
        f"{name}_p50_ms": pick(0.5),
        f"{name}_p99_ms": pick(0.99),
    }


def forwarded_writes(tmp: str, seconds: float) -> dict[str, Any]:
    """Local ``connect()`` writes on the leader's file and writes forwarded
    through a follower, with 1 and 16 sessions; the p50 difference for one."""
    lp, fp = os.path.join(tmp, "fwd-leader.db"), os.path.join(tmp, "fwd-follower.db")
    c = connect(lp)
    c.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v)")
    c.close()
    leader, _ = _start(["leader", lp, "--port", "0"], lp + ".log")
    follower = None
    r: dict[str, Any] = {}
    try:
        with open(lp + ".log") as f:
            port = re.search(r"leader on \S+:(\d+)", f.read())
        assert port is not None, "the leader's port is in its log"
        follower, furl = _start(["follower", fp, "--port", port.group(1)], fp + ".log")
        probe = Stream(furl)
        deadline = time.monotonic() + 60
        while probe.execute(
            "SELECT count(*) FROM sqlite_schema WHERE name='t'", None
        ).fetchall() != [(1,)]:
            if time.monotonic() > deadline:
                raise RuntimeError("the follower did not catch up")
            time.sleep(0.05)  # waiting for the catch-up, with a deadline
        probe.close()

        keys = itertools.count()  # one key space for every session of every run

        def local() -> Callable[[int], None]:
            conn = connect(lp)

            def write(_: int) -> None:
                conn.execute("INSERT INTO t VALUES(?, 'x')", (next(keys),))

            return write

        def forwarded() -> Callable[[int], None]:
            s = Stream(furl)

            def write(_: int) -> None:
                s.execute("INSERT INTO t VALUES(?, 'x')", (next(keys),))

            return write

        for n in SESSIONS:  # alternated, so that the machine's drift hits both alike
            r.update(_figures(f"local_write_{n}", _run(n, seconds, local), seconds))
            r.update(_figures(f"forwarded_write_{n}", _run(n, seconds, forwarded), seconds))
        r["forwarded_write_extra_p50_ms"] = (
            r["forwarded_write_1_p50_ms"] - r["local_write_1_p50_ms"]
        )
    finally:
        for p in (follower, leader):
            if p is not None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
    return r
