"""The shared-secret extension: mutual challenge-response before any request.

A leader started with ``--auth-file`` serves nothing on a connection until
the follower proves that it holds the same secret, and proves it holds it
too, so a follower never takes data from an impostor. The secret never
crosses the wire: each side sends an HMAC-SHA256 of both sides' fresh
nonces, labelled by role (so a proof cannot be reflected back):

* follower -> leader: a SYNC whose cid is -3 and whose hash is
  :data:`REQUEST_HASH` (the original leader, and a leader without a secret,
  answer it with an ERROR), then **HELLO** (i32 version, 32-byte nonce);
* leader -> follower: **CHALLENGE** (its 32-byte nonce), or ERROR;
* follower -> leader: **PROOF** (HMAC(secret, "follower" | both nonces));
* leader -> follower: **WELCOME** (HMAC(secret, "leader" | both nonces)),
  or ERROR ("wrong shared secret") and close.

Then the connection carries its one request as usual. Messages are frames
(``i32 type, i32 length, body``, :mod:`hctserver.protocol.messages`), as the other
extensions', of exact sizes. The state machines
here do no I/O; :func:`exchange` drives one over a connection.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from typing import Protocol

from ..errors import (
    AuthError,
    ConnectionLostError,
    LeaderBusyError,
    ProtocolError,
    TimedOutError,
)
from ..position import HASH_SIZE
from . import messages, wire
from .messages import MessageType, Origin

REQUEST_CID, REQUEST_HASH = messages.OPENERS[Origin.AUTH]
VERSION = 1

HELLO = MessageType.HELLO  # follower -> leader: version, nonce
CHALLENGE = MessageType.CHALLENGE  # leader -> follower: nonce
PROOF = MessageType.PROOF  # follower -> leader: its MAC
WELCOME = MessageType.WELCOME  # leader -> follower: its MAC

NONCE = messages.NONCE
MAC = messages.MAC
_sync = struct.Struct(f"<iq{HASH_SIZE}s")
_hello = struct.Struct(f"<i{NONCE}s")

NEEDED = (
    "this leader requires authentication: start the follower with --auth-file"
    " holding the leader's secret"
)
TLS_NEEDED = (
    "this leader requires TLS: start the follower with --tls-ca naming the CA of the"
    " leader's certificate"
)
WRONG = "authentication failed: wrong shared secret"
NOT_HERE = (
    "this leader has no shared secret (it was started without --auth-file):"
    " it cannot prove itself to this follower"
)


def is_request(cid: int, hash_: bytes) -> bool:
    return cid == REQUEST_CID and hash_ == REQUEST_HASH


def nonce() -> bytes:
    return os.urandom(NONCE)


def _mac(secret: bytes, role: bytes, follower_nonce: bytes, leader_nonce: bytes) -> bytes:
    msg = b"hctserver-auth-v1 " + role + b"\x00" + follower_nonce + leader_nonce
    return hmac.new(secret, msg, hashlib.sha256).digest()


class _Reader:
    """Whole messages of the kind expected next, or an ERROR from a leader."""

    def __init__(self, from_leader: bool) -> None:
        self.frames = messages.FrameDecoder(Origin.AUTH)
        self._from_leader = from_leader

    def next(self, kind: MessageType) -> bytes | None:
        frame = self.frames.next_frame(
            frozenset({kind, wire.ERROR}) if self._from_leader else frozenset({kind})
        )
        if frame is None:
            return None
        if frame.kind == wire.ERROR:
            text = messages.error_text(frame.body)
            if text.endswith(wire.RETRY):  # busy or draining: not about us
                raise LeaderBusyError(f"error from leader: {text}")
            raise AuthError(f"the leader refused this follower: {_explain(text)}")
        return frame.body


def _explain(text: str) -> str:
    if text == wire.INCOMPATIBLE:
        return (
            f"{text} (it does not know authentication: the original C leader,"
            " or hctserver before 0.4)"
        )
    return text


class FollowerAuth:
    """The follower's side: :meth:`start`, then feed what arrives to
    :meth:`receive` until :attr:`done`."""

    def __init__(self, secret: bytes, my_nonce: bytes | None = None) -> None:
        self._secret = secret
        self._nonce = my_nonce or nonce()
        self._expect = CHALLENGE
        self._want_mac = b""
        self._in = _Reader(from_leader=True)
        self.done = False

    def start(self) -> bytes:
        return wire.encode_sync(REQUEST_CID, REQUEST_HASH) + messages.encode(
            HELLO, _hello.pack(VERSION, self._nonce)
        )

    def receive(self, data: bytes | memoryview) -> bytes:
        """Bytes to send back (maybe none). Raises :class:`AuthError` when
        the leader refuses us or fails to prove itself."""
        self._in.frames.feed(data)
        out = b""
        while not self.done:
            body = self._in.next(self._expect)
            if body is None:
                break
            if self._expect == CHALLENGE:
                self._want_mac = _mac(self._secret, b"leader", self._nonce, body)
                out += messages.encode(PROOF, _mac(self._secret, b"follower", self._nonce, body))
                self._expect = WELCOME
            else:
                if not hmac.compare_digest(body, self._want_mac):
                    raise AuthError(
                        "the leader could not prove that it holds the shared secret:"
                        " it is not this follower's leader, or its --auth-file differs"
                    )
                self.done = True
        if self.done and self._in.frames.buffered:
            raise ProtocolError("the leader sent more than its WELCOME")
        return out


class LeaderAuth:
    """The leader's side. :meth:`receive` returns bytes to send; raises
    :class:`Refused` for a client without the secret. The client may send
    its request only after WELCOME, so nothing is left over."""

    def __init__(self, secret: bytes, my_nonce: bytes | None = None) -> None:
        self._secret = secret
        self._nonce = my_nonce or nonce()
        self._stage = 0  # 0: the SYNC, 1: HELLO, 2: PROOF
        self._sync = bytearray()  # the seed's framing: no length field
        self._theirs = b""
        self._in = _Reader(from_leader=False)
        self.done = False

    def receive(self, data: bytes | memoryview) -> bytes:
        out = b""
        if self._stage == 0:
            self._sync += data
            if len(self._sync) >= 4:
                _no_request(self._sync)
            if len(self._sync) < _sync.size:
                return out
            _, cid, h = _sync.unpack_from(self._sync)
            if cid != REQUEST_CID or h != REQUEST_HASH:
                raise Refused(NEEDED, f"no authentication (it sent SYNC from cid {cid})")
            data, self._sync = bytes(self._sync[_sync.size :]), bytearray()
            self._stage = 1
        self._in.frames.feed(data)
        if self._stage == 1:
            body = self._in.next(HELLO)
            if body is None:
                return out
            version, self._theirs = _hello.unpack(body)
            if version != VERSION:
                raise Refused(
                    f"authentication version {version} is not {VERSION}: upgrade the older node"
                )
            self._stage = 2
            out += messages.encode(CHALLENGE, self._nonce)
        body = self._in.next(PROOF)
        if body is None:
            return out
        if not hmac.compare_digest(
            body, _mac(self._secret, b"follower", self._theirs, self._nonce)
        ):
            raise Refused(WRONG, "wrong shared secret (the follower's --auth-file differs)")
        if self._in.frames.buffered:
            raise ProtocolError("the follower sent its request before the WELCOME")
        self.done = True
        return out + messages.encode(
            WELCOME, _mac(self._secret, b"leader", self._theirs, self._nonce)
        )


def _no_request(buf: bytearray) -> None:
    (kind,) = struct.unpack_from("<i", buf)
    if kind != wire.SYNC:
        name = wire.NAMES.get(kind, f"a message of type {kind}")
        raise Refused(NEEDED, f"no authentication (it sent {name})")


REFUSALS = (NEEDED, WRONG, NOT_HERE, TLS_NEEDED)


class Refused(AuthError):
    """A client the leader refuses: ``reply`` is the ERROR text for it, the
    message the reason for the leader's log."""

    def __init__(self, reply: str, why: str | None = None) -> None:
        super().__init__(why or reply)
        self.reply = reply


class _Conn(Protocol):
    peer: str

    def send_all(self, data: bytes, timeout: float | None) -> None: ...

    def recv_into(self, buf: bytearray, timeout: float | None) -> int: ...


def exchange(conn: _Conn, side: FollowerAuth | LeaderAuth, first: bytes, timeout: float) -> None:
    """Run ``side`` over ``conn`` (sending ``first`` first) until it is done,
    within ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout
    if first:
        conn.send_all(first, timeout)
    buf = bytearray(256)
    while not side.done:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimedOutError(f"{conn.peer} did not finish authenticating within {timeout:g} s")
        n = conn.recv_into(buf, left)
        if n == 0:
            raise ConnectionLostError(f"{conn.peer} closed the connection while authenticating")
        out = side.receive(memoryview(buf)[:n])
        if out:
            conn.send_all(out, left)
