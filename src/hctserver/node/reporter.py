"""The follower's end of the feedback channel (:mod:`hctserver.protocol.feedback`).

At the start of each session with a leader the follower's driver calls
:meth:`Reporter.hello` on a connection of its own: a leader with the
extension answers ACCEPT and the connection stays open; any other answer
(the original's ``incompatible database version``, a close, silence)
means no feedback until the next session, and nothing else is sent. The
reporter's thread then sends a REPORT every ``interval`` seconds, and at
once whenever the position moves (:meth:`Reporter.wake`), and reads the
leader's STATE replies: its newest cid, this follower's lag as the leader
sees it, and whether the leader's commits wait for acknowledgements
(``WAITS``: :attr:`HeardFromLeader.waits`, which makes the follower apply
what arrives at once). The channel is full duplex: one poller waits for
both a wake-up and the leader's bytes, so that a REPORT never waits for
the answer to the previous one.

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
from ..net.transport import Conn, Poller
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
    waits: bool = False  # the leader's commits wait for acknowledgements (STATE's WAITS)


class Reporter:
    """See the module's docstring. ``position()`` returns (applied, durable,
    received) cids. ``on_waits(flag)`` is told when the leader starts or
    stops waiting for acknowledgements (and False when the channel closes)."""

    def __init__(
        self,
        name: str,
        position: Callable[[], tuple[int, int, int]],
        interval: float = 0.2,
        timeout: float = 5.0,
        reopen: Callable[[], Conn] | None = None,
        retry: float = 0.2,
        on_waits: Callable[[bool], None] | None = None,
    ) -> None:
        self.name = name
        self.reopen = reopen
        self.retry = retry
        self.on_waits = on_waits
        self._wanted = False  # a session with a leader that takes feedback is on
        self.reopened = 0  # channels opened again by the reporter itself
        self.reports = 0  # REPORTs sent
        self.position = position
        self.interval = interval
        self.timeout = timeout
        self.view = HeardFromLeader()
        self._lock = threading.Lock()
        self._conn: Conn | None = None
        self._decoder = feedback.Decoder(frozenset({feedback.STATE}))
        self._buf = bytearray(4096)
        self._dead: list[Conn] = []  # channels detached, closed by the reporter thread
        self._poller: Poller | None = Poller()  # the reporter thread's; None once closed
        self._woken = False  # a wake-up is pending (saves a write to the waker per wake)

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
        self.view = HeardFromLeader(acc.follower_id, acc.newest, None, time.monotonic(), acc.client)
        self._wake_locked()

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
            waited = self.view.waits
            self.view = HeardFromLeader()
            self._dead.append(conn)
            self._wake_locked()
        conn.abort()  # wakes the reporter thread if it waits on it; it closes it
        if waited:
            self._tell_waits(False)

    def wake(self) -> None:
        """Report now (the position moved); cheap when a wake-up is pending."""
        if not self._woken:
            with self._lock:
                self._wake_locked()

    def _wake_locked(self) -> None:
        self._woken = True
        if self._poller is not None:
            self._poller.wake()

    def close(self) -> None:
        """Close the channel for good (the follower stopped)."""
        self.detach()
        self._close_dead()
        with self._lock:
            poller, self._poller = self._poller, None
        if poller is not None:
            poller.close()

    def _tell_waits(self, flag: bool) -> None:
        cb = self.on_waits
        if cb is not None:
            cb(flag)

    def run(self, stop: threading.Event) -> None:
        poller = self._poller
        if poller is None:
            return
        current: Conn | None = None
        try:
            while not stop.is_set():
                with self._lock:
                    conn, dec = self._conn, self._decoder
                if conn is not current:
                    if current is not None:
                        poller.remove(current)
                    current = None
                    if conn is not None and not conn.closed:
                        poller.add(conn, None)
                        current = conn
                self._close_dead()
                if conn is None:
                    if self._wanted and self.reopen is not None:
                        self._woken = False
                        self._reopen(stop)
                    else:
                        self._woken = False
                        poller.poll(self.interval)
                    continue
                try:
                    self._serve(conn, dec, poller, stop)
                except HctError as e:
                    if self._conn is conn:
                        log.info("feedback channel to the leader closed (%s); opening it again", e)
                    self.detach(expected=conn, session_over=False)
        finally:
            if current is not None:
                poller.remove(current)
            self.detach()
            self._close_dead()
            self.close()

    def _serve(
        self, conn: Conn, dec: feedback.Decoder, poller: Poller, stop: threading.Event
    ) -> None:
        """Report and read on ``conn`` until it changes, fails (raises
        HctError) or ``stop`` is set."""
        out = bytearray()
        out_since = 0.0  # when the bytes in ``out`` began to wait
        last: tuple[int, int, int] | None = None
        due = 0.0  # the next periodic report
        want = True  # the position may have moved since the last report
        while self._conn is conn and not stop.is_set():
            now = time.monotonic()
            if self._woken:
                self._woken = False  # before reading the position: a later move wakes again
                want = True
            if (want or now >= due) and not out:
                want = False
                pos = self.position()
                if pos != last or now >= due:
                    out += feedback.encode_report(*pos, self.name)
                    out_since = now
                    last = pos
                    due = now + self.interval
                    self.reports += 1
            if out:
                sent = conn.try_send(bytes(out))
                del out[:sent]
                if out and now - out_since > self.timeout:
                    raise TimedOutError(f"the leader took no report for {self.timeout:g} s")
                poller.watch(conn, write=bool(out))
            wait = max(0.0, due - time.monotonic())
            if out:
                wait = min(wait, self.timeout)
            for _, _, readable, _ in poller.poll(0.0 if self._woken else wait):
                if readable:
                    self._read(conn, dec)
            if self._dead:
                return

    def _read(self, conn: Conn, dec: feedback.Decoder) -> None:
        """The leader's STATE replies waiting on ``conn``."""
        for _ in range(4):  # at most 16 KiB at a time (one STATE per REPORT)
            n = conn.try_recv_into(self._buf)
            if n is None:
                return
            if n == 0:
                raise PeerError("the leader closed it")
            for m in dec.feed(memoryview(self._buf)[:n]):
                assert isinstance(m, feedback.State)
                waits = bool(m.flags & feedback.WAITS)
                with self._lock:
                    if self._conn is not conn:
                        return
                    lag = None if m.lag_us < 0 else m.lag_us / 1000
                    changed = waits != self.view.waits
                    v = self.view
                    self.view = HeardFromLeader(
                        v.follower_id, m.newest, lag, time.monotonic(), v.client, waits
                    )
                if changed:
                    self._tell_waits(waits)

    def _reopen(self, stop: threading.Event) -> None:
        """The channel failed during a session: open it again, now and then."""
        try:
            conn = self.reopen() if self.reopen is not None else None
        except HctError as e:
            log.debug("feedback channel: cannot reconnect yet (%s)", e)
            stop.wait(self.retry)
            return
        if conn is None:
            return
        try:
            acc = self._await_accept(conn)
        except HctError as e:
            conn.close()
            log.debug("feedback channel: not accepted yet (%s)", e)
            stop.wait(self.retry)
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
