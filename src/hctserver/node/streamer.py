"""The leader's live streams: one queue per subscriber, one thread sending.

A commit hook encodes an entry once and appends it to the queue of every
subscriber of that stream without blocking (:meth:`Streamer.push`). The
streamer thread writes the queues out with non-blocking sends; when commits
come faster than it sends, it gathers them for a few milliseconds between
rounds (a lone commit goes at once). A subscriber is dropped (its
follower can resync) when its queue exceeds ``limit`` bytes, when it has
had data waiting for ``stall_timeout`` seconds without taking any, when it
sends more than a few bytes (followers send nothing after SUB), or when its
connection fails: the commit rate never depends on the slowest follower,
and a subscriber that does not read cannot hold its slot for long.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from ..errors import ConnectionLostError
from ..net.transport import Conn, Poller

log = logging.getLogger("hctserver")

_SEND_CHUNK = 1 << 20
_MAX_HEARD = 4096  # bytes a subscriber may send before it is taken for hostile


class Subscriber:
    """One follower's SUB connection and what is queued for it."""

    __slots__ = (
        "conn",
        "dead",
        "follower",
        "heard",
        "job",
        "moved",
        "pending",
        "pending_bytes",
        "sent",
    )

    def __init__(self, conn: Conn, job: int, first: bytes = b"", follower: int = 0) -> None:
        self.conn = conn
        self.job = job
        self.follower = follower  # the feedback extension's id, 0 if none
        self.sent = 0  # bytes sent to it
        self.pending: deque[bytes | memoryview] = deque([first] if first else ())
        self.pending_bytes = len(first)
        self.moved = time.monotonic()  # when it last took bytes (or had none to take)
        self.heard = 0  # bytes it sent us
        self.dead = False

    @property
    def peer(self) -> str:
        return self.conn.peer


class Streamer:
    """Owns every subscriber connection; see the module's docstring."""

    def __init__(
        self,
        limit: int,
        coalesce: float = 0.003,
        stall_timeout: float = 10.0,
        on_drop: Callable[[Subscriber, bool], None] | None = None,
    ) -> None:
        self.limit = limit
        self.coalesce = coalesce
        self.stall_timeout = stall_timeout
        self.on_drop = on_drop  # told of every subscriber dropped (and if it left)
        self.lock = threading.Lock()
        self.subs: list[Subscriber] = []
        self._dirty: set[Subscriber] = set()
        self._poller = Poller()
        self._woken = False
        self._scratch = bytearray(4096)
        self.dropped = 0
        self.bytes_sent = 0

    def add(self, sub: Subscriber) -> None:
        """Own ``sub`` from now on; what it already has queued goes out first."""
        with self.lock:
            self.subs.append(sub)
            self._poller.add(sub.conn, sub)
            if sub.pending:
                self._dirty.add(sub)
        self._poller.wake()

    def push(self, subs: Sequence[Subscriber], frame: bytes) -> None:
        """Queue ``frame`` for each subscriber; never blocks on a socket."""
        n = len(frame)
        wake = False
        with self.lock:
            for s in subs:
                if s.dead:
                    continue
                if not s.pending:
                    s.moved = time.monotonic()  # the wait starts now, not at its last send
                s.pending.append(frame)
                s.pending_bytes += n
                self._dirty.add(s)
            if not self._woken:
                self._woken = wake = True
        if wake:
            self._poller.wake()

    def wake(self) -> None:
        self._poller.wake()

    def run(self, stop: threading.Event) -> None:
        """Send until ``stop`` is set; :meth:`finish` sends the rest."""
        while not stop.is_set():
            with self.lock:
                self._woken = False
                pending = bool(self._dirty)
                stuck = [s.moved for s in self.subs if s.pending]
            wait = 0.0 if pending else None
            if stuck and not pending:
                wait = max(0.0, min(stuck) + self.stall_timeout - time.monotonic()) + 0.01
            for _conn, sub, readable, writable in self._poller.poll(wait):
                if readable and self._closed_by_peer(sub):
                    continue
                if writable:
                    with self.lock:
                        self._dirty.add(sub)
            with self.lock:
                self._woken = True  # pushes during the pause need no wake-up
                dirty, self._dirty = self._dirty, set()
                # commits came faster than rounds: gather them. One at a time
                # goes at once (a forwarded write waits for it on a follower)
                busy = any(len(sub.pending) > 1 for sub in dirty)
            for sub in dirty:
                self._flush(sub)
            if stuck:
                self._drop_stalled()
            if busy and self.coalesce:
                stop.wait(self.coalesce)  # let commits gather: fewer, larger sends

    def _closed_by_peer(self, sub: Subscriber) -> bool:
        """Followers send nothing after SUB: readable means closed (or misbehaving)."""
        try:
            n = sub.conn.try_recv_into(self._scratch)
        except ConnectionLostError as e:
            self._drop(sub, str(e), gone=True)
            return True
        if n == 0:
            self._drop(sub, "the follower closed the connection", gone=True)
            return True
        sub.heard += n or 0
        if sub.heard > _MAX_HEARD:
            self._drop(sub, f"it sent {sub.heard} bytes after SUB (followers send nothing)")
            return True
        return False

    def _drop_stalled(self) -> None:
        now = time.monotonic()
        with self.lock:
            stalled = [s for s in self.subs if s.pending and now - s.moved > self.stall_timeout]
        for sub in stalled:
            self._drop(
                sub,
                f"it took nothing of {sub.pending_bytes} queued bytes for"
                f" {self.stall_timeout:g} s; it can resync",
            )

    def _flush(self, sub: Subscriber) -> None:
        if sub.dead:
            return
        if sub.pending_bytes > self.limit:
            self._drop(
                sub,
                f"more than {self.limit} bytes queued (it reads too slowly); it can resync",
            )
            return
        while True:
            with self.lock:
                if not sub.pending:
                    break
                chunk = _take_chunk(sub.pending)
            try:
                sent = sub.conn.try_send(chunk)
            except ConnectionLostError as e:
                self._drop(sub, str(e))
                return
            with self.lock:
                sub.pending_bytes -= sent
                sub.sent += sent
                self.bytes_sent += sent
                if sent:
                    sub.moved = time.monotonic()
                if sent < len(chunk):
                    sub.pending.appendleft(memoryview(chunk)[sent:])
                    if not sub.dead:
                        self._poller.watch(sub.conn, write=True)
                    return
        with self.lock:
            if not sub.dead:
                self._poller.watch(sub.conn, write=False)

    def _drop(self, sub: Subscriber, why: str, gone: bool = False) -> None:
        """Stop streaming to ``sub``; ``gone``: the follower left (not a
        fault of ours or its, logged at INFO)."""
        with self.lock:
            if sub.dead:
                return
            sub.dead = True
            sub.pending.clear()
            sub.pending_bytes = 0
            if sub in self.subs:
                self.subs.remove(sub)
            self._poller.remove(sub.conn)
        if gone:
            log.info("subscriber %s of stream %d left: %s", sub.peer, sub.job, why)
        else:
            self.dropped += 1
            log.warning("dropped subscriber %s of stream %d: %s", sub.peer, sub.job, why)
        sub.conn.close()
        if self.on_drop is not None:
            self.on_drop(sub, gone)

    def finish(self, timeout: float) -> None:
        """After :meth:`run` returned: send what is queued (all within
        ``timeout`` seconds), end each stream and close it."""
        deadline = time.monotonic() + timeout
        with self.lock:
            subs, self.subs = list(self.subs), []
        for sub in subs:
            if sub.dead:
                continue
            sub.dead = True
            try:
                sub.conn.set_blocking(True)
                while sub.pending:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ConnectionLostError("the flush deadline passed")
                    sub.conn.send_all(sub.pending.popleft(), left)
                sub.conn.shutdown_write()
            except ConnectionLostError as e:
                log.warning("subscriber %s of job %d: final flush failed: %s", sub.peer, sub.job, e)
            finally:
                sub.conn.close()
        self._poller.close()


def _take_chunk(pending: deque[bytes | memoryview]) -> bytes | memoryview:
    """The next frames to send, joined up to about 1 MiB."""
    chunk = pending.popleft()
    if len(chunk) >= _SEND_CHUNK or not pending:
        return chunk
    parts = [chunk]
    size = len(chunk)
    while pending and size < _SEND_CHUNK:
        nxt = pending.popleft()
        parts.append(nxt)
        size += len(nxt)
    return b"".join(parts)
