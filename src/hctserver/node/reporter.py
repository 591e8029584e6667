"""The follower's end of the feedback channel (:mod:`hctserver.protocol.feedback`).

At the start of each session with a leader the follower's driver calls
:meth:`Reporter.hello` on a connection of its own: a leader with the
extension answers ACCEPT and the connection stays open; any other answer
(the original's ``incompatible database version``, a close, silence)
means no feedback until the next session, and nothing else is sent. The
reporter's thread then sends a REPORT every ``interval`` seconds and reads
the leader's STATE replies: its newest cid and this follower's lag as the
leader sees it.

A channel that fails while the session goes on (the leader dropped a
follower that was paused past its idle timeout, a network cut, a reset) is
opened again by the reporter's thread itself, through ``reopen``, every
``retry`` seconds until it is back: synchronous commits on the leader wait
for these reports, so they must not depend on the next session.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import HctError, PeerError, TimedOutError
from ..net.transport import Conn
from ..protocol import feedback, wire

log = logging.getLogger("hctserver")

__all__ = ["HeardFromLeader", "Reporter"]

_ERROR = wire.ERROR.to_bytes(4, "little")


@dataclass
class HeardFromLeader:
    """What the follower last heard from its leader over the channel."""

    follower_id: int = 0  # 0: no channel (the leader does not take feedback)
    newest: int = -1  # the leader's newest cid; -1 unknown
    lag_ms: float | None = None  # this follower's lag as the leader sees it
    heard_at: float | None = None
    client: str = ""  # where the leader serves SQL clients, as it said in ACCEPT


class Reporter:
    """See the module's docstring. ``position()`` returns (applied, durable,
    received) cids."""

    def __init__(
        self,
        name: str,
        position: Callable[[], tuple[int, int, int]],
        interval: float = 0.2,
        timeout: float = 5.0,
        reopen: Callable[[], Conn] | None = None,
        retry: float = 0.2,
    ) -> None:
        self.name = name
        self.reopen = reopen
        self.retry = retry
        self._wanted = False  # a session with a leader that takes feedback is on
        self.reopened = 0  # channels opened again by the reporter itself
        self.position = position
        self.interval = interval
        self.timeout = timeout
        self.view = HeardFromLeader()
        self._lock = threading.Lock()
        self._conn: Conn | None = None
        self._decoder = feedback.Decoder(frozenset({feedback.STATE}))
        self._buf = bytearray(4096)
        self._dead: list[Conn] = []  # channels detached, closed by the reporter thread
        self._wake = threading.Event()

    @property
    def active(self) -> bool:
        """Is a feedback channel open?"""
        return self._conn is not None

    def hello(self, conn: Conn) -> int:
        """Send the probe on ``conn`` (a new connection to the leader). Returns
        the follower's id, and keeps ``conn``, if the leader accepts within
        ``timeout`` seconds; else 0 (``conn`` closed)."""
        self.detach()
        try:
            acc = self._await_accept(conn)
        except HctError as e:
            conn.close()
            log.info("the leader does not take feedback (%s); not reporting", e)
            return 0
        with self._lock:
            self._wanted = True
            self._take(conn, acc)
        log.info("reporting the position to the leader (follower id %d)", acc.follower_id)
        return int(acc.follower_id)

    def _take(self, conn: Conn, acc: feedback.Accept) -> None:
        """``conn`` is the channel from now on (the caller holds the lock)."""
        self._conn = conn
        self._decoder = feedback.Decoder(frozenset({feedback.STATE}))
        self.view = HeardFromLeader(
            acc.follower_id, acc.newest, None, time.monotonic(), acc.client
        )
        self._wake.set()

    def _await_accept(self, conn: Conn) -> feedback.Accept:
        """The leader's answer to the probe: ACCEPT, or an error saying why not
        (the original's ERROR, a close, garbage, or nothing in time)."""
        conn.send_all(wire.encode_sync(feedback.PROBE_CID, feedback.PROBE_HASH), self.timeout)
        deadline = time.monotonic() + self.timeout
        got = bytearray()
        buf = bytearray(512)  # not self._buf: the reporter thread may be using it
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimedOutError(f"no answer to the probe within {self.timeout:g} s")
            n = conn.recv_into(buf, left)
            if n == 0:
                raise PeerError("the leader closed the connection")
            got += buf[:n]
            if len(got) < 4:
                continue
            if got[:4] == _ERROR:  # the original's answer (decided once, from the start)
                err = wire.ReplyDecoder(wire.SYNC)
                err.feed(got)
                ev = err.next_events()
                if ev:
                    raise PeerError(f"it answered {ev[0]}")
                continue
            msgs = feedback.Decoder(frozenset({feedback.ACCEPT})).feed(got)
            if msgs:
                msg = msgs[0]
                assert isinstance(msg, feedback.Accept)
                return feedback.check_accept(msg)

    def detach(self, expected: Conn | None = None, *, session_over: bool = True) -> None:
        """Close the channel (the session with this leader ended, unless
        ``session_over`` is False: then the reporter opens it again); with
        ``expected``, only if that is still the channel."""
        with self._lock:
            conn = self._conn
            if expected is None or conn is expected:
                self._wanted = self._wanted and not session_over
            if conn is None or (expected is not None and conn is not expected):
                return
            self._conn = None
            self.view = HeardFromLeader()
        conn.abort()  # wakes the reporter thread if it waits on it; it closes it
        self._dead.append(conn)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        """Close the channel for good (the follower stopped)."""
        self.detach()
        self._close_dead()

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                self._wake.wait(self.interval)
                self._wake.clear()
                self._close_dead()
                if stop.is_set():
                    break
                with self._lock:
                    conn, dec = self._conn, self._decoder
                if conn is None:
                    self._reopen(stop)
                    continue
                try:
                    self._exchange(conn, dec)
                except HctError as e:
                    if self._conn is conn:
                        log.info("feedback channel to the leader closed (%s); opening it again", e)
                    self.detach(expected=conn, session_over=False)
        finally:
            self.detach()
            self._close_dead()

    def _reopen(self, stop: threading.Event) -> None:
        """The channel failed during a session: open it again, now and then."""
        if not self._wanted or self.reopen is None:
            return
        try:
            conn = self.reopen()
        except HctError as e:
            log.debug("feedback channel: cannot reconnect yet (%s)", e)
            stop.wait(self.retry)
            self._wake.set()
            return
        try:
            acc = self._await_accept(conn)
        except HctError as e:
            conn.close()
            log.debug("feedback channel: not accepted yet (%s)", e)
            stop.wait(self.retry)
            self._wake.set()
            return
        with self._lock:
            if not self._wanted or self._conn is not None:  # the session ended meanwhile
                self._dead.append(conn)
                return
            self._take(conn, acc)
            self.reopened += 1
        log.info("feedback channel to the leader open again (follower id %d)", acc.follower_id)

    def _close_dead(self) -> None:
        while self._dead:
            self._dead.pop().close()

    def _exchange(self, conn: Conn, dec: feedback.Decoder) -> None:
        applied, durable, received = self.position()
        conn.send_all(feedback.encode_report(applied, durable, received, self.name), self.timeout)
        try:
            n = conn.recv_into(self._buf, min(self.interval / 2, 0.05))
        except TimedOutError:
            return
        if n == 0:
            raise PeerError("the leader closed it")
        for m in dec.feed(memoryview(self._buf)[:n]):
            assert isinstance(m, feedback.State)
            with self._lock:
                if self._conn is conn:
                    lag = None if m.lag_us < 0 else m.lag_us / 1000
                    self.view = HeardFromLeader(
                        self.view.follower_id, m.newest, lag, time.monotonic(), self.view.client
                    )
