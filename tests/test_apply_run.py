"""The applier's fast path for catch-up: entries in cid order from the
snapshot, hashed along one chain by the receiver, applied as a run."""

from __future__ import annotations

from typing import Any

import pytest

from hctserver import Database, Entry
from hctserver.errors import ApplyError, ProtocolError
from hctserver.position import chain

import dbdump


def _leader(path: str) -> Database:
    """Writes, a schema change in the middle, more writes, a table dropped."""
    db = Database(path)
    db.set_mode("leader")
    c = db.connect()
    c.execute("CREATE TABLE t1(a INTEGER PRIMARY KEY, b, c)")
    for i in range(40):
        c.execute("REPLACE INTO t1 VALUES(?, randomblob(10), ?)", (i % 13, i))
    c.execute("CREATE TABLE t2(k TEXT PRIMARY KEY, v) WITHOUT ROWID")
    for i in range(30):
        c.execute("INSERT OR REPLACE INTO t2 VALUES(?, ?)", (f"k{i % 7}", i))
        c.execute("DELETE FROM t1 WHERE a = ?", (i % 13,))
    c.execute("ALTER TABLE t1 ADD COLUMN d DEFAULT 5")
    c.executemany("INSERT OR REPLACE INTO t1 VALUES(?, 'x', 1, ?)", [(i, i) for i in range(9)])
    c.close()
    return db


def _feed(src: Database, path: str, chunk: int, mangle: Any = None, **options: Any) -> Database:
    """What a follower's receiver does: chunks, hashed along one chain."""
    db = Database(path)
    ap = db.applier(**options)
    es = list(src.iter_entries())
    if mangle is not None:
        es = mangle(es)
    tag = object()
    last, vh = ap.position
    try:
        for i in range(0, len(es), chunk):
            part = es[i : i + chunk]
            hashes, last, vh = chain(part, last, vh, tag)
            ap.add_many(part, hashes)
            if i // chunk % 3 == 2:
                ap.apply()
        ap.apply()
    finally:
        ap.close()
    return db


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_a_run_with_schema_changes_ends_identical(tmp_path, chunk: int) -> None:
    src = _leader(str(tmp_path / "l.db"))
    db = Database(str(tmp_path / "f.db"))
    ap = db.applier(batch_entries=25)
    es = list(src.iter_entries())
    hashes, _, _ = chain(es, 0, ap.position.hash, object())
    for i in range(0, len(es), chunk):
        ap.add_many(es[i : i + chunk], hashes[i : i + chunk])
    assert ap.apply() == src.max_cid()
    schema_entries = sum(1 for e in es if e.schema)
    assert ap.fast == len(es) - schema_entries  # all but the schema entries went as runs
    assert ap.applied == len(es)
    ap.close()
    assert dbdump.everything(src.path) == dbdump.everything(db.path)
    assert db.position() == src.position() and db.check_journal() is None


def test_entries_out_of_order_or_from_elsewhere_take_the_general_path(tmp_path) -> None:
    src = _leader(str(tmp_path / "l.db"))
    es = list(src.iter_entries())
    db = Database(str(tmp_path / "f.db"))
    ap = db.applier()
    # the second half first (above a hole), then the first half; each
    # receiver's chain has its own tag
    half = len(es) // 2
    h2, _, _ = chain(es[half:], half, bytes(16), object())  # from a wrong H: not trusted
    ap.add_many(es[half:], h2)
    h1, _, _ = chain(es[:half], 0, bytes(16), object())
    ap.add_many(es[:half], h1)
    assert ap.apply() == src.max_cid()
    assert ap.fast == 0
    ap.close()
    assert dbdump.everything(src.path) == dbdump.everything(db.path)
    assert db.position() == src.position()


def _bad_data(es: list[Entry]) -> list[Entry]:
    i = len(es) - 5
    return [*es[:i], es[i]._replace(data=b"P" + es[i].data[1:][:3]), *es[i + 1 :]]


def test_an_error_inside_a_run_is_named_as_the_general_path_names_it(tmp_path) -> None:
    src = _leader(str(tmp_path / "l.db"))
    with pytest.raises((ProtocolError, ApplyError)) as fast:
        _feed(src, str(tmp_path / "a.db"), 1000, _bad_data)
    db = Database(str(tmp_path / "b.db"))
    ap = db.applier()
    ap.add_many(_bad_data(list(src.iter_entries())))  # no hashes: the general path only
    with pytest.raises((ProtocolError, ApplyError)) as general:
        ap.apply()
    assert type(fast.value) is type(general.value) and str(fast.value) == str(general.value)
    assert "nothing of" in str(fast.value)
    # and what came before the bad entry's batch is applied, consistently
    a = Database(str(tmp_path / "a.db"), init=False)
    assert a.check_journal() is None and a.snapshot() < src.max_cid()
