"""Journal retention: the policy in memory, then real leaders and followers."""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import time

import pytest

from hctserver import Database
from hctserver.errors import ConfigError
from hctserver.journal.retention import Cut, Pins, RetentionPolicy, plan
from hctserver.position import Entry
from hctserver.protocol import feedback, wire

from helpers import wait_until
from nodes import assert_identical, init_db, leader_node, snapshot_of
from procs import Procs, processes, stop, wal_size

WAL_BOUND = 256 << 20  # docs/JOURNAL.md, "Retention"


def _plan(policy: RetentionPolicy, **kw: object) -> Cut | None:
    args: dict[str, object] = {
        "baseline": 0,
        "snapshot": 1000,
        "total_bytes": 100_000,  # 100 bytes per entry
        "cid_for_bytes": lambda n: (n + 99) // 100 + 1,
        "aged_cid": None,
        "needs": [],
    }
    args.update(kw)
    return plan(policy, **args)  # type: ignore[arg-type]


def test_each_soft_limit_cuts_and_the_tightest_wins() -> None:
    off = RetentionPolicy(cids=0, bytes=0, seconds=0, max_bytes=0)
    assert not off.active and _plan(off) is None
    assert _plan(RetentionPolicy(cids=100, bytes=0, max_bytes=0)) == Cut(901)
    assert _plan(RetentionPolicy(cids=0, bytes=50_000, max_bytes=0)) == Cut(501)
    assert _plan(RetentionPolicy(cids=0, bytes=0, seconds=60, max_bytes=0), aged_cid=300) == Cut(
        301
    )
    both = RetentionPolicy(cids=100, bytes=50_000, max_bytes=0)
    assert _plan(both) == Cut(901)  # keep 100 entries (the tighter)
    assert _plan(RetentionPolicy(cids=5000, bytes=0, max_bytes=0)) is None  # all kept
    assert _plan(RetentionPolicy(cids=100, bytes=0, max_bytes=0), baseline=950) is None


def test_what_a_follower_needs_is_kept_until_the_hard_cap() -> None:
    p = RetentionPolicy(cids=100, bytes=0, max_bytes=80_000)
    assert _plan(p, needs=[(400, "f1"), (700, "f2")], total_bytes=60_000) == Cut(401)
    assert _plan(p, needs=[(0, "f1")], total_bytes=60_000) is None
    assert _plan(p, needs=[(0, "f1")], total_bytes=60_000, baseline=10) == Cut(901)
    forced = _plan(p, needs=[(0, "f1"), (950, "f2")], total_bytes=100_000)
    assert forced == Cut(201, True, ((0, "f1"),))  # 20,000 bytes over the cap go
    assert _plan(p, cid_for_bytes=lambda n: 5000) == Cut(1001, True)  # never past the snapshot


def test_what_the_archive_has_not_stored_is_kept_even_past_the_hard_cap() -> None:
    p = RetentionPolicy(cids=100, bytes=0, max_bytes=80_000)
    assert _plan(p, floor=500) == Cut(501)  # the soft limit would cut at 901
    assert _plan(p, floor=0) is None
    cap = RetentionPolicy(cids=0, bytes=0, max_bytes=80_000)
    assert _plan(cap, total_bytes=100_000) == Cut(201, True)  # the hard cap alone
    assert _plan(cap, floor=150, total_bytes=100_000) == Cut(151, True)  # held at the archive
    assert _plan(p, floor=2000) == Cut(901)  # an archive ahead holds nothing back


def test_the_policy_is_checked() -> None:
    with pytest.raises(ConfigError, match="hard cap"):
        RetentionPolicy(bytes=100, max_bytes=10)
    with pytest.raises(ConfigError, match="finite"):
        RetentionPolicy(seconds=float("inf"))
    with pytest.raises(ConfigError, match=">= 0"):
        RetentionPolicy(cids=-1)


def test_pins_hold_move_and_expire() -> None:
    pins = Pins()
    a = pins.hold(10, "SYNC")
    b = pins.hold(20, "snapshot")
    pins.move(a, 15)
    assert sorted(pins.held()) == [(15, "SYNC"), (20, "snapshot")]
    pins.release(a)
    pins.release(b, grace=5.0, now=100.0)
    assert pins.held(now=104.0) == [(20, "snapshot")]
    assert pins.held(now=105.0) == []
    c = pins.hold(30, "snapshot for 127.0.0.1:5000")
    pins.settle(29)
    assert pins.held() == [(30, "snapshot for 127.0.0.1:5000")]
    pins.settle(30)  # its follower SYNCs from there: the pin has done its job
    assert pins.held() == []
    pins.release(c)


# --- with real nodes ------------------------------------------------------------


def _policy(**kw: int) -> RetentionPolicy:
    return RetentionPolicy(**{"cids": 0, "bytes": 0, "seconds": 0, "max_bytes": 0, **kw})


def _feedback_client(port: int, applied: int, name: str) -> socket.socket:
    """A follower that reports ``applied`` on its feedback channel and stays."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(wire.encode_sync(feedback.PROBE_CID, feedback.PROBE_HASH))
    head = s.recv(8)
    kind, n = struct.unpack("<ii", head)
    assert kind == feedback.ACCEPT
    s.recv(n)
    s.sendall(feedback.encode_report(applied, applied, applied, name))
    return s


def test_the_leader_keeps_its_journal_bounded_but_keeps_what_followers_need(
    tmp_path, caplog
) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 3000)
    policy = _policy(cids=500, max_bytes=400_000)  # about 1,700 entries of 230 bytes
    leader = leader_node(lp, [], retention=policy, retain_interval=0.05)
    client = None
    try:
        wait_until(lambda: leader.db.baseline()[0] == 3001 - 500, 10, "cut to 500 entries")
        client = _feedback_client(leader.port, 2700, "slow follower")
        wait_until(lambda: len(leader.runner.followers) == 1, 5, "the report")
        c = leader.db.connect()
        for _ in range(3000):
            c.execute("BEGIN")
            c.execute("REPLACE INTO t1 VALUES(random() % 10000, randomblob(100), randomblob(100))")
            c.execute("COMMIT")
        c.close()
        wait_until(lambda: leader.db.baseline()[0] > 2700, 10, "the hard cap reached")
        assert leader.status()["retention"]["forced_cuts"] >= 1
        # the follower left behind needs nothing any more: the soft limit applies again
        wait_until(lambda: leader.db.baseline()[0] == 6001 - 500, 10, "500 entries again")
        assert any("past what slow follower (at cid 2700)" in r.message for r in caplog.records)
    finally:
        if client is not None:
            client.close()
        leader.close()


def test_a_sync_reply_in_progress_keeps_what_it_has_yet_to_send(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 60_000)  # a reply larger than the sockets' buffers
    leader = leader_node(lp, [], retention=_policy(cids=10**9), retain_interval=0.01)
    s = socket.create_connection(("127.0.0.1", leader.port), timeout=10)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        s.sendall(wire.encode_sync(0, bytes(16)))
        dec = wire.ReplyDecoder(wire.SYNC)
        cids: list[int] = []

        def read_some() -> None:
            data = s.recv(1 << 16)
            assert data, "the reply ended early"
            dec.feed(data)
            cids.extend(e.cid for e in dec.next_events() if isinstance(e, Entry))

        while len(cids) < 5000:  # the reply is under way; then it stalls on our window
            read_some()
        r = leader.runner
        r.retainer.policy = _policy(cids=10)

        def held_at_the_pin() -> bool:
            sent = min(cid for cid, who in r.pins.held() if who.startswith("SYNC"))
            return leader.db.baseline()[0] == sent < 60_000 - 10

        # retention cuts up to what the reply has sent, and no further
        wait_until(held_at_the_pin, 20, "a cut during the reply, held at its pin")
        while not dec.done:
            read_some()
        assert cids == list(range(1, 60_002))
    finally:
        s.close()
        leader.close()


def _rejoin(procs: Procs, fp: str, port: int, how: str) -> subprocess.Popen[str]:
    p = procs.follower(fp, port)
    wait_until(lambda: "caught up: streaming" in procs.stderr(p), 120, f"{fp} streaming")
    installed = "installed a snapshot" in procs.stderr(p)
    if how != "either":
        assert installed == (how == "bootstrap"), procs.stderr(p)
    return p


@pytest.mark.parametrize(
    "seconds, pause, retain",
    [
        pytest.param(25, (2, 12), ("--retain-cids", "60000"), id="25s"),
        pytest.param(600, (30, 300), (), id="10min", marks=pytest.mark.slow),
    ],
)
def test_soak_two_writers_with_retention_and_followers_that_stop(
    tmp_path, seconds: float, pause: tuple[float, float], retain: tuple[str, ...]
) -> None:
    """Journal and WAL stay bounded; a follower stopped briefly rejoins from
    the journal, one stopped for long from a snapshot; all end identical."""
    lp = str(tmp_path / "l.db")
    fps = [str(tmp_path / f"f{i}.db") for i in range(2)]
    init_db(lp)
    limit_cids = int(retain[1]) if retain else RetentionPolicy().cids
    with processes(str(tmp_path)) as procs:
        leader, port = procs.leader(lp, "--job", "writer", "--job", "writer", *retain)
        fs = [procs.follower(fp, port) for fp in fps]
        wait_until(lambda: all(snapshot_of(fp) > 1000 for fp in fps), 60, "followers streaming")
        t0 = time.monotonic()
        peaks = {"journal": 0, "wal": 0, "fwal": 0}
        stopped: dict[int, int] = {}
        fs_: list[subprocess.Popen[str] | None] = list(fs)
        while time.monotonic() < t0 + seconds or any(f is None for f in fs_):
            now = time.monotonic() - t0
            db = Database(lp, init=False)
            baseline = db.baseline()[0]
            peaks["journal"] = max(peaks["journal"], db.max_cid() - baseline)  # no holes
            db.close()
            for i, length in enumerate(pause):
                f = fs_[i]
                if i not in stopped and f is not None and now >= 1:
                    stop(f)
                    stopped[i] = snapshot_of(fps[i])
                    fs_[i] = None
                elif f is None and now >= 1 + length:
                    if i == 1 and baseline <= stopped[i]:
                        continue  # the long-stopped one waits until retention passed it
                    ahead = stopped[i] - baseline
                    how = "bootstrap" if i == 1 else "journal" if ahead > 10_000 else "either"
                    fs_[i] = _rejoin(procs, fps[i], port, how)
            peaks["wal"] = max(peaks["wal"], wal_size(lp))
            peaks["fwal"] = max(peaks["fwal"], *(wal_size(fp) for fp in fps))
            time.sleep(0.5)  # the sampling interval (nothing waits on it)
        assert leader.poll() is None
        stop(leader)
        final = snapshot_of(lp)
        for fp in fps:
            wait_until(lambda fp=fp: snapshot_of(fp) == final, 120, "followers at the end")
        for f in fs_:
            assert f is not None
            stop(f)
        log = procs.stderr(leader)
    truncated = Database(lp, init=False).baseline()[0]
    print(
        f"\nretention soak {seconds:g} s: {final:,} commits, baseline {truncated:,};"
        f" journal peak {peaks['journal']:,} entries, leader WAL peak"
        f" {peaks['wal'] / 2**20:.0f} MiB, follower WAL peak {peaks['fwal'] / 2**20:.0f} MiB;"
        f" leader file {os.path.getsize(lp) / 2**20:.0f} MiB"
    )
    assert truncated > 0
    # docs/JOURNAL.md: the limit, plus about five seconds of commits
    rate = final / (time.monotonic() - t0)
    assert peaks["journal"] <= limit_cids + 5 * rate, (peaks, rate)
    assert peaks["wal"] < WAL_BOUND and peaks["fwal"] < WAL_BOUND, peaks
    assert re.search(r"sent \S+ its snapshot", log)
    assert_identical(lp, *fps)
