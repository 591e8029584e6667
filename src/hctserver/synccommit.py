"""Synchronous commit: a commit returns once K followers acknowledged it.

The leader installs :meth:`SyncCommit.wait` as a commit wait of its
database (``Store.add_commit_wait``): it runs in the committing thread
after SQLite's COMMIT and the commit hooks (which queue the entry for the
followers), before the caller gets control back; for a group, once, with
its last cid, in the thread that led it, before its callers are woken.
Followers acknowledge through the feedback channel
(:mod:`hctserver.feedback`): a REPORT carries the cids they have applied
and have on disk, and they send one as soon as either moves.

When fewer than K followers acknowledge within ``timeout`` seconds, the
leader stops waiting (as PostgreSQL does when ``synchronous_standby_names``
cannot be satisfied and one gives up on it): it logs a warning, says
``degraded`` in ``/status`` and ``/metrics``, and commits asynchronously
until K followers have what was committed when it gave up, then says so
and waits again. ``timeout=None`` waits for as long as it takes.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .followers import FollowerTable

log = logging.getLogger("hctserver")

LEVELS = ("durable", "applied")
_SLICE = 0.5  # seconds between checks for a stopping leader while waiting


class SyncCommit:
    """The leader's side; thread-safe."""

    def __init__(
        self,
        followers: FollowerTable,
        k: int,
        *,
        level: str = "durable",
        timeout: float | None = None,
    ) -> None:
        if level not in LEVELS:
            raise ValueError(f"sync level must be one of {', '.join(LEVELS)}, not {level!r}")
        self.followers = followers
        self.k = k
        self.durable = level == "durable"
        self.level = level
        self.timeout = timeout
        self.degraded = False
        self._degraded_at = 0
        self.degradations = 0
        self.waits = 0
        self.waited_s = 0.0
        self.acked_cid = 0  # the newest cid K followers acknowledged (as far as seen)
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def wait(self, cid: int) -> bool:
        """Wait until ``cid`` is acknowledged; False if it was not (degraded,
        timed out, or the leader is stopping)."""
        if self.k <= 0 or cid <= self.acked_cid:
            return True
        if self.degraded:  # until K followers have what was committed when it degraded
            if self.followers.acked(self._degraded_at, self.durable) < self.k:
                return False
            self._recovered(self._degraded_at)
        t0 = time.monotonic()
        deadline = None if self.timeout is None else t0 + self.timeout
        n = 0
        while not self._stopping.is_set():
            left = _SLICE if deadline is None else min(_SLICE, deadline - time.monotonic())
            n = self.followers.wait_acked(cid, self.k, self.durable, max(0.0, left))
            if n >= self.k:
                with self._lock:
                    self.waits += 1
                    self.waited_s += time.monotonic() - t0
                    self.acked_cid = max(self.acked_cid, cid)
                return True
            if deadline is not None and time.monotonic() >= deadline:
                self._degrade(cid, n)
                return False
        return False

    def _degrade(self, cid: int, n: int) -> None:
        with self._lock:
            if self.degraded:
                return
            self.degraded = True
            self._degraded_at = cid
            self.degradations += 1
        log.warning(
            "synchronous commit: %d of %d followers acknowledged cid %d within %g s;"
            " committing asynchronously until %d of them have it",
            n,
            self.k,
            cid,
            self.timeout,
            self.k,
        )

    def _recovered(self, cid: int) -> None:
        with self._lock:
            if not self.degraded:
                return
            self.degraded = False
            self.acked_cid = max(self.acked_cid, cid)
        log.warning(
            "synchronous commit: %d followers have caught up (cid %d); waiting for them again",
            self.k,
            cid,
        )

    def stop(self) -> None:
        """The leader is stopping: no commit waits any more."""
        self._stopping.set()
        self.followers.wake()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "followers": self.k,
                "level": self.level,
                "timeout_s": self.timeout,
                "state": "off" if self.k <= 0 else ("degraded" if self.degraded else "sync"),
                "acked_cid": self.acked_cid,
                "waits": self.waits,
                "wait_avg_ms": round(1000 * self.waited_s / self.waits, 2) if self.waits else None,
                "degradations": self.degradations,
            }
