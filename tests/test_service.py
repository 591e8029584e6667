"""Leaders and followers run as services: applications' commits stream live,
followers outlive their leader, nothing writes a database behind the
journal's back, nodes stop on time and say why."""

from __future__ import annotations

import logging
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import apsw
import pytest

import hctserver
from hctserver import Database
from hctserver.errors import JobError, ModeError, UnjournaledWriteError
from hctserver.journal import patchset
from hctserver.net.transport import MemoryNetwork
from hctserver.node.testserver import Node
from hctserver.position import Entry

import dbdump
from helpers import wait_until
from nodes import assert_identical, follower_node, init_db, leader_node, snapshot_of
from procs import HCT, free_port, processes, stop, wal_size

APP = textwrap.dedent(
    """
    import sys
    import hctserver
    db = hctserver.connect(sys.argv[1])
    n, half = int(sys.argv[2]), int(sys.argv[2]) // 2
    for i in range(n):
        with db:
            db.execute("REPLACE INTO t1 VALUES(?, randomblob(50), ?)", (i % 997, i))
        if i == half - 1:
            print(db.snapshot(), flush=True)
            sys.stdin.readline()       # wait until the test has seen the followers
    print(db.snapshot(), flush=True)
    db.close()
    """
)


def test_an_applications_commits_stream_live_to_two_followers(tmp_path) -> None:
    """An application process writes 5,000 transactions through the public
    API while a leader with no jobs serves two followers: they apply the
    commits while they happen, and end identical."""
    lp, ap, bp = (str(tmp_path / n) for n in ("l.db", "a.db", "b.db"))
    init_db(lp)
    with processes(str(tmp_path)) as procs:
        leader, port = procs.leader(lp)
        fa, fb = procs.follower(ap, port), procs.follower(bp, port)
        wait_until(lambda: snapshot_of(ap) == 1 and snapshot_of(bp) == 1, what="caught up")
        app = procs.start(sys.executable, "-c", APP, lp, "5000", stdin=subprocess.PIPE)
        assert app.stdin is not None
        wait_until(lambda: procs.stdout(app).strip() != "", 60, "the first 2,500 commits")
        half = int(procs.stdout(app).split()[0])
        assert half == 2501
        # the application waits: only the live streams can bring its commits
        wait_until(
            lambda: snapshot_of(ap) == half and snapshot_of(bp) == half, 30, "followers at half"
        )
        app.stdin.write("go on\n")
        app.stdin.flush()
        assert app.wait(120) == 0, procs.stderr(app)
        last = int(procs.stdout(app).split()[-1])
        assert last == 5001
        wait_until(lambda: snapshot_of(ap) == last and snapshot_of(bp) == last, 60, "all")
        assert fa.poll() is None and fb.poll() is None  # services: still running
        for p in (fa, fb, leader):
            stop(p)
            assert p.returncode == 0, procs.stderr(p)
    assert_identical(lp, ap, bp)


def test_a_follower_outlives_a_leader_killed_five_times(tmp_path) -> None:
    """SIGKILL and restart the leader five times under write load; the
    follower (default mode) never exits and ends identical."""
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp)
    port = free_port()
    with processes(str(tmp_path)) as procs:
        leader, _ = procs.leader(lp, "--job", "writer", "--job", "writer", port=port)
        follower = procs.follower(fp, port, "--retry-max", "0.5")
        for _ in range(5):
            target = Database(lp, init=False).snapshot() + 200
            wait_until(lambda t=target: snapshot_of(fp) >= t, 60, "the follower streaming")
            leader.kill()
            leader.wait(30)
            assert follower.poll() is None, procs.stderr(follower)
            leader, _ = procs.leader(lp, "--job", "writer", "--job", "writer", port=port)
        target = Database(lp, init=False).snapshot() + 200
        wait_until(lambda t=target: snapshot_of(fp) >= t, 60, "the follower after the last restart")
        took = stop(leader)
        assert leader.returncode == 0 and took < 5, (took, procs.stderr(leader))
        assert wal_size(lp) == 0  # checkpointed on the way out
        # the writes are over; a leader serving the final state lets it converge
        leader, _ = procs.leader(lp, port=port)
        final = Database(lp, init=False).snapshot()
        wait_until(lambda: snapshot_of(fp) == final, 60, "the follower at the leader's last cid")
        assert follower.poll() is None
        for p in (follower, leader):
            stop(p)
            assert p.returncode == 0, procs.stderr(p)
        assert "lost the leader" in procs.stderr(follower)
    assert_identical(lp, fp)


def test_sigterm_stops_a_busy_leader_cleanly_within_five_seconds(tmp_path) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp)
    with processes(str(tmp_path)) as procs:
        leader, port = procs.leader(lp, "--job", "writer", "--job", "writer", "--job", "writer")
        follower = procs.follower(fp, port, "--once", "--verbose")
        wait_until(lambda: "syncreply 1 received" in procs.stdout(follower), 60, "streaming")
        wait_until(lambda: snapshot_of(fp) > 2000, 60, "the follower streaming")
        took = stop(leader)
        assert leader.returncode == 0 and took < 5, (took, procs.stderr(leader))
        assert "leader stopped by SIGTERM" in procs.stderr(leader)
        assert wal_size(lp) == 0
        # the streams were flushed and closed: a --once follower ends with the leader
        assert follower.wait(30) == 0, procs.stderr(follower)
    assert_identical(lp, fp)


def test_plain_sqlite_writes_are_refused_and_schema_changes_stop_the_follower(tmp_path) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 50)
    with processes(str(tmp_path)) as procs:
        leader, port = procs.leader(lp)
        follower = procs.follower(fp, port)
        wait_until(lambda: snapshot_of(fp) == 51, 60, "the follower caught up")
        before = dbdump.tables(fp)
        plain = sqlite3.connect(fp, timeout=10)
        for sql in (
            "INSERT INTO t1 VALUES(100000, 'local', 'row')",
            "UPDATE t1 SET b = 'changed'",
            "DELETE FROM t1",
            "DELETE FROM hct_journal",
        ):
            with pytest.raises(
                sqlite3.IntegrityError, match=r"hctserver: .*hctserver\.connect\(\)"
            ):
                plain.execute(sql)
            plain.rollback()
        assert dbdump.tables(fp) == before
        # the leader's database is guarded the same way
        on_leader = sqlite3.connect(lp, timeout=10)
        with pytest.raises(sqlite3.IntegrityError, match="hctserver"):
            on_leader.execute("DELETE FROM t1")
        on_leader.close()  # Python's sqlite3 left its transaction open
        # triggers cannot stop DDL: the follower finds it and stops, exit 8
        plain.execute("CREATE TABLE sneaky(x)")
        plain.commit()
        plain.close()
        t0 = time.monotonic()
        assert follower.wait(30) == 8
        assert time.monotonic() - t0 < 5
        err = procs.stderr(follower).strip().splitlines()[-1]
        assert "changed outside hctserver: table sneaky was created" in err, err
        assert leader.poll() is None
        # the same on the leader's database, while it serves
        plain = sqlite3.connect(lp, timeout=10)
        plain.execute("CREATE INDEX sneaky_b ON t1(b)")
        plain.commit()
        plain.close()
        assert leader.wait(30) == 8
        assert "index sneaky_b was created" in procs.stderr(leader).strip().splitlines()[-1]
    assert dbdump.tables(fp) == {**before, "sneaky": []}  # left as found


def test_the_leader_refuses_to_start_on_a_changed_schema(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 3)
    plain = sqlite3.connect(lp)
    plain.execute("DROP TABLE t1")
    plain.commit()
    plain.close()
    n = Node(lp, port=0)
    with pytest.raises(UnjournaledWriteError, match="table t1 was dropped"):
        n.start()
    n.close()


def _big_leader(path: str, n: int) -> Database:
    """A leader database with ``n`` entries, built fast through an applier."""
    db = Database(path)
    header = patchset.encode_table("t1", [1, 0, 0])
    blob = b"x" * 40
    entries = [Entry(1, 0, "CREATE TABLE t1(a INTEGER PRIMARY KEY, b, c)", b"")]
    entries += [
        Entry(c, 1, "", header + patchset.encode_insert((c, blob, c))) for c in range(2, n + 1)
    ]
    ap = db.applier()
    ap.add_many(entries)
    ap.apply()
    ap.close()
    return db


@pytest.mark.parametrize("syncthreads", [1, 4])
def test_close_during_a_catch_up_of_200000_entries_is_quick_and_consistent(
    tmp_path, syncthreads: int
) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    src = _big_leader(lp, 200_000)
    src.close()
    leader = leader_node(lp, [])
    try:
        f = follower_node(
            fp, leader.port, once=False, syncthreads=syncthreads, extra={"bootstrap": False}
        )
        wait_until(lambda: f.runner.stats.sync_entries > 40_000, 60, "the catch-up under way")
        t0 = time.monotonic()
        f.close()
        took = time.monotonic() - t0
        assert took < 1.0, took
        assert f.runner.stats.phase == "sync"  # it was still catching up
    finally:
        leader.close()
    db = Database(fp, init=False)
    pos = db.position()
    assert 0 <= pos.cid < 200_000
    assert db.hash_at(pos.cid) == Database(lp, init=False).hash_at(pos.cid)
    c = apsw.Connection(fp)
    assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    if pos.cid > 1:  # cid 1 created t1; each later cid inserted the row a = cid
        assert c.execute("SELECT count(*), max(a) FROM t1").fetchone() == (pos.cid - 1, pos.cid)


@pytest.mark.parametrize("follower", [False, True])
def test_a_job_that_raises_is_reported_within_a_second(tmp_path, caplog, follower: bool) -> None:
    caplog.set_level(logging.ERROR, logger="hctserver")
    lp = str(tmp_path / "l.db")
    init_db(lp, 3)
    raised: list[float] = []

    def bad(db: Any, timeout: Any) -> None:
        timeout.wait(0.3)
        raised.append(time.monotonic())
        raise ValueError("the job broke")

    def idle(db: Any, timeout: Any) -> None:
        while not timeout.wait(0.05):
            pass

    reported: list[float] = []

    class Stamp(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "the job broke" in record.getMessage():
                reported.append(time.monotonic())

    handler = Stamp()
    logging.getLogger("hctserver").addHandler(handler)
    try:
        if follower:
            leader = leader_node(lp, [idle])
            node = Node(str(tmp_path / "f.db"), follower=True, port=leader.port)
            node.job(idle)
            node.job(bad)
            node.start()
        else:
            leader = node = leader_node(lp, [idle, bad, idle])
        with pytest.raises(JobError, match=r"job 1 \(bad\): ValueError: the job broke"):
            node.wait(30)
        waited = time.monotonic()
        node.close()
        if follower:
            leader.close()
    finally:
        logging.getLogger("hctserver").removeHandler(handler)
    assert raised and reported
    assert reported[0] - raised[0] < 1.0
    assert waited - raised[0] < 1.0
    record = next(r for r in caplog.records if "the job broke" in r.getMessage())
    assert record.exc_info is not None  # with its traceback


def test_a_thousand_wait_for_wake_ups_none_missed(tmp_path) -> None:
    src = Database(str(tmp_path / "l.db"))
    src.set_mode("leader")
    c = src.connect()
    c.execute("CREATE TABLE t(x)")
    for i in range(1000):
        c.execute("INSERT INTO t VALUES(?)", (i,))
    c.close()
    es = list(src.iter_entries())
    f = Database(str(tmp_path / "f.db"))
    ap = f.applier()
    slow: list[tuple[int, float]] = []
    missed: list[int] = []

    def waiter() -> None:
        for cid in range(1, len(es) + 1):
            t0 = time.monotonic()
            # a long poll: only the in-process wake-up can end this wait early
            if not f.wait_for(cid, timeout=5, poll=60):
                missed.append(cid)
            if time.monotonic() - t0 > 1.0:
                slow.append((cid, time.monotonic() - t0))

    t = threading.Thread(target=waiter)
    t.start()
    for e in es:
        ap.add(e)
        ap.apply()
    t.join()
    assert not missed and not slow, (missed, slow)


WAITER = textwrap.dedent(
    """
    import sys, time
    from hctserver import Database
    db = Database(sys.argv[1])
    print("waiting", flush=True)
    t0 = time.monotonic()
    ok = db.wait_for(int(sys.argv[2]), timeout=60)
    print(ok, time.monotonic() - t0, flush=True)
    """
)


def test_wait_for_works_from_another_process(tmp_path) -> None:
    src = Database(str(tmp_path / "l.db"))
    src.set_mode("leader")
    c = src.connect()
    c.execute("CREATE TABLE t(x)")
    c.execute("INSERT INTO t VALUES(1)")
    es = list(src.iter_entries())
    fp = str(tmp_path / "f.db")
    f = Database(fp)
    ap = f.applier()
    ap.add(es[0])
    ap.apply()
    with processes(str(tmp_path)) as procs:
        child = procs.start(sys.executable, "-c", WAITER, fp, "2")
        wait_until(lambda: "waiting" in procs.stdout(child), 60, "the waiter")
        ap.add(es[1])
        ap.apply()
        assert child.wait(60) == 0, procs.stderr(child)
        ok, took = procs.stdout(child).split()[1:3]
        assert ok == "True" and float(took) < 30


def test_verify_says_when_a_follower_is_merely_behind(tmp_path) -> None:
    from helpers import replay

    lp = str(tmp_path / "leader.db")
    init_db(lp, 30)
    replay(Database(lp, init=False), str(tmp_path / "follower.db"), upto=21).close()
    for a, b in (("follower.db", "leader.db"), ("leader.db", "follower.db")):
        p = subprocess.run(
            [*HCT, "verify", a, b], capture_output=True, text=True, cwd=tmp_path, timeout=60
        )
        assert p.returncode == 9, p.stdout + p.stderr
        assert p.stdout.strip() == "behind: follower.db is behind leader.db by 10 cids (at cid 21)"


def test_a_follower_started_before_its_leader_connects_when_it_comes(tmp_path) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 20)
    port = free_port()
    with processes(str(tmp_path)) as procs:
        follower = procs.follower(fp, port, "--retry-max", "0.3")
        wait_until(lambda: "lost the leader" in procs.stderr(follower), 30, "a failed attempt")
        leader, _ = procs.leader(lp, port=port)
        wait_until(lambda: snapshot_of(fp) == 21, 60, "the follower caught up")
        stop(follower)
        stop(leader)
        assert follower.returncode == 0 and leader.returncode == 0
    assert_identical(lp, fp)


def test_nodes_over_the_in_memory_transport(tmp_path) -> None:
    """The nodes run over any transport: here socket pairs, no TCP."""
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 10)
    net = MemoryNetwork()
    leader = leader_node(lp, [], transport=net)
    f = follower_node(fp, leader.port, once=False, extra={"transport": net})
    try:
        wait_until(lambda: f.runner.stats.phase == "stream", what="streaming")
        app = leader.db.connect()
        for i in range(20):
            app.execute("INSERT OR REPLACE INTO t1 VALUES(?, 'mem', 1)", (i,))
        app.close()
        assert f.db.wait_for(31, timeout=30)
    finally:
        f.close()
        leader.close()
    assert_identical(lp, fp)


def test_connect_is_the_public_entry_point_and_a_followers_database_reads_only(tmp_path) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    db = hctserver.connect(lp)
    db.execute("CREATE TABLE t1(a INTEGER PRIMARY KEY, b, c)")
    with db:
        db.execute("INSERT INTO t1 VALUES(1, 'x', 'y')")
        assert db.execute("SELECT b FROM t1").fetchone() == ("x",)  # read your writes
    db.executemany("INSERT INTO t1 VALUES(?, ?, ?)", [(2, "a", "b"), (3, "c", "d")])
    assert db.snapshot() == 3
    db.close()
    leader = leader_node(lp, [])
    f = follower_node(fp, leader.port)
    try:
        wait_until(lambda: snapshot_of(fp) == 3, what="the follower caught up")
        wait_until(lambda: f.runner.stats.phase == "stream", what="the follower subscribed")
    finally:
        leader.close()
        f.wait(30)
        f.close()
    # a follower's file opens for reading; with no node to forward to, a write is refused
    conn = hctserver.connect(fp)
    try:
        assert conn.execute("SELECT count(*) FROM t1").fetchall() == [(3,)]
        with pytest.raises(ModeError, match="FOLLOWER mode"):
            conn.execute("INSERT INTO t1 VALUES(9, 'n', 'o')")
        assert conn.execute("SELECT count(*) FROM t1").fetchall() == [(3,)]
    finally:
        conn.close()


def test_a_leader_node_streams_commits_made_outside_its_jobs(tmp_path) -> None:
    """Commits of another process reach a follower through the last stream."""
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 5)

    def trickle(db: Any, timeout: Any) -> None:  # a job writing now and then
        i = 0
        while not timeout.wait(0.005):
            db.execute("INSERT OR REPLACE INTO t1 VALUES(?, 'job', 0)", (100_000 + i % 50,))
            i += 1

    leader = leader_node(lp, [trickle], poll_interval=0.002)
    f = follower_node(fp, leader.port)
    try:
        wait_until(lambda: f.runner.stats.phase == "stream", what="streaming")
        base = f.runner.stats.sub_entries
        other = subprocess.run(
            [sys.executable, "-c", APP.replace("sys.stdin.readline()", "pass"), lp, "200"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert other.returncode == 0, other.stderr
        last = int(other.stdout.split()[-1])
        wait_until(lambda: f.db.snapshot() >= last, 60, "the other process's commits")
        assert f.runner.stats.sub_entries - base >= 200
    finally:
        leader.runner.timeout.expire()
        leader.wait(60)
        f.wait(60)
        leader.close()
        f.close()
    assert_identical(lp, fp)


def test_sigterm_and_sigint_both_stop_a_follower_with_exit_0(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 5)
    with processes(str(tmp_path)) as procs:
        leader, port = procs.leader(lp)
        for i, sig in enumerate((signal.SIGTERM, signal.SIGINT)):
            fp = str(tmp_path / f"f{i}.db")
            f = procs.follower(fp, port)
            wait_until(lambda fp=fp: snapshot_of(fp) == 6, 60, "caught up")
            took = stop(f, sig)
            assert f.returncode == 0 and took < 5, procs.stderr(f)
            assert f"follower stopped by {signal.Signals(sig).name}" in procs.stderr(f)
        stop(leader, signal.SIGINT)
        assert leader.returncode == 0


def test_reconnecting_does_not_double_the_streams(tmp_path) -> None:
    """After a leader restart, the ends of the old streams are not taken for
    ends of the new ones (which would subscribe twice)."""
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 5)

    def idle(db: Any, timeout: Any) -> None:
        timeout.wait_expired()

    port = free_port()
    f = None
    try:
        for round_ in range(3):
            leader = Node(lp, port=port)
            for _ in range(4):
                leader.job(idle)
            leader.start()
            if f is None:
                f = follower_node(fp, port, once=False, extra={"retry_max": 0.2})
            runner = f.runner
            wait_until(
                lambda r=runner, ld=leader: (
                    r.stats.phase == "stream"
                    and r.queued_events == 0
                    and ld.runner.subscriber_counts() == [1] * 5
                ),
                what=f"streaming after restart {round_}",
            )
            leader.close()
    finally:
        if f is not None:
            f.close()


def test_close_does_not_wait_for_a_connect_in_progress(tmp_path) -> None:
    import socket

    blackhole = socket.create_server(("127.0.0.1", 0), backlog=0)  # never accepts
    port = blackhole.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):  # fill the backlog: later SYNs are dropped, connects hang
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            fillers.append(c)
        f = follower_node(str(tmp_path / "f.db"), port, once=False, extra={"connect_timeout": 30})
        wait_until(lambda: f.runner.stats.phase == "sync", what="connecting")
        t0 = time.monotonic()
        f.close()
        assert time.monotonic() - t0 < 1.0
    finally:
        for c in fillers:
            c.close()
        blackhole.close()


def test_close_does_not_wait_for_a_reader_in_the_way_of_the_checkpoint(tmp_path) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 20)
    leader = leader_node(lp, [])
    f = follower_node(fp, leader.port, once=False)
    reader = apsw.Connection(fp)
    try:
        wait_until(lambda: f.runner.stats.phase == "stream", what="streaming")
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM t1").fetchone()[0] > 0
        t0 = time.monotonic()
        f.close()
        assert time.monotonic() - t0 < 1.0
    finally:
        reader.close()
        leader.close()


def test_a_new_replica_is_refused_to_applications_before_it_synced(tmp_path) -> None:
    fp = str(tmp_path / "f.db")
    f = follower_node(fp, free_port(), once=False)  # no leader yet
    try:
        wait_until(lambda: f.runner.session.reconnects >= 1, what="a first attempt")
        conn = hctserver.connect(fp)  # opens for reading; a write has no leader to go to
        try:
            with pytest.raises(ModeError, match=r"a follower's database .*has not said where"):
                conn.execute("CREATE TABLE mine(a)")
        finally:
            conn.close()
    finally:
        f.close()
