"""The pure wire module: round trips, any split, and only typed errors."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hctserver.errors import (
    EntryTooSmallError,
    MissingNulError,
    ProtocolError,
    SizeLimitError,
    TruncatedMessageError,
    UnknownMessageTypeError,
)
from hctserver.position import Entry
from hctserver.protocol import wire

entries = st.builds(
    Entry,
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-(2**63), 2**63 - 1),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=30),
    st.binary(max_size=200),
)
hashes = st.binary(min_size=16, max_size=16)


def decode_all(dec: wire._Decoder, data: bytes, cuts: list[int]) -> list[object]:
    out: list[object] = []
    prev = 0
    for c in [*sorted(cuts), len(data)]:
        dec.feed(data[prev:c])
        out.extend(dec.next_events())
        prev = c
    dec.eof()
    return out


def all_splits(data: bytes, make: object) -> None:
    """Decoding gives the same events whatever single split point is chosen."""
    want = decode_all(make(), data, [])  # type: ignore[operator]
    for i in range(len(data) + 1):
        assert decode_all(make(), data, [i]) == want  # type: ignore[operator]


@given(st.integers(-(2**63), 2**63 - 1), hashes)
def test_sync_round_trip(cid: int, h: bytes) -> None:
    data = wire.encode_sync(cid, h)
    assert data[:4] == b"\x01\x00\x00\x00" and len(data) == 28
    assert decode_all(wire.RequestDecoder(), data, []) == [wire.SyncRequest(cid, h)]
    all_splits(data, wire.RequestDecoder)


@given(st.integers(-(2**31), 2**31 - 1))
def test_sub_round_trip(job: int) -> None:
    data = wire.encode_sub(job)
    assert data == struct.pack("<ii", 2, job)
    assert decode_all(wire.RequestDecoder(), data, []) == [wire.SubRequest(job)]


@given(st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00")))
def test_error_round_trip(msg: str) -> None:
    data = wire.encode_error(msg)
    n = struct.unpack_from("<i", data, 4)[0]
    assert data[8 + n - 1] == 0 and n == len(msg.encode()) + 1
    for req in (wire.SYNC, wire.SUB):
        assert decode_all(wire.ReplyDecoder(req), data, []) == [wire.ErrorReply(msg)]


@settings(max_examples=40)
@given(st.integers(0, 64), st.lists(entries, max_size=4))
def test_syncreply_round_trip_at_every_split(njob: int, es: list[Entry]) -> None:
    data = wire.encode_syncreply(njob, es)
    want = [wire.SyncReplyStart(njob), *es, wire.SyncReplyEnd()]
    assert decode_all(wire.ReplyDecoder(wire.SYNC), data, []) == want
    all_splits(data, lambda: wire.ReplyDecoder(wire.SYNC))


@settings(max_examples=40)
@given(st.lists(entries, max_size=4), st.lists(st.integers(0, 2000), max_size=5))
def test_subreply_round_trip_at_any_splits(es: list[Entry], cuts: list[int]) -> None:
    data = wire.encode_subreply_start() + b"".join(wire.encode_entry(*e) for e in es)
    got = decode_all(wire.ReplyDecoder(wire.SUB), data, [c for c in cuts if c <= len(data)])
    assert got == [wire.SubReplyStart(), *es]


@given(entries)
def test_entry_layout_is_the_specs(e: Entry) -> None:
    data = wire.encode_entry(*e)
    schema = e.schema.encode()
    size = 16 + len(schema) + 1 + len(e.data)
    assert data == struct.pack("<iqq", size, e.cid, e.schemacid) + schema + b"\x00" + e.data
    assert wire.decode_entry(data[4:]) == e


def test_entry_validation_errors() -> None:
    def sub(body: bytes) -> list[object]:
        d = wire.ReplyDecoder(wire.SUB, max_size=1000)
        d.feed(wire.encode_subreply_start() + body)
        return d.next_events()

    with pytest.raises(EntryTooSmallError, match="entry size 16 is below the minimum of 17"):
        sub(struct.pack("<i", 16) + bytes(16))
    with pytest.raises(EntryTooSmallError):
        sub(struct.pack("<i", 0))  # a SUB stream has no end marker
    with pytest.raises(EntryTooSmallError):
        sub(struct.pack("<i", -5))
    with pytest.raises(SizeLimitError, match="exceeds the limit of 1000"):
        sub(struct.pack("<i", 1001))
    with pytest.raises(MissingNulError, match="cid 7"):
        sub(struct.pack("<iqq", 20, 7, 0) + b"abcd")
    with pytest.raises(ProtocolError, match="not UTF-8"):
        sub(struct.pack("<iqq", 19, 7, 0) + b"\xff\x00x")
    with pytest.raises(UnknownMessageTypeError, match="unexpected reply type to SUB - 4"):
        sub_type(wire.SUB, 4)
    with pytest.raises(UnknownMessageTypeError, match="unknown message type 10"):
        d = wire.RequestDecoder()
        d.feed(struct.pack("<i", 10))
        d.next_events()


def sub_type(req: int, t: int) -> None:
    d = wire.ReplyDecoder(req)
    d.feed(struct.pack("<i", t))
    d.next_events()


def test_truncation_is_reported_at_eof() -> None:
    data = wire.encode_syncreply(2, [Entry(1, 0, "x", b"yz")])
    for cut in range(len(data)):
        d = wire.ReplyDecoder(wire.SYNC)
        d.feed(data[:cut])
        d.next_events()
        with pytest.raises(TruncatedMessageError):
            d.eof()
    d = wire.RequestDecoder()
    d.feed(wire.encode_sync(5, bytes(16))[:10])
    assert d.next_events() == []
    with pytest.raises(TruncatedMessageError):
        d.eof()
    # a SUB stream may end between entries, not inside one
    d = wire.ReplyDecoder(wire.SUB)
    d.feed(wire.encode_subreply_start() + wire.encode_entry(1, 0, "", b"a"))
    d.next_events()
    d.eof()


@settings(max_examples=300)
@given(st.binary(max_size=300), st.sampled_from(["req", "sync", "sub"]))
def test_random_bytes_raise_only_protocol_errors(data: bytes, side: str) -> None:
    dec: wire._Decoder = (
        wire.RequestDecoder()
        if side == "req"
        else wire.ReplyDecoder(wire.SYNC if side == "sync" else wire.SUB, max_size=1 << 16)
    )
    try:
        dec.feed(data)
        dec.next_events()
        dec.eof()
    except ProtocolError:
        pass
