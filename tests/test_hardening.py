"""Hostile peers, unlucky operators and full disks: every resource a peer can
make a node spend is bounded, and bad input is refused with nothing lost.

Each test runs the attack, checks the bound or the refusal, then shows that
the node still serves a real follower (or writes, for a leader) and that
nothing was lost. The numbers in the names are the items of issue 9.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import apsw
import pytest

from hctserver import Database
from hctserver.errors import (
    DatabaseInUseError,
    NotReplicationDatabaseError,
    ProtocolError,
    TimedOutError,
)
from hctserver.node.testserver import Node
from hctserver.position import Entry
from hctserver.protocol import wire

import dbdump
from helpers import replay, wait_until
from nodes import (
    FakeLeader,
    assert_identical,
    follower_node,
    init_db,
    leader_node,
    snapshot_of,
)
from procs import HCT, processes, stop, wal_size


def sync_from_zero() -> bytes:
    return wire.encode_sync(0, bytes(16))


def lazy_socket(port: int, request: bytes) -> socket.socket:
    """A client that sends ``request`` and then never reads (tiny buffer)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(request)
    return s


def read_reply(s: socket.socket, limit: int = 1 << 16) -> bytes:
    s.settimeout(10)
    out = b""
    while len(out) < limit:
        chunk = s.recv(4096)
        if not chunk:
            break
        out += chunk
    return out


def streams_soon(f: Node, seconds: float = 10.0) -> None:
    wait_until(lambda: f.runner.stats.phase == "stream", seconds, "the real follower streaming")


def real_follower_streams_within_2s(path: str, port: int, **options: Any) -> Node:
    """After an attack: a real follower starts and streams within 2 s."""
    t0 = time.monotonic()
    f = follower_node(path, port, **options)
    streams_soon(f)
    assert time.monotonic() - t0 < 2.0
    return f


# --- 2. one client pins the WAL ---------------------------------------------------------------


def test_2_a_sync_reader_that_never_reads_pins_nothing(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 30_000)  # a reply far larger than the socket buffers
    gate = threading.Event()
    leader = leader_node(lp, [_gated_writer(gate)])
    attacker = lazy_socket(leader.port, sync_from_zero())
    try:
        wait_until(lambda: leader.runner.syncs_served == 0 and _stalled(leader), 30, "stalled")
        gate.set()
        start, peak = leader.db.max_cid(), 0
        while leader.db.max_cid() < start + 30_000:  # about 350 MB of WAL if pinned
            peak = max(peak, wal_size(lp))
            time.sleep(0.02)  # the sampling interval (nothing waits on it)
        # the reply is stalled, but no read transaction stays open meanwhile:
        # the checkpointer keeps the WAL within its bound
        assert peak < 100 << 20, peak
        attacker.close()
        f = follower_node(str(tmp_path / "f.db"), leader.port)
        streams_soon(f)
    finally:
        attacker.close()
        leader.runner.timeout.expire()
        leader.wait(60)
    f.wait(60)
    assert_identical(lp, str(tmp_path / "f.db"))


def _stalled(leader: Node) -> bool:
    """The leader is blocked sending a SYNC reply (a handler thread is busy)."""
    return any(t.name.startswith("hct-serve-") for t in threading.enumerate())


def test_2_a_sync_reader_that_never_reads_is_cut_off(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 30_000)
    leader = leader_node(lp, [], send_timeout=1.0)
    attacker = lazy_socket(leader.port, sync_from_zero())
    try:
        wait_until(lambda: _stalled(leader), 30, "the reply stalled")
        t0 = time.monotonic()
        wait_until(lambda: not _stalled(leader), 30, "the reply cut off")
        assert time.monotonic() - t0 < 5
        got = read_reply(attacker, 1 << 30)  # what it was sent, then the end
        assert 0 < len(got) < 30_000 * 250
        f = follower_node(str(tmp_path / "f.db"), leader.port)
        streams_soon(f)
    finally:
        attacker.close()
        leader.close()
    f.wait(30)
    f.close()
    assert snapshot_of(str(tmp_path / "f.db")) == 30_001


def _gated_writer(gate: threading.Event) -> Any:
    from nodes import gated_writer

    return gated_writer(gate)


# --- 3. the request deadline, per request ------------------------------------------------


def test_3_clients_trickling_bytes_are_cut_and_a_follower_gets_through(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 50)
    leader = leader_node(lp, [], request_timeout=1.0, max_connections=8)
    stop_attack = threading.Event()
    cut: list[float] = []

    def trickler() -> None:
        while not stop_attack.is_set():
            s = socket.create_connection(("127.0.0.1", leader.port))
            t0 = time.monotonic()
            try:
                for b in sync_from_zero():  # one byte every 0.3 s: never a whole request
                    s.sendall(bytes([b]))
                    if stop_attack.wait(0.3):
                        return
            except OSError:
                cut.append(time.monotonic() - t0)
            finally:
                s.close()

    attackers = [threading.Thread(target=trickler, daemon=True) for _ in range(12)]
    for t in attackers:
        t.start()
    try:
        wait_until(lambda: len(cut) >= 12, 30, "trickling clients cut off")
        assert max(cut) < 5  # per request: 1 s, or at once when a slot was needed
        f = real_follower_streams_within_2s(str(tmp_path / "f.db"), leader.port, once=False)
    finally:
        stop_attack.set()
        for t in attackers:
            t.join(10)
        leader.close()
    f.close()
    assert snapshot_of(str(tmp_path / "f.db")) == 51


# --- 4. lock-outs ----------------------------------------------------------------------------


def test_4_a_hundred_idle_connections_do_not_lock_a_follower_out(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 50)
    leader = leader_node(lp, [])
    idle = []
    try:
        for _ in range(100):
            idle.append(socket.create_connection(("127.0.0.1", leader.port)))
        f = real_follower_streams_within_2s(str(tmp_path / "f.db"), leader.port, once=False)
        f.close()
    finally:
        for s in idle:
            s.close()
        leader.close()
    assert snapshot_of(str(tmp_path / "f.db")) == 51


def test_4_subscribers_that_never_read_are_dropped_in_bounded_time(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp)
    gate = threading.Event()
    leader = leader_node(lp, [_gated_writer(gate)], max_subscribers=4, sub_stall_timeout=1.0)
    lazy = [lazy_socket(leader.port, wire.encode_sub(0)) for _ in range(4)]
    try:
        # the four are served by threads of their own: the fifth must come after them
        wait_until(lambda: leader.runner.subscriber_counts()[0] == 4, 30, "four subscribers")
        full = read_reply(_connected(leader.port, wire.encode_sub(0)), 200)  # the limit is reached
        assert b"too many subscribers for job 0" in full
        gate.set()
        wait_until(lambda: leader.runner.dropped >= 4, 30, "the lazy subscribers dropped")
        f = real_follower_streams_within_2s(str(tmp_path / "f.db"), leader.port)
    finally:
        for s in lazy:
            s.close()
        leader.runner.timeout.expire()
        leader.wait(60)
    f.wait(60)
    assert_identical(lp, str(tmp_path / "f.db"))


def _wal_resets(db: str) -> int:
    """The WAL header's checkpoint sequence number (it moves at every reset)."""
    try:
        with open(db + "-wal", "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        return -1
    return int.from_bytes(head[12:16], "big") if len(head) == 16 else -1


def _connected(port: int, request: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(request)
    return s


def test_4_sync_readers_take_turns_and_writers_go_on(tmp_path) -> None:
    """Twenty SYNC-from-0 readers that never read: replies are framed two at a
    time and a stalled one holds no slot, so commits go on and a real
    follower is served at once."""
    lp = str(tmp_path / "l.db")
    init_db(lp, 20_000)
    gate = threading.Event()
    leader = leader_node(lp, [_gated_writer(gate)], send_timeout=2.0)
    readers = [lazy_socket(leader.port, sync_from_zero()) for _ in range(20)]
    try:
        gate.set()
        before, resets = leader.db.max_cid(), _wal_resets(lp)
        # none of the twenty pins the WAL: it is reset (checkpointed from its
        # start) while they stall, which a reader holding a snapshot forbids.
        # A property, not a size: a loaded machine checkpoints late, not never.
        wait_until(lambda: _wal_resets(lp) != resets, 120, "a WAL reset while the readers stall")
        wait_until(lambda: leader.db.max_cid() >= before + 20_000, 120, "commits going on")
        f = real_follower_streams_within_2s(str(tmp_path / "f.db"), leader.port)
    finally:
        for s in readers:
            s.close()
        leader.runner.timeout.expire()
        leader.wait(60)
    f.wait(60)
    assert_identical(lp, str(tmp_path / "f.db"))


# --- 5. no SQL from the wire ------------------------------------------------------------


def _schema_attack(
    tmp_path: Any, schema: str, data: bytes = b""
) -> tuple[str, str, dict[str, Any]]:
    """A follower caught up to cid 5 of a real leader, then a fake leader that
    sends ``schema``/``data`` as cid 6: returns (follower path, error, its
    tables, schema and journal before)."""
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 4)
    replay(Database(lp, init=False), fp).close()
    before = dbdump.everything(fp)
    es = list(Database(lp, init=False).iter_entries())
    evil = Entry(6, 1, schema, data)
    fake = FakeLeader(wire.encode_syncreply(1, [*es, evil]), wire.encode_subreply_start())
    f = follower_node(fp, fake.port)
    with pytest.raises(ProtocolError) as err:
        f.wait(30)
    f.close()
    fake.close()
    return fp, str(err.value), before


@pytest.mark.parametrize(
    ("schema", "what"),
    [
        (
            "ATTACH '{dir}/outside.db' AS x; CREATE TABLE x.t(a); INSERT INTO x.t VALUES(1)",
            "ATTACH",
        ),
        ("DELETE FROM hct_journal; UPDATE hct_baseline SET cid = 0", "row write to hct_journal"),
        ("CREATE TABLE ok(a); INSERT INTO t1 VALUES(99, 'planted', 'row')", "row write to t1"),
        ("PRAGMA writable_schema = 1", "PRAGMA"),
        ("DROP TABLE hct_journal", "'hct_journal'"),
        ("CREATE TEMP TABLE tmp(a)", "CREATE TEMP TABLE"),
        ("COMMIT; CREATE TABLE after_commit(a)", "TRANSACTION"),
    ],
)
def test_5_a_leader_cannot_run_sql_outside_the_schema_rules(
    tmp_path, schema: str, what: str
) -> None:
    fp, err, before = _schema_attack(tmp_path, schema.format(dir=tmp_path))
    assert "cid 6" in err and what in err, err
    assert not (tmp_path / "outside.db").exists()
    assert dbdump.everything(fp) == before  # nothing of it applied
    _still_follows(tmp_path, fp)


def test_5_data_for_a_system_table_is_refused(tmp_path) -> None:
    from hctserver.journal import patchset

    data = patchset.encode_table("hct_baseline", [1, 0, 0]) + patchset.encode_insert(
        (99, 0, bytes(16))
    )
    fp, err, before = _schema_attack(tmp_path, "", data)
    assert "cid 6" in err and "'hct_baseline'" in err, err
    assert dbdump.everything(fp) == before
    _still_follows(tmp_path, fp)


def _still_follows(tmp_path: Any, fp: str) -> None:
    """The refused follower's file is sound and a real leader serves it."""
    lp = str(tmp_path / "l.db")
    c = apsw.Connection(fp)
    assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    c.close()
    leader = leader_node(lp, [])
    f = follower_node(fp, leader.port)
    try:
        streams_soon(f)
    finally:
        leader.close()
    f.wait(30)
    f.close()
    assert_identical(lp, fp)


# --- 6. a leader cannot exhaust a follower ----------------------------------------------------


def test_6_a_million_streams_are_refused_before_any_socket(tmp_path) -> None:
    fake = FakeLeader(struct.pack("<ii", 4, 1_000_000) + struct.pack("<i", 0))
    fds = len(os.listdir("/proc/self/fd"))
    f = follower_node(str(tmp_path / "f.db"), fake.port)
    with pytest.raises(ProtocolError, match="announces 1000000 streams"):
        f.wait(30)
    f.close()
    fake.close()
    assert len(os.listdir("/proc/self/fd")) <= fds + 2


def test_6_a_huge_entry_is_refused_before_it_is_allocated(tmp_path) -> None:
    header = struct.pack("<ii", 4, 1) + struct.pack("<iqq", 1 << 30, 1, 0)
    fake = FakeLeader(header)  # announces a 1 GiB entry, sends 16 bytes of it
    f = follower_node(str(tmp_path / "f.db"), fake.port)
    with pytest.raises(ProtocolError, match="exceeds the limit of 33554432 bytes"):
        f.wait(30)
    f.close()
    fake.close()


def test_6_a_leader_sending_a_byte_at_a_time_is_cut_off(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 3)
    reply = wire.encode_syncreply(1, list(Database(lp, init=False).iter_entries()))
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def trickle(conn: socket.socket) -> None:
        conn.recv(64)
        try:
            for b in reply:
                conn.sendall(bytes([b]))
                time.sleep(0.5)  # the attack itself: a byte every half second
        except OSError:
            pass
        finally:
            conn.close()

    def serve() -> None:
        with srv:
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    t0 = time.monotonic()
    f = follower_node(str(tmp_path / "f.db"), port, extra={"io_timeout": 2.0})
    with pytest.raises(TimedOutError, match="no whole entry from the leader for 2 s"):
        f.wait(30)
    assert time.monotonic() - t0 < 10
    f.close()
    srv.close()


def _big_entries(n: int, size: int) -> bytes:
    from hctserver.journal import patchset

    es = [Entry(1, 0, "CREATE TABLE big(a INTEGER PRIMARY KEY, b)", b"")]
    header = patchset.encode_table("big", [1, 0])
    es += [
        Entry(c, 1, "", header + patchset.encode_insert((c, os.urandom(16) * (size // 16))))
        for c in range(2, n + 2)
    ]
    return wire.encode_syncreply(1, es)


FOLLOW_AND_REPORT = """
import resource, sys
from hctserver.node.testserver import Node
f = Node(sys.argv[1], follower=True, port=int(sys.argv[2]))
f.start()
f.db.wait_for(int(sys.argv[3]), timeout=300)
print("snapshot", f.db.snapshot())
print("rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
f.close()
"""


@pytest.mark.parametrize(
    "n", [pytest.param(250, id="250MB"), pytest.param(2001, id="2GB", marks=pytest.mark.slow)]
)
def test_6_entries_held_before_apply_are_bounded_in_bytes(tmp_path, n: int) -> None:
    """syncthreads 1 held up to 40,000 entries before applying, whatever their
    size: 1 MB entries now go to SQLite every 16 MiB."""
    fake = FakeLeader(_big_entries(n, 1 << 20), wire.encode_subreply_start())
    # Through sh, which forks: a process exec'd straight from this (large) one
    # would report this one's peak as its own ru_maxrss.
    follow = [sys.executable, "-c", FOLLOW_AND_REPORT, str(tmp_path / "f.db"), str(fake.port)]
    follow.append(str(n + 1))
    p = subprocess.run(
        ["sh", "-c", '"$@"; exit $?', "sh", *follow],
        capture_output=True,
        text=True,
        timeout=600,
    )
    fake.close()
    out = dict(line.split(" ", 1) for line in p.stdout.splitlines())
    assert int(out["snapshot"]) == n + 1, p.stdout + p.stderr
    assert float(out["rss_mb"]) < 200, out  # not n MB: 16 MiB held, then applied


# --- 7. outcomes that say what happened ------------------------------------------------------


def test_7_a_malformed_entry_is_a_protocol_error_naming_its_cid(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 4)
    es = list(Database(lp, init=False).iter_entries())
    bad = es[3]._replace(data=es[3].data[:9])
    fake = FakeLeader(wire.encode_syncreply(1, [*es[:3], bad]), wire.encode_subreply_start())
    with processes(str(tmp_path)) as procs:
        f = procs.follower(str(tmp_path / "f.db"), fake.port, "--once")
        assert f.wait(60) == 5
        last = procs.stderr(f).strip().splitlines()[-1]
    fake.close()
    assert "cid 4: the entry's data is not a valid session patchset" in last, last
    assert "malformed" not in last.split("(")[0]
    assert snapshot_of(str(tmp_path / "f.db")) <= 3  # whole batches only


def test_7_commands_refuse_files_they_were_not_meant_for(tmp_path) -> None:
    plain = tmp_path / "plain.db"
    c = sqlite3.connect(plain)
    c.execute("CREATE TABLE mine(a)")
    c.execute("INSERT INTO mine VALUES(1)")
    c.commit()
    c.close()
    before = plain.read_bytes()
    p = subprocess.run(
        [*HCT, "follower", str(plain), "--port", "1", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 3 and "holds tables but is not a replication database" in p.stderr
    assert "hctserver init" in p.stderr
    assert plain.read_bytes() == before
    for args, code, match in [
        (["leader", str(tmp_path / "typo.db")], 3, "no such database"),
        (["leader", str(tmp_path / "x.db"), "--seconds", "nan"], 2, "finite"),
        (["truncate", str(plain), "--min-cid", "-5"], 2, "at least 1"),
        (["follower", str(tmp_path / "y.db"), "--max-entry-bytes", "0"], 2, "at least 1"),
        (["leader", str(tmp_path / "x.db"), "--request-timeout", "inf"], 2, "finite"),
    ]:
        p = subprocess.run([*HCT, *args], capture_output=True, text=True, timeout=60)
        assert p.returncode == code and match in p.stderr, (args, p.stderr)
    assert not (tmp_path / "typo.db").exists()


def test_7_a_path_blocked_by_permissions_says_so(tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    init_db(str(locked / "l.db"), 1)
    locked.chmod(0)
    try:
        if os.geteuid() != 0:
            p = subprocess.run(
                [*HCT, "status", str(locked / "l.db")], capture_output=True, text=True, timeout=60
            )
            assert p.returncode == 3, p.stderr
            said = p.stderr
        else:
            said = _as_nobody(lambda: Database(str(locked / "l.db"), init=False))
    finally:
        locked.chmod(0o755)
    assert "permission denied" in said and "no such database" not in said, said


def _as_nobody(fn: Any) -> str:
    """Run ``fn`` in a forked child as the user nobody (root reads anything);
    return the message of the error it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no threads of its own, and it leaves through os._exit
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            try:
                fn()
                msg = "no error"
            except NotReplicationDatabaseError as e:
                msg = str(e)
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        msg = f.read()
    os.waitpid(pid, 0)
    return msg


# --- 8. one node per file --------------------------------------------------------------------


def test_8_a_second_node_on_a_database_is_refused(tmp_path) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 5)
    with processes(str(tmp_path)) as procs:
        first, port = procs.leader(lp)
        follower = procs.follower(fp, port)
        wait_until(lambda: snapshot_of(fp) == 6, 30, "the follower caught up")
        second = [
            ["leader", lp, "--port", "0"],
            ["follower", lp, "--port", str(port)],
            ["leader", fp, "--port", "0"],
            ["follower", fp, "--port", str(port)],
        ]
        for args in second:
            p = subprocess.run([*HCT, *args], capture_output=True, text=True, timeout=60)
            assert p.returncode == 3, (args, p.stderr)
            assert "is already served by a node" in p.stderr and "pid" in p.stderr
        # the lock dies with its holder, however it dies
        first.kill()
        first.wait(30)
        again, _ = procs.leader(lp, port=port)
        c = sqlite3.connect(lp)
        with pytest.raises(sqlite3.IntegrityError):  # still guarded while nobody serves
            c.execute("DELETE FROM t1")
        c.close()
        app = Database(lp, init=False)
        app.set_mode("leader")
        conn = app.connect()
        conn.execute("INSERT INTO t1 VALUES(777, 'after', 'restart')")
        conn.close()
        wait_until(lambda: snapshot_of(fp) == 7, 30, "the new leader's commit at the follower")
        for p in (follower, again):
            stop(p)
    assert_identical(lp, fp)


def test_8_the_lock_is_per_file_in_one_process_too(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 1)
    a = leader_node(lp, [])
    try:
        b = Node(lp, port=0)
        with pytest.raises(DatabaseInUseError, match=r"already served by a node \(leader, pid"):
            b.start()
        b.close()
    finally:
        a.close()
    c = leader_node(lp, [])  # released on close
    c.close()


# --- 9. edits to old journal rows ---------------------------------------------------------


def test_9_an_edited_old_journal_row_is_found(tmp_path) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 50)
    replay(Database(lp, init=False), fp).close()
    ok = subprocess.run([*HCT, "verify", "--journal", fp], capture_output=True, text=True)
    assert ok.returncode == 0 and "journal intact" in ok.stdout
    raw = apsw.Connection(fp)
    raw.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)  # past the guards, on purpose
    raw.execute("UPDATE hct_journal SET data = data || x'00' WHERE cid = 20")
    raw.close()
    for args in (["verify", "--journal", fp], ["verify", "--journal", lp, fp]):
        p = subprocess.run([*HCT, *args], capture_output=True, text=True, timeout=60)
        assert p.returncode == 1, p.stdout + p.stderr
        assert "cid 20: its hash column does not match" in p.stdout
    assert Database(fp, init=False).check_journal() is not None
    assert Database(lp, init=False).check_journal() is None


def test_9_the_plain_sqlite_edit_itself_is_refused(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 5)
    c = sqlite3.connect(lp)
    with pytest.raises(sqlite3.IntegrityError, match="hctserver"):
        c.execute("UPDATE hct_journal SET hash = zeroblob(16) WHERE cid = 2")
    c.close()
    assert dbdump.journal(lp)[1][4] != bytes(16)


# --- 1. a full disk, on both nodes (done-when 2) -------------------------------------------------


def test_1_a_full_disk_is_reported_and_both_nodes_resume(tmp_path) -> None:
    """A full disk (made on demand by hctserver's fault VFS) under a leader
    with writers and a follower: both say so, neither stops, nothing is
    corrupted, and both go on when space returns."""
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp)
    control = tmp_path / "disk"
    control.write_text("ok")
    env = {**os.environ, "HCTSERVER_FAULT_DISK": str(control)}
    with processes(str(tmp_path)) as procs:
        leader, port = procs.leader(lp, "--job", "writer", "--job", "writer", env=env)
        follower = procs.follower(fp, port, env=env)
        wait_until(lambda: snapshot_of(fp) > 2000, 60, "replication under way")
        control.write_text("full")
        wait_until(
            lambda: (
                "disk is full" in procs.stderr(leader) and "disk is full" in procs.stderr(follower)
            ),
            30,
            "both nodes reporting the full disk",
        )
        assert leader.poll() is None and follower.poll() is None
        full_at = snapshot_of(lp)
        control.write_text("ok")
        wait_until(lambda: snapshot_of(lp) > full_at + 2000, 60, "the leader writing again")
        wait_until(lambda: snapshot_of(fp) > full_at + 1000, 60, "the follower applying again")
        for node in (leader, follower):  # whatever met the full disk says it is over
            said = procs.stderr(node)
            assert "space again" in said or "work again" in said, said
        stop(leader)
        assert leader.returncode == 0, procs.stderr(leader)
        final = Database(lp, init=False).snapshot()
        wait_until(lambda: snapshot_of(fp) == final, 60, "the follower at the leader's last cid")
        stop(follower)
        assert follower.returncode == 0, procs.stderr(follower)
    for path in (lp, fp):
        c = apsw.Connection(path)
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        c.close()
        assert Database(path, init=False).check_journal() is None
        assert wal_size(path) < 64 << 20
    assert_identical(lp, fp)


def test_background_checks_survive_a_failing_read(tmp_path) -> None:
    """The watchdog and the other-writers stream retry a read that failed
    instead of stopping the node."""
    from hctserver.errors import UnjournaledWriteError
    from hctserver.journal.watchdog import watch

    class Flaky:
        path = "flaky.db"
        calls = 0

        def check_unjournaled(self) -> None:
            self.calls += 1
            if self.calls <= 2:
                raise apsw.BusyError("database is locked")
            raise UnjournaledWriteError("found")

    flaky = Flaky()
    with pytest.raises(UnjournaledWriteError):
        watch(flaky, threading.Event(), 0.01)  # type: ignore[arg-type]
    assert flaky.calls == 3

    lp = str(tmp_path / "l.db")
    init_db(lp, 2)
    leader = leader_node(lp, [], poll_interval=0.002)
    try:
        others = leader.runner.other_writers  # broken on purpose below
        real = others.catch_up
        broken = [2]

        def catch_up() -> None:
            if broken[0]:
                broken[0] -= 1
                raise apsw.IOError("disk I/O error")
            real()

        others.catch_up = catch_up
        f = follower_node(str(tmp_path / "f.db"), leader.port)
        streams_soon(f)
        app = leader.db.connect()
        app.execute("INSERT INTO t1 VALUES(5, 'after', 'failures')")
        app.close()
        assert f.db.wait_for(4, timeout=30) and broken[0] == 0
    finally:
        leader.close()
    f.wait(30)
    f.close()
