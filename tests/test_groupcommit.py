"""Group commit and the one-call transaction API (``transact``)."""

from __future__ import annotations

import threading
from typing import Any

import apsw
import pytest

from hctserver import Database
from hctserver.errors import ModeError, UnsupportedStatementError
from hctserver.journal import hctformat, patchset

import dbdump
from helpers import replay, wait_until

T1 = "CREATE TABLE t1(a INTEGER PRIMARY KEY, b TEXT NOT NULL, c)"


def _leader(path: str, fmt: str | None = None) -> Database:
    db = Database(path, format=fmt) if fmt else Database(path)
    db.set_mode("leader")
    c = db.connect()
    c.execute(T1)
    c.close()
    return db


def _keys(data: bytes) -> list[Any]:
    """The primary keys an entry's patchset writes."""
    return [(ch[2] or ch[3])[0] for t in patchset.decode(data) for ch in t.changes]


def test_transact_commits_one_entry_with_its_rows_and_cid(tmp_path) -> None:
    db = _leader(str(tmp_path / "l.db"))
    c = db.connect()
    before = db.max_cid()
    res = c.transact(
        [
            ("INSERT INTO t1 VALUES(?, ?, ?)", (1, "x", 1.5)),
            "INSERT INTO t1 VALUES(2, 'y', NULL)",
            ("UPDATE t1 SET c = ? WHERE a = ? RETURNING a, c", (7, 2)),
            "SELECT count(*) FROM t1",
        ]
    )
    assert res.cid == before + 1 == db.max_cid() == c.last_cid
    assert res.rows == [[], [], [(2, 7)], [(2,)]]
    (entry,) = [e for e in db.iter_entries() if e.cid == res.cid]
    assert sorted(_keys(entry.data)) == [1, 2]
    assert db.check_journal() is None
    # a read-only transaction journals nothing
    assert c.transact(["SELECT * FROM t1 ORDER BY a"]) == (0, [[(1, "x", 1.5), (2, "y", 7)]])
    assert db.max_cid() == res.cid
    f = replay(db, str(tmp_path / "f.db"))
    assert dbdump.everything(db.path) == dbdump.everything(f.path)
    c.close()
    f.close()
    db.close()


def test_concurrent_transactions_commit_in_groups_each_with_its_own_entry(tmp_path) -> None:
    db = _leader(str(tmp_path / "l.db"))
    threads, per = 8, 150
    cids: dict[int, int] = {}
    errors: list[BaseException] = []

    def run(t: int) -> None:
        c = db.connect()
        try:
            for i in range(per):
                key = t * 1000 + i
                res = c.transact([("INSERT INTO t1 VALUES(?, ?, ?)", (key, f"t{t}", i))])
                cids[key] = res.cid
        except BaseException as e:
            errors.append(e)
        finally:
            c.close()

    start = db.max_cid()
    ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors
    assert sorted(cids.values()) == list(range(start + 1, start + 1 + threads * per))
    by_cid = {e.cid: e for e in db.iter_entries()}
    for key, cid in cids.items():
        assert _keys(by_cid[cid].data) == [key]  # each entry holds its own transaction only
    cm = db.committer()
    assert cm.transactions == threads * per
    assert cm.groups < cm.transactions  # some groups carried several
    assert db.check_journal() is None
    f = replay(db, str(tmp_path / "f.db"))
    assert dbdump.everything(db.path) == dbdump.everything(f.path)
    f.close()
    db.close()


def _in_one_group(db: Database, works: list[list[Any]]) -> list[Any]:
    """Submit ``works`` from as many threads so that the first commits alone
    and the others (in any order) form one group: the writer lock is held
    until all of them are queued behind the first."""
    cm = db.committer()
    results: list[Any] = [None] * len(works)

    def run(i: int) -> None:
        c = db.connect()
        try:
            results[i] = c.transact(works[i])
        except BaseException as e:
            results[i] = e
        finally:
            c.close()

    first = threading.Thread(target=run, args=(0,))
    ts = [threading.Thread(target=run, args=(i,)) for i in range(1, len(works))]
    groups = cm.groups
    with db.share:
        first.start()
        wait_until(lambda: cm.queued() == 0 and cm.busy(), what="a first group")
        for t in ts:
            t.start()
        wait_until(lambda: cm.queued() == len(ts), what="the others queued")
    for t in [first, *ts]:
        t.join(60)
    assert cm.groups == groups + 2  # the first alone, then all the others together
    return results


def test_a_failing_transaction_rolls_back_alone_inside_its_group(tmp_path) -> None:
    db = _leader(str(tmp_path / "l.db"))
    works = [
        [
            ("INSERT INTO t1 VALUES(?, 'first', 0)", (1,)),
            ("INSERT INTO t1 VALUES(99, 'e', 0)", None),
        ],
        [("INSERT INTO t1 VALUES(?, 'b', 0)", (10,)), ("UPDATE t1 SET c = 1 WHERE a = 10", None)],
        # its first statement succeeds, its second fails (NOT NULL): both undone
        [("INSERT INTO t1 VALUES(20, 'c', 0)", None), ("INSERT INTO t1 VALUES(21, NULL, 0)", None)],
        [("INSERT INTO t1 VALUES(30, 'd', 0)", None)],
        # one statement that fails: SQLite undoes it (no savepoint needed)
        [("INSERT INTO t1 VALUES(99, 'dup', 0)", None)],
        [("DELETE FROM t1 WHERE a = 1", None)],
    ]
    res = _in_one_group(db, works)
    assert isinstance(res[2], apsw.ConstraintError) and "NOT NULL" in str(res[2])
    assert isinstance(res[4], apsw.ConstraintError) and "UNIQUE" in str(res[4])
    ok = [res[i].cid for i in (0, 1, 3, 5)]
    assert sorted(ok) == list(range(2, 6)) == list(range(2, db.max_cid() + 1))
    rows = db.connect().execute("SELECT a, b, c FROM t1 ORDER BY a").fetchall()
    assert rows == [(10, "b", 1), (30, "d", 0), (99, "e", 0)]
    by_cid = {e.cid: e for e in db.iter_entries()}
    assert _keys(by_cid[ok[1]].data) == [10] and _keys(by_cid[ok[3]].data) == [1]
    assert db.check_journal() is None
    f = replay(db, str(tmp_path / "f.db"))
    assert dbdump.everything(db.path) == dbdump.everything(f.path)
    f.close()
    db.close()


def test_transact_refuses_what_it_cannot_run(tmp_path) -> None:
    db = _leader(str(tmp_path / "l.db"))
    c = db.connect()
    for bad, what in [
        (["CREATE TABLE t2(x)"], "execute()"),
        (["INSERT INTO t1 VALUES(1,'a',1); INSERT INTO t1 VALUES(2,'b',2)"], "one statement"),
        ([], "at least one"),
        (["BEGIN"], "execute()"),
    ]:
        with pytest.raises(UnsupportedStatementError, match=what):
            c.transact(bad)
    c.execute("BEGIN")
    with pytest.raises(UnsupportedStatementError, match="open one"):
        c.transact(["INSERT INTO t1 VALUES(1, 'a', 1)"])
    c.execute("ROLLBACK")
    db.set_mode("follower")
    with pytest.raises(ModeError):
        c.transact(["INSERT INTO t1 VALUES(1, 'a', 1)"])
    assert db.max_cid() == 1
    c.close()
    db.close()


def test_transact_on_an_hctree_format_leader_journals_final_rows(tmp_path) -> None:
    db = _leader(str(tmp_path / "h.db"), fmt="hctree")
    c = db.connect()
    works = [
        [("INSERT INTO t1 VALUES(?, 'x', ?)", (k, k)) for k in (1, 2)],
        [("UPDATE t1 SET c = 5 WHERE a = 9", None)],
    ]
    res = _in_one_group(db, [[("INSERT INTO t1 VALUES(9, 'z', 0)", None)], *works])
    by_cid = {e.cid: e for e in db.iter_entries()}
    first = hctformat.decode(by_cid[res[1].cid].data)
    assert [op.rowid for t in first for op in t.ops] == [1, 2]
    (second,) = hctformat.decode(by_cid[res[2].cid].data)
    assert [op.rowid for op in second.ops] == [9]
    assert db.check_journal() is None
    c.close()
    db.close()


def test_a_transaction_that_fails_after_its_statement_ran_leaves_nothing(
    tmp_path, monkeypatch
) -> None:
    """A failure past the statements (here the journal insert, as on a full
    disk) undoes the transaction's rows too: never a row without its entry."""
    from hctserver.errors import DiskFullError
    from hctserver.journal.transaction import Transactions

    db = _leader(str(tmp_path / "l.db"))
    real = Transactions.journal

    def journal(self: Transactions, schema: str, data: bytes) -> Any:
        if 77 in _keys(data):
            raise DiskFullError("the disk is full (injected)")
        return real(self, schema, data)

    monkeypatch.setattr(Transactions, "journal", journal)
    c = db.connect()
    with pytest.raises(DiskFullError):  # alone in its group
        c.transact([("INSERT INTO t1 VALUES(77, 'x', 0)", None)])
    res = _in_one_group(  # one of several
        db,
        [
            [("INSERT INTO t1 VALUES(1, 'a', 0)", None)],
            [("INSERT INTO t1 VALUES(2, 'b', 0)", None)],
            [("INSERT INTO t1 VALUES(77, 'x', 0)", None)],
            [("INSERT INTO t1 VALUES(3, 'c', 0)", None)],
        ],
    )
    assert isinstance(res[2], DiskFullError)
    assert sorted(r.cid for i, r in enumerate(res) if i != 2) == [2, 3, 4]
    assert c.execute("SELECT a FROM t1 ORDER BY a").fetchall() == [(1,), (2,), (3,)]
    assert db.max_cid() == 4 and db.check_journal() is None
    c.close()
    f = replay(db, str(tmp_path / "f.db"))
    assert dbdump.everything(db.path) == dbdump.everything(f.path)
    f.close()
    db.close()


def test_writes_waiting_for_the_lock_when_the_mode_changes_are_refused(tmp_path) -> None:
    """A node that fences itself leaves LEADER mode while writers wait for the
    writer lock: none of them writes once it has the lock."""
    db = _leader(str(tmp_path / "l.db"))
    grouped, plain = db.connect(), db.connect()
    results: dict[str, Any] = {}

    def run(name: str, fn: Any) -> None:
        try:
            results[name] = fn()
        except BaseException as e:
            results[name] = e

    cm = db.committer()
    ts = [
        threading.Thread(
            target=run,
            args=("group", lambda: grouped.transact(["INSERT INTO t1 VALUES(1, 'g', 0)"])),
        ),
        threading.Thread(
            target=run, args=("plain", lambda: plain.execute("INSERT INTO t1 VALUES(2, 'p', 0)"))
        ),
    ]
    with db.share:
        for t in ts:
            t.start()
        wait_until(lambda: cm.busy(), what="the group waiting for the lock")
        wait_until(
            lambda: any(f.f_code.co_name == "lock" for f in _frames(ts[1])), what="the writer"
        )
        db.set_mode("follower")
    for t in ts:
        t.join(30)
    assert isinstance(results["group"], ModeError), results
    assert isinstance(results["plain"], ModeError), results
    assert "FOLLOWER mode" in str(results["group"])
    assert db.max_cid() == 1
    assert grouped.execute("SELECT count(*) FROM t1").fetchone() == (0,)
    grouped.close()
    plain.close()
    db.close()


def _frames(t: threading.Thread) -> list[Any]:
    """The frames of thread ``t``'s stack, innermost first."""
    import sys

    f = sys._current_frames().get(t.ident or 0)
    out = []
    while f is not None:
        out.append(f)
        f = f.f_back
    return out
