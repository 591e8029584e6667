"""Where a follower's received entries go: the sink owns the applier.

Group commit: while catching up, entries are applied once ``min_batch`` of
them (or ``queue_bytes`` bytes) have gathered, or at :meth:`Sink.flush`, so
that one transaction writes each page of the tables once for many
entries. ``pipelined=False`` (``syncthreads=1``) applies them in the thread
that received them; ``pipelined=True`` hands them to the apply thread
through a queue bounded in bytes, so that receiving overlaps with applying.
While streaming, the apply thread always applies: it waits
``commit_interval`` after the first entry of a group arrives, trading that
much lag for a low cost per entry. While the leader's commits wait for this
follower's acknowledgement (:meth:`Sink.hurry`, told by the reporter when
the leader's STATE says ``WAITS``), it applies what has arrived at once,
without that wait: entries that arrive while one transaction commits join
the next one (group commit without a timer), so that one sync of the WAL
acknowledges them all.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import apsw

from ..errors import DiskFullError
from ..journal.apply import Applier
from ..position import Entry, Position
from .followers import CommitClock

log = logging.getLogger("hctserver")

_FULL_RETRY_MAX = 5.0  # seconds between attempts while the disk is full
_WANT_POLL = 0.0005  # seconds between looks at the readers' wanted cid while gathering


@dataclass
class FollowerStats:
    """Counters for progress displays; read them from any thread."""

    phase: str = "starting"
    sync_entries: int = 0
    sync_bytes: int = 0
    sub_entries: int = 0
    snapshot: int = 0
    start_snapshot: int = 0
    resubscribes: int = 0
    reconnects: int = 0
    disk_full: bool = False
    received_cid: int = 0  # the newest cid received
    catchup_from: int = 0  # the snapshot when this session's catch-up began
    catchup_t0: float = 0.0  # and when (time.monotonic())
    catchup_seconds: float | None = None  # how long it took, once streaming


class Sink:
    """See the module's docstring. :meth:`work` is the apply thread's loop."""

    def __init__(
        self,
        applier: Applier,
        pipelined: bool,
        queue_bytes: int,
        stats: FollowerStats,
        min_batch: int = 40_000,
        wanted: Callable[[], int] | None = None,
    ) -> None:
        self.applier = applier
        self.arrivals = CommitClock()  # when each cid arrived: the local view of lag
        self.pipelined = pipelined
        self.limit = max(1, queue_bytes)
        self.stats = stats
        self.min_batch = min_batch
        self.wanted = wanted  # the newest cid a reader waits for: no batching delay then
        self.commit_interval = 0.0
        self.streaming = False
        self.eager = False  # the leader waits for acknowledgements: no batching delay
        self.applies = 0  # apply passes (for tests and the bench)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._items: list[tuple[list[Entry], list[Any] | None]] = []
        self._count = 0  # entries in _items
        self._bytes = 0
        self._flushing = False
        self._busy = False
        self._closed = False
        self._stopping = threading.Event()
        self.error: BaseException | None = None

    @property
    def position(self) -> Position:
        return self.applier.position

    @property
    def closed(self) -> bool:
        return self._closed

    def stream(self, commit_interval: float) -> None:
        """From now on apply in the apply thread, in groups over time."""
        self.flush()
        with self._cond:
            self.commit_interval = commit_interval
            self.streaming = True
            self._cond.notify_all()

    def hurry(self, eager: bool) -> None:
        """The leader's commits wait for acknowledgements (``eager``): apply
        what arrives as soon as it arrives; else batch over
        ``commit_interval`` again."""
        with self._cond:
            self.eager = eager
            self._cond.notify_all()

    def put(self, entries: list[Entry], nbytes: int, hashes: list[Any] | None = None) -> None:
        """Entries to apply; ``hashes`` as for :meth:`Applier.add_many`."""
        if not entries:
            return
        with self._cond:
            threaded = self._threaded()
            while threaded and self._bytes >= self.limit and self.error is None:
                if self._closed:
                    return
                self._cond.wait()
            self._raise()
            if self._closed:
                return
            self._items.append((entries, hashes))
            top = max(entries[0].cid, entries[-1].cid)  # stream batches are nearly in order
            if top > self.stats.received_cid:
                self.stats.received_cid = top
                self.arrivals.note(top)
            self._count += len(entries)
            self._bytes += nbytes
            if threaded:
                self._cond.notify_all()
            elif self._count >= self.min_batch or self._bytes >= self.limit:
                self._apply_held()  # in the receiving thread

    def _threaded(self) -> bool:
        return self.pipelined or self.streaming

    def _apply_held(self) -> None:
        chunks, self._items = self._items, []
        self._count = self._bytes = 0
        try:
            self._apply(chunks)
        except BaseException as e:
            if not self._closed:
                self.error = e
            raise

    def _apply(self, chunks: list[tuple[list[Entry], list[Any] | None]]) -> None:
        ap = self.applier
        for entries, hashes in chunks:
            ap.add_many(entries, hashes)
        delay = 0.1
        while True:
            try:
                self.stats.snapshot = ap.apply()
                self.applies += 1
            except DiskFullError as e:
                # keep the entries and try again: the disk may get space back
                if not self.stats.disk_full:
                    self.stats.disk_full = True
                    log.error("%s; retrying every %g s at most", e, _FULL_RETRY_MAX)
                if self._stopping.wait(delay):
                    raise
                delay = min(_FULL_RETRY_MAX, delay * 2)
                continue
            if self.stats.disk_full:
                self.stats.disk_full = False
                log.warning("the disk has space again: applying resumed at cid %d", ap.snapshot)
            return

    def _ready(self) -> bool:
        if not self._threaded():
            return False
        if self._flushing or self.streaming:
            return bool(self._items)
        return self._count >= self.min_batch or self._bytes >= self.limit // 2

    def work(self) -> None:
        """The apply thread: apply what is ready until :meth:`close`."""
        while True:
            with self._cond:
                while not self._closed and not self._ready():
                    self._cond.wait()
                if self._closed:
                    return
                self._busy = True
                delay = self.commit_interval if self.streaming and not self.eager else 0.0
            if delay > 0 and self._bytes < self.limit // 2:
                self._gather(delay)
            with self._cond:
                chunks, self._items = self._items, []
                self._count = self._bytes = 0
                self._cond.notify_all()
            try:
                self._apply(chunks)
            except BaseException as e:
                with self._cond:
                    if not self._closed:
                        self.error = e
                    self._busy = False
                    self._cond.notify_all()
                if self._closed:
                    return
                raise
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _gather(self, delay: float) -> None:
        """Let more of the stream join this transaction for ``delay`` seconds,
        unless a reader waits for a cid not applied yet (a forwarded write
        reading its own write): it is polled, as it may be in another process."""
        end = time.monotonic() + delay
        with self._cond:
            while not self._closed and not self.eager:
                if self.wanted is not None and self.wanted() > self.stats.snapshot:
                    return
                left = end - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(min(left, _WANT_POLL))

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def flush(self) -> None:
        """Apply everything put so far; raise the apply error if any."""
        if not self._threaded():
            with self._lock:
                self._raise()
                if self._items and not self._closed:
                    self._apply_held()
            return
        with self._cond:
            self._flushing = True
            self._cond.notify_all()
            try:
                while (self._items or self._busy) and self.error is None and not self._closed:
                    self._cond.wait()
            finally:
                self._flushing = False
            self._raise()

    def replace_applier(self, change: Callable[[], None], make: Callable[[], Applier]) -> None:
        """Run ``change`` (which replaces the database's contents) while the
        apply thread is idle, then apply with a new applier from ``make``.
        Call after :meth:`flush`, with nothing arriving."""
        with self._cond:
            self._cond.wait_for(lambda: not self._busy or self._closed)
            self._items, self._count, self._bytes = [], 0, 0
            old = self.applier
            old.close()
            try:
                change()
            finally:
                self.applier = make()
            self.arrivals = CommitClock()

    def close(self) -> None:
        """Stop: the apply thread ends, what it had not applied is dropped
        (the follower asks for it again), a batch being applied is rolled back."""
        self._closed = True  # before the lock: an inline apply may hold it
        self._stopping.set()
        with contextlib.suppress(apsw.Error):  # closed already: being replaced
            self.applier.interrupt()
        with self._cond:
            self._cond.notify_all()
