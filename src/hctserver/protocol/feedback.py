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
  this follower's lag as it sees it; from version 3, flags: :data:`WAITS`
  when the leader's commits wait for its followers' acknowledgements, so
  that the follower applies and reports what arrives at once instead of
  batching it);
* with the id, the follower subscribes with **SUBX** (SUB plus the id), so
  the leader knows which streams are whose.

Every extension message is a frame (``i32 type, i32 length, body``,
:mod:`hctserver.protocol.messages`): a receiver reads the fields it knows and skips
the rest, so later versions can add fields. docs/PROTOCOL.md has the byte
tables.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ..errors import ProtocolError
from . import messages
from .messages import MessageType, Origin

PROBE_CID, PROBE_HASH = messages.OPENERS[Origin.FEEDBACK]
VERSION = 3  # 2: ACCEPT carries the leader's client URL; 3: STATE carries flags

ACCEPT = MessageType.ACCEPT  # leader -> follower, once
STATE = MessageType.STATE  # leader -> follower, one per REPORT
REPORT = MessageType.REPORT  # follower -> leader

MAX_BODY = messages.FEEDBACK_MAX  # the largest body either side accepts
MAX_NAME = 200  # bytes of a follower's name kept

_accept = struct.Struct("<iqq")
_state = struct.Struct("<qq")
_flags = struct.Struct("<I")  # version 3: STATE's flags, after the fields of version 1
WAITS = 1  # STATE flag: the leader's commits wait for acknowledgements (synchronous commit)
_len16 = struct.Struct("<H")
MAX_URL = 400  # bytes of the leader's client URL
_report = struct.Struct("<qqq")


class Accept(NamedTuple):
    version: int
    follower_id: int
    newest: int
    client: str = ""  # version 2: where the leader serves SQL clients ("" if not)


class State(NamedTuple):
    newest: int
    lag_us: int  # the follower's lag as the leader sees it; -1 if unknown
    flags: int = 0  # version 3: WAITS (0 from older leaders)


class Report(NamedTuple):
    applied: int  # the follower's snapshot: every cid up to it is applied
    durable: int  # every cid up to it is applied and on disk
    received: int  # the newest cid it has received
    name: str


def is_probe(cid: int, hash_: bytes) -> bool:
    return cid == PROBE_CID and hash_ == PROBE_HASH


def client_url(url: str, host: str) -> str:
    """The leader's client URL as a follower that reached it at ``host``
    uses it: a wildcard or empty host in ``url`` becomes ``host``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, path = rest.partition("/")
    name, colon, port = netloc.rpartition(":")
    if not colon:
        name, port = netloc, ""
    if name.strip("[]") in ("", "0.0.0.0", "::"):
        name = f"[{host}]" if ":" in host else host
    return f"{scheme}://{name}{colon}{port}{slash}{path}"


def encode_accept(follower_id: int, newest: int, client: str = "") -> bytes:
    body = _accept.pack(VERSION, follower_id, newest)
    url = client.encode()[:MAX_URL]
    if url:  # else the fields of version 1 alone
        body += _len16.pack(len(url)) + url
    return messages.encode(ACCEPT, body)


def encode_state(newest: int, lag_us: int, flags: int = 0) -> bytes:
    body = _state.pack(newest, lag_us)
    if flags:  # else the fields of version 1 alone (an older follower reads those only)
        body += _flags.pack(flags)
    return messages.encode(STATE, body)


def encode_report(applied: int, durable: int, received: int, name: str) -> bytes:
    raw = name.encode("utf-8", "replace")[:MAX_NAME]
    return messages.encode(REPORT, _report.pack(applied, durable, received) + raw)


class Decoder:
    """Feedback messages from a byte stream, split anywhere. ``accept`` is
    the set of message types this side may receive."""

    def __init__(self, accept: frozenset[int]) -> None:
        self.accept = accept
        self._frames = messages.FrameDecoder(Origin.FEEDBACK)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Accept | State | Report]:
        self._frames.feed(data)
        return [_decode(f) for f in self._frames.frames(self.accept)]


def _decode(frame: messages.Frame) -> Accept | State | Report:
    body = frame.body  # at least the fields of version 1: the frame's bounds
    if frame.kind == ACCEPT:
        version, fid, newest = _accept.unpack_from(body)
        client = ""
        rest = body[_accept.size :]
        if version >= 2 and len(rest) >= _len16.size:
            (n,) = _len16.unpack_from(rest)
            client = bytes(rest[_len16.size : _len16.size + min(n, MAX_URL)]).decode(
                "utf-8", "replace"
            )
        return Accept(version, fid, newest, client)
    if frame.kind == STATE:
        newest, lag_us = _state.unpack_from(body)
        flags = 0
        if len(body) >= _state.size + _flags.size:
            (flags,) = _flags.unpack_from(body, _state.size)
        return State(newest, lag_us, flags)
    applied, durable, received = _report.unpack_from(body)
    name = body[_report.size :][:MAX_NAME].decode("utf-8", "replace")
    return Report(applied, durable, received, name)


def check_accept(msg: Accept) -> Accept:
    if msg.version < 1 or msg.follower_id <= 0:
        raise ProtocolError(f"bad ACCEPT from the leader: {msg}")
    return msg
