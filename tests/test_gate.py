"""The commit gate: every writer, in the node's process or another, commits
only while the node leads and is acknowledged only as the node's jobs are."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import apsw
import pytest

import hctserver
from hctserver import Database
from hctserver.errors import (
    CommitUnknownError,
    NoNodeError,
    NotLeaderError,
    NotReplicationDatabaseError,
    UnsupportedStatementError,
)
from hctserver.journal.gate import HEARTBEAT, GatePublisher, gate_path

from helpers import complete_lines, wait_until
from nodes import init_db, snapshot_of
from procs import HCT, processes, stop

# --- the gate on real files, in one process ------------------------------------------


def _served(tmp_path: Path) -> tuple[str, GatePublisher]:
    path = str(tmp_path / "g.db")
    init_db(path)
    db = Database(path)
    db.set_role("leader")
    db.close()
    return path, GatePublisher(path)


def test_a_file_no_node_ever_served_is_open_and_has_no_gate_file(tmp_path) -> None:
    path = str(tmp_path / "plain.db")
    c = hctserver.connect(path)
    c.execute("CREATE TABLE t(a)")
    c.execute("INSERT INTO t VALUES(1)")
    assert c.last_cid == 2 and not os.path.exists(gate_path(c.db.path))
    c.close()


def test_commits_are_refused_unless_the_node_leads_before_its_deadline(tmp_path) -> None:
    path, pub = _served(tmp_path)
    c = hctserver.connect(path)
    with pytest.raises(NoNodeError, match="no node serves it"):
        c.execute("INSERT INTO t1 VALUES(1, 'x', 'y')")
    pub.lead(sync_k=0, sync_timeout=None, valid_until=time.monotonic() + 30)
    c.execute("INSERT INTO t1 VALUES(1, 'x', 'y')")
    pub.follow("127.0.0.1:4000")
    with pytest.raises(NotLeaderError, match=r"follows 127\.0\.0\.1:4000") as ei:
        c.execute("INSERT INTO t1 VALUES(2, 'x', 'y')")
    assert ei.value.leader == "127.0.0.1:4000"
    pub.lead(sync_k=0, sync_timeout=None, valid_until=time.monotonic() + 0.3)
    c.execute("INSERT INTO t1 VALUES(3, 'x', 'y')")
    wait_until(lambda: time.monotonic() > pub.state.valid_until_ns / 1e9, what="the deadline")
    with pytest.raises(NotLeaderError, match="lapsed"):  # nobody had to do anything
        c.execute("INSERT INTO t1 VALUES(4, 'x', 'y')")
    # nothing refused was written
    assert [r[0] for r in c.execute("SELECT a FROM t1 ORDER BY a")] == [1, 3]
    c.close()
    pub.close()


def test_a_waiting_commit_is_never_reported_as_a_success(tmp_path) -> None:
    path, pub = _served(tmp_path)
    pub.lead(sync_k=1, sync_timeout=None, valid_until=time.monotonic() + 60)
    c = hctserver.connect(path)
    got: list[BaseException | int] = []

    def write(sql: str) -> None:
        try:
            c.execute(sql)
            got.append(c.last_cid)
        except BaseException as e:
            got.append(e)

    # acknowledged by K followers: a success
    th = threading.Thread(target=write, args=("INSERT INTO t1 VALUES(1, 'a', 'b')",))
    th.start()
    wait_until(lambda: snapshot_of(path) >= 2, what="the commit")
    assert th.is_alive()  # committed, waiting for its acknowledgement
    pub.acked(snapshot_of(path))
    th.join(10)
    assert got == [2]
    # the node stops while it waits: CommitUnknownError, with its cid
    th = threading.Thread(target=write, args=("INSERT INTO t1 VALUES(2, 'a', 'b')",))
    th.start()
    wait_until(lambda: snapshot_of(path) >= 3, what="the commit")
    pub.stop()
    th.join(10)
    err = got[1]
    assert isinstance(err, CommitUnknownError) and err.cid == 3
    assert "stopped leading" in str(err)
    # the lease runs out while it waits: the same, with no one publishing anything
    pub.lead(sync_k=1, sync_timeout=None, valid_until=time.monotonic() + 0.5)
    with pytest.raises(CommitUnknownError, match="lease"):
        c.execute("INSERT INTO t1 VALUES(3, 'a', 'b')")
    # synchronous commit gives up (the node degrades): the waiting commit is unknown
    pub.lead(sync_k=1, sync_timeout=None, valid_until=time.monotonic() + 60)
    th = threading.Thread(target=write, args=("INSERT INTO t1 VALUES(4, 'a', 'b')",))
    th.start()
    wait_until(lambda: snapshot_of(path) >= 5, what="the commit")
    pub.set_degraded(True)
    th.join(10)
    assert isinstance(got[2], CommitUnknownError) and "gave up" in str(got[2])
    c.execute("INSERT INTO t1 VALUES(5, 'a', 'b')")  # degraded: asynchronous, at once
    c.close()
    pub.close()


def test_explicit_adoption_of_another_applications_file(tmp_path) -> None:
    path = str(tmp_path / "theirs.db")
    raw = apsw.Connection(path)
    raw.execute("CREATE TABLE users(id INTEGER PRIMARY KEY, name)")
    raw.execute("INSERT INTO users VALUES(1, 'ann')")
    raw.close()
    with pytest.raises(NotReplicationDatabaseError, match="adopt=True"):
        hctserver.connect(path)
    c = hctserver.connect(path, adopt=True)
    assert c.execute("SELECT name FROM users").fetchall() == [("ann",)]
    assert c.db.position().cid == 1  # its schema and rows became cid 1
    c.close()


def test_sql_the_journal_cannot_carry_is_refused_and_user_version_is_replicated(tmp_path) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    c = hctserver.connect(lp)
    c.execute("CREATE TABLE t(a)")
    for sql, why in [
        (f"ATTACH '{tmp_path / 'aux.db'}' AS aux", "ATTACH"),
        ("CREATE TEMP TABLE x(y)", "temp"),
        ("PRAGMA writable_schema = 1", "writable_schema"),
    ]:
        with pytest.raises(UnsupportedStatementError, match=why):
            c.execute(sql)
    c.execute("PRAGMA user_version = 42")
    c.execute("INSERT INTO t VALUES(1)")
    f = Database(fp)
    ap = f.applier()
    ap.add_many(c.db.iter_entries())
    ap.apply()
    raw = apsw.Connection(fp)
    assert raw.execute("PRAGMA user_version").fetchall() == [(42,)]
    assert raw.execute("SELECT a FROM t").fetchall() == [(1,)]
    raw.close()
    f.close()
    c.close()


# --- nodes and applications in other processes -----------------------------------------

_ONE_WRITE = textwrap.dedent(
    """
    import sys, time, hctserver
    from hctserver.errors import CommitUnknownError
    db = hctserver.connect(sys.argv[1])
    print("ready", flush=True)
    t0 = time.monotonic()
    try:
        db.execute("INSERT INTO t1 VALUES(9999, 'app', 'x')")
        print("acknowledged", db.last_cid, round(time.monotonic() - t0, 2), flush=True)
    except CommitUnknownError as e:
        print("unknown", e.cid, round(time.monotonic() - t0, 2), e, flush=True)
    """
)


def _app(procs, db: str, script: str = _ONE_WRITE) -> subprocess.Popen[str]:
    return procs.start(sys.executable, "-c", script, db)


@pytest.mark.parametrize("timeout", [None, 1.0], ids=["blocks", "times-out"])
def test_sync_commit_holds_an_application_in_another_process(tmp_path, timeout) -> None:
    """--sync-followers 1 and no follower: a connect() writer in another
    process blocks, or gets CommitUnknownError after --sync-timeout."""
    tmp = str(tmp_path)
    lp, fp = os.path.join(tmp, "l.db"), os.path.join(tmp, "f.db")
    init_db(lp, 2)
    extra = ["--sync-followers", "1"] + ([] if timeout is None else ["--sync-timeout", "1"])
    with processes(tmp) as procs:
        leader, port = procs.leader(lp, *extra)
        app = _app(procs, lp)
        wait_until(lambda: "ready" in procs.stdout(app), what="the application")
        wait_until(lambda: snapshot_of(lp) >= 4, what="its commit on the leader")
        if timeout is None:
            # it holds while no follower is there (watching for a violation over 2 s)
            t_end = time.monotonic() + 2
            while time.monotonic() < t_end:
                assert app.poll() is None and "acknowledged" not in procs.stdout(app)
                time.sleep(0.1)
            f = procs.start(*HCT, "follower", fp, "--port", str(port), "--synchronous", "FULL")
            app.wait(60)
            out = procs.stdout(app)
            assert "acknowledged 4" in out, out
            assert snapshot_of(fp) >= 4  # the follower has it: that is what released it
            stop(f)
        else:
            app.wait(60)
            out = procs.stdout(app)
            assert out.split()[1:3] == ["unknown", "4"], out
            assert float(out.split()[3]) >= timeout
            assert "--sync-timeout" in out
        assert stop(leader) < 30 and leader.returncode == 0


def test_an_application_beside_a_paused_leader_stops_and_goes_on_after(tmp_path) -> None:
    tmp = str(tmp_path)
    lp = os.path.join(tmp, "l.db")
    init_db(lp, 1)
    c = Database(lp)
    c.set_mode("leader")
    c.connect().execute("CREATE TABLE kv(k TEXT PRIMARY KEY, v)")
    c.close()
    acks = os.path.join(tmp, "acks.log")
    writer = str(Path(__file__).parent / "data" / "app_writer.py")
    with processes(tmp) as procs:
        leader, _ = procs.leader(lp)
        app = procs.start(sys.executable, writer, lp, "a", acks, os.path.join(tmp, "stop"))

        def acked() -> list[float]:
            text = Path(acks).read_text() if os.path.exists(acks) else ""
            return [float(x.split()[3]) for x in complete_lines(text) if x.startswith("ack")]

        wait_until(lambda: len(acked()) > 50, what="acknowledged writes")
        leader.send_signal(signal.SIGSTOP)
        t_stop = time.time()
        try:
            # a paused node publishes nothing: its deadline passes, the writes stop
            wait_until(lambda: time.time() > t_stop + HEARTBEAT + 1, what="a pause")
            last = max(acked())
            assert last <= t_stop + HEARTBEAT + 0.5, last - t_stop
            n = len(acked())
            wait_until(lambda: time.time() > t_stop + HEARTBEAT + 2, what="a longer pause")
            assert len(acked()) == n  # still refused
        finally:
            leader.send_signal(signal.SIGCONT)
        wait_until(lambda: len(acked()) > n + 20, what="writes after the node came back")
        Path(tmp, "stop").touch()
        app.wait(60)
        assert app.returncode == 0, procs.stderr(app)
        assert stop(leader) < 30 and leader.returncode == 0


def test_an_unapplicable_statement_is_refused_at_the_source(tmp_path) -> None:
    """The issue's ATTACH: refused on the leader; no follower stops; a new
    follower catches up; user_version reaches the followers."""
    tmp = str(tmp_path)
    lp, f1, f2 = (os.path.join(tmp, n) for n in ("l.db", "f1.db", "f2.db"))
    init_db(lp, 3)
    script = textwrap.dedent(
        f"""
        import sys, hctserver
        db = hctserver.connect(sys.argv[1])
        try:
            db.execute("ATTACH '{tmp}/aux.db' AS aux")
            print("accepted")
        except hctserver.errors.UnsupportedStatementError as e:
            print("refused:", e)
        db.execute("PRAGMA user_version = 5")
        db.execute("INSERT INTO t1 VALUES(5000, 'after', 'x')")
        print("cid", db.last_cid)
        """
    )
    with processes(tmp) as procs:
        leader, port = procs.leader(lp)
        fa = procs.start(*HCT, "follower", f1, "--port", str(port))
        wait_until(lambda: snapshot_of(f1) >= 4, what="the first follower")
        app = _app(procs, lp, script)
        app.wait(60)
        out = procs.stdout(app)
        assert "refused: refused on a replicated database: ATTACH" in out, out
        cid = int(out.split("cid")[1])
        fb = procs.start(*HCT, "follower", f2, "--port", str(port))
        for f in (f1, f2):
            wait_until(lambda f=f: snapshot_of(f) >= cid, what="a follower with every entry")
            raw = apsw.Connection(f, flags=apsw.SQLITE_OPEN_READONLY)
            assert raw.execute("PRAGMA user_version").fetchall() == [(5,)]
            raw.close()
        assert fa.poll() is None and fb.poll() is None
        for p in (fa, fb, leader):
            assert stop(p) < 30 and p.returncode == 0, procs.stderr(p)


def test_a_paused_sync_follower_acknowledges_again_within_2_s(tmp_path) -> None:
    tmp = str(tmp_path)
    lp, fp = os.path.join(tmp, "l.db"), os.path.join(tmp, "f.db")
    init_db(lp, 2)
    script = textwrap.dedent(
        """
        import sys, time, hctserver
        db = hctserver.connect(sys.argv[1])
        i = 0
        while True:
            i += 1
            db.execute("INSERT OR REPLACE INTO t1 VALUES(?, 'sync', ?)", (i % 100, i))
            print("ack", db.last_cid, time.time(), flush=True)
        """
    )
    with processes(tmp) as procs:
        leader, port = procs.leader(lp, "--sync-followers", "1")
        f = procs.start(*HCT, "follower", fp, "--port", str(port), "--synchronous", "FULL")
        app = _app(procs, lp, script)

        def acks() -> list[float]:
            return [float(x.split()[2]) for x in complete_lines(procs.stdout(app))]

        wait_until(lambda: len(acks()) > 20, what="synchronous commits")
        f.send_signal(signal.SIGSTOP)
        t_stop = time.time()
        try:
            wait_until(lambda: time.time() > t_stop + 10, 30, "10 s of pause")
            n = len(acks())
            assert max(acks()) < t_stop + 1  # nothing acknowledged without the follower
        finally:
            f.send_signal(signal.SIGCONT)
        t_cont = time.time()
        wait_until(lambda: len(acks()) > n, 30, "a synchronous commit after the pause")
        first = min(t for t in acks() if t > t_cont - 0.001)
        assert first - t_cont <= 2.0, first - t_cont
        wait_until(lambda: len(acks()) > n + 50, 30, "synchronous commits going on")
        app.kill()
        app.wait(30)
        for p in (f, leader):
            assert stop(p) < 30 and p.returncode == 0, procs.stderr(p)


def test_a_record_left_half_written_by_a_killed_publisher_is_not_waited_on_forever(
    tmp_path, monkeypatch
) -> None:
    """A node SIGKILLed in the middle of a publish leaves the sequence odd:
    readers give up on it (no node leads: nothing is admitted), and the next
    node's publisher starts past its generation instead of hanging."""
    import struct

    from hctserver.errors import NoNodeError
    from hctserver.journal import gate as gate_mod

    monkeypatch.setattr(gate_mod, "TORN_AFTER", 0.05)
    db_path = str(tmp_path / "g.db")
    pub = gate_mod.GatePublisher(db_path)
    pub.lead(sync_k=0, sync_timeout=None, valid_until=time.monotonic() + 60)
    generation = pub.state.generation
    pub.close()
    with open(gate_mod.gate_path(db_path), "r+b") as f:  # the killed writer's odd sequence
        magic, seq = struct.unpack_from("<8sQ", f.read(16))
        f.seek(0)
        f.write(struct.pack("<8sQ", magic, seq + 1))
    reader = gate_mod.Gate(db_path, standalone=False)
    assert reader.state() is gate_mod.TORN
    with pytest.raises(NoNodeError):
        reader.admit()
    pub = gate_mod.GatePublisher(db_path)  # the restarted node: does not hang
    pub.lead(sync_k=0, sync_timeout=None, valid_until=time.monotonic() + 60)
    assert pub.state.generation > generation
    assert reader.admit() is not None  # leads again
    pub.close()
    reader.close()
