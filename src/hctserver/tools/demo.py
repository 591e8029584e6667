"""``hctserver demo``: a leader with six writers and a monitor, followers in
their own processes (one joining late, to show a catch-up), a live view of
commits/s and each follower's lag, then a verdict from verifying every
follower against the leader."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import apsw
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ..journal.database import Database
from ..journal.verify import compare
from ..node.jobs import T1_SQL, writer
from ..node.leader import Leader
from ..node.testserver import Node
from .top import Rates, view


@dataclass
class _Follower:
    name: str
    path: str
    start_at: float
    proc: subprocess.Popen[bytes] | None = None
    snapshot: int = -1
    lag_cids: int = 0
    lag_ms: float = 0.0
    peak_lag_ms: float = 0.0
    samples: list[tuple[float, float]] = field(default_factory=list)
    stderr: str = ""


def _snapshot(path: str) -> int:
    """A follower's snapshot as seen from this process (read only)."""
    try:
        c = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    except apsw.Error:
        return -1
    try:
        c.set_busy_timeout(100)
        rows = c.execute(
            "SELECT max(cid) FROM hct_journal WHERE vhash IS NOT NULL"
            " UNION ALL SELECT cid FROM hct_baseline"
        ).fetchall()
        return max(int(r[0] or 0) for r in rows)
    except apsw.Error:
        return -1
    finally:
        c.close()


def run_demo(seconds: float = 10.0, followers: int = 2, plot: str | None = None) -> int:
    console = Console()
    tty = console.is_terminal
    tmp = tempfile.mkdtemp(prefix="hctserver-demo-")
    try:
        return _demo(console, tty, tmp, seconds, followers, plot)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _demo(
    console: Console, tty: bool, tmp: str, seconds: float, nfollowers: int, plot: str | None
) -> int:
    lpath = os.path.join(tmp, "leader.db")
    db = Database(lpath)
    db.set_mode("leader")
    db.connect().execute(T1_SQL)
    db.close()

    leader = Node(lpath, port=0)  # the demo ends the jobs itself, see below
    for _ in range(6):
        leader.job(writer)
    leader.job(_silent_monitor)
    fs = [
        _Follower(
            f"follower {i + 1}",
            os.path.join(tmp, f"follower{i + 1}.db"),
            0.4 * seconds if i == nfollowers - 1 and nfollowers > 1 else 0.0,
        )
        for i in range(nfollowers)
    ]
    leader.start()
    t0 = time.monotonic()
    console.print(
        f"leader on 127.0.0.1:{leader.port}: 6 writer jobs and a monitor for {seconds:g} s;"
        f" {nfollowers} follower(s){' (the last joins late)' if nfollowers > 1 else ''}"
    )
    rates: list[tuple[float, float]] = []
    last = (t0, 0)
    leader_done = False
    stopping = False
    top = Rates()
    doc = leader.status()

    def title() -> str:
        return f"hctserver demo  t={time.monotonic() - t0:5.1f}s  (lag as the leader sees it)"

    live = (
        Live(view([("leader", doc)], top, title()), console=console, refresh_per_second=4)
        if tty
        else None
    )
    next_print = t0
    with live if live is not None else contextlib.nullcontext():
        while True:
            now = time.monotonic()
            for f in fs:
                if f.proc is None and now - t0 >= f.start_at:
                    f.proc = _spawn(f.path, leader.port)
            if not leader_done:
                doc = leader.status()  # what /status serves: the same source as `top`
            cid = doc["snapshot"]
            if now - last[0] >= 0.5:
                rates.append((now - t0, (cid - last[1]) / (now - last[0])))
                last = (now, cid)
            by_name = {r["name"]: r for r in doc["followers"] if r["feedback"]}
            for f in fs:
                r = by_name.get(f.path)
                if r is None or r["lag_ms"] is None:
                    continue
                f.snapshot, f.lag_cids, f.lag_ms = r["applied_cid"], r["lag_cids"], r["lag_ms"]
                f.peak_lag_ms = max(f.peak_lag_ms, f.lag_ms) if now - t0 > 1 else f.peak_lag_ms
                f.samples.append((now - t0, f.lag_ms))
            if live is not None:
                live.update(view([("leader", doc)], top, title()))
            elif now >= next_print:
                next_print = now + 1.0
                console.print(
                    f"t={now - t0:4.1f}s leader cid {cid:,}; "
                    + "; ".join(
                        f"{f.name} {f.snapshot:,} (lag {f.lag_cids:,} cids, {f.lag_ms:,.0f} ms)"
                        for f in fs
                        if f.proc is not None and f.snapshot >= 0
                    )
                )
            late = now - t0 >= seconds + 60  # do not wait for ever on a follower that cannot start
            if not stopping and now - t0 >= seconds and (late or _all_streaming(leader, fs)):
                # end the jobs only once every follower streams, so that the late
                # one shows a catch-up rather than a leader that went away
                stopping = True
                assert leader.runner is not None
                leader.runner.timeout.expire()
            if not leader_done and leader.wait(0):
                leader_done = True
            if leader_done and all(f.proc is not None and f.proc.poll() is not None for f in fs):
                break
            if leader_done and now - t0 > seconds + 120:
                break
            time.sleep(0.1)

    final = leader.db.position()
    summary = Table(title="summary")
    for col in ("node", "snapshot", "version hash", "peak lag (ms)", "verdict"):
        summary.add_column(col)
    summary.add_row("leader", f"{final.cid:,}", final.hash.hex(), "", "")
    ok = True
    for f in fs:
        verdict = _verdict(f, lpath)
        ok = ok and verdict == "identical"
        snap = _snapshot(f.path)
        pos = Database(f.path, init=False).position() if snap >= 0 else None
        summary.add_row(
            f.name, f"{snap:,}", pos.hash.hex() if pos else "-", f"{f.peak_lag_ms:,.0f}", verdict
        )
    leader.close()
    console.print(summary)
    total = rates and sum(r for _, r in rates) / len(rates)
    console.print(f"leader: {final.cid:,} commits in {seconds:g} s (about {total:,.0f}/s)")
    if plot:
        _plot(plot, fs, rates)
        console.print(f"lag plot written to {plot}")
    console.print("all followers identical to the leader" if ok else "FOLLOWERS DIFFER")
    return 0 if ok else 1


def _all_streaming(leader: Node, fs: list[_Follower]) -> bool:
    runner = leader.runner
    if not isinstance(runner, Leader) or any(f.proc is None for f in fs):
        return False
    return all(n >= len(fs) for n in runner.subscriber_counts())


def _silent_monitor(db: Any, timeout: Any) -> None:
    """The demo's monitor: the live view shows what `monitor` would print."""
    while not timeout.wait(1.0):
        db.execute("SELECT max(cid) FROM hct_journal").fetchone()


def _spawn(path: str, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hctserver",
            "follower",
            path,
            "--port",
            str(port),
            "--once",
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _verdict(f: _Follower, leader_path: str) -> str:
    assert f.proc is not None
    try:
        _, err = f.proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        f.proc.kill()
        return "did not finish"
    if f.proc.returncode != 0:
        return f"failed: {err.decode(errors='replace').strip()[:200]}"
    diff = compare(leader_path, f.path)
    return "identical" if diff is None else f"differs: {diff}"


def _plot(path: str, fs: list[_Follower], rates: list[tuple[float, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    ax1.plot([t for t, _ in rates], [r for _, r in rates])
    ax1.set_ylabel("leader commits/s")
    for f in fs:
        ax2.plot([t for t, _ in f.samples], [v for _, v in f.samples], label=f.name)
    ax2.set_ylabel("lag (ms)")
    ax2.set_xlabel("seconds")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
