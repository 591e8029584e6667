"""What a leader knows of its followers: their reports and their lag.

:class:`CommitClock` remembers when cids were committed (to the leader's
poll interval, a few milliseconds), so that a follower's reported position
becomes a lag in time, as PostgreSQL's ``replay_lag`` does.
:class:`FollowerTable` keeps each reporting follower's last report. Both
are plain data with a lock: no I/O.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..protocol.feedback import Report

STALE_REPORT = 1.0  # seconds after which a report no longer stands for now


class CommitClock:
    """(cid, when) samples, newest last, for the last ``keep`` seconds."""

    def __init__(self, keep: float = 120.0) -> None:
        self.keep = keep
        self._cids: list[int] = []
        self._times: list[float] = []
        self._lock = threading.Lock()

    def note(self, cid: int, now: float | None = None) -> None:
        """Every cid up to ``cid`` was committed by ``now``."""
        t = time.monotonic() if now is None else now
        with self._lock:
            if self._cids and cid <= self._cids[-1]:
                return
            self._cids.append(cid)
            self._times.append(t)
            if len(self._times) > 64 and self._times[len(self._times) // 2] < t - self.keep:
                half = len(self._times) // 2
                del self._cids[:half]
                del self._times[:half]

    @property
    def newest(self) -> int:
        with self._lock:
            return self._cids[-1] if self._cids else 0

    def lag(self, applied: int, now: float | None = None) -> float:
        """Seconds the oldest commit a follower at ``applied`` lacks has
        waited (0 if it lacks none the clock knows of; at least the clock's
        span if that commit is older than its oldest sample)."""
        t = time.monotonic() if now is None else now
        with self._lock:
            if not self._cids or applied >= self._cids[-1]:
                return 0.0
            i = bisect.bisect_left(self._cids, applied + 1)
            return max(0.0, t - self._times[i])


@dataclass
class FollowerInfo:
    """One follower with the feedback extension, as its leader sees it."""

    id: int
    address: str
    connected_at: float = field(default_factory=time.monotonic)
    name: str = ""
    applied: int = -1
    durable: int = -1
    received: int = -1
    reported_at: float | None = None
    lag_s: float | None = None  # at its last report
    lag_cids: int | None = None  # at its last report (the same moment as lag_s)
    drops: int = 0
    reports: int = 0


class FollowerTable:
    """Followers with a feedback channel, by id (see :mod:`hctserver.protocol.feedback`)."""

    def __init__(self, clock: CommitClock) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._next = 1
        self._rows: dict[int, FollowerInfo] = {}
        self.on_change: Callable[[], None] | None = None  # after a report, or one left

    def add(self, address: str) -> FollowerInfo:
        with self._lock:
            info = FollowerInfo(self._next, address)
            self._next += 1
            self._rows[info.id] = info
            return info

    def remove(self, fid: int) -> None:
        with self._lock:
            self._rows.pop(fid, None)
        self._changed()

    def _changed(self) -> None:
        cb = self.on_change
        if cb is not None:
            cb()

    def report(self, fid: int, r: Report, now: float | None = None) -> float:
        """Record a report; returns the follower's lag in seconds."""
        t = time.monotonic() if now is None else now
        lag = self.clock.lag(r.applied, t)
        behind = max(0, self.clock.newest - r.applied)
        with self._lock:
            info = self._rows.get(fid)
            if info is not None:
                info.name = r.name
                info.applied, info.durable, info.received = r.applied, r.durable, r.received
                info.reported_at, info.lag_s, info.lag_cids = t, lag, behind
                info.reports += 1
        self._changed()
        return lag

    def acked(self, cid: int, durable: bool = True) -> int:
        """How many connected followers reported ``cid`` applied (``durable``:
        and on disk)."""
        with self._lock:
            return self._acked(cid, durable)

    def _acked(self, cid: int, durable: bool) -> int:
        if durable:
            return sum(1 for f in self._rows.values() if f.durable >= cid)
        return sum(1 for f in self._rows.values() if f.applied >= cid)

    def kth_acked(self, k: int, durable: bool = True) -> int:
        """The newest cid that ``k`` connected followers have acknowledged
        (``durable``: on their disk, else applied); 0 if fewer are connected."""
        with self._lock:
            got = sorted(
                (f.durable if durable else f.applied for f in self._rows.values()), reverse=True
            )
        return max(0, got[k - 1]) if 0 < k <= len(got) else 0

    def dropped(self, fid: int) -> None:
        with self._lock:
            info = self._rows.get(fid)
            if info is not None:
                info.drops += 1

    def needs(self) -> list[tuple[int, str]]:
        """(applied cid, name) of every connected follower that has reported:
        the journal after those cids is what they will ask for."""
        with self._lock:
            return [(f.applied, f.name or f.address) for f in self._rows.values() if f.applied >= 0]

    def known(self, fid: int) -> bool:
        with self._lock:
            return fid in self._rows

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)

    def rows(self, newest: int, now: float | None = None) -> list[dict[str, Any]]:
        """Each follower's state. The lag is the one computed at its last
        report (cids and time of one moment); for a follower whose last
        report is older than :data:`STALE_REPORT` it grows with time, as its
        silence does, against ``newest``."""
        t = time.monotonic() if now is None else now
        with self._lock:
            infos = list(self._rows.values())
        out = []
        for f in infos:
            lag, behind = f.lag_s, f.lag_cids
            if f.reported_at is not None and t - f.reported_at > STALE_REPORT:
                lag, behind = self.clock.lag(f.applied, t), max(0, newest - f.applied)
            out.append(
                {
                    "id": f.id,
                    "address": f.address,
                    "name": f.name,
                    "connected_s": round(t - f.connected_at, 3),
                    "applied_cid": f.applied,
                    "durable_cid": f.durable,
                    "received_cid": f.received,
                    "lag_cids": behind,
                    "lag_ms": None if lag is None else round(lag * 1000, 1),
                    "report_age_ms": (
                        None if f.reported_at is None else round((t - f.reported_at) * 1000, 1)
                    ),
                    "drops": f.drops,
                }
            )
        return out
