"""The applier's path for small groups (a synchronous leader's stream: one
to a few entries per transaction): the data filter's tables kept across
transactions until the schema moves, a lone entry applied without grouping.
What is applied, and every refusal, stays as in larger batches."""

from __future__ import annotations

import apsw
import pytest

from hctserver import Database, Entry
from hctserver.errors import ApplyError, ProtocolError
from hctserver.journal import patchset

import dbdump


def _leader(path: str) -> Database:
    """Small commits, schema changes between them (a table added, a column
    added, a table dropped)."""
    db = Database(path)
    db.set_mode("leader")
    c = db.connect()
    c.execute("CREATE TABLE t1(a INTEGER PRIMARY KEY, b, c)")
    for i in range(20):
        c.execute("REPLACE INTO t1 VALUES(?, randomblob(10), ?)", (i % 7, i))
    c.execute("CREATE TABLE t2(k TEXT PRIMARY KEY, v) WITHOUT ROWID")
    for i in range(12):
        c.execute("INSERT OR REPLACE INTO t2 VALUES(?, ?)", (f"k{i % 5}", i))
        c.execute("DELETE FROM t1 WHERE a = ?", (i % 7,))
    c.execute("ALTER TABLE t1 ADD COLUMN d DEFAULT 5")
    c.executemany("INSERT OR REPLACE INTO t1 VALUES(?, 'x', 1, ?)", [(i, i) for i in range(5)])
    c.execute("CREATE TABLE t3(x PRIMARY KEY, y)")
    c.execute("INSERT INTO t3 VALUES(1, 2)")
    c.execute("DROP TABLE t2")
    c.execute("INSERT INTO t3 VALUES(2, 3)")
    c.close()
    return db


@pytest.mark.parametrize("group", [1, 2, 3, 10])
def test_small_groups_end_identical(tmp_path, group: int) -> None:
    src = _leader(str(tmp_path / "l.db"))
    es = list(src.iter_entries())
    db = Database(str(tmp_path / "f.db"))
    ap = db.applier()
    for i in range(0, len(es), group):
        ap.add_many(es[i : i + group])  # as streamed: no hashes from the receiver
        ap.apply()
    assert ap.snapshot == src.max_cid() and ap.applied == len(es)
    ap.close()
    assert dbdump.everything(src.path) == dbdump.everything(db.path)
    assert db.position() == src.position() and db.check_journal() is None


def _stream(tmp_path) -> tuple[list[Entry], Database]:
    """A leader's entries and an empty follower."""
    src = _leader(str(tmp_path / "l.db"))
    es = list(src.iter_entries())
    src.close()
    return es, Database(str(tmp_path / "f.db"))


def test_a_table_dropped_behind_the_appliers_back_is_refused_not_skipped(tmp_path) -> None:
    # the filter's tables are kept between transactions: a schema change made
    # by another connection must still be seen (a stale list would let SQLite
    # skip the changes to a missing table silently)
    es, db = _stream(tmp_path)
    ap = db.applier()
    for e in es[:5]:  # the CREATE of t1 and writes to it
        ap.add(e)
        ap.apply()
    other = apsw.Connection(db.path)
    other.execute("DROP TABLE t1")
    other.close()
    ap.add(es[5])
    with pytest.raises(ProtocolError, match="'t1', which is not a table of the follower's schema"):
        ap.apply()
    assert ap.snapshot == 5
    ap.close()
    assert db.position().cid == 5


def test_a_table_created_behind_the_appliers_back_is_let_through(tmp_path) -> None:
    es, db = _stream(tmp_path)
    ap = db.applier()
    ap.add(es[0])  # CREATE TABLE t1
    ap.apply()
    t9 = patchset.encode_table("t9", [1, 0]) + patchset.encode_insert([1, "x"])
    ap.add(Entry(2, 1, "", t9))
    with pytest.raises(ProtocolError, match="'t9', which is not a table"):
        ap.apply()  # the list is read now, and kept
    other = apsw.Connection(db.path)
    other.execute("CREATE TABLE t9(a INTEGER PRIMARY KEY, b)")
    other.close()
    assert ap.apply() == 2  # the schema moved: read again
    ap.close()
    c = apsw.Connection(db.path)
    assert c.execute("SELECT * FROM t9").fetchall() == [(1, "x")]
    c.close()


@pytest.mark.parametrize("alone", [True, False])
def test_refusals_and_conflicts_of_a_lone_entry_as_in_a_batch(tmp_path, alone: bool) -> None:
    es, db = _stream(tmp_path)
    ap = db.applier()
    ap.add(es[0])  # CREATE TABLE t1(a INTEGER PRIMARY KEY, b, c)
    ap.apply()
    ins = patchset.encode_table("t1", [1, 0, 0]) + patchset.encode_insert([1, "b", "c"])
    sysw = patchset.encode_table("hct_local", [1, 0]) + patchset.encode_insert(["k", "v"])
    empty = Entry(2, 1, "", b"")
    lead = [] if alone else [empty]
    at = 2 if alone else 3
    # a system table: refused, nothing applied
    for e in [*lead, Entry(at, 1, "", sysw)]:
        ap.add(e)
    with pytest.raises(ProtocolError, match="'hct_local', which is not a table"):
        ap.apply()
    assert ap.snapshot == 1
    ap.close()
    # a row that is there already: the conflict names the table and the key
    db.close()
    db = Database(str(tmp_path / "f.db"))
    c = db.open_connection(apply=True)
    c.execute("INSERT INTO t1 VALUES(1, 'old', 'old')")
    c.close()
    ap = db.applier()
    for e in [*lead, Entry(at, 1, "", ins)]:
        ap.add(e)
    with pytest.raises(ApplyError, match=r"table t1, INSERT of key \(1,\): a row with that key"):
        ap.apply()
    assert ap.snapshot == 1
    # an unknown encoding, as a spilled row would bring it back (add checks it first)
    with pytest.raises(ApplyError, match="unknown data encoding 0x5a"):
        ap.add(Entry(at + 5, 1, "", b"Zzz"))
    ap.close()
    assert db.position().cid == 1
