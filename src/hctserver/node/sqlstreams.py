"""The SQL endpoint's streams: who holds which baton, and for how long.

A stream is a client's session: a connection to the node's database (and,
on a follower, the leader's stream of a transaction forwarded there). Its
baton is good for one pipeline: each answer carries a new one. The table
is bounded (``max_streams``; idle streams outside a transaction go first
when it is full), a stream idle for ``idle`` seconds ends, and one idle
inside a transaction, which may hold the database's write lock, ends after
``tx_idle`` (PostgreSQL's idle_in_transaction_session_timeout). The reaper
(:meth:`StreamTable.run`) ends them without waiting for another request,
and interrupts a pipeline running past ``max_run`` seconds.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import apsw

from ..client.exceptions import Error as DbError
from ..client.local import LocalBackend
from ..client.remote import Stream
from ..errors import HctError
from ..journal.database import Database

log = logging.getLogger("hctserver")

MAX_STREAMS = 64
IDLE = 30.0  # seconds a stream may wait for its next pipeline
TX_IDLE = 10.0  # seconds a stream may wait inside a transaction (it may hold the write lock)
MAX_RUN = 60.0  # seconds one pipeline's SQL may run before it is interrupted
USED_BATONS = 4096  # batons remembered after use: a resent one is told apart from an expired one
_REAP_EVERY = 0.5  # seconds


class Refused(Exception):
    """A pipeline refused as a whole: an HTTP status, a reason and a code."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(eq=False)
class ClientStream:
    baton: str
    local: LocalBackend
    used: float  # when its last pipeline ended (time.monotonic)
    remote: Stream | None = None  # a transaction forwarded to the leader, open
    started: float = 0.0  # when the pipeline running now began (0: none)
    tainted: bool = False  # its leader stream ran a PRAGMA or the like: never pooled

    @property
    def in_transaction(self) -> bool:
        return self.remote is not None or self.local.in_transaction


class StreamTable:
    """See the module's docstring; thread-safe."""

    def __init__(
        self,
        db: Database,
        max_streams: int = MAX_STREAMS,
        idle: float = IDLE,
        tx_idle: float = TX_IDLE,
        max_run: float = MAX_RUN,
        max_bytes: int | None = None,
    ) -> None:
        self.db = db
        self.max_bytes = max_bytes  # of one statement's rows
        self.max_streams = max_streams
        self.idle = idle
        self.tx_idle = tx_idle
        self.max_run = max_run
        self._lock = threading.Lock()
        self._idle: dict[str, ClientStream] = {}  # baton -> a stream between pipelines
        self._running: set[ClientStream] = set()
        self._used: OrderedDict[str, None] = OrderedDict()
        self._closed = False

    @property
    def running(self) -> int:
        """Pipelines running now."""
        with self._lock:
            return len(self._running)

    def take(self, baton: str | None) -> ClientStream:
        """The stream of ``baton`` (a new one for None), now running a pipeline."""
        pushed_out: ClientStream | None = None
        with self._lock:
            if self._closed:
                raise Refused(503, "the node is stopping", "HCT_STOPPING")
            s = None
            if baton is not None:
                s = self._idle.pop(baton, None)
                if s is None:
                    raise self._unknown(baton)
            elif len(self._idle) + len(self._running) >= self.max_streams:
                free = [x for x in self._idle.values() if not x.in_transaction]
                if not free:
                    raise Refused(503, f"all {self.max_streams} streams are in use", "HCT_BUSY")
                pushed_out = min(free, key=lambda x: x.used)
                del self._idle[pushed_out.baton]
            if baton is None:
                s = ClientStream("", LocalBackend.over(self.db, self.max_bytes), time.monotonic())
            assert s is not None
            self._forget(s.baton)
            s.baton = secrets.token_urlsafe(18)
            s.started = time.monotonic()
            self._running.add(s)
        if pushed_out is not None:
            close(pushed_out)
        return s

    def _unknown(self, baton: str) -> Refused:
        if baton in self._used:
            return Refused(
                400,
                "this baton was used already: the pipeline sent with it ran, and its answer"
                " was its outcome. If that answer was lost, the outcome is unknown (a COMMIT"
                " in it may have run): check, or send transactions with a txid",
                "BATON_USED",
            )
        return Refused(
            400,
            "unknown or expired baton: the stream ended (idle for more than"
            f" {self.idle:g} s, {self.tx_idle:g} s in a transaction, or closed) and an open"
            " transaction was rolled back: run it again",
            "STREAM_EXPIRED",
        )

    def _forget(self, baton: str) -> None:
        """``baton`` came with a pipeline: it is void now, and remembered as
        used (the caller holds the lock)."""
        if baton:
            self._used[baton] = None
            while len(self._used) > USED_BATONS:
                self._used.popitem(last=False)

    def done(self, s: ClientStream, keep: bool) -> None:
        """The pipeline ended: keep the stream for its next one, or end it
        (its open transaction, if any, rolled back)."""
        s.used = time.monotonic()
        with self._lock:
            self._running.discard(s)
            s.started = 0.0
            if keep and not self._closed:
                self._idle[s.baton] = s
                return
        close(s)

    def reap(self) -> None:
        """End the streams idle too long; interrupt pipelines running too long."""
        now = time.monotonic()
        with self._lock:
            stale = [
                x
                for x in self._idle.values()
                if now - x.used > (self.tx_idle if x.in_transaction else self.idle)
            ]
            for x in stale:
                del self._idle[x.baton]
            late = [x for x in self._running if x.started and now - x.started > self.max_run]
        for x in stale:
            close(x)
        for x in late:
            log.warning("a SQL client's pipeline ran for over %g s: interrupted", self.max_run)
            x.local.connection.interrupt()

    def run(self, stop: threading.Event) -> None:
        """The reaper thread: :meth:`reap` until ``stop``."""
        while not stop.wait(_REAP_EVERY):
            self.reap()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = list(self._idle.values()), {}
        for s in idle:
            close(s)


def close(s: ClientStream) -> None:
    """End a stream: its leader stream closed, its connection closed (which
    rolls back what it left open)."""
    remote, s.remote = s.remote, None
    if remote is not None:
        remote.close()
    try:
        s.local.close()
    except (HctError, DbError, apsw.Error) as e:
        log.debug("closing a client stream: %s", e)
