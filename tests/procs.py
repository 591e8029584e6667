"""Nodes and applications as real processes, stopped even when a test fails."""

from __future__ import annotations

import fcntl
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HCT = [sys.executable, "-m", "hctserver"]


class Procs:
    """Starts processes whose output goes to files in ``logs`` (a pipe nobody
    reads could fill and block them); :meth:`close` kills whatever still runs."""

    def __init__(self, logs: str) -> None:
        self.logs = logs
        self.procs: list[subprocess.Popen[str]] = []
        self.files: dict[int, str] = {}

    def start(
        self,
        *args: str,
        stdin: int | None = subprocess.DEVNULL,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[str]:
        n = len(self.procs)
        out = os.path.join(self.logs, f"proc{n}.out")
        with open(out, "w") as fo, open(out[:-4] + ".err", "w") as fe:
            p = subprocess.Popen(list(args), stdin=stdin, stdout=fo, stderr=fe, text=True, env=env)
        self.procs.append(p)
        self.files[p.pid] = out[:-4]
        return p

    def stderr(self, p: subprocess.Popen[str]) -> str:
        with open(self.files[p.pid] + ".err") as f:
            return f.read()

    def stdout(self, p: subprocess.Popen[str]) -> str:
        with open(self.files[p.pid] + ".out") as f:
            return f.read()

    def leader(
        self, db: str, *args: str, port: int = 0, env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[str], int]:
        """``hctserver leader`` on ``port`` (0: any); returns it and its port."""
        p = self.start(*HCT, "leader", db, "--port", str(port), *args, env=env)
        deadline = time.monotonic() + 60
        while True:
            m = re.search(r"leader on 127\.0\.0\.1:(\d+)", self.stderr(p))
            if m:
                return p, int(m.group(1))
            if p.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the leader did not start: {self.stderr(p)}")
            time.sleep(0.02)

    def follower(
        self, db: str, port: int, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        return self.start(*HCT, "follower", db, "--port", str(port), *args, env=env)

    def c_leader(
        self, db: str, port: int, seconds: int, writers: int, *more: str
    ) -> subprocess.Popen[str]:
        """The original C leader (the reference build's leader.tcl); skips
        the test when the reference build is not here."""
        fixture = require_reference()
        return self.start(
            str(fixture), str(fixture.parent / "leader.tcl"), db, str(port), str(seconds),
            str(writers), *more,
        )  # fmt: skip

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


@contextmanager
def processes(logs: str) -> Iterator[Procs]:
    procs = Procs(logs)
    try:
        yield procs
    finally:
        procs.close()


def stop(p: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 30) -> float:
    """Send ``sig`` and wait for the exit; returns the seconds it took."""
    t0 = time.monotonic()
    p.send_signal(sig)
    p.wait(timeout)
    return time.monotonic() - t0


_CLAIMED: list[int] = []  # lock files held for this process's life, one per port


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def terminate(p: subprocess.Popen[Any] | None, timeout: float = 10) -> None:
    """SIGTERM a server a test started, SIGKILL it if it does not exit in time."""
    if p is None or p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout)


def free_port() -> int:
    """A port for a server that must know it before it starts (a cluster
    node, etcd, a leader restarted on it). Without a race: it lies below the
    kernel's ephemeral range, so no port-0 bind or outgoing connection takes
    it meanwhile, and a lock file held for this process's life keeps other
    test processes (another suite run beside this one) off it."""
    top = _ephemeral_start()
    locks = Path(tempfile.gettempdir()) / "hctserver-test-ports"
    locks.mkdir(exist_ok=True)
    for _ in range(2000):
        port = random.randrange(max(1024, top - 12000), top)
        fd = os.open(locks / str(port), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with socket.create_server(("127.0.0.1", port)):
                pass  # nobody listens there now
        except OSError:  # claimed by another process, or in use
            os.close(fd)
            continue
        _CLAIMED.append(fd)
        return port
    raise AssertionError("no free port below the ephemeral range")


def wal_size(db: str) -> int:
    wal = db + "-wal"
    return os.path.getsize(wal) if os.path.exists(wal) else 0


def require_reference() -> Path:
    """:func:`reference`, or skip the test saying why."""
    import pytest

    from hctserver.tools.locate import reference_fixture

    fixture = reference_fixture()
    if fixture is None:
        pytest.skip("the original C system is not here ($HCTSERVER_REFERENCE, ../shared/reference)")
    return fixture
