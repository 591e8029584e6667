"""The leader's side of the continuous archive (docs/ARCHIVE.md).

Two threads of the leader's task group: ``hct-archive`` ships the journal
(:meth:`Archiver.run`) and, once the jobs have stopped, ships what is left;
``hct-archive-snap`` stores a snapshot every ``snapshot_every`` seconds and
prunes what the archive no longer needs to keep. The journal keeps every
entry the archive has not stored (:meth:`floor`, the retention floor).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import apsw

from ..errors import HctError
from ..journal.archive import Archiver, open_store, prune
from ..journal.store import Store
from ..net.tasks import TaskGroup

log = logging.getLogger("hctserver")


class ArchiveTask:
    def __init__(
        self,
        db: Store,
        url: str,
        *,
        max_delay: float = 1.0,
        snapshot_every: float = 3600.0,
        keep: float = 0.0,
        ceiling: Callable[[], int] | None = None,
    ) -> None:
        self.url = url
        self.archiver = Archiver(db, open_store(url), max_delay=max_delay, ceiling=ceiling)
        self.snapshot_every = snapshot_every
        self.keep = keep
        self.jobs_done = threading.Event()  # then the last entries are shipped
        self._high = -1  # the newest cid the archive was seen to hold: it never moves back

    def start(self, group: TaskGroup) -> None:
        group.spawn("hct-archive", self.archiver.run, self.jobs_done)
        if self.snapshot_every > 0:
            group.spawn("hct-archive-snap", self._schedule, group.stopping)

    def finish(self) -> None:
        """The jobs have stopped: ship what is left, then end."""
        self.jobs_done.set()

    def floor(self) -> int:
        """The newest cid the archive is known to hold (-1 before it is known:
        keep everything). It holds while the store is down: what the archive
        has not stored stays in the journal."""
        cid = self.archiver.status().archived_cid
        if cid is not None and cid > self._high:
            self._high = cid
        return self._high

    def status(self) -> dict[str, Any]:
        st = self.archiver.status()
        high = self.floor()
        return {
            "url": self.archiver.store.url,
            "archived_cid": None if high < 0 else high,
            "lag_cids": max(0, self.archiver.db.snapshot() - high) if high >= 0 else None,
            "lag_s": round(st.lag_seconds, 3),
            "segments": st.segments,
            "bytes": st.bytes,
            "snapshots": st.snapshots,
        }

    def _schedule(self, stop: threading.Event) -> None:
        failing = False
        while not stop.wait(self.snapshot_every):
            try:
                ref = self.archiver.snapshot_now()
                log.info("archive %s: snapshot at cid %d", self.url, ref.cid)
                if self.keep > 0:
                    gone = prune(self.archiver.store, self.keep).deleted
                    if gone:
                        log.info("archive %s: pruned %d objects", self.url, len(gone))
                failing = False
            except (HctError, apsw.Error, OSError) as e:
                if not failing:
                    log.warning("archive %s: snapshot or prune failed (%s); next in %g s",
                                self.url, e, self.snapshot_every)  # fmt: skip
                failing = True
