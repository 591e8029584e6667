"""The follower's end of the bootstrap extension: ask, receive into a file.

:func:`fetch` speaks :mod:`hctserver.protocol.bootstrap` on one connection and
writes the snapshot into a file as it arrives (memory: one message), with
the same bounds as everything else a leader sends: a size limit checked
before anything is written, the disk's free space, and ``io_timeout`` for
each whole message. Checking and installing the file is
:mod:`hctserver.journal.snapshot`'s.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time

from .. import faults
from ..errors import (
    ConnectionLostError,
    DiskFullError,
    IncompatibleError,
    NoSnapshotsError,
    ProtocolError,
    SizeLimitError,
    TimedOutError,
    UnknownMessageTypeError,
)
from ..net.transport import Conn
from ..position import Position
from ..protocol import bootstrap, wire
from ..protocol.session import leader_error

MAX_SNAPSHOT_BYTES = 1 << 40  # the largest snapshot a follower accepts unless told


def fetch(
    conn: Conn,
    pos: Position,
    reseed: bool,
    path: str,
    *,
    io_timeout: float,
    max_bytes: int = MAX_SNAPSHOT_BYTES,
) -> bootstrap.Head:
    """Ask for a snapshot from position ``pos`` and write it to ``path``;
    return its HEAD once the whole file has arrived and matches its digest."""
    reader = _Reader(conn, io_timeout)
    conn.send_all(bootstrap.encode_request(), io_timeout)
    offer = reader.next(frozenset({bootstrap.OFFER, wire.ERROR}))
    if isinstance(offer, wire.ErrorReply):
        if offer.message == wire.INCOMPATIBLE:
            raise NoSnapshotsError(
                "error from leader: incompatible database version, and it sends no"
                " snapshots (an original C leader, or one run with --no-snapshots): re-seed"
                " this follower from an empty file, or start the leader with snapshots on"
            )
        raise leader_error(offer.message)
    conn.send_all(bootstrap.encode_want(pos.cid, pos.hash, reseed), io_timeout)
    head = reader.next(frozenset({bootstrap.HEAD, wire.ERROR}))
    if isinstance(head, wire.ErrorReply):
        if head.message == wire.INCOMPATIBLE:
            raise IncompatibleError(
                f"error from leader: incompatible database version (this database's history"
                f" at cid {pos.cid} differs from the leader's, or is ahead of it). It was left"
                " as it is; to replace it with the leader's data, run the follower with"
                " --reseed (a copy of it is kept beside it)"
            )
        raise leader_error(head.message)
    assert isinstance(head, bootstrap.Head)
    if head.size > max_bytes:
        raise SizeLimitError(
            f"the leader's snapshot is {head.size} bytes; this follower accepts at most"
            f" {max_bytes} (max_snapshot_bytes)"
        )
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    if head.size * 2 > free:  # the file, and the WAL while it is installed
        raise DiskFullError(
            f"the disk is full: the leader's snapshot needs {2 * head.size} bytes"
            f" (the file, then as much WAL to install it); {free} are free"
        )
    _receive(reader, head, path)
    return head


def _receive(reader: _Reader, head: bootstrap.Head, path: str) -> None:
    digest = hashlib.sha256()
    got = 0
    kinds = frozenset({bootstrap.DATA, bootstrap.END})
    with open(path, "wb") as f:
        while True:
            msg = reader.next(kinds)
            if isinstance(msg, bootstrap.End):
                break
            assert isinstance(msg, bootstrap.Data)
            got += len(msg.chunk)
            if got > head.size:
                raise ProtocolError(f"the leader sent more than the {head.size} bytes it announced")
            try:
                f.write(msg.chunk)
            except OSError as e:
                raise DiskFullError(f"the disk is full: receiving the snapshot failed ({e})") from e
            digest.update(msg.chunk)
            faults.kill_point("receive")
        f.flush()
        os.fsync(f.fileno())
    if got != head.size:
        raise ProtocolError(f"the leader sent {got} bytes of a {head.size}-byte snapshot")
    if digest.digest() != msg.digest:
        raise ProtocolError("the snapshot from the leader does not match its SHA-256")


class _Reader:
    """Whole messages from ``conn``, each within ``io_timeout``."""

    def __init__(self, conn: Conn, io_timeout: float) -> None:
        self.conn = conn
        self.io_timeout = io_timeout
        self.dec = bootstrap.Decoder(_FROM_LEADER)
        self.ready: list[bootstrap.Message] = []
        self.buf = memoryview(bytearray(1 << 20))

    def next(self, accept: frozenset[int]) -> bootstrap.Message:
        deadline = time.monotonic() + self.io_timeout
        while not self.ready:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimedOutError("deadline passed")
                n = self.conn.recv_into(self.buf, left)
            except TimedOutError:
                raise TimedOutError(
                    f"no whole message from the leader for {self.io_timeout:g} s during"
                    " the snapshot"
                ) from None
            if n == 0:
                raise ConnectionLostError("the leader closed the connection during the snapshot")
            self.ready.extend(self.dec.feed(self.buf[:n]))
        msg = self.ready.pop(0)
        kind = wire.ERROR if isinstance(msg, wire.ErrorReply) else _KIND[type(msg)]
        if kind not in accept:
            raise UnknownMessageTypeError(f"unexpected bootstrap message {type(msg).__name__}")
        return msg


_FROM_LEADER = frozenset(
    {bootstrap.OFFER, bootstrap.HEAD, bootstrap.DATA, bootstrap.END, wire.ERROR}
)
_KIND: dict[type, int] = {
    bootstrap.Offer: bootstrap.OFFER,
    bootstrap.Head: bootstrap.HEAD,
    bootstrap.Data: bootstrap.DATA,
    bootstrap.End: bootstrap.END,
}
