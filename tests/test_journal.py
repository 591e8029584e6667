"""The journal layer: capture on the leader, apply on the follower."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
from typing import Any

import apsw
import pytest

from hctserver import Database, Entry, Mode, entry_hash, fold
from hctserver.errors import (
    ApplyError,
    BusyError,
    DivergenceError,
    ModeError,
    NotReplicationDatabaseError,
    ProtocolError,
    UnsupportedStatementError,
)

import dbdump
from helpers import entries, file_bytes, leader, replay, wait_until


def same(a: str, b: str) -> None:
    assert dbdump.everything(a) == dbdump.everything(b)
    pa, pb = Database(a, init=False), Database(b, init=False)
    assert pa.position() == pb.position()


# --- modes -------------------------------------------------------------------


def test_new_and_reopened_databases_start_as_followers(tmp_path) -> None:
    db = Database(str(tmp_path / "x.db"))
    assert db.mode is Mode.FOLLOWER
    db.set_mode("leader")
    db.close()
    assert Database(str(tmp_path / "x.db")).mode is Mode.FOLLOWER


def test_sql_write_refused_in_follower_mode(tmp_path) -> None:
    db = leader(str(tmp_path / "l.db"), 3)
    db.set_mode(Mode.FOLLOWER)
    before = dbdump.everything(db.path)
    c = db.connect()
    for attempt in (
        lambda: c.execute("INSERT INTO t1 VALUES(100, 1, 2)"),
        lambda: c.execute("CREATE TABLE t2(x)"),
        lambda: c.executemany("INSERT INTO t1 VALUES(?, 1, 2)", [(200,), (201,)]),
    ):
        with pytest.raises(ModeError, match="FOLLOWER mode: writes are refused"):
            attempt()
    c.execute("BEGIN")
    assert c.execute("SELECT count(*) FROM t1").fetchone()[0] > 0  # reads are fine
    with pytest.raises(ModeError):
        c.execute("UPDATE t1 SET b=1")
    c.execute("COMMIT")
    assert dbdump.everything(db.path) == before


def test_apply_refused_in_leader_mode(tmp_path) -> None:
    db = leader(str(tmp_path / "l.db"), 1)
    with pytest.raises(ModeError, match="LEADER mode: applying journal entries is refused"):
        db.applier()


def test_becoming_leader_is_refused_while_the_journal_has_a_hole(tmp_path) -> None:
    src = leader(str(tmp_path / "l.db"), 6)
    f = Database(str(tmp_path / "f.db"))
    ap = f.applier(window_bytes=0)
    es = entries(src)
    ap.add_many([es[0], es[3]])
    ap.apply()  # cid 4 is stored above the hole at 2
    with pytest.raises(ModeError, match="hole at cid 2"):
        f.set_mode("leader")
    assert f.rollback() == 1
    f.set_mode("leader")


def test_plain_files_and_missing_files_are_refused_without_init(tmp_path) -> None:
    with pytest.raises(NotReplicationDatabaseError, match="no such database"):
        Database(str(tmp_path / "missing.db"), init=False)
    plain = str(tmp_path / "plain.db")
    apsw.Connection(plain).execute("CREATE TABLE x(a)")
    with pytest.raises(NotReplicationDatabaseError, match="not a replication database"):
        Database(plain, init=False)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(NotReplicationDatabaseError, match="not an SQLite database"):
        Database(str(junk))


# --- capture -------------------------------------------------------------------


def test_rolled_back_and_empty_transactions_leave_no_journal_row(tmp_path) -> None:
    db = leader(str(tmp_path / "l.db"), 0)
    c = db.connect()
    c.execute("BEGIN")
    c.execute("INSERT INTO t1 VALUES(1, 2, 3)")
    c.execute("ROLLBACK")
    c.execute("UPDATE t1 SET b=5 WHERE a=99")  # changes nothing
    with pytest.raises(ZeroDivisionError), c:
        c.execute("INSERT INTO t1 VALUES(2, 2, 3)")
        raise ZeroDivisionError
    assert db.max_cid() == 1
    assert c.execute("SELECT count(*) FROM t1").fetchone()[0] == 0


def test_every_transaction_form_is_journaled(tmp_path) -> None:
    db = leader(str(tmp_path / "l.db"), 0)
    c = db.connect()
    c.execute("INSERT INTO t1 VALUES(1, 'auto', 0)")  # autocommit: cid 2
    c.execute("BEGIN IMMEDIATE; INSERT INTO t1 VALUES(2, 'x', 0); COMMIT")  # cid 3
    with c:  # cid 4, with a nested savepoint rolled back
        c.execute("INSERT INTO t1 VALUES(3, 'ctx', 0)")
        with pytest.raises(KeyError), c:
            c.execute("INSERT INTO t1 VALUES(4, 'gone', 0)")
            raise KeyError
    c.execute("SAVEPOINT outer_sp")  # cid 5: outermost RELEASE commits
    c.execute("INSERT INTO t1 VALUES(5, 'sp', 0)")
    c.execute("SAVEPOINT inner_sp")
    c.execute("INSERT INTO t1 VALUES(6, 'gone', 0)")
    c.execute("ROLLBACK TO inner_sp")
    c.execute("RELEASE outer_sp")
    c.executemany("INSERT INTO t1 VALUES(?, 'many', 0)", [(7,), (8,)])  # cid 6
    c.execute("BEGIN; END")  # nothing written: no entry
    assert db.max_cid() == 6
    assert [r[0] for r in c.execute("SELECT a FROM t1 ORDER BY a")] == [1, 2, 3, 5, 7, 8]
    same(db.path, replay(db, str(tmp_path / "f.db")).path)


def test_schema_changes_are_captured_in_order_with_rows(tmp_path) -> None:
    db = leader(str(tmp_path / "l.db"), 0)
    c = db.connect()
    c.execute("BEGIN")
    c.execute("INSERT INTO t1 VALUES(1, 1, 1)")
    c.execute("CREATE TABLE t2(a INTEGER PRIMARY KEY, b)")
    c.execute("INSERT INTO t2 VALUES(1, 'x')")
    c.execute("ALTER TABLE t2 ADD COLUMN c DEFAULT 'dflt'")
    c.execute("CREATE INDEX t2_b ON t2(b)")
    c.execute("ALTER TABLE t2 RENAME COLUMN b TO bb")
    c.execute("CREATE TABLE gone(x)")
    c.execute("INSERT INTO gone VALUES(1)")
    c.execute("DROP TABLE gone")
    c.execute("ALTER TABLE t1 DROP COLUMN c")
    c.execute("ALTER TABLE t1 RENAME TO t1new")
    c.execute("CREATE VIEW v AS SELECT * FROM t2")
    c.execute("CREATE TRIGGER tr AFTER INSERT ON t2 BEGIN UPDATE t2 SET c='trig'; END")
    c.execute("COMMIT")
    e = db.entry(2)
    assert e is not None and e.schemacid == 1
    assert e.schema.split(";")[0] == "CREATE TABLE t2(a INTEGER PRIMARY KEY, b)"
    assert "ALTER TABLE t1 RENAME TO t1new" in e.schema
    c.execute("INSERT INTO t2(a) VALUES(2)")
    assert db.entry(3).schemacid == 2  # type: ignore[union-attr]
    f = replay(db, str(tmp_path / "f.db"))
    same(db.path, f.path)
    assert dbdump.tables(f.path)["t2"][0][2] == ("text", "trig")


def test_system_tables_cannot_be_written_by_user_sql(tmp_path) -> None:
    db = leader(str(tmp_path / "l.db"), 2)
    c = db.connect()
    for sql in (
        "DELETE FROM hct_journal",
        "UPDATE hct_baseline SET cid=5",
        "DROP TABLE hct_journal",
    ):
        with pytest.raises(apsw.AuthError):
            c.execute(sql)
    assert db.max_cid() == 3


def test_vacuum_is_refused_because_it_renumbers_rowids(tmp_path) -> None:
    db = leader(str(tmp_path / "l.db"), 1)
    with pytest.raises(UnsupportedStatementError, match="VACUUM INTO"):
        db.connect().execute("VACUUM")


def test_commit_hooks_see_each_committed_entry(tmp_path) -> None:
    db = leader(str(tmp_path / "l.db"), 0)
    seen_db: list[Any] = []
    seen_conn: list[Any] = []
    db.add_commit_hook(lambda *a: seen_db.append(a))
    c = db.connect()
    c.add_commit_hook(lambda *a: seen_conn.append(a))
    other = db.connect()
    c.execute("INSERT INTO t1 VALUES(1, 2, 3)")
    other.execute("INSERT INTO t1 VALUES(2, 2, 3)")
    c.execute("BEGIN; INSERT INTO t1 VALUES(9, 9, 9); ROLLBACK")
    assert [a[0] for a in seen_db] == [2, 3]
    assert [a[0] for a in seen_conn] == [2]
    cid, schema, data, schemacid = seen_conn[0]
    assert db.entry(2) == Entry(cid, schemacid, schema, data)


def test_busy_timeout_applies_to_the_in_process_writer_lock(tmp_path) -> None:
    db = leader(str(tmp_path / "l.db"), 0)
    db.busy_timeout = 0.2
    a, b = db.connect(), db.connect()
    a.execute("BEGIN IMMEDIATE")
    with pytest.raises(BusyError, match="database is locked"):
        b.execute("INSERT INTO t1 VALUES(1, 1, 1)")
    a.execute("COMMIT")
    b.execute("INSERT INTO t1 VALUES(1, 1, 1)")
    assert db.max_cid() == 2


def test_a_lock_held_outside_the_process_gives_a_typed_busy_error(tmp_path) -> None:
    # A plain SQLite connection stands for another process holding the write lock
    # (a paused node, say): transact and execute both say so, typed, and nothing is written.
    db = leader(str(tmp_path / "l.db"), 0)
    db.busy_timeout = 0.2
    outsider = apsw.Connection(str(tmp_path / "l.db"))
    outsider.execute("BEGIN IMMEDIATE")
    c = db.connect()
    with pytest.raises(BusyError, match="another process held the write lock"):
        c.transact([("INSERT INTO t1 VALUES(1, 1, 1)", ())])
    with pytest.raises(BusyError, match="another process held the write lock"):
        c.execute("INSERT INTO t1 VALUES(1, 1, 1)")
    outsider.execute("ROLLBACK")
    c.transact([("INSERT INTO t1 VALUES(1, 1, 1)", ())])
    assert db.max_cid() == 2


def test_four_threads_give_a_gap_free_journal(tmp_path) -> None:
    db = leader(str(tmp_path / "l.db"), 0)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            c = db.connect()
            for i in range(150):
                c.execute("BEGIN CONCURRENT")
                c.execute("INSERT INTO t1 VALUES(?, ?, randomblob(10))", (k * 1000 + i, k))
                c.execute("COMMIT")
            c.close()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    cids = [r[0] for r in dbdump.journal(db.path)]
    assert cids == list(range(1, 602))
    same(db.path, replay(db, str(tmp_path / "f.db")).path)


# --- values and table shapes ----------------------------------------------------


def test_every_value_type_round_trips_exactly(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(dbdump, "ZERO_SIGN_MATTERS", True)
    db = leader(str(tmp_path / "l.db"), 0, schema="CREATE TABLE v(k INTEGER PRIMARY KEY, x)")
    values = [
        None,
        0,
        1,
        -1,
        2**63 - 1,
        -(2**63),
        0.0,
        -0.0,
        1.5,
        -2.25e-308,
        1e308,
        math.inf,
        -math.inf,
        "",
        "plain",
        "unicode é 日本 \U0001f600",
        "nul\x00inside",
        b"",
        b"\x00\xff" * 10,
        os.urandom(1 << 20),
    ]
    c = db.connect()
    for i, v in enumerate(values):
        c.execute("INSERT INTO v VALUES(?, ?)", (i, v))
    f = replay(db, str(tmp_path / "f.db"))
    same(db.path, f.path)
    got = dict(apsw.Connection(f.path).execute("SELECT k, x FROM v").fetchall())
    for i, v in enumerate(values):
        assert type(got[i]) is type(v) and got[i] == v
        if isinstance(v, float):
            assert math.copysign(1, got[i]) == math.copysign(1, v)


def test_a_trigger_does_not_fire_again_on_the_follower(tmp_path) -> None:
    db = Database(str(tmp_path / "l.db"))
    db.set_mode("leader")
    c = db.connect()
    c.execute(
        "CREATE TABLE t(a INTEGER PRIMARY KEY, b);"
        "CREATE TABLE log(id INTEGER PRIMARY KEY AUTOINCREMENT, a);"
        "CREATE TRIGGER t_ins AFTER INSERT ON t BEGIN INSERT INTO log(a) VALUES(new.a); END;"
        "CREATE TABLE p(id INTEGER PRIMARY KEY);"
        "CREATE TABLE ch(id INTEGER PRIMARY KEY, pid REFERENCES p(id) ON DELETE CASCADE)"
    )
    c.execute("PRAGMA foreign_keys=ON")
    for i in range(5):
        c.execute("INSERT INTO t VALUES(?, ?)", (i, i))
    c.execute("INSERT INTO p VALUES(1)")
    c.execute("INSERT INTO ch VALUES(1, 1), (2, 1)")
    c.execute("DELETE FROM p")  # cascades on the leader, and the cascade is journaled
    f = replay(db, str(tmp_path / "f.db"))
    same(db.path, f.path)
    assert len(dbdump.tables(f.path)["log"]) == 5
    assert dbdump.tables(f.path)["ch"] == []


def test_adopting_an_existing_database(tmp_path) -> None:
    path = str(tmp_path / "existing.db")
    raw = apsw.Connection(path)
    raw.execute(
        "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, price REAL, img BLOB);"
        "CREATE TABLE tags(item INTEGER, tag TEXT, PRIMARY KEY(item, tag)) WITHOUT ROWID;"
        "CREATE TABLE notes(body);"
        "CREATE TABLE seq(id INTEGER PRIMARY KEY AUTOINCREMENT, v);"
        "CREATE INDEX items_name ON items(name);"
        "CREATE VIEW cheap AS SELECT * FROM items WHERE price < 10;"
        "CREATE TRIGGER notes_t AFTER INSERT ON notes BEGIN INSERT INTO seq(v) VALUES(1); END"
    )
    with raw:
        raw.executemany(
            "INSERT INTO items VALUES(?, ?, ?, ?)",
            ((i, f"item {i}", i / 7, os.urandom(8) if i % 3 else None) for i in range(10_000)),
        )
        raw.executemany("INSERT INTO tags VALUES(?, ?)", ((i, t) for i in range(500) for t in "ab"))
        raw.executemany("INSERT INTO notes VALUES(?)", ((f"n{i}",) for i in range(300)))
        raw.execute("DELETE FROM notes WHERE rowid % 2 = 0")  # rowids with gaps
    raw.close()
    before = {"tables": dbdump.tables(path), "schema": dbdump.schema(path)}
    db = Database(path)
    assert db.position().cid == 1 and db.max_cid() == 1
    e = db.entry(1)
    assert e is not None and e.schemacid == 0 and "CREATE TABLE items" in e.schema
    assert dbdump.tables(path) == before["tables"] and dbdump.schema(path) == before["schema"]
    f = replay(db, str(tmp_path / "f.db"))
    same(path, f.path)
    assert len(dbdump.tables(f.path)["items"]) == 10_000
    # and the adopted database carries on as a leader
    db.set_mode("leader")
    db.connect().execute("UPDATE items SET price=0 WHERE id=5")
    assert db.max_cid() == 2


# --- the follower's apply --------------------------------------------------------


def test_out_of_order_entries_wait_for_the_hole_and_duplicates_are_ignored(tmp_path) -> None:
    src = leader(str(tmp_path / "l.db"), 9)
    es = entries(src)
    f = Database(str(tmp_path / "f.db"))
    ap = f.applier()
    assert ap.add(es[5]) and ap.add(es[2])
    assert not ap.add(es[5])
    assert ap.apply() == 0 and ap.pending == 2
    ap.add_many(es[:2])
    assert ap.apply() == 3
    ap.add_many(reversed(es))
    assert ap.apply() == 10 and ap.pending == 0
    assert not ap.add(es[0])
    same(src.path, f.path)


def test_divergence_is_detected_with_nothing_applied(tmp_path) -> None:
    src = leader(str(tmp_path / "l.db"), 6)
    es = entries(src)
    f = replay(src, str(tmp_path / "f.db"), upto=4)
    before = file_bytes(f.path)
    ap = f.applier()
    forged = es[2]._replace(data=es[2].data[:-1] + bytes([es[2].data[-1] ^ 1]))  # never equal
    with pytest.raises(DivergenceError, match=r"cid 3 is already in .* different hash"):
        ap.add(forged)
    ap.add(es[5])
    with pytest.raises(DivergenceError, match="cid 6 arrived twice"):
        ap.add(es[5]._replace(schemacid=5))
    assert file_bytes(f.path) == before
    assert f.position().cid == 4


def test_rollback_discards_entries_above_the_first_hole_and_none_below(tmp_path) -> None:
    src = leader(str(tmp_path / "l.db"), 9)
    es = entries(src)
    f = replay(src, str(tmp_path / "f.db"), upto=3)
    tables_before = dbdump.tables(f.path)
    ap = f.applier(window_bytes=0)  # store what waits above the hole on disk
    ap.add_many([es[4], es[6], es[7]])
    ap.apply()
    ap.close()
    assert [r[0] for r in dbdump.journal(f.path)] == [1, 2, 3, 5, 7, 8]
    assert f.first_hole() == 4 and f.position().cid == 3
    assert dbdump.tables(f.path) == tables_before  # nothing above the hole applied
    assert f.rollback() == 3
    assert [r[0] for r in dbdump.journal(f.path)] == [1, 2, 3]
    assert f.position() == (3, src.hash_at(3))


def test_entries_stored_above_a_hole_are_applied_once_it_fills(tmp_path) -> None:
    src = leader(str(tmp_path / "l.db"), 30)
    es = entries(src)
    f = Database(str(tmp_path / "f.db"))
    ap = f.applier(window_bytes=100, batch_entries=4)
    ap.add_many(es[10:])
    ap.apply()
    assert ap.pending == len(es) - 10
    ap.close()
    ap = f.applier(window_bytes=100, batch_entries=4)  # a new applier finds them on disk
    ap.add_many(es[:10])
    assert ap.apply() == len(es)
    same(src.path, f.path)


def test_corrupt_or_unknown_data_is_refused_with_nothing_applied(tmp_path) -> None:
    src = leader(str(tmp_path / "l.db"), 3)
    es = entries(src)
    f = replay(src, str(tmp_path / "f.db"), upto=2)
    before = dbdump.everything(f.path)
    ap = f.applier()
    with pytest.raises(ApplyError, match="unknown data encoding 0x5a"):
        ap.add(Entry(3, 1, "", b"Zjunk"))
    ap.add(es[2]._replace(data=es[2].data[:7]))
    # bad bytes from the leader, not local corruption: a protocol error naming the cid
    with pytest.raises(ProtocolError, match="cid 3: the entry's data is not a valid session"):
        ap.apply()
    assert dbdump.everything(f.path) == before


def test_a_follower_not_at_the_entries_base_gets_an_apply_error(tmp_path) -> None:
    src = leader(str(tmp_path / "l.db"), 0)
    c = src.connect()
    c.execute("INSERT INTO t1 VALUES(1, 'a', 'b')")
    c.execute("INSERT INTO t1 VALUES(2, 'a', 'b')")
    es = entries(src)
    f = replay(src, str(tmp_path / "f.db"), upto=1)
    raw = apsw.Connection(f.path)
    raw.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)  # past the guards, on purpose
    raw.execute("INSERT INTO t1 VALUES(1, 'local', 'row')")  # a write behind the journal's back
    ap = f.applier()
    ap.add_many(es[1:])
    with pytest.raises(ApplyError, match=r"table t1, INSERT .*already exists"):
        ap.apply()
    assert f.position().cid == 1


def test_schema_entries_are_applied_alone(tmp_path) -> None:
    src = leader(str(tmp_path / "l.db"), 4)
    c = src.connect()
    c.execute("CREATE TABLE t2(x)")
    c.execute("INSERT INTO t2 VALUES(1)")
    f = Database(str(tmp_path / "f.db"))
    commits: list[int] = []
    ap = f.applier()
    orig = ap._apply_batch
    ap._apply_batch = lambda b: (commits.append(len(b)), orig(b))  # type: ignore[method-assign]
    ap.add_many(entries(src))
    ap.apply()
    assert commits == [1, 4, 1, 1]  # schema | 4 rows | schema | 1 row
    same(src.path, f.path)


def test_wait_for_returns_once_the_snapshot_reaches_the_cid(tmp_path) -> None:
    src = leader(str(tmp_path / "l.db"), 20)
    f = Database(str(tmp_path / "f.db"))
    assert not f.wait_for(5, timeout=0.05)

    def later() -> None:
        ap = f.applier()
        ap.add_many(src.iter_entries())
        ap.apply()

    t = threading.Thread(target=later)
    t.start()
    assert f.wait_for(21, timeout=30)
    t.join()
    assert f.snapshot() == 21


CHILD = textwrap.dedent(
    """
    import sys, time
    from hctserver import Database
    src, dst = Database(sys.argv[1], init=False), Database(sys.argv[2])
    es = list(src.iter_entries())
    ap = dst.applier(batch_entries=len(es))
    ap.add_many(es[:100])
    ap.apply()
    calls = [0]
    def progress():
        calls[0] += 1
        if calls[0] == 50:
            sys.stdout.write("inside\\n"); sys.stdout.flush()
            time.sleep(3600)   # stay inside the transaction until killed
        return 0
    ap._conn.set_progress_handler(progress, 100)
    ap.add_many(es[100:])
    ap.apply()
    """
)


def test_sigkill_in_the_middle_of_a_group_commit_leaves_a_consistent_snapshot(tmp_path) -> None:
    src = leader(str(tmp_path / "l.db"), 3000)
    dst = str(tmp_path / "f.db")
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, src.path, dst], stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == "inside\n"
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=30)
    f = Database(dst)
    snap = f.position()
    assert snap.cid == 100 and snap.hash == src.hash_at(100)
    ref = replay(src, str(tmp_path / "ref.db"), upto=100)
    assert dbdump.tables(dst) == dbdump.tables(ref.path)
    assert f.rollback() == 0
    ap = f.applier()
    ap.add_many(src.iter_entries(after=snap.cid))
    ap.apply()
    same(src.path, dst)


def test_wait_until_helper_times_out() -> None:
    with pytest.raises(AssertionError, match="timed out"):
        wait_until(lambda: False, timeout=0.05)


def test_tables_with_generated_columns_replicate(tmp_path) -> None:
    db = leader(str(tmp_path / "l.db"), 0)
    c = db.connect()
    shape = "CREATE TABLE g(a INTEGER PRIMARY KEY, b, c AS (b*2) STORED, d AS (b+1) VIRTUAL)"
    c.execute("BEGIN")
    c.execute(shape)
    # SQLite's preupdate hook cannot hand over such rows: this transaction is
    # refused as busy, and its retry is captured by a session object
    with pytest.raises(BusyError, match="generated columns"):
        c.execute("INSERT INTO g(a, b) VALUES(1, 10)")
    assert not c.in_transaction
    c.execute(shape)
    c.execute("INSERT INTO g(a, b) VALUES(1, 10), (2, 20)")
    c.execute("UPDATE g SET b=b+1")
    c.execute("DELETE FROM g WHERE a=2")
    c.execute("INSERT INTO t1 VALUES(1, 2, 3)")
    # a schema change inside a transaction keeps such rows in a session too
    c.execute("BEGIN")
    c.execute("INSERT INTO g(a, b) VALUES(3, 30)")
    c.execute("ALTER TABLE t1 ADD COLUMN d")
    c.execute("UPDATE g SET b=31 WHERE a=3")
    c.execute("COMMIT")
    f = replay(db, str(tmp_path / "f.db"))
    same(db.path, f.path)
    got = apsw.Connection(f.path).execute("SELECT * FROM g").fetchall()
    assert got == [(1, 11, 22, 12), (3, 31, 62, 32)]


OTHER_WRITER = textwrap.dedent(
    """
    import sys
    import hctserver
    db = hctserver.connect(sys.argv[1])
    for i in range(2):
        db.execute("INSERT INTO t1 VALUES(?, 'other', 'process')", (1000 + i,))
    db.db.truncate(db.db.snapshot() + 1)   # the journal is empty now
    db.close()
    """
)


def test_another_process_committing_and_truncating_does_not_break_the_chain(tmp_path) -> None:
    """This process caches the journal's tail; another one commits and
    truncates behind it; the next commit here still extends the true chain."""
    db = leader(str(tmp_path / "l.db"), 3)
    c = db.connect()
    c.execute("INSERT INTO t1 VALUES(500, 'here', 'first')")  # tail cached: cid 5
    p = subprocess.run(
        [sys.executable, "-c", OTHER_WRITER, db.path], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    assert db.baseline()[0] == 7 and db.journal_stats()[0] == 0
    c.execute("INSERT INTO t1 VALUES(501, 'here', 'second')")
    assert c.last_cid == 8
    e = db.entry(8)
    assert e is not None
    assert db.hash_at(8) == fold(db.baseline()[2], entry_hash(8, e.schema, e.data, e.schemacid))
    c.close()


def test_a_table_from_an_earlier_transaction_can_be_dropped(tmp_path) -> None:
    """Its guard triggers go with it (they cannot be dropped on their own),
    and a follower replaying the journal drops it too."""
    db = leader(str(tmp_path / "l.db"), 0)
    c = db.connect()
    c.execute("CREATE TABLE old(x)")
    c.execute("INSERT INTO old VALUES(1)")
    guards = [r[0] for r in c.execute("SELECT name FROM sqlite_schema WHERE type='trigger'")]
    assert guards
    with pytest.raises(apsw.AuthError):
        c.execute(f"DROP TRIGGER {guards[0]}")
    c.execute("DROP TABLE old")
    assert c.execute("SELECT count(*) FROM sqlite_schema WHERE tbl_name='old'").fetchall() == [(0,)]
    f = replay(db, str(tmp_path / "f.db"))
    assert dbdump.tables(f.path) == dbdump.tables(db.path)
    assert "old" not in dbdump.tables(f.path)


def test_first_hole_sees_no_hole_while_another_connection_commits(tmp_path) -> None:
    """It reads the applied and the stored cids in one snapshot: a commit by
    another connection in between is not a hole (hctserver.connect() would
    refuse to make the database a leader)."""
    path = str(tmp_path / "l.db")
    writer_db = leader(path, 0)
    stop = threading.Event()

    def write() -> None:
        c = writer_db.connect()
        while not stop.is_set():
            c.execute("INSERT INTO t1 VALUES(NULL, 1, 2)")
        c.close()

    t = threading.Thread(target=write)
    t.start()
    reader = Database(path)
    try:
        wait_until(lambda: reader.snapshot() > 50, what="commits")
        holes = [h for h in (reader.first_hole() for _ in range(3000)) if h is not None]
    finally:
        stop.set()
        t.join(30)
    assert holes == []
    assert reader.snapshot() > 50
