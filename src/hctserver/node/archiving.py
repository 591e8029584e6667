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

    def start(self, group: TaskGroup) -> None:
        group.spawn("hct-archive", self.archiver.run, self.jobs_done)
        if self.snapshot_every > 0:
            group.spawn("hct-archive-snap", self._schedule, group.stopping)

    def finish(self) -> None:
        """The jobs have stopped: ship what is left, then end."""
        self.jobs_done.set()

    def floor(self) -> int:
        """The newest cid the archive holds (-1 while unknown: keep everything)."""
        cid = self.archiver.status().archived_cid
        return -1 if cid is None else cid

    def status(self) -> dict[str, Any]:
        st = self.archiver.status()
        return {
            "url": self.archiver.store.url,
            "archived_cid": st.archived_cid,
            "lag_cids": st.lag_cids,
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
