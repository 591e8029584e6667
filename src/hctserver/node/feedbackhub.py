"""The leader's end of the followers' feedback channels: one thread reads
every channel (one poller), records each REPORT in the
:class:`~hctserver.node.followers.FollowerTable` and answers with STATE.

Bounded like the streams: at most ``max_channels`` channels; a channel
silent for ``idle_timeout`` seconds (followers report every 0.2 s) is
closed, and one that sends garbage or stops reading its STATE replies
(more than 4 KiB waiting) is dropped. Only the newest REPORT of a burst is
recorded and answered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..errors import ConnectionLostError, HctError
from ..net.transport import Conn, Poller
from ..protocol import feedback
from .followers import FollowerInfo, FollowerTable

log = logging.getLogger("hctserver")

_MAX_OUT = 4096


class _Channel:
    __slots__ = ("conn", "decoder", "heard", "info", "out")

    def __init__(self, conn: Conn, info: FollowerInfo) -> None:
        self.conn = conn
        self.info = info
        self.decoder = feedback.Decoder(frozenset({feedback.REPORT}))
        self.out = bytearray()
        self.heard = time.monotonic()


class FeedbackHub:
    """See the module's docstring."""

    def __init__(
        self,
        table: FollowerTable,
        newest: Callable[[], int],
        max_channels: int = 64,
        idle_timeout: float = 5.0,
    ) -> None:
        self.table = table
        self.newest = newest
        self.max_channels = max_channels
        self.idle_timeout = idle_timeout
        self.client_url = ""  # sent in ACCEPT: where this leader serves SQL clients
        self.waits = False  # STATE says WAITS: this leader's commits wait for acknowledgements
        self._poller = Poller()
        self._lock = threading.Lock()
        self._channels: dict[Conn, _Channel] = {}
        self._buf = bytearray(4096)
        self._opening = 0  # ACCEPTs being sent
        self._closed = False

    def accept(self, conn: Conn, timeout: float, newest: int) -> int:
        """A follower's probe: send ACCEPT and own ``conn`` from then on;
        returns the follower's id. With every channel taken (or the hub
        closed) it closes ``conn`` without a word and returns 0: to the
        follower, a leader without feedback."""
        with self._lock:
            if self._closed or len(self._channels) + self._opening >= self.max_channels:
                conn.close()
                return 0
            self._opening += 1
        info = self.table.add(conn.peer)
        try:
            conn.send_all(feedback.encode_accept(info.id, newest, self.client_url), timeout)
        except BaseException:
            self.table.remove(info.id)
            with self._lock:
                self._opening -= 1
            raise
        with self._lock:
            self._opening -= 1
            if self._closed:
                self.table.remove(info.id)
                conn.close()
                return 0
            self._channels[conn] = _Channel(conn, info)
            self._poller.add(conn, None)
            self._poller.wake()  # under the lock: close() has not run
        log.info("follower %d at %s reports its position", info.id, conn.peer)
        return info.id

    def wake(self) -> None:
        with self._lock:
            if not self._closed:
                self._poller.wake()

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                for conn, _, readable, writable in self._poller.poll(1.0):
                    ch = self._channels.get(conn)
                    if ch is None:
                        continue
                    try:
                        if readable:
                            self._read(ch)
                        if writable or ch.out:
                            self._write(ch)
                    except (HctError, OSError) as e:
                        self._drop(ch, str(e))
                now = time.monotonic()
                with self._lock:
                    idle = [c for c in self._channels.values() if now - c.heard > self.idle_timeout]
                for ch in idle:
                    self._drop(ch, f"no report for {self.idle_timeout:g} s")
        finally:
            self.close()

    def _read(self, ch: _Channel) -> None:
        n = ch.conn.try_recv_into(self._buf)
        if n is None:
            return
        if n == 0:
            raise ConnectionLostError("the follower closed its feedback channel")
        ch.heard = time.monotonic()
        reports = ch.decoder.feed(memoryview(self._buf)[:n])
        if reports:  # only the newest of a burst counts (and is answered)
            r = reports[-1]
            assert isinstance(r, feedback.Report)
            lag = self.table.report(ch.info.id, r, ch.heard)
            flags = feedback.WAITS if self.waits else 0
            ch.out += feedback.encode_state(self.newest(), int(lag * 1e6), flags)
        if len(ch.out) > _MAX_OUT:
            raise ConnectionLostError("the follower does not read its STATE replies")

    def _write(self, ch: _Channel) -> None:
        if ch.out:
            sent = ch.conn.try_send(bytes(ch.out))
            del ch.out[:sent]
        self._poller.watch(ch.conn, write=bool(ch.out))

    def _drop(self, ch: _Channel, why: str) -> None:
        with self._lock:
            if self._channels.pop(ch.conn, None) is None:
                return
        self._forget(ch)
        log.info(
            "follower %d at %s: feedback channel closed (%s)", ch.info.id, ch.info.address, why
        )

    def _forget(self, ch: _Channel) -> None:
        self._poller.remove(ch.conn)
        self.table.remove(ch.info.id)
        ch.conn.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            chans = list(self._channels.values())
            self._channels.clear()
            for ch in chans:
                self._forget(ch)
            self._poller.close()
