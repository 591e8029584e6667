"""The continuous archive (docs/ARCHIVE.md): the journal shipped, as
compressed segments, to an object store, with snapshots now and then, so
that any cid (or any time) it covers can be restored.

:class:`Archiver` only reads the database (its own read connection, one
short read at a time), so it never holds up a commit. It finds where the
archive ends by listing it, checks that the end is a position of this
database's history, and ships the entries after it. Each segment is one
atomic ``put`` whose name says its cid range, so a crash at any moment
leaves the archive at the end of a segment: the next archiver goes on from
there, with no gap and no duplicate.

The reading side (restore, ls, verify, prune) lives in
:mod:`hctserver.journal.archive_restore` and is exported here too.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import apsw

from ..errors import HctError
from ..position import ZERO_HASH, Entry, entry_hash, fold
from . import snapshot
from .archive_catalog import GENESIS, Catalog
from .archive_format import (
    ArchiveError,
    ArchiveGapError,
    ArchiveMismatchError,
    ObjectMissingError,
    SnapshotRef,
    TimedEntry,
    encode_segment,
    encode_snapshot,
    segment_name,
    segment_prefix,
    snapshot_head,
    snapshot_name,
)
from .archive_restore import (
    Listing,
    Pruned,
    Restored,
    Verified,
    ls,
    parse_time,
    prune,
    restore,
    show_time,
    verify,
)
from .archive_store import DirStore, ObjectStore, open_store, register_scheme
from .store import JournalReader, Store

__all__ = [
    "ArchiveError",
    "ArchiveGapError",
    "ArchiveMismatchError",
    "ArchiveStatus",
    "Archiver",
    "DirStore",
    "Listing",
    "ObjectMissingError",
    "ObjectStore",
    "Pruned",
    "Restored",
    "Verified",
    "ls",
    "open_store",
    "parse_time",
    "prune",
    "register_scheme",
    "restore",
    "show_time",
    "verify",
]

log = logging.getLogger("hctserver")

CHUNK_ROWS = 1000  # journal rows per read: each read is one short read transaction
RECHECK = 10.0  # seconds between checks that no other archiver writes here
MAX_BACKOFF = 30.0
_TOP = (1 << 63) - 1
Clock = Callable[[], int]


def wall_us() -> int:
    return time.time_ns() // 1000


class CommitTimes:
    """When this process saw cids committed (a snapshot listener: a leader's
    commits, a follower's applied batches), wall clock in µs; the newest
    ``keep`` samples. A sample (c, t) means every cid up to c was committed
    by t."""

    def __init__(self, clock: Clock, keep: int = 100_000) -> None:
        self._clock = clock
        self._samples: deque[tuple[int, int]] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def note(self, cid: int) -> None:
        t = self._clock()
        with self._lock:
            if not self._samples or cid > self._samples[-1][0]:
                self._samples.append((cid, t))

    def time_of(self, cid: int) -> int | None:
        """When ``cid`` was committed, if seen; forgets the samples before it
        (cids are asked for in ascending order)."""
        with self._lock:
            s = self._samples
            while s and s[0][0] < cid:
                s.popleft()
            return s[0][1] if s else None


@dataclass(frozen=True)
class _End:
    """Where the stored archive ends: (cid, H), the commit time there, the object."""

    cid: int
    hash: bytes
    time_us: int
    obj: str


@dataclass
class _Open:
    """The segment being filled: entries read but not yet stored."""

    next: int  # the cid expected next
    hash: bytes  # H after the last entry read
    time_us: int  # commit time of the last entry read (times never go back)
    entries: list[TimedEntry] = field(default_factory=list)
    nbytes: int = 0
    opened: float = 0.0  # monotonic time of its first entry

    def add(self, te: TimedEntry, now: float) -> None:
        if not self.entries:
            self.opened = now
        self.entries.append(te)
        self.nbytes += len(te.entry.data) + len(te.entry.schema) + 44
        self.next = te.entry.cid + 1
        self.hash = fold(self.hash, te.hash)
        self.time_us = te.time_us


@dataclass(frozen=True)
class ArchiveStatus:
    archived_cid: int | None  # None until the archive's end is known
    lag_cids: int
    lag_seconds: float
    buffered: int  # entries read, not yet stored
    segments: int  # stored by this archiver
    bytes: int
    snapshots: int


class Archiver:
    """Ships ``db``'s journal to ``store``. A segment is stored once it holds
    ``max_bytes`` of entries or its first entry is ``max_delay`` seconds old
    (so at most that much is lost with the leader); :meth:`run` ships every
    ``interval`` seconds. One archiver per archive."""

    def __init__(
        self,
        db: Store,
        store: ObjectStore,
        *,
        max_bytes: int = 16 << 20,
        max_delay: float = 1.0,
        interval: float = 0.2,
        clock: Clock = wall_us,
        monotonic: Callable[[], float] = time.monotonic,
        ceiling: Callable[[], int] | None = None,
    ) -> None:
        self.db = db
        # the newest cid it may ship (a synchronous leader's acknowledged cid:
        # then the archive never holds a commit a new leader might lack)
        self.ceiling = ceiling
        self.store = store
        self.max_bytes = max_bytes
        self.max_delay = max_delay
        self.interval = interval
        self._clock = clock
        self._monotonic = monotonic
        self._times = CommitTimes(clock)
        db.add_snapshot_listener(self._times.note)
        self._reader: JournalReader | None = None
        self._end: _End | None = None
        self._open: _Open | None = None
        self._shipped: list[TimedEntry] = []  # by the current call, for snapshot_now
        self._checked: float | None = None  # when _put last looked for another archiver
        self._lock = threading.RLock()  # one ship or snapshot at a time
        self.segments = self.bytes = self.snapshots = 0
        self.retired = False

    # --- shipping --------------------------------------------------------------

    def ship_once(self, *, flush: bool = False) -> int:
        """Read what the journal holds past the archive and store every
        segment that is full or old enough (every one, with ``flush``).
        Returns the number of entries stored."""
        with self._lock:
            self._shipped = []
            try:
                if self._open is None:
                    self._start()
                self._read()
                op = self._open
                assert op is not None
                age = self._monotonic() - op.opened
                if op.entries and (flush or age >= self.max_delay):
                    self._put()
            except BaseException:
                self._forget()  # the next call lists the archive again
                raise
            return len(self._shipped)

    def flush(self) -> int:
        """Store everything committed so far."""
        return self.ship_once(flush=True)

    def _forget(self) -> None:
        self._end = self._open = self._checked = None

    def _start(self) -> None:
        end = self._resolve()
        if end is None:  # an empty archive of a journal that does not start at 0
            self._snapshot(connected=False)
        else:
            self._begin(end)

    def _begin(self, end: _End) -> None:
        self._end = end
        self._open = _Open(end.cid + 1, end.hash, end.time_us)

    def _resolve(self) -> _End | None:
        """Where the archive ends, checked against this database's history;
        None for an empty archive that needs a snapshot first."""
        cat = Catalog.load(self.store)
        ends = []
        if cat.segments:
            ref = cat.segments[-1]
            seg = cat.fetch(ref)
            ends.append(_End(ref.last, seg.hash, seg.last_time_us, ref.name))
        if cat.snapshots and (not ends or cat.snapshots[-1].cid > ends[0].cid):
            s = cat.snapshots[-1]  # a snapshot past the segments: a re-anchored archive
            ends.append(_End(s.cid, s.hash, s.time_us, s.name))
        for end in ends:
            h = self.db.hash_at(end.cid)
            if h == end.hash:
                return end
            if h is not None:
                raise ArchiveMismatchError(
                    f"the archive's version hash at cid {end.cid} is not {self.db.path}'s:"
                    " it is another database's archive (or this history was replaced)",
                    end.obj,
                )
        if ends:
            raise self._unknowable(ends)
        bcid, bschemacid, bhash = self.db.baseline()
        if bhash == ZERO_HASH and bschemacid == 0:  # nothing was ever truncated
            return _End(bcid, ZERO_HASH, 0, GENESIS)
        return None

    def _unknowable(self, ends: list[_End]) -> ArchiveError:
        top = max(ends, key=lambda e: e.cid)
        pos = self.db.position()
        if top.cid > pos.cid:
            return ArchiveMismatchError(
                f"the archive ends at cid {top.cid}, past {self.db.path} (at cid {pos.cid}):"
                " another database's archive, or this database was restored to an older state",
                top.obj,
            )
        return ArchiveGapError(
            f"the archive ends at cid {ends[0].cid} but the journal of {self.db.path} now"
            f" starts after cid {self.db.baseline()[0]}: the entries between were truncated"
            " before they were shipped; take a snapshot to go on (Archiver.snapshot_now,"
            " `hctserver archive snapshot`)",
            ends[0].obj,
        )

    def _read(self) -> None:
        op = self._open
        assert op is not None
        if self._reader is None:
            self._reader = JournalReader(self.db)
        now_us, now = self._clock(), self._monotonic()
        while True:
            top = _TOP if self.ceiling is None else self.ceiling()
            rows = self._reader.raw_chunk(op.next - 1, top, CHUNK_ROWS) if top >= op.next else []
            for cid, schemacid, schema, data in rows:
                if cid != op.next:
                    if op.entries:
                        self._put()
                    raise self._unknowable([self._stored_end()])
                t = max(self._times.time_of(cid) or now_us, op.time_us)
                eh = entry_hash(cid, schema, data, schemacid)
                op.add(TimedEntry(Entry(cid, schemacid, schema.decode(), data), eh, t), now)
                if op.nbytes >= self.max_bytes:
                    self._put()
            if len(rows) < CHUNK_ROWS:
                return

    def _stored_end(self) -> _End:
        assert self._end is not None
        return self._end

    def retire(self) -> None:
        """Store nothing from now on (its node has stopped; a call still stuck
        on the store must not land a segment after the next leader's)."""
        self.retired = True

    def _put(self) -> None:
        if self.retired:
            raise ArchiveError(f"{self.store.url}: this archiver was retired", None)
        op, end = self._open, self._stored_end()
        assert op is not None and op.entries
        first, last = op.entries[0].entry.cid, op.entries[-1].entry.cid
        name = segment_name(first, last)
        self._check_alone(first, name)
        blob = encode_segment(op.entries, end.hash, op.hash)
        self.store.put(name, blob)
        self._end = _End(last, op.hash, op.time_us, name)
        self._shipped.extend(op.entries)
        self.segments += 1
        self.bytes += len(blob)
        op.entries, op.nbytes = [], 0

    def _check_alone(self, first: int, name: str) -> None:
        """Refuse to store an overlap: another archiver (a process that lived
        on) stored from ``first`` already. Checked at the first put after
        listing the archive, then every RECHECK seconds (a listing of a
        directory costs in proportion to the objects in it)."""
        now = self._monotonic()
        if self._checked is not None and now - self._checked < RECHECK:
            return
        there = self.store.list(segment_prefix(first))
        if there:
            raise ArchiveError(
                f"the archive already holds {there[0]} from cid {first}: another archiver"
                " writes to this archive (this one lists it again and goes on from its end)",
                name,
            )
        self._checked = now

    # --- snapshots -------------------------------------------------------------

    def snapshot_now(self) -> SnapshotRef:
        """Store a snapshot of the database now (after shipping everything
        before it). Where the journal no longer holds what the archive needs
        next (or the archive is empty), the snapshot is where the archive
        goes on from; an archive of another history is refused."""
        with self._lock:
            connected = True
            if self._open is None:
                try:
                    end = self._resolve()
                except ArchiveGapError as e:
                    log.warning("%s; a snapshot bridges the gap", e)
                    end = None
                if end is None:
                    connected = False
                else:
                    self._begin(end)
            if connected:
                try:
                    self.flush()
                except ArchiveGapError as e:  # truncated since the last ship
                    log.warning("%s; a snapshot bridges the gap", e)
                    connected = False
            return self._snapshot(connected)

    def _snapshot(self, connected: bool) -> SnapshotRef:
        tmpdir = tempfile.mkdtemp(prefix=".hct-archive-", dir=os.path.dirname(self.db.path))
        try:
            path = os.path.join(tmpdir, "snapshot.db")
            info = snapshot.make(self.db, path)
            with open(path, "rb") as f:
                raw = f.read()
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        if connected:
            before = self._stored_end()
            self.flush()  # the archive now covers the snapshot's cid: it has a time there
            t = next((te.time_us for te in self._shipped if te.entry.cid == info.cid), None)
            t = before.time_us if t is None else t
        else:
            t = self._times.time_of(info.cid) or self._clock()
        head = snapshot_head(raw, info.cid, info.hash, info.schemacid, t)
        name = snapshot_name(info.cid, info.hash, t)
        self.store.put(name, encode_snapshot(raw, head))
        self.snapshots += 1
        if not connected:
            self._begin(_End(info.cid, info.hash, t, name))
        log.info("archived a snapshot at cid %d as %s", info.cid, name)
        return SnapshotRef(info.cid, info.hash, t, name)

    # --- status and the loop ---------------------------------------------------

    def status(self) -> ArchiveStatus:
        end, op = self._end, self._open
        snap = self.db.snapshot()
        entries = op.entries if op is not None else []  # replaced, never emptied in place
        oldest = entries[0].time_us if entries else None
        lag_s = 0.0 if oldest is None else max(0.0, (self._clock() - oldest) / 1e6)
        return ArchiveStatus(
            archived_cid=None if end is None else end.cid,
            lag_cids=0 if end is None else max(0, snap - end.cid),
            lag_seconds=lag_s,
            buffered=len(entries),
            segments=self.segments,
            bytes=self.bytes,
            snapshots=self.snapshots,
        )

    def run(self, stop: threading.Event) -> None:
        """Ship every ``interval`` seconds until ``stop``, then everything
        left. Failures are logged and retried with backoff (an archive that
        is down never stops the node)."""
        wait, failing = self.interval, False
        try:
            while not stop.wait(wait):
                try:
                    try:
                        self.ship_once()
                    except ArchiveGapError as e:  # the journal was cut: a snapshot bridges it
                        log.warning("archiving to %s: %s; storing a snapshot", self.store.url, e)
                        self.snapshot_now()
                except (HctError, apsw.Error, OSError) as e:
                    if not failing:
                        log.warning("archiving to %s failed (%s); retrying", self.store.url, e)
                    failing, wait = True, min(MAX_BACKOFF, wait * 2)
                    continue
                if failing:
                    log.warning("archiving to %s works again", self.store.url)
                failing, wait = False, self.interval
            try:
                if not failing:  # a store that is down now would only hold up the stop
                    self.flush()
            except (HctError, apsw.Error, OSError) as e:
                log.warning("archiving to %s: the last entries were not shipped (%s)",
                            self.store.url, e)  # fmt: skip
        finally:
            self.close()

    def close(self) -> None:
        self.db.remove_snapshot_listener(self._times.note)
        if self._reader is not None:
            self._reader.close()
            self._reader = None
