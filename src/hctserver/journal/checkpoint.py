"""WAL checkpoints off the commit and apply paths.

While a :class:`Checkpointer` runs, connections the store opens leave
checkpoints to it (``wal_autocheckpoint=0``). Most of the copying overlaps
with the writers; the last frames are copied holding the writer lock, so
that the WAL can start over (a checkpoint racing with appends never
completes), waiting up to 200 ms for readers of the WAL to move on. A
failing checkpoint (a full disk, a busy reader) is logged once per kind of
error and retried with backoff; it never stops the loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import apsw

from .sqlutil import fetchone
from .store import Store

log = logging.getLogger("hctserver")

_READER_WAIT_MS = 200


class Checkpointer:
    """Checkpoints ``db``'s WAL every ``interval`` seconds; takes the writer
    lock for a full pass once ``frames`` frames have gathered."""

    def __init__(
        self,
        db: Store,
        interval: float = 0.1,
        frames: int = 16000,
        position: Callable[[], int] | None = None,
        on_durable: Callable[[], None] | None = None,
    ) -> None:
        self.db = db
        self.on_durable = on_durable  # told when ``durable`` moves (a follower reports it)
        self.interval = interval
        self.frames = frames
        self.failures = 0
        # A checkpoint syncs the WAL first: every commit made before it started
        # is then on disk. ``durable`` is the snapshot (from ``position``) then.
        self.position = position
        self.durable = -1
        self._seen: set[str] = set()

    def take_over(self) -> None:
        """From now on the store's new connections leave checkpoints to this
        checkpointer: call it before opening them, then start :meth:`run`."""
        self.db.background_checkpoints = True

    def run(self, stop: threading.Event) -> None:
        """Checkpoint until ``stop`` is set. Call :meth:`final` once the writers
        have stopped."""
        db = self.db
        db.background_checkpoints = True
        conn = db.open_connection()
        conn.set_busy_timeout(_READER_WAIT_MS)  # how long RESTART waits for readers
        delay = self.interval
        try:
            while not stop.wait(delay):
                try:
                    before = self.position() if self.position is not None else -1
                    if self._pass(conn) and before != self.durable:
                        self.durable = before
                        if self.on_durable is not None:
                            self.on_durable()
                    if delay > self.interval:
                        log.warning("WAL checkpoints of %s work again", db.path)
                    delay = self.interval
                except apsw.Error as e:
                    self.failures += 1
                    delay = min(5.0, max(self.interval, delay * 2))
                    kind = type(e).__name__
                    if kind not in self._seen:
                        self._seen.add(kind)
                        log.warning(
                            "WAL checkpoint of %s failed (%s); retrying every %.1f s at most",
                            db.path,
                            e,
                            5.0,
                        )
        finally:
            db.background_checkpoints = False
            conn.close()

    def _pass(self, conn: apsw.Connection) -> bool:
        """One pass; True if it copied the whole WAL (which it synced first):
        every commit made before the pass is then on disk."""
        _, in_wal, copied = fetchone(conn, "PRAGMA wal_checkpoint(PASSIVE)")
        if in_wal < self.frames:
            return bool(copied == in_wal)
        lock = self.db.share
        self.db.checkpoint_wanted = True  # writers let us have the lock
        try:
            if lock.acquire(timeout=1.0):
                try:
                    # RESTART waits (briefly: readers are short) until no reader
                    # uses the WAL, so that the next commit starts it over and
                    # journal_size_limit cuts the file back
                    busy, _, _ = fetchone(conn, "PRAGMA wal_checkpoint(RESTART)")
                    if busy:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    return not busy
                finally:
                    lock.release()
        finally:
            self.db.checkpoint_wanted = False
        return False

    def final(self) -> bool:
        """Copy the whole WAL into the database and empty it (TRUNCATE), or as
        much as readers allow. Returns True when the WAL was emptied."""
        try:
            conn = self.db.open_connection()
            conn.set_busy_timeout(0)  # a reader in the way: do what can be done, now
        except Exception as e:
            log.warning("final WAL checkpoint of %s failed: %s", self.db.path, e)
            return False
        try:
            busy, _, _ = fetchone(conn, "PRAGMA wal_checkpoint(TRUNCATE)")
            if busy:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            return not busy
        except apsw.Error as e:
            log.warning("final WAL checkpoint of %s failed: %s", self.db.path, e)
            return False
        finally:
            conn.close()
