"""The wire protocol of SPEC section 2, as pure functions and decoders.

No sockets and no threads here (in the spirit of h11): encoders return
bytes, decoders take bytes in any split and return events. Integers are
little-endian, as the original writes them on its platforms.

Follower -> leader: ``SYNC`` (i32 1, i64 cid, 16-byte hash) or ``SUB``
(i32 2, i32 job). Leader -> follower: ``ERROR`` (i32 3, i32 n, n bytes with
NUL), ``SYNCREPLY`` (i32 4, i32 nJob, entries, i32 0), ``SUBREPLY`` (i32 5,
entries for as long as the connection lives). Entry: i32 size, then i64 cid,
i64 schemacid, schema bytes, NUL, data; size = 16 + len(schema) + 1 + len(data).
The type numbers, the seed's and every extension's, are
:data:`hctserver.protocol.messages.TABLE`'s.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

from .. import speedups
from ..errors import (
    EntryTooSmallError,
    MissingNulError,
    ProtocolError,
    SizeLimitError,
    TruncatedMessageError,
    UnknownMessageTypeError,
)
from ..position import HASH_SIZE, Entry
from .messages import MAX_ERROR as MAX_ERROR  # public here too, as it was
from .messages import MessageType, Origin, names

# the seed's numbers, as messages.TABLE has them
SYNC = MessageType.SYNC
SUB = MessageType.SUB
ERROR = MessageType.ERROR
SYNCREPLY = MessageType.SYNCREPLY
SUBREPLY = MessageType.SUBREPLY
SUBX = MessageType.SUBX  # SUB with the follower's id: only after the feedback extension's ACCEPT

NAMES = names(Origin.SEED)

MIN_ENTRY = 17  # two i64 and the schema's NUL
DEFAULT_MAX_SIZE = 1 << 30  # largest entry the decoders accept unless told otherwise

INCOMPATIBLE = "incompatible database version"
RETRY = "retry later"  # ends every refusal a follower may retry

_i32 = struct.Struct("<i")
_ii = struct.Struct("<ii")
_iq = struct.Struct("<iq")
_iqq = struct.Struct("<iqq")
_iiq = struct.Struct("<iiq")
_qq = struct.Struct("<qq")

END_OF_ENTRIES = _i32.pack(0)
TLS_HANDSHAKE = 0x16  # the first byte a TLS client sends (a handshake record)
_tuple_new = tuple.__new__  # builds an Entry without the namedtuple's Python-level __new__
_native: Any = speedups.native()
# the compiled twin of the loop in ReplyDecoder._entries: takes the whole,
# well-formed entries and leaves everything else (errors, the end) to it
NATIVE_DECODE = _native.decode_entries if _native is not None else None


# --- events ------------------------------------------------------------------


class SyncRequest(NamedTuple):
    cid: int
    hash: bytes


class SubRequest(NamedTuple):
    job: int
    follower: int = 0  # the feedback extension's id (SUBX); 0 for a plain SUB


class ErrorReply(NamedTuple):
    message: str


class SyncReplyStart(NamedTuple):
    njob: int


class SyncReplyEnd(NamedTuple):
    pass


class SubReplyStart(NamedTuple):
    pass


Event = (
    SyncRequest | SubRequest | ErrorReply | SyncReplyStart | SyncReplyEnd | SubReplyStart | Entry
)


# --- encoders ----------------------------------------------------------------


def encode_sync(cid: int, hash_: bytes) -> bytes:
    if len(hash_) != HASH_SIZE:
        raise ValueError(f"a version hash is {HASH_SIZE} bytes, not {len(hash_)}")
    return _iq.pack(SYNC, cid) + hash_


def encode_sub(job: int) -> bytes:
    return _ii.pack(SUB, job)


def encode_subx(job: int, follower: int) -> bytes:
    return _iiq.pack(SUBX, job, follower)


def encode_error(message: str) -> bytes:
    body = message.encode("utf-8") + b"\x00"
    return _ii.pack(ERROR, len(body)) + body


def encode_syncreply_start(njob: int) -> bytes:
    return _ii.pack(SYNCREPLY, njob)


def encode_subreply_start() -> bytes:
    return _i32.pack(SUBREPLY)


def encode_entry(cid: int, schemacid: int, schema: str | bytes, data: bytes) -> bytes:
    s = schema.encode("utf-8") if isinstance(schema, str) else schema
    if b"\x00" in s:
        raise ValueError("a schema cannot contain a NUL byte on the wire")
    return b"".join((_iqq.pack(16 + len(s) + 1 + len(data), cid, schemacid), s, b"\x00", data))


def frame_entries(buf: bytearray, rows: Iterator[tuple[Any, ...]], limit: int) -> tuple[int, int]:
    """Frame rows ``(cid, schemacid, schema bytes, data)`` onto ``buf`` until it
    holds ``limit`` bytes or the rows run out (the leader's fast path).
    Returns (entries framed, the last one's cid)."""
    pack = _iqq.pack
    n = cid = 0
    for cid, schemacid, schema, data in rows:
        buf += pack(17 + len(schema) + len(data), cid, schemacid)
        buf += schema
        buf += b"\x00"
        buf += data
        n += 1
        if len(buf) >= limit:
            break
    return n, cid


def encode_syncreply(njob: int, entries: list[Entry]) -> bytes:
    """A whole SYNCREPLY (for tests and small replies; the leader streams)."""
    return b"".join(
        [encode_syncreply_start(njob), *(encode_entry(*e) for e in entries), END_OF_ENTRIES]
    )


def decode_entry(body: bytes | bytearray | memoryview, max_size: int = DEFAULT_MAX_SIZE) -> Entry:
    """An entry from its ``size`` bytes (the i32 size field already removed)."""
    n = len(body)
    if n < MIN_ENTRY:
        raise EntryTooSmallError(f"entry of {n} bytes; the minimum is {MIN_ENTRY}")
    dec = ReplyDecoder(SUB, max_size)
    dec.feed(_i32.pack(SUBREPLY) + _i32.pack(n) + bytes(body))
    events = dec.next_events()
    assert isinstance(events[-1], Entry)
    return events[-1]


# --- incremental decoders ----------------------------------------------------------

_WANT_TYPE = 0
_WANT_SYNC_BODY = 1
_WANT_SUB_BODY = 2
_WANT_ERROR_LEN = 3
_WANT_ERROR_BODY = 4
_WANT_NJOB = 5
_WANT_SIZE = 6
_WANT_ENTRY = 7
_DONE = 8
_WANT_SUBX_BODY = 9


class _Decoder:
    """Shared buffer handling: feed() bytes, next_events() parses what is whole."""

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._pos = 0
        self._state = _WANT_TYPE
        self._need = 4
        self.closed = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def _mid_message(self) -> bool:
        return self.buffered > 0

    def eof(self) -> None:
        """The peer closed. Raises TruncatedMessageError if it did so mid-message."""
        self.closed = True
        if self._state != _DONE and self._mid_message():
            raise TruncatedMessageError(
                f"connection closed in the middle of a message ({self.buffered} of"
                f" {self._need} bytes of the next field received)"
            )


class RequestDecoder(_Decoder):
    """The leader's side: decodes the one request of a connection."""

    def next_events(self) -> list[Event]:
        out: list[Event] = []
        buf = self._buf
        while self._state != _DONE and len(buf) - self._pos >= self._need:
            p = self._pos
            if self._state == _WANT_TYPE:
                (t,) = _i32.unpack_from(buf, p)
                self._pos += 4
                if t == SYNC:
                    self._state, self._need = _WANT_SYNC_BODY, 8 + HASH_SIZE
                elif t == SUB:
                    self._state, self._need = _WANT_SUB_BODY, 4
                elif t == SUBX:
                    self._state, self._need = _WANT_SUBX_BODY, 12
                else:
                    self._state = _DONE
                    if buf[p] == TLS_HANDSHAKE:
                        raise UnknownMessageTypeError(
                            "a TLS handshake: this leader does not use TLS (start it with"
                            " --tls-cert and --tls-key, or the follower without --tls-ca)"
                        )
                    raise UnknownMessageTypeError(
                        f"unknown message type {t} (expected {SYNC} SYNC or {SUB} SUB)"
                    )
            elif self._state == _WANT_SYNC_BODY:
                cid = struct.unpack_from("<q", buf, p)[0]
                out.append(SyncRequest(cid, bytes(buf[p + 8 : p + 8 + HASH_SIZE])))
                self._pos += 8 + HASH_SIZE
                self._state = _DONE
            elif self._state == _WANT_SUBX_BODY:
                out.append(SubRequest(*_iq.unpack_from(buf, p)))
                self._pos += 12
                self._state = _DONE
            else:
                out.append(SubRequest(_i32.unpack_from(buf, p)[0]))
                self._pos += 4
                self._state = _DONE
        return out

    def _mid_message(self) -> bool:
        return self._state != _WANT_TYPE or self.buffered > 0


class ReplyDecoder(_Decoder):
    """The follower's side: decodes the reply to a SYNC (``request=SYNC``) or a
    SUB (``request=SUB``), including the stream of entries that follows."""

    def __init__(self, request: int, max_size: int = DEFAULT_MAX_SIZE, pure: bool = False) -> None:
        super().__init__(max_size)
        if request not in (SYNC, SUB):
            raise ValueError("request must be SYNC or SUB")
        self.request = request
        self._native = None if pure else NATIVE_DECODE
        self.entry_bytes = 0  # bytes of entries decoded so far (size fields included)

    def _mid_message(self) -> bool:
        if self._state == _WANT_SIZE and self.request == SUB:
            return self.buffered > 0  # a SUB stream may end between entries
        return self._state != _DONE

    def eof(self) -> None:
        self.closed = True
        if not self._mid_message():
            return
        if self._state == _WANT_TYPE and not self.buffered:
            raise TruncatedMessageError("the leader closed the connection without replying")
        if self._state == _WANT_SIZE and self.buffered < 4:
            raise TruncatedMessageError(
                "the leader closed the connection before the end of the SYNCREPLY"
                if not self.buffered
                else f"connection closed inside an entry's size field ({self.buffered} of 4 bytes)"
            )
        raise TruncatedMessageError(
            f"connection closed in the middle of a message ({self.buffered} of {self._need}"
            " bytes received)"
        )

    def next_events(self) -> list[Event]:
        out: list[Event] = []
        buf = self._buf
        maxsize = self.max_size
        while self._state != _DONE:
            p = self._pos
            avail = len(buf) - p
            if self._state == _WANT_SIZE:
                self._entries(buf, out)
                if self._state == _WANT_SIZE:
                    break
                continue
            if avail < self._need:
                break
            if self._state == _WANT_TYPE:
                (t,) = _i32.unpack_from(buf, p)
                self._pos += 4
                if t == ERROR:
                    self._state, self._need = _WANT_ERROR_LEN, 4
                elif t == SYNCREPLY and self.request == SYNC:
                    self._state, self._need = _WANT_NJOB, 4
                elif t == SUBREPLY and self.request == SUB:
                    self._state, self._need = _WANT_SIZE, 4
                    out.append(SubReplyStart())
                else:
                    self._state = _DONE
                    want = SYNCREPLY if self.request == SYNC else SUBREPLY
                    raise UnknownMessageTypeError(
                        f"unexpected reply type to {NAMES[self.request]} - {t}"
                        f" (expected {want} or {ERROR})"
                    )
            elif self._state == _WANT_NJOB:
                (njob,) = _i32.unpack_from(buf, p)
                self._pos += 4
                if njob < 0:
                    self._state = _DONE
                    raise ProtocolError(f"SYNCREPLY announces {njob} jobs")
                self._state, self._need = _WANT_SIZE, 4
                out.append(SyncReplyStart(njob))
            elif self._state == _WANT_ERROR_LEN:
                (n,) = _i32.unpack_from(buf, p)
                self._pos += 4
                if n < 0 or n > min(maxsize, MAX_ERROR):
                    self._state = _DONE
                    raise SizeLimitError(
                        f"ERROR message length {n} is out of range (at most {MAX_ERROR})"
                    )
                self._state, self._need = _WANT_ERROR_BODY, n
            elif self._state == _WANT_ERROR_BODY:
                raw = bytes(buf[p : p + self._need])
                self._pos += self._need
                self._state = _DONE
                out.append(ErrorReply(raw.split(b"\x00", 1)[0].decode("utf-8", "replace")))
        return out

    def _entries(self, buf: bytearray, out: list[Event]) -> None:
        """The hot loop: whole entries straight out of the buffer."""
        p = n0 = self._pos
        if self._native is not None:
            got, p = self._native(buf, p, self.max_size, Entry)
            out.extend(got)
        end = len(buf)
        maxsize = self.max_size
        unpack_size, unpack_ids, find, append = (
            _i32.unpack_from,
            _qq.unpack_from,
            buf.find,
            out.append,
        )
        try:
            while end - p >= 4:
                (size,) = unpack_size(buf, p)
                if size < MIN_ENTRY or size > maxsize:
                    if size == 0 and self.request == SYNC:
                        p += 4
                        self._state = _DONE
                        append(SyncReplyEnd())
                        return
                    self._state = _DONE
                    if size > maxsize:
                        raise SizeLimitError(
                            f"entry of {size} bytes exceeds the limit of {maxsize} bytes"
                        )
                    raise EntryTooSmallError(
                        f"entry size {size} is below the minimum of {MIN_ENTRY}"
                    )
                stop = p + 4 + size
                if stop > end:
                    self._need = 4 + size
                    return
                cid, schemacid = unpack_ids(buf, p + 4)
                nul = find(b"\x00", p + 20, stop)
                if nul < 0:
                    self._state = _DONE
                    raise MissingNulError(
                        f"entry for cid {cid}: the schema text has no terminating NUL"
                    )
                if nul == p + 20:
                    schema = ""
                else:
                    try:
                        schema = buf[p + 20 : nul].decode("utf-8")
                    except UnicodeDecodeError as e:
                        self._state = _DONE
                        raise ProtocolError(
                            f"entry for cid {cid}: schema is not UTF-8 ({e})"
                        ) from None
                append(_tuple_new(Entry, (cid, schemacid, schema, bytes(buf[nul + 1 : stop]))))
                p = stop
        finally:
            self.entry_bytes += p - n0
            self._pos = p
