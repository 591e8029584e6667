"""Every message type on the wire, in one table, and the extension frames' codec.

The seed's messages (SPEC section 2) are the original C nodes': their
numbers and bytes never change. Our extensions (feedback, bootstrap,
authentication) are negotiated by a SYNC that no real position matches
(:data:`OPENERS`), so the original never sees their numbers; their
messages are *frames*: ``i32 type, i32 length, body``, a body a receiver
reads the fields it knows of and skips the rest of, so that later versions
can add fields. The seed's ERROR has that shape too, so the extensions
take it in their streams. :class:`FrameDecoder` checks a frame's type and
length from its 8-byte header, before its body arrives, so a peer cannot
make the receiver wait for (or buffer) a body it would refuse.

Pure: no sockets, no threads. docs/PROTOCOL.md has the byte tables.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Container
from typing import NamedTuple

from ..errors import SizeLimitError, TruncatedMessageError, UnknownMessageTypeError


class Origin(str, enum.Enum):
    """Which protocol a message belongs to."""

    SEED = "seed"  # the original's (SPEC section 2)
    FEEDBACK = "feedback"
    BOOTSTRAP = "bootstrap"
    AUTH = "auth"


class Direction(str, enum.Enum):
    TO_LEADER = "follower to leader"
    TO_FOLLOWER = "leader to follower"


@enum.unique
class MessageType(enum.IntEnum):
    """The number that starts every message; :data:`TABLE` says whose it is."""

    SYNC = 1
    SUB = 2
    ERROR = 3
    SYNCREPLY = 4
    SUBREPLY = 5
    ACCEPT = 6
    STATE = 7
    REPORT = 8
    SUBX = 9
    OFFER = 10
    WANT = 11
    HEAD = 12
    DATA = 13
    END = 14
    HELLO = 20
    CHALLENGE = 21
    PROOF = 22
    WELCOME = 23

    @property
    def origin(self) -> Origin:
        return TABLE[self].origin

    @property
    def direction(self) -> Direction:
        return TABLE[self].direction

    @property
    def bounds(self) -> tuple[int, int] | None:
        return TABLE[self].bounds


class Spec(NamedTuple):
    origin: Origin
    direction: Direction
    # a frame's smallest and largest body (the smallest: the fields of
    # version 1); None: not a frame (the seed's requests and replies have
    # no length field, and SUBX is SUB's shape)
    bounds: tuple[int, int] | None = None


MAX_ERROR = 1 << 16  # the largest ERROR message accepted
FEEDBACK_MAX = 512  # the largest body of a feedback message
BOOTSTRAP_MAX = 4096  # ... of a bootstrap message other than DATA
MAX_DATA = 1 << 20  # the largest DATA body (a piece of a snapshot)
NONCE = MAC = 32  # authentication: a nonce, an HMAC-SHA256

_S, _FB, _BS, _AU = Origin.SEED, Origin.FEEDBACK, Origin.BOOTSTRAP, Origin.AUTH
_L, _F = Direction.TO_LEADER, Direction.TO_FOLLOWER
_M = MessageType

TABLE: dict[MessageType, Spec] = {
    _M.SYNC: Spec(_S, _L),
    _M.SUB: Spec(_S, _L),
    _M.ERROR: Spec(_S, _F, (1, MAX_ERROR)),  # a frame too, with its NUL
    _M.SYNCREPLY: Spec(_S, _F),
    _M.SUBREPLY: Spec(_S, _F),
    _M.ACCEPT: Spec(_FB, _F, (20, FEEDBACK_MAX)),
    _M.STATE: Spec(_FB, _F, (16, FEEDBACK_MAX)),
    _M.REPORT: Spec(_FB, _L, (24, FEEDBACK_MAX)),  # then the follower's name
    _M.SUBX: Spec(_FB, _L),
    _M.OFFER: Spec(_BS, _F, (20, BOOTSTRAP_MAX)),
    _M.WANT: Spec(_BS, _L, (28, BOOTSTRAP_MAX)),
    _M.HEAD: Spec(_BS, _F, (44, BOOTSTRAP_MAX)),
    _M.DATA: Spec(_BS, _F, (1, MAX_DATA)),
    _M.END: Spec(_BS, _F, (32, BOOTSTRAP_MAX)),
    # authentication's bodies are exact: nothing of it may be skipped
    _M.HELLO: Spec(_AU, _L, (4 + NONCE, 4 + NONCE)),
    _M.CHALLENGE: Spec(_AU, _F, (NONCE, NONCE)),
    _M.PROOF: Spec(_AU, _L, (MAC, MAC)),
    _M.WELCOME: Spec(_AU, _F, (MAC, MAC)),
}


def names(origin: Origin) -> dict[int, str]:
    """``{number: name}`` of one protocol's messages."""
    return {t: t.name for t in MessageType if t.origin is origin}


class Opener(NamedTuple):
    """The SYNC that opens an extension: a cid no database has and 16 bytes
    that are never a version hash, so a leader without the extension (the
    original above all) answers it ``incompatible database version``."""

    cid: int
    hash: bytes


OPENERS: dict[Origin, Opener] = {
    Origin.FEEDBACK: Opener(-1, b"hctserver-fb-v1\x00"),
    Origin.BOOTSTRAP: Opener(-2, b"hctserver-bs-v1\x00"),
    Origin.AUTH: Opener(-3, b"hctserver-au-v1\x00"),
}


# --- the extension frames' codec -----------------------------------------------

HEADER = struct.Struct("<ii")  # i32 type, i32 length


class Frame(NamedTuple):
    kind: MessageType
    body: bytes


def header(kind: MessageType, n: int) -> bytes:
    """The 8 bytes before a body of ``n`` bytes (sent apart from a large body)."""
    return HEADER.pack(kind, n)


def encode(kind: MessageType, body: bytes) -> bytes:
    return HEADER.pack(kind, len(body)) + body


def error_text(body: bytes) -> str:
    """An ERROR frame's message, without its NUL."""
    return body.rstrip(b"\x00").decode("utf-8", "replace")


class FrameDecoder:
    """Frames from a byte stream split anywhere: :meth:`feed` bytes, then take
    whole frames of the types the receiver may get at that point."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin  # whose frames, for the errors
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_frame(self, accept: Container[int]) -> Frame | None:
        """The next whole frame; None until it has all arrived. Raises
        :class:`UnknownMessageTypeError` for a type not in ``accept`` and
        :class:`SizeLimitError` for a length outside its bounds, from the
        header alone."""
        buf = self._buf
        if len(buf) < HEADER.size:
            return None
        kind, n = HEADER.unpack_from(buf)
        if kind not in accept:
            raise UnknownMessageTypeError(
                f"unexpected {self.origin.value} message type {kind} of {n} bytes"
                f" (expected message {_expected(accept)})"
            )
        t = MessageType(kind)
        if t.bounds is None:
            raise ValueError(f"{t.name} is not an extension frame")
        lo, hi = t.bounds
        if not lo <= n <= hi:
            allowed = f"{lo}" if lo == hi else f"from {lo} to {hi}"
            raise SizeLimitError(f"{t.name} body of {n} bytes ({allowed} allowed)")
        if len(buf) < HEADER.size + n:
            return None
        body = bytes(buf[HEADER.size : HEADER.size + n])
        del buf[: HEADER.size + n]  # cheap: a bytearray drops its head in place
        return Frame(t, body)

    def eof(self) -> None:
        """The peer closed: raises :class:`TruncatedMessageError` if it did so
        in the middle of a frame (nothing partial is ever used)."""
        if self._buf:
            raise TruncatedMessageError(
                f"connection closed in the middle of a {self.origin.value} message"
                f" ({len(self._buf)} bytes of it received)"
            )

    def frames(self, accept: Container[int]) -> list[Frame]:
        """Every whole frame buffered."""
        out = []
        while (f := self.next_frame(accept)) is not None:
            out.append(f)
        return out


def _expected(accept: Container[int]) -> str:
    # ERROR last: it is the refusal any step may get instead
    known = sorted((t for t in MessageType if t in accept), key=lambda t: (t == _M.ERROR, t))
    said = [f"{t} {t.name}" for t in known]
    return " or ".join([", ".join(said[:-1]), said[-1]] if len(said) > 1 else said)
