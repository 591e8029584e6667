"""Leaders and followers over real sockets on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading

import pytest

from hctserver import Database
from hctserver.errors import ConnectionLostError, IncompatibleError, PeerError, ProtocolError

import dbdump
from helpers import replay, wait_until
from nodes import (
    FakeLeader,
    assert_identical,
    follower_node,
    gated_writer,
    idle_job,
    init_db,
    leader_node,
    settled_bytes,
    snapshot_of,
)


def test_six_writers_a_monitor_and_two_followers_end_identical(tmp_path, capsys) -> None:
    lp, ap, bp = (str(tmp_path / n) for n in ("l.db", "a.db", "b.db"))
    init_db(lp)
    gate = threading.Event()
    leader = leader_node(lp, [gated_writer(gate)] * 6 + ["monitor"])
    a = follower_node(ap, leader.port)  # before the jobs write anything
    wait_until(lambda: a.runner.stats.phase == "stream", what="follower A streaming")
    gate.set()
    wait_until(lambda: leader.db.max_cid() > 3000, what="3000 commits")
    b = follower_node(bp, leader.port, syncthreads=4, syncbytes=20_000)
    wait_until(lambda: b.runner.stats.phase == "stream", what="follower B streaming")
    joined_at = leader.db.max_cid()
    wait_until(lambda: leader.db.max_cid() > joined_at + 1000, what="commits after B joined")
    leader.runner.timeout.expire()
    leader.wait()
    a.wait(60)
    b.wait(60)
    assert_identical(lp, ap, bp)
    assert b.runner.stats.sync_entries >= 3000  # B caught up from a non-empty journal
    assert a.runner.stats.sub_entries > 0 and b.runner.stats.sub_entries > 0
    assert "max cid:" in capsys.readouterr().out


def test_a_stopped_follower_restarts_and_converges(tmp_path) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 200)
    gate = threading.Event()
    gate.set()
    leader = leader_node(lp, [gated_writer(gate)] * 2)
    f = follower_node(fp, leader.port)
    wait_until(lambda: f.runner.stats.phase == "stream" and f.runner.stats.sub_entries > 200)
    f.runner.stop()
    f.wait(30)  # a stop on request is not an error, whatever was in flight
    f.close()
    snap = Database(fp, init=False).position()
    ref = replay(Database(lp, init=False), str(tmp_path / "ref.db"), upto=snap.cid)
    assert dbdump.tables(fp) == dbdump.tables(ref.path)  # nothing half-applied
    g = follower_node(fp, leader.port, syncthreads=2)
    wait_until(lambda: g.runner.stats.phase == "stream")
    leader.runner.timeout.expire()
    leader.wait()
    g.wait(60)
    assert_identical(lp, fp)


CHILD = (
    "import sys\n"
    "from hctserver.node.testserver import Node\n"
    "n = Node(sys.argv[1], follower=True, port=int(sys.argv[2]), syncthreads=2)\n"
    "n.extra['bootstrap'] = False  # this test is about replay\n"
    "n.run()\n"
)


def test_a_follower_killed_during_catch_up_restarts_and_converges(tmp_path) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 60_000)
    total = Database(lp, init=False).max_cid()
    gate = threading.Event()
    leader = leader_node(lp, [gated_writer(gate)])
    child = subprocess.Popen([sys.executable, "-c", CHILD, fp, str(leader.port)])
    try:
        wait_until(lambda: snapshot_of(fp) > 0, what="the child applying its first batch")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    killed_at = Database(fp).position()
    assert 0 < killed_at.cid < total  # it really was in the middle of catching up
    ref = replay(Database(lp, init=False), str(tmp_path / "ref.db"), upto=killed_at.cid)
    assert dbdump.tables(fp) == dbdump.tables(ref.path)
    gate.set()  # the leader writes on while the follower comes back
    g = follower_node(fp, leader.port)
    wait_until(lambda: g.runner.stats.phase == "stream")
    leader.runner.timeout.expire()
    leader.wait()
    g.wait(60)
    assert_identical(lp, fp)


def _diverge(src: str, dst: str, upto_cid: int, extra: int) -> None:
    """dst: src's history up to ``upto_cid``, then ``extra`` commits of its own."""
    replay(Database(src, init=False), dst, upto=upto_cid).close()
    d = Database(dst)
    d.set_mode("leader")
    c = d.connect()
    for i in range(extra):
        c.execute("INSERT OR REPLACE INTO t1 VALUES(?, 'other', 'history')", (i,))
    c.close()
    d.close()


def test_diverged_and_ahead_followers_are_refused_and_left_untouched(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 100)
    diverged, ahead = str(tmp_path / "div.db"), str(tmp_path / "ahead.db")
    _diverge(lp, diverged, 50, 20)  # cid 70 exists on both, with different content
    shutil.copy(lp, ahead)
    _diverge(lp, ahead, 101, 5)  # cid 106 > the leader's 101
    before = {p: settled_bytes(p) for p in (diverged, ahead)}
    leader = leader_node(lp, [idle_job])
    for p in (diverged, ahead):
        f = follower_node(p, leader.port)
        with pytest.raises(IncompatibleError, match="incompatible database version"):
            f.wait(30)
        f.close()
        assert settled_bytes(p) == before[p]
    good = follower_node(str(tmp_path / "good.db"), leader.port)
    wait_until(lambda: good.runner.stats.phase == "stream")
    leader.runner.timeout.expire()
    leader.wait()
    good.wait(30)
    assert_identical(lp, str(tmp_path / "good.db"))


def _exchange(port: int, data: bytes, *, shut: bool = True, timeout: float = 10) -> bytes:
    """Send raw bytes to the leader and read until it closes (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if data:
            s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def _error_text(reply: bytes) -> str:
    t, n = struct.unpack_from("<ii", reply)
    assert t == 3, reply[:16]
    assert len(reply) == 8 + n and reply[-1] == 0
    return reply[8:-1].decode()


def test_malformed_requests_get_an_error_and_the_leader_carries_on(tmp_path) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    lp = str(tmp_path / "l.db")
    init_db(lp, 50)
    gate = threading.Event()
    gate.set()
    leader = leader_node(lp, [gated_writer(gate)] * 2, request_timeout=0.5, max_subscribers=1)
    port = leader.port
    assert "unknown message type 7" in _error_text(_exchange(port, struct.pack("<i", 7)))
    # two jobs and the stream of other writers: streams 0, 1 and 2
    assert "no such job: 3" in _error_text(_exchange(port, struct.pack("<ii", 2, 3)))
    assert "no such job: -1" in _error_text(_exchange(port, struct.pack("<ii", 2, -1)))
    truncated = _exchange(port, struct.pack("<iq", 1, 0)[:10])
    assert "middle of a message" in _error_text(truncated)
    silent = _exchange(port, struct.pack("<iq", 1, 0)[:10], shut=False)
    assert "no complete request within 0.5 s" in _error_text(silent)
    assert "no complete request" in _error_text(_exchange(port, b"", shut=False))
    assert _exchange(port, b"") == b""  # connect and close: nothing to answer
    bad_hash = struct.pack("<iq", 1, 10) + b"\x01" * 16
    assert _error_text(_exchange(port, bad_hash)) == "incompatible database version"
    with socket.create_connection(("127.0.0.1", port)) as first:
        first.sendall(struct.pack("<ii", 2, 0))
        assert first.recv(4) == struct.pack("<i", 5)
        too_many = _exchange(port, struct.pack("<ii", 2, 0))
        assert "too many subscribers for job 0 (the limit is 1)" in _error_text(too_many)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=64))
    def random_bytes(data: bytes) -> None:
        reply = _exchange(port, data, timeout=5)
        if reply:
            t = struct.unpack_from("<i", reply)[0]
            assert t in (3, 4, 5)

    random_bytes()
    f = follower_node(str(tmp_path / "f.db"), port)
    wait_until(lambda: f.runner.stats.phase == "stream")
    leader.runner.timeout.expire()
    leader.wait()
    f.wait(30)
    assert_identical(lp, str(tmp_path / "f.db"))


def test_a_subscriber_that_never_reads_is_dropped(tmp_path) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp)
    gate = threading.Event()
    leader = leader_node(lp, [gated_writer(gate)] * 2, sub_buffer_bytes=200_000)
    lazy = socket.socket()
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.connect(("127.0.0.1", leader.port))
    lazy.sendall(struct.pack("<ii", 2, 0))
    assert lazy.recv(4) == struct.pack("<i", 5)
    f = follower_node(fp, leader.port)
    wait_until(lambda: f.runner.stats.phase == "stream")
    gate.set()
    wait_until(lambda: leader.runner.dropped >= 1, what="the lazy subscriber dropped")
    dropped_at = leader.db.max_cid()
    wait_until(lambda: leader.db.max_cid() > dropped_at + 2000, what="jobs running on")
    leader.runner.timeout.expire()
    leader.wait()
    f.wait(60)
    lazy.close()
    assert_identical(lp, fp)


# --- a follower facing a misbehaving leader ---------------------------------------------


def _entries_bytes(src: str, upto: int) -> bytes:
    from hctserver.protocol import wire

    return b"".join(
        wire.encode_entry(*e) for e in Database(src, init=False).iter_entries(upto=upto)
    )


def _misbehaving_replies(lp: str) -> dict[str, bytes]:
    good = _entries_bytes(lp, 3)
    header = struct.pack("<ii", 4, 1)
    return {
        "garbage": b"hello world, this is not the protocol",
        "truncated": header + good + struct.pack("<iqq", 100, 4, 1) + b"only part",
        "vanished": header + good,
        "error": struct.pack("<ii", 3, 8) + b"go away\x00",
        "huge": header + struct.pack("<i", 2**31 - 1),
    }


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        ("garbage", ProtocolError, "unexpected reply type to SYNC - 1819043176"),
        ("truncated", ConnectionLostError, "in the middle of a message"),
        ("vanished", ConnectionLostError, "before the end of the SYNCREPLY"),
        ("error", PeerError, "error from leader: go away"),
        ("huge", ProtocolError, "exceeds the limit"),
    ],
)
def test_a_follower_stops_cleanly_on_a_misbehaving_leader(
    tmp_path, name: str, error: type[Exception], match: str
) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 10)
    fake = FakeLeader(_misbehaving_replies(lp)[name])
    fp = str(tmp_path / "f.db")
    f = follower_node(fp, fake.port, extra={"max_size": 1 << 20})  # once: give up at once
    with pytest.raises(error, match=match):
        f.wait(30)
    f.close()
    fake.close()
    snap = Database(fp).position()
    assert snap.cid in (0, 3)  # whole entries only
    ref = replay(Database(lp, init=False), str(tmp_path / "ref.db"), upto=snap.cid)
    assert dbdump.tables(fp) == dbdump.tables(ref.path)


@pytest.mark.parametrize("name", ["garbage", "huge", "error"])
def test_a_service_follower_stops_on_a_protocol_violation(tmp_path, name: str) -> None:
    """Final errors end a follower in its default mode too."""
    lp = str(tmp_path / "l.db")
    init_db(lp, 10)
    fake = FakeLeader(_misbehaving_replies(lp)[name])
    f = follower_node(str(tmp_path / "f.db"), fake.port, once=False, extra={"max_size": 1 << 20})
    with pytest.raises((ProtocolError, PeerError)):
        f.wait(30)
    f.close()
    fake.close()


@pytest.mark.parametrize("name", ["truncated", "vanished"])
def test_a_service_follower_retries_a_leader_that_vanishes(tmp_path, name: str) -> None:
    """A leader that dies mid-reply is a lost leader: back off and try again;
    the whole entries received meanwhile are applied."""
    lp = str(tmp_path / "l.db")
    init_db(lp, 10)
    fake = FakeLeader(_misbehaving_replies(lp)[name])
    f = follower_node(
        str(tmp_path / "f.db"),
        fake.port,
        once=False,
        extra={"retry_initial": 0.01, "retry_max": 0.05},
    )
    try:
        wait_until(lambda: f.runner.session.reconnects >= 3, what="three reconnects")
        assert not f.wait(0) and f.error is None
        assert f.runner.stats.snapshot == 3
    finally:
        f.close()
        fake.close()
    assert f.error is None


def test_a_follower_stopped_with_entries_above_a_hole_stops_cleanly(tmp_path) -> None:
    from hctserver.protocol import wire

    lp = str(tmp_path / "l.db")
    init_db(lp, 6)
    es = list(Database(lp, init=False).iter_entries())
    sync = wire.encode_syncreply(1, es[:3])
    sub = wire.encode_subreply_start() + wire.encode_entry(*es[4])  # cid 5: 4 never comes
    fake = FakeLeader(sync, sub)
    fp = str(tmp_path / "f.db")
    f = follower_node(fp, fake.port)
    wait_until(lambda: f.runner.stats.sub_entries == 1 and f.runner.stats.snapshot == 3)
    f.stop()
    f.wait(30)  # no error: the hole is what a stop in mid-stream leaves
    f.close()
    fake.close()
    assert Database(fp).position() == (3, Database(lp, init=False).hash_at(3))


def test_a_hole_the_streams_never_fill_is_asked_for_again(tmp_path, caplog) -> None:
    """A streaming follower whose entries wait above a hole SYNCs again
    instead of waiting for ever (here the leader's first two replies lack cid
    4, which only the third has)."""
    from hctserver.protocol import wire

    lp = str(tmp_path / "l.db")
    init_db(lp, 6)
    es = list(Database(lp, init=False).iter_entries())
    early, later = wire.encode_syncreply(1, es[:3]), wire.encode_syncreply(1, es[:6])
    sub = wire.encode_subreply_start() + wire.encode_entry(*es[4])  # cid 5
    fake = FakeLeader([early, early, later], sub)
    fp = str(tmp_path / "f.db")
    f = follower_node(fp, fake.port, once=False, extra={"hole_timeout": 0.2})
    try:
        wait_until(lambda: f.runner.stats.snapshot == 6, what="the hole filled")
        assert fake.served >= 3
        assert "missing from the streams; asking again" in caplog.text
    finally:
        f.close()
        fake.close()
    assert Database(fp).position() == (6, Database(lp, init=False).hash_at(6))


@pytest.mark.slow
def test_soak_six_writers_with_followers_restarting(tmp_path) -> None:
    """The original's workload while one follower is stopped and started again
    four times (20,000 commits apart) and another follows throughout.
    Run with --runslow."""
    lp, ap, bp = (str(tmp_path / n) for n in ("l.db", "a.db", "b.db"))
    init_db(lp)
    gate = threading.Event()
    gate.set()
    leader = leader_node(lp, [gated_writer(gate)] * 6)
    a = follower_node(ap, leader.port, syncthreads=2)
    for _ in range(4):
        b = follower_node(bp, leader.port)
        wait_until(lambda b=b: b.runner.stats.phase == "stream", timeout=60)
        target = leader.db.max_cid() + 20_000
        wait_until(lambda t=target: leader.db.max_cid() > t, timeout=60)
        b.runner.stop()
        b.wait(60)
        b.close()
    b = follower_node(bp, leader.port)
    wait_until(lambda: b.runner.stats.phase == "stream", timeout=60)
    leader.runner.timeout.expire()
    leader.wait()
    a.wait(120)
    b.wait(120)
    assert_identical(lp, ap, bp)
