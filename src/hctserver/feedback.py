"""The feedback extension's messages, as pure functions and a decoder.

A follower reports its position to the leader a few times a second, as a
PostgreSQL standby sends status updates. Nothing here changes what the
original's messages mean, and a follower says nothing new to a leader
that has not said it understands:

* the follower opens a connection and sends a **probe**: a SYNC whose cid is
  -1 and whose hash is :data:`PROBE_HASH`. The original leader (and any
  leader without the extension) answers it as any SYNC it cannot match,
  ``incompatible database version``, and closes: no feedback then;
* a leader with the extension answers **ACCEPT** (its version, an id for
  this follower, its newest cid) and keeps the connection as the feedback
  channel: the follower sends **REPORT** (applied, durable and received
  cids, its name), the leader answers each with **STATE** (its newest cid,
  this follower's lag as it sees it);
* with the id, the follower subscribes with **SUBX** (SUB plus the id), so
  the leader knows which streams are whose.

Every extension message is ``i32 type, i32 length, body``: a receiver reads
the fields it knows and skips the rest, so later versions can add fields.
docs/PROTOCOL.md has the byte tables.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .errors import ProtocolError, SizeLimitError, UnknownMessageTypeError

PROBE_CID = -1
PROBE_HASH = b"hctserver-fb-v1\x00"  # 16 bytes: never a real version hash
VERSION = 1

ACCEPT = 6  # leader -> follower, once
STATE = 7  # leader -> follower, one per REPORT
REPORT = 8  # follower -> leader

MAX_BODY = 512  # the largest body either side accepts
MAX_NAME = 200  # bytes of a follower's name kept

_head = struct.Struct("<ii")
_accept = struct.Struct("<iqq")
_state = struct.Struct("<qq")
_report = struct.Struct("<qqq")


class Accept(NamedTuple):
    version: int
    follower_id: int
    newest: int


class State(NamedTuple):
    newest: int
    lag_us: int  # the follower's lag as the leader sees it; -1 if unknown


class Report(NamedTuple):
    applied: int  # the follower's snapshot: every cid up to it is applied
    durable: int  # every cid up to it is applied and on disk
    received: int  # the newest cid it has received
    name: str


def is_probe(cid: int, hash_: bytes) -> bool:
    return cid == PROBE_CID and hash_ == PROBE_HASH


def _message(kind: int, body: bytes) -> bytes:
    return _head.pack(kind, len(body)) + body


def encode_accept(follower_id: int, newest: int) -> bytes:
    return _message(ACCEPT, _accept.pack(VERSION, follower_id, newest))


def encode_state(newest: int, lag_us: int) -> bytes:
    return _message(STATE, _state.pack(newest, lag_us))


def encode_report(applied: int, durable: int, received: int, name: str) -> bytes:
    raw = name.encode("utf-8", "replace")[:MAX_NAME]
    return _message(REPORT, _report.pack(applied, durable, received) + raw)


_LAYOUT: dict[int, tuple[str, struct.Struct]] = {
    ACCEPT: ("ACCEPT", _accept),
    STATE: ("STATE", _state),
    REPORT: ("REPORT", _report),
}


class Decoder:
    """Extension messages from a byte stream, split anywhere. ``accept`` is
    the set of message types this side may receive."""

    def __init__(self, accept: frozenset[int]) -> None:
        self.accept = accept
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Accept | State | Report]:
        self._buf += data
        out: list[Accept | State | Report] = []
        buf = self._buf
        while len(buf) >= 8:
            kind, n = _head.unpack_from(buf, 0)
            if kind not in self.accept:
                raise UnknownMessageTypeError(f"unexpected feedback message type {kind}")
            name, layout = _LAYOUT[kind]
            if not layout.size <= n <= MAX_BODY:
                raise SizeLimitError(
                    f"{name} body of {n} bytes (from {layout.size} to {MAX_BODY} allowed)"
                )
            if len(buf) < 8 + n:
                break
            fields = layout.unpack_from(buf, 8)
            if kind == ACCEPT:
                out.append(Accept(*fields))
            elif kind == STATE:
                out.append(State(*fields))
            else:
                extra = bytes(buf[8 + layout.size : 8 + n])[:MAX_NAME]
                applied, durable, received = fields
                out.append(Report(applied, durable, received, extra.decode("utf-8", "replace")))
            del buf[: 8 + n]
        return out


def check_accept(msg: Accept) -> Accept:
    if msg.version < 1 or msg.follower_id <= 0:
        raise ProtocolError(f"bad ACCEPT from the leader: {msg}")
    return msg
