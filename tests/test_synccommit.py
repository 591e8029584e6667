"""Synchronous commit: a commit returns once K followers acknowledged it."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from hctserver.errors import CommitUnknownError, ConfigError
from hctserver.node.followers import CommitClock, FollowerTable
from hctserver.node.synccommit import SyncCommit
from hctserver.protocol.feedback import Report

from helpers import wait_until
from nodes import follower_node, init_db, leader_node, snapshot_of

# --- the rule, in memory -----------------------------------------------------------


def _table(n: int) -> tuple[FollowerTable, list[int]]:
    t = FollowerTable(CommitClock())
    return t, [t.add(f"127.0.0.1:{1000 + i}").id for i in range(n)]


def _report(t: FollowerTable, fid: int, applied: int, durable: int) -> None:
    t.report(fid, Report(applied, durable, applied, f"f{fid}"))


class _Sink:
    """Records what SyncCommit publishes (the gate's publisher, in memory)."""

    def __init__(self) -> None:
        self.acked_cid = 0
        self.acked_one_cid = 0
        self.degraded = False

    def acked(self, cid: int) -> None:
        assert cid > self.acked_cid, "published acknowledgements only move forward"
        self.acked_cid = cid

    def acked_one(self, cid: int) -> None:
        assert cid > self.acked_one_cid, "published acknowledgements only move forward"
        self.acked_one_cid = cid

    def set_degraded(self, degraded: bool) -> None:
        self.degraded = degraded


def _sync(t: FollowerTable, k: int, **kw: object) -> tuple[SyncCommit, _Sink]:
    sync = SyncCommit(t, k, **kw)  # type: ignore[arg-type]
    sink = _Sink()
    sync.attach(sink)
    t.on_change = sync.refresh
    return sync, sink


def test_k_acknowledgements_at_the_chosen_level_are_published() -> None:
    t, (a, b) = _table(2)
    sync, sink = _sync(t, 2)
    _report(t, a, 10, 10)
    _report(t, b, 10, 9)  # applied, not yet on disk: not enough at level durable
    assert sink.acked_cid == 9
    _report(t, b, 10, 10)
    assert sink.acked_cid == 10 and sync.status()["state"] == "sync"
    t.remove(b)  # one follower left: what two had stays acknowledged
    assert sink.acked_cid == 10
    _report(t, a, 12, 12)
    assert sink.acked_cid == 10  # one is not two
    t2, (c, d) = _table(2)
    _, applied = _sync(t2, 2, level="applied")
    _report(t2, c, 11, 3)
    _report(t2, d, 11, 3)
    assert applied.acked_cid == 11


def test_too_few_followers_degrade_to_asynchronous_then_recover(caplog) -> None:
    t, (a,) = _table(1)
    sync, sink = _sync(t, 1, timeout=0.2)
    caplog.set_level(logging.WARNING, logger="hctserver")
    t.clock.note(5, now=100.0)  # cid 5 committed at t=100, nobody has it
    sync.tick(now=100.1)
    assert not sink.degraded
    sync.tick(now=100.25)
    st = sync.status()
    assert sink.degraded and st["state"] == "degraded" and st["degradations"] == 1
    assert "0 of 1 followers acknowledged cid 1 within 0.2 s" in caplog.text
    t.clock.note(7, now=100.3)
    _report(t, a, 4, 4)  # not yet what was committed when it gave up (cid 5): still async
    assert sink.degraded and sink.acked_cid == 4
    _report(t, a, 5, 5)
    assert not sink.degraded and "waiting for them again" in caplog.text
    assert sync.status()["state"] == "sync"


def test_no_sync_publishes_nothing_and_a_detached_sync_publishes_nowhere() -> None:
    t, (a,) = _table(1)
    sync, sink = _sync(t, 0)
    _report(t, a, 5, 5)
    assert sink.acked_cid == 0 and sync.status()["state"] == "off"
    # what one follower has is published for transactions that ask for replication
    assert sink.acked_one_cid == 5
    sync2, sink2 = _sync(t, 1)
    sync2.attach(None)
    _report(t, a, 6, 6)
    assert sink2.acked_cid == 5  # attached: it published cid 5; detached: nothing after


# --- nodes ---------------------------------------------------------------------------


def test_a_leader_with_sync_followers_returns_after_the_follower_has_the_commit(
    tmp_path,
) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 3)
    leader = leader_node(lp, [], sync_followers=1, sync_timeout=1.0, sync_level="applied")
    f = None
    try:
        f = follower_node(fp, leader.port, once=False)
        runner = leader.runner
        assert runner is not None
        wait_until(lambda: f.runner.stats.phase == "stream", what="streaming")
        wait_until(lambda: len(runner.followers) == 1, what="the feedback channel")
        app = leader.db.connect()
        for i in range(20):
            app.execute("INSERT OR REPLACE INTO t1 VALUES(?, 'sync', ?)", (i, i))
            # acknowledged before the commit returned: the follower has it now
            assert snapshot_of(fp) >= app.last_cid
        st = runner.sync.status()
        assert st["state"] == "sync" and st["acked_cid"] >= app.last_cid
        # the follower goes: a commit waits 1 s, and gets CommitUnknownError (it
        # is on the leader, on no follower); the leader then commits
        # asynchronously and says so; the follower comes back and it waits again
        f.close()
        f = None
        t0 = time.monotonic()
        with pytest.raises(CommitUnknownError, match=r"did not acknowledge|gave up"):
            app.execute("INSERT OR REPLACE INTO t1 VALUES(100, 'alone', 0)")
        assert time.monotonic() - t0 >= 1.0
        assert app.execute("SELECT b FROM t1 WHERE a = 100").fetchall() == [("alone",)]
        wait_until(lambda: runner.sync.status()["state"] == "degraded", what="degraded")
        t1 = time.monotonic()
        app.execute("INSERT OR REPLACE INTO t1 VALUES(101, 'alone', 0)")
        assert time.monotonic() - t1 < 0.5
        f = follower_node(fp, leader.port, once=False)
        wait_until(lambda: snapshot_of(fp) >= app.last_cid, what="the follower caught up")
        wait_until(lambda: runner.followers.acked(app.last_cid, False) == 1, what="its report")
        app.execute("INSERT OR REPLACE INTO t1 VALUES(102, 'sync again', 0)")
        assert runner.sync.status()["state"] == "sync"
        assert snapshot_of(fp) >= app.last_cid
        app.close()
    finally:
        if f is not None:
            f.close()
        leader.close()


def test_sync_settings_are_checked(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp)
    for extra, what in [
        ({"sync_followers": -1}, "0 or more"),
        ({"sync_followers": 1, "feedback": False}, "feedback"),
        ({"sync_followers": 1, "sync_level": "fsync"}, "durable, applied"),
        ({"sync_followers": 1, "sync_timeout": 0}, "more than 0"),
    ]:
        with pytest.raises(ConfigError, match=what):
            leader_node(lp, [], **extra)


def test_group_commits_wait_once_and_every_caller_returns_acknowledged(tmp_path) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 3)
    leader = leader_node(lp, [], sync_followers=1, sync_level="applied")
    f = follower_node(fp, leader.port, once=False)
    errors: list[BaseException] = []
    late: list[int] = []

    def writer(t: int) -> None:
        c = leader.db.connect()
        try:
            for i in range(15):
                res = c.transact(
                    [("INSERT OR REPLACE INTO t1 VALUES(?, 'g', ?)", (t * 100 + i, i))]
                )
                if snapshot_of(fp) < res.cid:
                    late.append(res.cid)  # returned before the follower had it
        except BaseException as e:
            errors.append(e)
        finally:
            c.close()

    try:
        runner = leader.runner
        assert runner is not None
        wait_until(lambda: len(runner.followers) == 1, what="the feedback channel")
        ts = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        assert not errors and not late
        cm = leader.db.committer()
        assert cm.transactions == 60 and cm.groups < 60  # they shared groups
    finally:
        f.close()
        leader.close()
