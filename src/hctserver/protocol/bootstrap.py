"""The bootstrap extension's messages and the leader's verdict, pure.

A follower that cannot replay the journal (it is empty and the journal is
long, or its position is below the leader's truncated baseline, or its
history differs and the operator said ``--reseed``) asks for a snapshot
(:mod:`hctserver.journal.snapshot`). Nothing of the original's protocol changes:

* the follower opens a connection and sends a **request**: a SYNC whose cid
  is -2 and whose hash is :data:`REQUEST_HASH`. The original leader (and a
  leader without the extension) answers ``incompatible database version``
  and closes, as for any SYNC it cannot match;
* a leader with the extension answers **OFFER** (its version, baseline and
  newest cid); the follower sends **WANT** (its position, and whether it
  may be replaced although its history differs);
* the leader decides (:func:`verdict`) and answers ERROR, or **HEAD** (the
  snapshot's position, its size, the verdict), the file in **DATA**
  messages, and **END** (the file's SHA-256).

Every message is a frame (``i32 type, i32 length, body``,
:mod:`hctserver.protocol.messages`), as the feedback extension's (the original's
ERROR has this shape too). docs/PROTOCOL.md has the byte tables.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ..errors import ProtocolError
from ..position import HASH_SIZE
from . import messages, wire
from .messages import MessageType, Origin

REQUEST_CID, REQUEST_HASH = messages.OPENERS[Origin.BOOTSTRAP]
VERSION = 1

OFFER = MessageType.OFFER  # leader -> follower
WANT = MessageType.WANT  # follower -> leader
HEAD = MessageType.HEAD  # leader -> follower
DATA = MessageType.DATA  # leader -> follower, many
END = MessageType.END  # leader -> follower

MAX_DATA = messages.MAX_DATA  # the largest DATA body
DIGEST_SIZE = 32

# the verdict: why this follower gets a snapshot
BEHIND = 0  # in the leader's history (an empty follower, say): it could have replayed
BELOW = 1  # below the leader's baseline: the entries it needs are gone
DIVERGED = 2  # its history differs (or is ahead), and it asked to be replaced
VERDICTS = {BEHIND: "behind", BELOW: "below the baseline", DIVERGED: "diverged"}

RESEED = 1  # WANT flag: replace me even if my history differs

_offer = struct.Struct("<iqq")
_want = struct.Struct(f"<q{HASH_SIZE}si")
_headbody = struct.Struct(f"<qq{HASH_SIZE}sqi")


class Offer(NamedTuple):
    version: int
    baseline: int
    newest: int


class Want(NamedTuple):
    cid: int
    hash: bytes
    flags: int


class Head(NamedTuple):
    cid: int
    schemacid: int
    hash: bytes
    size: int
    verdict: int


class Data(NamedTuple):
    chunk: bytes


class End(NamedTuple):
    digest: bytes


Message = Offer | Want | Head | Data | End | wire.ErrorReply


def is_request(cid: int, hash_: bytes) -> bool:
    return cid == REQUEST_CID and hash_ == REQUEST_HASH


def encode_request() -> bytes:
    return wire.encode_sync(REQUEST_CID, REQUEST_HASH)


def encode_offer(baseline: int, newest: int) -> bytes:
    return messages.encode(OFFER, _offer.pack(VERSION, baseline, newest))


def encode_want(cid: int, hash_: bytes, reseed: bool) -> bytes:
    return messages.encode(WANT, _want.pack(cid, hash_, RESEED if reseed else 0))


def encode_head(cid: int, schemacid: int, hash_: bytes, size: int, verdict: int) -> bytes:
    return messages.encode(HEAD, _headbody.pack(cid, schemacid, hash_, size, verdict))


def data_header(n: int) -> bytes:
    """The 8 bytes before ``n`` bytes of file in a DATA message."""
    return messages.header(DATA, n)


def encode_end(digest: bytes) -> bytes:
    return messages.encode(END, digest)


class Decoder:
    """Messages from a byte stream, split anywhere. ``accept``: the types
    this side may receive; a later version may add fields to the fixed
    messages (read what is known, skip the rest)."""

    def __init__(self, accept: frozenset[int]) -> None:
        self.accept = accept
        self._frames = messages.FrameDecoder(Origin.BOOTSTRAP)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        self._frames.feed(data)
        return [_decode(f) for f in self._frames.frames(self.accept)]

    @property
    def buffered(self) -> int:
        return self._frames.buffered


def _decode(frame: messages.Frame) -> Message:
    kind, body = frame
    if kind == DATA:
        return Data(body)
    if kind == wire.ERROR:
        return wire.ErrorReply(messages.error_text(body))
    if kind == OFFER:
        return Offer(*_offer.unpack_from(body))
    if kind == WANT:
        return Want(*_want.unpack_from(body))
    if kind == HEAD:
        head = Head(*_headbody.unpack_from(body))
        if head.size < 0 or head.verdict not in VERDICTS or head.cid < 0:
            raise ProtocolError(f"bad HEAD from the leader: {head}")
        return head
    return End(body[:DIGEST_SIZE])


def verdict(want: Want, baseline: int, newest: int, hash_at: bytes | None) -> int | None:
    """Why the follower at ``want`` gets a snapshot; None: it must not (its
    history differs and it did not ask to be replaced). ``hash_at`` is the
    leader's H at ``want.cid`` (None if the leader has none there)."""
    if want.cid < baseline:
        return BELOW
    if 0 <= want.cid <= newest and hash_at == want.hash:
        return BEHIND
    return DIVERGED if want.flags & RESEED else None
