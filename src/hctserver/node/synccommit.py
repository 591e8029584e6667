"""Synchronous commit, the leader's side: how many followers acknowledged
what, published through the commit gate (:mod:`hctserver.journal.gate`).

Every writer of the leader's file, in the node's process or in any other,
waits in :meth:`hctserver.journal.gate.Gate.acknowledge` after its COMMIT until the
gate says that K followers have its cid. This object decides what the gate
says: followers acknowledge through the feedback channel
(:mod:`hctserver.protocol.feedback`, a REPORT carries the cids they have applied and
have on disk); on every report :meth:`SyncCommit.refresh` publishes the
newest cid K of them have at the chosen level.

When the oldest commit not yet acknowledged has waited ``timeout`` seconds
(:meth:`SyncCommit.tick`, from the leader's ``hct-gate`` thread), the
leader stops waiting (as PostgreSQL does when ``synchronous_standby_names``
cannot be satisfied and one gives up on it): the commits that were waiting
get CommitUnknownError, it logs a warning, says ``degraded`` in ``/status``
and ``/metrics``, and commits asynchronously until K followers have what
was committed when it gave up, then says so and waits again.
``timeout=None`` waits for as long as it takes.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from .followers import FollowerTable

log = logging.getLogger("hctserver")

LEVELS = ("durable", "applied")
TICK = 0.05  # seconds between checks of the oldest unacknowledged commit


class AckSink(Protocol):
    """Where the decisions go (the gate's publisher)."""

    def acked(self, cid: int) -> None: ...

    def acked_one(self, cid: int) -> None: ...

    def set_degraded(self, degraded: bool) -> None: ...


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
        self.acked_cid = 0  # the newest cid K followers acknowledged (as far as seen)
        self.acked_one = 0  # with K = 0: the newest cid one follower acknowledged
        self.sink: AckSink | None = None
        self._lock = threading.Lock()

    def attach(self, sink: AckSink | None, base: int = 0) -> None:
        """Publish to ``sink`` from now on (None: nowhere, the leader stopped);
        no commit up to ``base`` (before the leader started) waits."""
        with self._lock:
            self.sink = sink
            if sink is not None:  # detaching keeps it: the archive ships up to it at the end
                self.acked_cid = base
                self.acked_one = base
            self.degraded = False
        self.refresh()

    def refresh(self) -> None:
        """A report arrived or a follower left: publish what K followers have
        (with K = 0: what one follower has, for transactions that ask for
        replicated durability on their own)."""
        if self.k <= 0:
            one = self.followers.kth_acked(1, self.durable)
            with self._lock:
                sink = self.sink
                if sink is None or one <= self.acked_one:
                    return
                self.acked_one = one
                sink.acked_one(one)
            return
        acked = self.followers.kth_acked(self.k, self.durable)
        with self._lock:
            sink = self.sink
            if acked <= self.acked_cid or sink is None:
                return
            self.acked_cid = acked
            sink.acked(acked)
            recovered = self.degraded and acked >= self._degraded_at
            if recovered:
                self.degraded = False
                sink.set_degraded(False)
        if recovered:
            log.warning(
                "synchronous commit: %d followers have caught up (cid %d); waiting for them again",
                self.k,
                acked,
            )

    def tick(self, now: float | None = None) -> None:
        """Give up waiting once the oldest commit K followers lack has waited
        ``timeout`` seconds."""
        if self.k <= 0 or self.timeout is None or self.degraded:
            return
        clock = self.followers.clock
        waited = clock.lag(self.acked_cid, now)
        if waited < self.timeout:
            return
        cid = clock.newest
        with self._lock:
            sink = self.sink
            if self.degraded or sink is None:
                return
            self.degraded = True
            self._degraded_at = cid
            self.degradations += 1
            sink.set_degraded(True)
        n = self.followers.acked(self.acked_cid + 1, self.durable)
        log.warning(
            "synchronous commit: %d of %d followers acknowledged cid %d within %g s;"
            " committing asynchronously until %d of them have cid %d",
            n,
            self.k,
            self.acked_cid + 1,
            self.timeout,
            self.k,
            cid,
        )

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "followers": self.k,
                "level": self.level,
                "timeout_s": self.timeout,
                "state": "off" if self.k <= 0 else ("degraded" if self.degraded else "sync"),
                "acked_cid": self.acked_cid,
                "degradations": self.degradations,
            }
