"""The compiled twins (hctserver.native) against the pure-Python reference:
the same bytes, hashes, events and errors on the same inputs."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hctserver import position, speedups
from hctserver.errors import ProtocolError
from hctserver.journal import apply, hctformat, patchset
from hctserver.position import Entry
from hctserver.protocol import wire

native: Any = pytest.importorskip("hctserver.native", reason="the extension is not built here")

I64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
SCHEMA = st.text(max_size=40)
DATA = st.binary(max_size=300)
FAST = settings(
    max_examples=int(os.environ.get("SPEEDUPS_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FAST
@given(st.binary(max_size=300))
def test_md5_matches_hashlib(data: bytes) -> None:
    assert native.md5(data) == hashlib.md5(data).digest()


@FAST
@given(I64, SCHEMA, DATA, I64)
def test_entry_hash_and_fold(cid: int, schema: str, data: bytes, schemacid: int) -> None:
    h = position.py_entry_hash(cid, schema, data, schemacid)
    assert native.entry_hash(cid, schema, data, schemacid) == h
    assert native.entry_hash(cid, schema.encode(), data, schemacid) == h
    assert native.fold(h, h[::-1]) == position.py_fold(h, h[::-1])


@st.composite
def runs(draw: Any) -> tuple[list[Entry], int]:
    start = draw(st.integers(min_value=0, max_value=1000))
    cids = []
    c = start
    for _ in range(draw(st.integers(min_value=0, max_value=30))):
        c += draw(st.sampled_from([1, 1, 1, 1, 0, 2, -3]))
        cids.append(c)
    es = [Entry(c, draw(I64), draw(st.sampled_from(["", "CREATE TABLE x(a)", "é"])), draw(DATA))
          for c in cids]  # fmt: skip
    return es, start


@FAST
@given(runs(), st.binary(min_size=16, max_size=16))
def test_chain_matches(run: tuple[list[Entry], int], h: bytes) -> None:
    entries, start = run
    tag = object()
    assert native.chain(entries, start, h, tag) == position.py_chain(entries, start, h, tag)
    for item in native.chain(entries, start, h, tag)[0]:
        assert item is None or item[2] is tag


def test_chain_refuses_what_it_cannot_hash() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        native.chain([], 0, b"short", None)
    with pytest.raises(TypeError):
        native.chain([Entry(1, 0, "", "not bytes")], 0, bytes(16), None)  # type: ignore[arg-type]


# --- decoding ---------------------------------------------------------------------------


def _frame(e: Entry) -> bytes:
    return wire.encode_entry(e.cid, e.schemacid, e.schema, e.data)


@st.composite
def streams(draw: Any) -> bytes:
    """A SYNCREPLY, whole, cut short or corrupted."""
    out = [struct.pack("<ii", wire.SYNCREPLY, 1)]
    for i in range(draw(st.integers(min_value=0, max_value=12))):
        e = Entry(i + 1, draw(I64), draw(st.sampled_from(["", "CREATE TABLE t(a)"])), draw(DATA))
        out.append(_frame(e))
    out.append(wire.END_OF_ENTRIES)
    raw = bytearray(b"".join(out))
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        kind = draw(st.sampled_from(["flip", "cut", "size", "schema"]))
        if not raw:
            break
        at = draw(st.integers(min_value=0, max_value=len(raw) - 1))
        if kind == "flip":
            raw[at] ^= draw(st.integers(min_value=1, max_value=255))
        elif kind == "cut":
            del raw[at:]
        elif kind == "size":
            raw[at : at + 4] = struct.pack("<i", draw(st.integers(-5, 1 << 20)))
        else:
            raw[at : at + 2] = b"\xff\xfe"  # not UTF-8 where a schema may be
    return bytes(raw)


def _decode(raw: bytes, cuts: list[int], pure: bool, max_size: int) -> tuple[list[Any], Any, int]:
    dec = wire.ReplyDecoder(wire.SYNC, max_size, pure=pure)
    events: list[Any] = []
    err = None
    pos = 0
    try:
        for cut in [*sorted(cuts), len(raw)]:
            dec.feed(raw[pos:cut])
            pos = max(pos, cut)
            events.extend(dec.next_events())
            if dec.done:
                break
        if not dec.done:
            dec.eof()
    except ProtocolError as e:
        err = (type(e), str(e))
    return events, err, dec.entry_bytes


@FAST
@given(streams(), st.lists(st.integers(min_value=0, max_value=4000), max_size=4),
       st.sampled_from([1 << 30, 200]))  # fmt: skip
def test_decoding_matches_event_for_event_and_error_for_error(
    raw: bytes, cuts: list[int], max_size: int
) -> None:
    cuts = [min(c, len(raw)) for c in cuts]
    assert _decode(raw, cuts, False, max_size) == _decode(raw, cuts, True, max_size)


def test_native_decoding_yields_entries_of_the_entry_type() -> None:
    raw = (
        struct.pack("<ii", wire.SYNCREPLY, 1) + _frame(Entry(1, 0, "s", b"d")) + wire.END_OF_ENTRIES
    )
    events = _decode(raw, [], False, 1 << 30)[0]
    assert type(events[1]) is Entry and events[1] == Entry(1, 0, "s", b"d")


# --- patchset values -------------------------------------------------------------------

VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(alphabet=st.characters(), max_size=200),
    st.binary(max_size=300),
    st.none(),
    st.booleans(),
    st.just(patchset.UNDEFINED),
    st.binary(max_size=20).map(bytearray),
    st.sampled_from(["\ud800x", 1j, object()]),  # a lone surrogate, then what cannot be encoded
)


def _canon(x: Any) -> Any:
    """x with every float as its bits (NaN equals itself, -0.0 differs from 0.0)."""
    if isinstance(x, float):
        return ("float", struct.pack(">d", x))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [_canon(v) for v in x])
    return x


def _outcome(fn: Any, values: Any) -> Any:
    try:
        return _canon(fn(values))
    except Exception as e:
        return type(e), str(e)


@FAST
@given(st.lists(VALUES, max_size=8))
def test_encode_values_matches(values: list[Any]) -> None:
    def via_native(vs: list[Any]) -> bytes:
        out = native.encode_values(vs, patchset.UNDEFINED)
        return patchset.py_encode_values(vs) if out is None else out

    assert _outcome(via_native, values) == _outcome(patchset.py_encode_values, values)


# --- choosing -----------------------------------------------------------------------------


def test_the_implementation_in_use_and_forcing_pure_python() -> None:
    if speedups.native() is not None:
        assert speedups.implementation() == "native"
        assert position.chain is native.chain and wire.NATIVE_DECODE is native.decode_entries
    code = (
        "from hctserver import speedups, position; from hctserver.protocol import wire;"
        "print(speedups.implementation(), position.chain is position.py_chain,"
        " wire.NATIVE_DECODE is None)"
    )
    env = {**os.environ, speedups.ENV: "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["python", "(forced", "by", "HCTSERVER_PURE)", "True", "True"]


# --- hctree records -------------------------------------------------------------------

FIELD = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.binary(max_size=30),
)


def _corrupt(draw: Any, raw: bytes) -> bytes:
    b = bytearray(raw)
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        if not b:
            break
        at = draw(st.integers(min_value=0, max_value=len(b) - 1))
        kind = draw(st.sampled_from(["flip", "cut", "byte"]))
        if kind == "flip":
            b[at] ^= draw(st.integers(min_value=1, max_value=255))
        elif kind == "cut":
            del b[at:]
        else:
            b.insert(at, draw(st.sampled_from([0x80, 0xFF, 10, 11, 0x54, 0x00])))
    return bytes(b)


@st.composite
def records(draw: Any) -> bytes:
    fields = draw(st.lists(FIELD, max_size=6))
    return _corrupt(draw, hctformat.encode_record(fields, wide_negatives=draw(st.booleans())))


@st.composite
def hct_datas(draw: Any) -> bytes:
    tables = []
    for name in draw(st.lists(st.sampled_from(["t1", "t2", "é"]), min_size=1, max_size=3)):
        ops = []
        for _ in range(draw(st.integers(min_value=0, max_value=4))):
            kind = draw(st.sampled_from("idID"))
            rowid = draw(I64) if kind in "id" else None
            values = tuple(draw(st.lists(FIELD, min_size=1, max_size=4))) if kind != "d" else ()
            ops.append(hctformat.Op(kind, rowid, values))
        tables.append(hctformat.TableOps(name, ops))
    return _corrupt(draw, hctformat.encode(tables))


@FAST
@given(records())
def test_hctree_record_decoding_matches(rec: bytes) -> None:
    def via_native(r: bytes) -> Any:
        out = native.hct_record(r)
        return hctformat.py_decode_record(r) if out is None else out

    assert _outcome(via_native, rec) == _outcome(hctformat.py_decode_record, rec)


@FAST
@given(hct_datas())
def test_hctree_scan_matches(data: bytes) -> None:
    def via_native(d: bytes) -> Any:
        out = native.hct_scan(d, hctformat.RawOp)
        return hctformat.py_scan(d) if out is None else out

    assert _outcome(via_native, data) == _outcome(hctformat.py_scan, data)


@FAST
@given(runs(), st.binary(min_size=16, max_size=16))
def test_journal_rows_match(run: tuple[list[Entry], int], h: bytes) -> None:
    entries = [Entry(i + 1, e.schemacid, e.schema, e.data) for i, e in enumerate(run[0])]
    hashes, _, _ = position.py_chain(entries, 0, h, None)
    assert native.journal_rows(entries, hashes) == apply.py_journal_rows(entries, hashes)
