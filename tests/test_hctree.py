"""hctree's journal entry format, against the vectors made on the real C
system (tests/data/hctree-vectors.json: ../shared/interop/vectors.json, FORMAT.md)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import apsw
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hctserver import Database
from hctserver.errors import ProtocolError
from hctserver.journal import hctformat
from hctserver.journal.hctapply import HctApplier
from hctserver.position import entry_hash, fold

# a copy of ../shared/interop/vectors.json (made on the real C system; see
# FORMAT.md there), so that these tests run wherever the repository is
VECTORS = Path(__file__).with_name("data") / "hctree-vectors.json"


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    return dict(json.loads(VECTORS.read_text()))


def hctree_leader(path: str) -> Database:
    """A new `--format hctree` database in LEADER mode."""
    db = Database(path, format="hctree")
    db.set_mode("leader")
    return db


def entries(v: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for t in v["transactions"] for e in t["entries"]]


def test_hashes_and_the_chain_are_the_c_systems(vectors) -> None:
    h = bytes.fromhex(vectors["baseline"]["hash_hex"])
    for e in entries(vectors):
        data = bytes.fromhex(e["data_hex"])
        eh = entry_hash(e["cid"], e["schema"], data, e["schemacid"])
        assert eh.hex() == e["hash_hex"], e["cid"]
        h = fold(h, eh)
        assert h.hex() == e["version_hash_hex"], e["cid"]


def _value(v: Any) -> Any:
    if isinstance(v, dict):
        if "blob" in v:
            return bytes.fromhex(v["blob"])
        return struct.unpack(">d", bytes.fromhex(v["ieee754"]))[0]
    return v


def _tables(conn: apsw.Connection, names: list[str]) -> dict[str, Any]:
    out = {}
    for name in names:
        cols = [r[1] for r in conn.execute(f"PRAGMA table_info({name})")]
        wr = conn.execute("SELECT wr FROM pragma_table_list WHERE name=?", (name,)).fetchone()[0]
        if wr:
            rows = [list(r) for r in conn.execute(f"SELECT * FROM {name}")]
            rows.sort(key=lambda r: json.dumps(r, default=lambda b: b.hex()))
        else:
            rows = [list(r) for r in conn.execute(f"SELECT rowid, * FROM {name} ORDER BY rowid")]
        out[name] = (cols, rows)
    return out


def _expected(v: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, t in v["final_tables"].items():
        rows = []
        for r in t["rows"]:
            vals = [_value(x) for x in r["values"]]
            rows.append(vals if t["without_rowid"] else [r["rowid"], *vals])
        if t["without_rowid"]:
            rows.sort(key=lambda r: json.dumps(r, default=lambda b: b.hex()))
        out[name] = (t["columns"], rows)
    return out


def test_decoding_every_entry_reproduces_the_final_tables(vectors, tmp_path) -> None:
    conn = apsw.Connection(str(tmp_path / "replay.db"))
    applier = HctApplier(conn)
    for e in entries(vectors):
        conn.execute("BEGIN")
        if e["schema"]:
            for _ in conn.execute(e["schema"]):
                pass
            applier.schema_changed()
        applier.apply(bytes.fromhex(e["data_hex"]), lambda name: True, f"cid {e['cid']}")
        conn.execute("COMMIT")
    want = _expected(vectors)
    assert _tables(conn, list(want)) == want


def test_records_encode_as_the_c_system_wrote_them(vectors) -> None:
    """Every entry's data, decoded and encoded again, gives the same bytes."""
    for e in entries(vectors):
        data = bytes.fromhex(e["data_hex"])
        assert hctformat.encode(hctformat.decode(data)) == data, e["cid"]


def test_wide_negatives_are_what_the_c_follower_reads_right() -> None:
    rec = hctformat.encode_record([-1, -129, 5, None], wide_negatives=True)
    assert hctformat.decode_record(rec) == (-1, -129, 5, None)
    header = rec[1:5]
    assert list(header) == [6, 6, 1, 0]  # 8-byte ints for the negatives only


@given(
    st.lists(
        st.one_of(
            st.none(),
            st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
            st.floats(allow_nan=False),
            st.text(max_size=300),
            st.binary(max_size=300),
        ),
        max_size=40,
    )
)
def test_records_round_trip(values) -> None:
    assert hctformat.decode_record(hctformat.encode_record(values)) == tuple(values)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"X", "expected a table"),
        (b"Tt1", "malformed"),
        (b"Tt1\x00z", "unknown record kind"),
        (b"Tt1\x00i\x01\x7f\x02", "runs past the end"),
        (b"Tt1\x00i\x01\x02\x05\x01", "record header of 5 bytes"),
        (b"Tt1\x00i\x01\x02\x02\x0a", "serial type 10"),
    ],
)
def test_malformed_data_is_a_protocol_error(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        hctformat.decode(data)


# --- our leader writing hctree's format -------------------------------------------------


def _rowid_prefix(v: dict[str, Any]) -> list[dict[str, Any]]:
    """The transactions on rowid tables (the C follower takes no other)."""
    out = []
    for t in v["transactions"]:
        if "WITHOUT ROWID" in t["sql"]:
            break
        out.append(t)
    return out


def test_a_hctree_format_leader_writes_what_the_c_system_wrote(vectors, tmp_path) -> None:
    """The same transactions on a `--format hctree` database: the same cids,
    schemas, schemacids, and data byte for byte, except that negative
    integers take 8 bytes (the C follower misreads shorter ones); entry
    hashes equal wherever the bytes are."""
    db = hctree_leader(str(tmp_path / "l.db"))
    assert db.baseline() == (6, 0, bytes(16))
    conn = db.connect()
    want = []
    for t in _rowid_prefix(vectors):
        conn.execute(t["sql"])
        want += t["entries"]
    got = list(db.iter_entries())
    assert [e.cid for e in got] == [e["cid"] for e in want]
    same = 0
    for e, w in zip(got, want, strict=True):
        data = bytes.fromhex(w["data_hex"])
        assert (e.schema, e.schemacid) == (w["schema"], w["schemacid"]), e.cid
        widened = hctformat.encode(hctformat.decode(data), wide_negatives=True)
        assert e.data == widened, e.cid
        if widened == data:
            same += 1
            assert entry_hash(e.cid, e.schema, e.data, e.schemacid).hex() == w["hash_hex"]
    assert same >= 20  # all but the entries holding small negative integers
    conn.close()
    db.close()


def test_what_a_c_follower_cannot_take_is_refused_at_commit(tmp_path) -> None:
    from hctserver.errors import UnsupportedStatementError

    db = hctree_leader(str(tmp_path / "l.db"))
    c = db.connect()
    c.execute("CREATE TABLE t(a INTEGER PRIMARY KEY, b REAL)")
    with pytest.raises(UnsupportedStatementError, match="WITHOUT ROWID"):
        c.execute("CREATE TABLE w(k PRIMARY KEY, v) WITHOUT ROWID")
    assert c.execute("SELECT count(*) FROM sqlite_schema WHERE name='w'").fetchall() == [(0,)]
    c.execute("INSERT INTO t VALUES(-1, 2.0)")  # negatives in 8 bytes, 2.0 as the integer 2
    (e,) = [e for e in db.iter_entries() if e.data]
    ((table,),) = [hctformat.decode(e.data)]
    assert table.ops == [hctformat.Op("i", -1, (None, 2))]
    assert e.data.endswith(hctformat.encode_record([None, 2]))
    c.close()
    db.close()


def test_the_format_is_chosen_when_a_database_is_made(tmp_path) -> None:
    from hctserver.errors import ConfigError

    plain = str(tmp_path / "plain.db")
    c = apsw.Connection(plain)
    c.execute("CREATE TABLE x(a)")
    c.close()
    with pytest.raises(ConfigError, match="an hctree-format database starts empty"):
        Database(plain, format="hctree")
    db = Database(str(tmp_path / "h.db"), format="hctree")
    assert db.format == "hctree"
    db.close()
    with pytest.raises(ConfigError, match="writes entries in the hctree format"):
        Database(str(tmp_path / "h.db"), format="session")
    assert Database(str(tmp_path / "h.db")).format == "hctree"
    assert Database(str(tmp_path / "s.db")).format == "session"
    with pytest.raises(ConfigError, match="format must be one of"):
        Database(str(tmp_path / "z.db"), format="xml")


def test_our_nodes_replicate_an_hctree_format_database(tmp_path) -> None:
    """An empty follower (no snapshots) SYNCs from cid 0: the leader answers
    from its journal's start, as the C leader does, and the follower takes
    that start as its baseline; writers run all along."""
    import threading

    from helpers import wait_until
    from nodes import end_identical, follower_node, gated_writer, leader_node

    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    db = hctree_leader(lp)
    db.connect().execute("CREATE TABLE t1(a INTEGER PRIMARY KEY, b, c)")
    assert [db.hash_at(c) for c in (0, 5, 6)] == [bytes(16)] * 3
    assert db.sync_start(0) == 6 and db.sync_start(7) == 7
    db.close()
    gate = threading.Event()
    gate.set()
    leader = leader_node(lp, [gated_writer(gate)] * 2)
    f = follower_node(fp, leader.port, extra={"bootstrap": False})
    try:
        wait_until(lambda: f.runner.stats.phase == "stream", 30, "streaming")
        wait_until(lambda: leader.db.max_cid() > 3000, 30, "commits")
    finally:
        end_identical(leader, f, lp, fp)
    assert Database(fp).baseline() == (6, 0, bytes(16))


@given(
    st.lists(
        st.lists(
            st.tuples(
                st.integers(min_value=-3, max_value=3),
                st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=3)),
                st.booleans(),
            ),
            min_size=1,
            max_size=4,
            unique_by=lambda t: t[0],
        ),
        max_size=8,
    )
)
def test_entries_applied_together_end_as_applied_one_by_one(entries_ops) -> None:
    """Only a key's last record counts: a batch ends where entry-by-entry
    application ends."""
    datas = [
        hctformat.encode(
            [
                hctformat.TableOps(
                    "t",
                    [
                        hctformat.Op("i", k, (None, v)) if keep else hctformat.Op("d", k, ())
                        for k, v, keep in sorted(ops)
                    ],
                )
            ]
        )
        for ops in entries_ops
    ]
    results = []
    for together in (False, True):
        conn = apsw.Connection(":memory:")
        conn.execute("CREATE TABLE t(a INTEGER PRIMARY KEY, b)")
        applier = HctApplier(conn)
        if together:
            applier.apply_many(datas, lambda name: True, "batch")
        else:
            for d in datas:
                applier.apply(d, lambda name: True, "entry")
        results.append(conn.execute("SELECT a, b FROM t ORDER BY a").fetchall())
    assert results[0] == results[1]


def test_writes_then_a_rename_in_one_transaction_are_refused_on_hctree(tmp_path) -> None:
    from hctserver.errors import UnsupportedStatementError

    db = hctree_leader(str(tmp_path / "l.db"))
    c = db.connect()
    c.execute("CREATE TABLE t(a INTEGER PRIMARY KEY, b)")
    with pytest.raises(UnsupportedStatementError, match="rename it in a transaction of its own"):
        c.execute("BEGIN; INSERT INTO t VALUES(1, 'x'); ALTER TABLE t RENAME TO u; COMMIT")
    assert c.execute(
        "SELECT name FROM sqlite_schema WHERE type='table' AND name IN ('t','u')"
    ).fetchall() == [("t",)]
    c.execute("INSERT INTO t VALUES(1, 'x')")
    c.execute("ALTER TABLE t RENAME TO u")  # on its own: fine
    assert c.execute("SELECT * FROM u").fetchall() == [(1, "x")]
    c.close()
    db.close()
