"""Synchronous commit: a commit returns once K followers acknowledged it."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from hctserver.errors import ConfigError
from hctserver.feedback import Report
from hctserver.followers import CommitClock, FollowerTable
from hctserver.synccommit import SyncCommit

from helpers import wait_until
from nodes import follower_node, init_db, leader_node, snapshot_of

# --- the rule, in memory -----------------------------------------------------------


def _table(n: int) -> tuple[FollowerTable, list[int]]:
    t = FollowerTable(CommitClock())
    return t, [t.add(f"127.0.0.1:{1000 + i}").id for i in range(n)]


def _report(t: FollowerTable, fid: int, applied: int, durable: int) -> None:
    t.report(fid, Report(applied, durable, applied, f"f{fid}"))


def test_a_commit_waits_for_k_acknowledgements_at_the_chosen_level() -> None:
    t, (a, b) = _table(2)
    sync = SyncCommit(t, 2, timeout=5.0)
    done: list[bool] = []
    th = threading.Thread(target=lambda: done.append(sync.wait(10)))
    th.start()
    _report(t, a, 10, 10)
    _report(t, b, 10, 9)  # applied, not yet on disk: not enough at level durable
    th.join(0.3)
    assert th.is_alive() and not done
    _report(t, b, 10, 10)
    th.join(5)
    assert done == [True] and sync.status()["state"] == "sync"
    assert sync.wait(9)  # below what was acknowledged: at once
    applied = SyncCommit(t, 2, level="applied", timeout=5.0)
    _report(t, a, 11, 10)
    _report(t, b, 11, 10)
    assert applied.wait(11) and not SyncCommit(t, 2, timeout=0.05).wait(11)


def test_too_few_followers_degrade_to_asynchronous_then_recover(caplog) -> None:
    t, (a,) = _table(1)
    sync = SyncCommit(t, 1, timeout=0.2)
    caplog.set_level(logging.WARNING, logger="hctserver")
    t0 = time.monotonic()
    assert sync.wait(5) is False
    assert time.monotonic() - t0 >= 0.2
    st = sync.status()
    assert st["state"] == "degraded" and st["degradations"] == 1
    assert "0 of 1 followers acknowledged cid 5 within 0.2 s" in caplog.text
    t1 = time.monotonic()
    assert sync.wait(6) is False and time.monotonic() - t1 < 0.1  # no waiting meanwhile
    _report(t, a, 5, 5)  # it has what was committed when it degraded: sync again
    assert sync.wait(7) is False  # ... and this commit waited, in vain, and degraded anew
    assert "waiting for them again" in caplog.text and sync.status()["degradations"] == 2
    _report(t, a, 8, 8)
    assert sync.wait(8) is True and sync.status()["state"] == "sync"


def test_stopping_releases_waiting_commits_and_no_sync_means_no_wait() -> None:
    t, _ = _table(1)
    sync = SyncCommit(t, 1)  # no timeout: as long as it takes
    done: list[bool] = []
    th = threading.Thread(target=lambda: done.append(sync.wait(3)))
    th.start()
    th.join(0.3)
    assert th.is_alive()
    sync.stop()
    th.join(5)
    assert done == [False]
    assert SyncCommit(t, 0).wait(100) and SyncCommit(t, 0).status()["state"] == "off"


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
        assert st["state"] == "sync" and st["waits"] >= 20
        # the follower goes: commits wait 1 s, then the leader commits
        # asynchronously and says so; the follower comes back and it waits again
        f.close()
        f = None
        t0 = time.monotonic()
        app.execute("INSERT OR REPLACE INTO t1 VALUES(100, 'alone', 0)")
        assert time.monotonic() - t0 >= 1.0
        assert runner.sync.status()["state"] == "degraded"
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
        assert cm.transactions == 60 and cm.groups < 60  # they shared waits
        assert runner.sync.status()["waits"] <= cm.groups
    finally:
        f.close()
        leader.close()
