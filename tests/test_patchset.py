"""Our patchset encoder against the session extension's own output."""

from __future__ import annotations

import apsw
from hypothesis import given, settings
from hypothesis import strategies as st

from hctserver.journal import patchset

values = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=10),
    st.binary(max_size=10),
)


def session_patchset(setup: list[str], change: str, args: tuple[object, ...]) -> bytes:
    c = apsw.Connection(":memory:")
    for s in setup:
        c.execute(s)
    s = apsw.Session(c, "main")
    s.config(apsw.SQLITE_SESSION_OBJCONFIG_ROWID, 1)
    s.attach()
    c.execute(change, args)
    out: bytes = s.patchset()
    return out


@settings(max_examples=60)
@given(values, values, values)
def test_insert_update_delete_bytes_match_the_session(a: object, b: object, c: object) -> None:
    shape = "CREATE TABLE w(k TEXT, j INTEGER, v, x, PRIMARY KEY(j, k)) WITHOUT ROWID"
    header = patchset.encode_table("w", [2, 1, 0, 0])
    got = session_patchset([shape], "INSERT INTO w VALUES('k', 7, ?, ?)", (a, b))
    assert got == header + patchset.encode_insert(["k", 7, a, b])
    base = [shape, "INSERT INTO w VALUES('k', 7, 1, 2)"]
    got = session_patchset(base, "UPDATE w SET x=?", (c,))
    if c == 2 and type(c) is int:
        assert got == b""
    else:
        assert got == header + patchset.encode_update(["k", 7], [patchset.UNDEFINED, c])
    assert session_patchset(base, "DELETE FROM w", ()) == header + patchset.encode_delete(["k", 7])


def test_rowid_tables_carry_the_rowid_first() -> None:
    got = session_patchset(["CREATE TABLE r(x, y)"], "INSERT INTO r VALUES(?, ?)", (5, "a"))
    assert got == patchset.encode_table("r", [1, 0, 0]) + patchset.encode_insert([1, 5, "a"])
    (table,) = patchset.decode(got)
    assert table.name == "r" and table.changes == [(patchset.INSERT, False, (), (1, 5, "a"))]


@given(st.integers(0, 2**64 - 1))
def test_varint_round_trip(v: int) -> None:
    enc = patchset.put_varint(v)
    assert len(enc) <= 9
    assert patchset.get_varint(enc + b"junk", 0) == (v, len(enc))


def test_decode_spreads_update_records() -> None:
    data = patchset.encode_table("t", [1, 0, 0]) + patchset.encode_update(
        [4], [patchset.UNDEFINED, "z"]
    )
    (t,) = patchset.decode(data)
    assert t.changes == [
        (
            patchset.UPDATE,
            False,
            (4, patchset.UNDEFINED, patchset.UNDEFINED),
            (patchset.UNDEFINED, patchset.UNDEFINED, "z"),
        )
    ]
