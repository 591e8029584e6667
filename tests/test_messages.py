"""The one table of message types and the extension frames' codec: every
number once, every module naming the table's entries, the codec's round
trips and refusals, and the bytes on the wire unchanged."""

from __future__ import annotations

import ast
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hctserver.errors import (
    ProtocolError,
    SizeLimitError,
    TruncatedMessageError,
    UnknownMessageTypeError,
)
from hctserver.protocol import auth, bootstrap, feedback, messages, wire
from hctserver.protocol.messages import (
    OPENERS,
    TABLE,
    Direction,
    Frame,
    FrameDecoder,
    MessageType,
    Origin,
)

ROOT = Path(__file__).resolve().parent.parent
H = bytes(range(16))

# --- the table ----------------------------------------------------------------


def test_every_number_and_name_is_in_the_table_once() -> None:
    members = list(MessageType.__members__.values())
    assert len({int(t) for t in members}) == len(members)  # no alias hides a clash
    assert set(TABLE) == set(MessageType)
    assert all(
        isinstance(s.origin, Origin) and isinstance(s.direction, Direction) for s in TABLE.values()
    )


def test_the_seeds_numbers_are_the_specs() -> None:
    seed = {int(t): t.name for t in MessageType if t.origin is Origin.SEED}
    assert seed == {1: "SYNC", 2: "SUB", 3: "ERROR", 4: "SYNCREPLY", 5: "SUBREPLY"}
    assert seed == wire.NAMES
    assert {t.direction for t in (MessageType.SYNC, MessageType.SUB)} == {Direction.TO_LEADER}


def test_frames_have_bounds_and_the_seeds_framing_has_none() -> None:
    for t, spec in TABLE.items():
        framed = spec.origin is not Origin.SEED and t != MessageType.SUBX
        assert (spec.bounds is not None) == (framed or t == MessageType.ERROR), t
        if spec.bounds is not None:
            assert 0 < spec.bounds[0] <= spec.bounds[1], t


MODULE_TYPES = {
    wire: (Origin.SEED, ["SYNC", "SUB", "ERROR", "SYNCREPLY", "SUBREPLY"]),
    feedback: (Origin.FEEDBACK, ["ACCEPT", "STATE", "REPORT"]),
    bootstrap: (Origin.BOOTSTRAP, ["OFFER", "WANT", "HEAD", "DATA", "END"]),
    auth: (Origin.AUTH, ["HELLO", "CHALLENGE", "PROOF", "WELCOME"]),
}


def test_every_module_names_the_tables_entries() -> None:
    covered = {"SUBX"}  # the feedback extension's, named in wire with SUB
    assert wire.SUBX is MessageType.SUBX and wire.SUBX.origin is Origin.FEEDBACK
    for module, (origin, names) in MODULE_TYPES.items():
        for name in names:
            assert getattr(module, name) is MessageType[name], (module.__name__, name)
            assert MessageType[name].origin is origin
        covered.update(names)
    assert covered == set(MessageType.__members__)


def test_no_module_numbers_a_message_type_itself() -> None:
    """A module-level ``ACCEPT = 6`` anywhere would be a second table."""
    names = set(MessageType.__members__)
    found = []
    for path in sorted((ROOT / "src" / "hctserver").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, int)
                and any(isinstance(t, ast.Name) and t.id in names for t in node.targets)
            ):
                found.append(f"{path.name}:{node.lineno}")
    assert not found


def handshake() -> tuple[bytes, bytes, bytes, bytes]:
    """An authentication's four sends, with fixed nonces."""
    f = auth.FollowerAuth(b"s" * 32, my_nonce=b"n" * 32)
    ld = auth.LeaderAuth(b"s" * 32, my_nonce=b"m" * 32)
    start = f.start()
    challenge = ld.receive(start)
    proof = f.receive(challenge)
    welcome = ld.receive(proof)
    assert f.receive(welcome) == b"" and f.done and ld.done
    return start, challenge, proof, welcome


def test_the_fixed_fields_are_the_smallest_bodies() -> None:
    """The table's lower bounds are what each module's encoder writes for
    version 1 (REPORT with an empty name, END with a digest)."""
    start, challenge, proof, welcome = handshake()
    bodies = {
        MessageType.ACCEPT: feedback.encode_accept(1, 2),
        MessageType.STATE: feedback.encode_state(1, 2),
        MessageType.REPORT: feedback.encode_report(1, 2, 3, ""),
        MessageType.OFFER: bootstrap.encode_offer(1, 2),
        MessageType.WANT: bootstrap.encode_want(1, H, False),
        MessageType.HEAD: bootstrap.encode_head(1, 0, H, 0, bootstrap.BEHIND),
        MessageType.END: bootstrap.encode_end(b"d" * bootstrap.DIGEST_SIZE),
        MessageType.HELLO: start[28:],
        MessageType.CHALLENGE: challenge,
        MessageType.PROOF: proof,
        MessageType.WELCOME: welcome,
    }
    for t, data in bodies.items():
        kind, n = messages.HEADER.unpack_from(data)
        assert (kind, n) == (t, len(data) - 8)
        assert n == (t.bounds or (-1, -1))[0], t.name


def test_openers_are_distinct_syncs_no_database_matches() -> None:
    assert len({o.cid for o in OPENERS.values()}) == len({o.hash for o in OPENERS.values()}) == 3
    assert all(o.cid < 0 and len(o.hash) == 16 for o in OPENERS.values())
    assert OPENERS[Origin.FEEDBACK] == (feedback.PROBE_CID, feedback.PROBE_HASH)
    assert OPENERS[Origin.BOOTSTRAP] == (bootstrap.REQUEST_CID, bootstrap.REQUEST_HASH)
    assert OPENERS[Origin.AUTH] == (auth.REQUEST_CID, auth.REQUEST_HASH)
    assert feedback.is_probe(*OPENERS[Origin.FEEDBACK])
    assert bootstrap.is_request(*OPENERS[Origin.BOOTSTRAP])
    assert auth.is_request(*OPENERS[Origin.AUTH])


def test_the_protocol_doc_has_the_table() -> None:
    doc = (ROOT / "docs" / "PROTOCOL.md").read_text()
    section = doc[doc.index("## Message types") : doc.index("## Messages\n")]
    rows = re.findall(r"^\| (\d+) \| (\w+) \| (\w+) \| ([a-z ]+) \| ([^|]+) \|$", section, re.M)
    want = []
    for t, spec in TABLE.items():
        if spec.bounds is None:
            body = "—"
        elif spec.bounds[0] == spec.bounds[1]:
            body = f"{spec.bounds[0]:,}"
        else:
            body = f"{spec.bounds[0]:,} to {spec.bounds[1]:,}"
        want.append((str(int(t)), t.name, spec.origin.value, spec.direction.value, body))
    assert rows == want


# --- golden bytes: computed by the code before the table existed ---------------------

GOLDEN = {
    "sync": "010000000500000000000000000102030405060708090a0b0c0d0e0f",
    "sub": "0200000002000000",
    "subx": "09000000010000000700000000000000",
    "error": "03000000030000006e6f00",
    "syncreply_start": "0400000003000000",
    "subreply_start": "05000000",
    "accept": "06000000140000000300000007000000000000002a00000000000000",
    "accept_v2": "06000000230000000300000007000000000000002a000000000000000d00"
    "687474703a2f2f683a31323334",
    "state": "07000000100000002a00000000000000dc05000000000000",
    "state_v3": "07000000140000002a00000000000000dc0500000000000001000000",
    "report": "080000001a0000002800000000000000270000000000000029000000000000006631",
    "request": "01000000feffffffffffffff6863747365727665722d62732d763100",
    "offer": "0a000000140000000100000003000000000000002a00000000000000",
    "want": "0b0000001c0000000500000000000000000102030405060708090a0b0c0d0e0f01000000",
    "head": "0c0000002c0000002a000000000000000200000000000000000102030405060708090a0b0c0d0e0f"
    "001000000000000001000000",
    "data": "0d00000003000000616263",
    "end": "0e00000020000000000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    "auth_start": "01000000fdffffffffffffff6863747365727665722d61752d763100"
    "1400000024000000010000006e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e",
    "challenge": "15000000200000006d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d",
    "proof": "160000002000000093e128e850be7225842fb1c58736e39afec8be1710631d6082c0ff319b4335e0",
    "welcome": "1700000020000000688063aaf4b5c30b1c6946951d9e69fd42a171ed163b16ee7358f8a8e6116a54",
}


def test_the_bytes_on_the_wire_did_not_change() -> None:
    start, challenge, proof, welcome = handshake()
    got = {
        "sync": wire.encode_sync(5, H),
        "sub": wire.encode_sub(2),
        "subx": wire.encode_subx(1, 7),
        "error": wire.encode_error("no"),
        "syncreply_start": wire.encode_syncreply_start(3),
        "subreply_start": wire.encode_subreply_start(),
        "accept": feedback.encode_accept(7, 42),
        "accept_v2": feedback.encode_accept(7, 42, "http://h:1234"),
        "state": feedback.encode_state(42, 1500),
        "state_v3": feedback.encode_state(42, 1500, feedback.WAITS),
        "report": feedback.encode_report(40, 39, 41, "f1"),
        "request": bootstrap.encode_request(),
        "offer": bootstrap.encode_offer(3, 42),
        "want": bootstrap.encode_want(5, H, True),
        "head": bootstrap.encode_head(42, 2, H, 4096, bootstrap.BELOW),
        "data": bootstrap.data_header(3) + b"abc",
        "end": bootstrap.encode_end(bytes(range(32))),
        "auth_start": start,
        "challenge": challenge,
        "proof": proof,
        "welcome": welcome,
    }
    assert {k: v.hex() for k, v in got.items()} == GOLDEN


def test_the_golden_frames_decode() -> None:
    fb = feedback.Decoder(frozenset({feedback.ACCEPT, feedback.STATE, feedback.REPORT}))
    stream = b"".join(bytes.fromhex(GOLDEN[k]) for k in ("accept", "state", "state_v3", "report"))
    assert fb.feed(stream) == [
        feedback.Accept(3, 7, 42),
        feedback.State(42, 1500),
        feedback.State(42, 1500, feedback.WAITS),
        feedback.Report(40, 39, 41, "f1"),
    ]


def test_older_feedback_versions_decode() -> None:
    """Frames of versions 1 and 2 (an ACCEPT without flags in STATE) still
    decode, and a STATE of version 3 keeps the fields of version 1 first, so
    that an older follower reading only those gets the same values."""
    v2 = bytes.fromhex(
        "06000000230000000200000007000000000000002a000000000000000d00687474703a2f2f683a31323334"
    )
    v1 = bytes.fromhex("06000000140000000100000007000000000000002a00000000000000")
    fb = feedback.Decoder(frozenset({feedback.ACCEPT, feedback.STATE}))
    assert fb.feed(v2 + v1) == [
        feedback.Accept(2, 7, 42, "http://h:1234"),
        feedback.Accept(1, 7, 42),
    ]
    v3 = bytes.fromhex(GOLDEN["state_v3"])
    assert v3[8:24] == bytes.fromhex(GOLDEN["state"])[8:24]
    assert fb.feed(v3)[0].flags == feedback.WAITS
    assert fb.feed(feedback.encode_state(1, 2, 0)) == [feedback.State(1, 2, 0)]
    bs = bootstrap.Decoder(frozenset({bootstrap.OFFER, bootstrap.WANT, bootstrap.HEAD,
                                      bootstrap.DATA, bootstrap.END, wire.ERROR}))  # fmt: skip
    keys = ("offer", "want", "head", "data", "end", "error")
    assert bs.feed(b"".join(bytes.fromhex(GOLDEN[k]) for k in keys)) == [
        bootstrap.Offer(1, 3, 42),
        bootstrap.Want(5, H, bootstrap.RESEED),
        bootstrap.Head(42, 2, H, 4096, bootstrap.BELOW),
        bootstrap.Data(b"abc"),
        bootstrap.End(bytes(range(32))),
        wire.ErrorReply("no"),
    ]


# --- the codec ------------------------------------------------------------------------

FRAMED = sorted(t for t, s in TABLE.items() if s.bounds is not None)


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    t = draw(st.sampled_from(FRAMED))
    lo, hi = TABLE[t].bounds or (0, 0)
    return Frame(t, draw(st.binary(min_size=lo, max_size=min(hi, 300))))


@given(st.lists(frames(), max_size=6), st.lists(st.integers(0, 2000), max_size=4))
def test_frames_round_trip_at_any_splits(fs: list[Frame], cuts: list[int]) -> None:
    data = b"".join(messages.encode(f.kind, f.body) for f in fs)
    dec = FrameDecoder(Origin.FEEDBACK)
    got: list[Frame] = []
    prev = 0
    for c in [*sorted(c for c in cuts if c <= len(data)), len(data)]:
        dec.feed(data[prev:c])
        got += dec.frames(frozenset(FRAMED))
        prev = c
    dec.eof()
    assert got == fs and dec.buffered == 0
    assert all(type(f.kind) is MessageType for f in got)


def test_header_is_encodes_first_eight_bytes() -> None:
    assert messages.header(MessageType.DATA, 3) + b"abc" == messages.encode(
        MessageType.DATA, b"abc"
    )


def head(kind: int, n: int) -> bytes:
    return struct.pack("<ii", kind, n)


@pytest.mark.parametrize(
    "data, error, said",
    [
        (head(99, 4), UnknownMessageTypeError, "unexpected bootstrap message type 99 of 4 bytes"),
        (head(MessageType.SYNC, 0), UnknownMessageTypeError, "type 1"),  # the seed's, not accepted
        (
            head(MessageType.ACCEPT, 20),
            UnknownMessageTypeError,
            "expected message 13 DATA, 14 END or 3 ERROR",
        ),
        (head(MessageType.DATA, messages.MAX_DATA + 1), SizeLimitError, "DATA body of 1048577"),
        (head(MessageType.DATA, 0), SizeLimitError, "from 1 to 1048576 allowed"),
        (head(MessageType.DATA, -1), SizeLimitError, "DATA body of -1"),
        (head(MessageType.ERROR, messages.MAX_ERROR + 1), SizeLimitError, "ERROR body"),
        (head(MessageType.END, 31), SizeLimitError, "END body of 31 bytes"),  # truncated fields
    ],
)
def test_the_codec_refuses_from_the_header(data: bytes, error: type, said: str) -> None:
    """Refused as soon as the 8-byte header is in: the body never arrives."""
    dec = FrameDecoder(Origin.BOOTSTRAP)
    dec.feed(data)
    accept = frozenset({MessageType.DATA, MessageType.END, MessageType.ERROR})
    with pytest.raises(error, match=said) as e:
        dec.next_frame(accept)
    assert isinstance(e.value, ProtocolError)


def test_authentications_bodies_are_exact() -> None:
    dec = FrameDecoder(Origin.AUTH)
    dec.feed(messages.encode(MessageType.CHALLENGE, b"n" * 33))
    with pytest.raises(SizeLimitError, match=r"CHALLENGE body of 33 bytes \(32 allowed\)"):
        dec.next_frame(frozenset({MessageType.CHALLENGE}))


def test_a_frame_cut_short_is_truncated() -> None:
    data = messages.encode(MessageType.STATE, bytes(16))
    for n in range(1, len(data)):
        dec = FrameDecoder(Origin.FEEDBACK)
        dec.feed(data[:n])
        assert dec.next_frame(frozenset({MessageType.STATE})) is None
        with pytest.raises(TruncatedMessageError, match="middle of a feedback message"):
            dec.eof()
    FrameDecoder(Origin.FEEDBACK).eof()  # nothing buffered: a clean end


def test_a_type_without_a_frame_is_a_programming_error() -> None:
    dec = FrameDecoder(Origin.FEEDBACK)
    dec.feed(head(MessageType.SUBX, 12))
    with pytest.raises(ValueError, match="SUBX is not an extension frame"):
        dec.next_frame(frozenset({MessageType.SUBX}))


def test_accept_carries_the_leaders_client_url_and_a_follower_resolves_its_host() -> None:
    (msg,) = feedback.Decoder(frozenset({feedback.ACCEPT})).feed(
        feedback.encode_accept(3, 9, "https://0.0.0.0:8080")
    )
    assert msg == feedback.Accept(feedback.VERSION, 3, 9, "https://0.0.0.0:8080")
    assert feedback.client_url(msg.client, "10.1.2.3") == "https://10.1.2.3:8080"
    assert feedback.client_url("http://[::]:80/x", "::1") == "http://[::1]:80/x"
    assert feedback.client_url("http://db.example:80", "10.0.0.1") == "http://db.example:80"
    # version 1 (no URL): an empty client
    (old,) = feedback.Decoder(frozenset({feedback.ACCEPT})).feed(feedback.encode_accept(3, 9))
    assert old.client == ""
