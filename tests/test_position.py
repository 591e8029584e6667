"""Hash vectors computed here with hashlib.md5 over the byte layout of SPEC 1."""

from __future__ import annotations

import hashlib
import shutil
import struct

from hctserver import Database, entry_hash, fold
from hctserver.position import ZERO_HASH, Entry, chain, fold_all

import dbdump
from helpers import leader, replay


def md5(b: bytes) -> bytes:
    return hashlib.md5(b).digest()


def be64(v: int) -> bytes:
    return struct.pack(">q", v)


def test_entry_hash_matches_spec_layout() -> None:
    data = bytes(range(256)) * 3
    want = md5(be64(7) + "CREATE TABLE é(x)".encode() + data + be64(3))
    assert entry_hash(7, "CREATE TABLE é(x)", data, 3) == want
    # no separators: moving a byte between schema and data keeps the hash
    assert entry_hash(1, "ab", b"c", 0) == entry_hash(1, "a", b"bc", 0)
    assert entry_hash(-1, "", b"", -(2**63)) == md5(b"\xff" * 8 + b"\x80" + b"\x00" * 7)


def test_fold_is_md5_of_concatenation() -> None:
    h1, h2 = md5(b"one"), md5(b"two")
    assert fold(ZERO_HASH, h1) == md5(bytes(16) + h1)
    assert fold(fold(ZERO_HASH, h1), h2) == md5(md5(bytes(16) + h1) + h2)
    assert fold_all(ZERO_HASH, [h1, h2]) == md5(md5(bytes(16) + h1) + h2)


def test_chain_hashes_a_contiguous_run_and_stops_at_a_gap() -> None:
    es = [Entry(5, 1, "", b"a"), Entry(6, 1, "CREATE TABLE x(y)", b""), Entry(8, 6, "", b"c")]
    tag = object()
    hashes, last, h = chain(es, 4, ZERO_HASH, tag)
    h5 = md5(be64(5) + b"a" + be64(1))
    h6 = md5(be64(6) + b"CREATE TABLE x(y)" + be64(1))
    assert hashes[0] == (h5, md5(bytes(16) + h5), tag)
    assert hashes[1] == (h6, md5(md5(bytes(16) + h5) + h6), tag)
    assert hashes[2] is None and last == 6 and h == hashes[1][1]


def test_journal_rows_and_position_follow_the_spec(tmp_path) -> None:
    db = leader(str(tmp_path / "l.db"), 25)
    rows = dbdump.journal(db.path)
    assert [r[0] for r in rows] == list(range(1, 27))
    h = bytes(16)
    for cid, schema, data, schemacid, hsh, vhash in rows:
        assert hsh == md5(be64(cid) + schema.encode() + data + be64(schemacid))
        h = md5(h + hsh)
        assert vhash == h
        assert db.hash_at(cid) == h
    assert db.position() == (26, h)
    assert rows[0][3] == 0 and all(r[3] == 1 for r in rows[1:])  # schemacid


def test_truncated_database_has_its_twins_position(tmp_path) -> None:
    db = leader(str(tmp_path / "l.db"), 30)
    db.close()
    shutil.copy(tmp_path / "l.db", tmp_path / "twin.db")
    a = Database(str(tmp_path / "l.db"), init=False)
    b = Database(str(tmp_path / "twin.db"), init=False)
    want_h20 = b.hash_at(20)
    assert a.truncate(21) == 20
    assert a.baseline() == (20, 1, want_h20)
    assert a.position() == b.position()
    assert a.hash_at(20) == want_h20 and a.hash_at(19) is None
    assert a.hash_at(31) == b.hash_at(31)
    # truncating everything: the position lives on in the baseline alone
    a.truncate(32)
    assert a.status()["journal_entries"] == 0
    assert a.position() == b.position()


def test_truncated_follower_keeps_matching_and_applying(tmp_path) -> None:
    src = leader(str(tmp_path / "l.db"), 40)
    f = replay(src, str(tmp_path / "f.db"), upto=20)
    f.truncate(15)
    ap = f.applier()
    ap.add_many(src.iter_entries(after=20))
    ap.apply()
    assert f.position() == src.position()
    assert dbdump.tables(f.path) == dbdump.tables(src.path)


def test_truncate_above_the_snapshot_is_refused(tmp_path) -> None:
    import pytest

    from hctserver.errors import JournalError

    db = leader(str(tmp_path / "l.db"), 3)
    with pytest.raises(JournalError, match="snapshot is 4"):
        db.truncate(6)
    assert db.truncate(1) == 0
