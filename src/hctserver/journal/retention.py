"""Journal retention: the leader truncates its journal in the background.

A policy (:class:`RetentionPolicy`) says how much journal to keep: at most
``cids`` entries, at most ``bytes`` of entry text, nothing older than
``seconds`` (each 0: no such limit). Those are soft limits: entries that a
connected follower, a SYNC reply in progress or a snapshot just sent still
needs (:class:`Pins`) are kept beyond them, until the journal passes
``max_bytes``, the hard cap, which is always kept (a follower left behind
then bootstraps from a snapshot, and the log says which).

:func:`plan` decides the cut without I/O; :class:`Retainer` is the thread
that measures, plans and truncates, in steps of a few thousand rows so
that writers wait for no long transaction.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import apsw

from ..errors import ConfigError, HctError
from .sqlutil import fetchall
from .store import Store
from .systables import ENTRY_BYTES

log = logging.getLogger("hctserver")

STEP_ROWS = 5_000  # rows deleted per write transaction
SNAPSHOT = "snapshot"  # how a pin for a snapshot sent is named (Pins.settle)


@dataclass(frozen=True)
class RetentionPolicy:
    cids: int = 1_000_000
    bytes: int = 256 << 20
    seconds: float = 0.0
    max_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        for name in ("cids", "bytes", "seconds", "max_bytes"):
            v = getattr(self, name)
            if not v >= 0 or v == float("inf"):
                raise ConfigError(f"retention {name} must be a finite number >= 0, not {v!r}")
        if self.max_bytes and self.bytes and self.max_bytes < self.bytes:
            raise ConfigError(
                f"the hard cap (retain-max-bytes {self.max_bytes}) is below the soft limit"
                f" (retain-bytes {self.bytes}); raise it or lower the other"
            )

    @property
    def active(self) -> bool:
        return bool(self.cids or self.bytes or self.seconds or self.max_bytes)


class Pins:
    """Cids whose following entries something still needs, by token: a
    SYNC reply in progress (moves as it sends), a snapshot just sent (for a
    while, until its follower has SYNCed from it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 1
        self._pins: dict[int, tuple[int, str, float]] = {}  # token -> (cid, who, expiry)

    def hold(self, cid: int, who: str) -> int:
        with self._lock:
            token = self._next
            self._next += 1
            self._pins[token] = (cid, who, float("inf"))
            return token

    def move(self, token: int, cid: int) -> None:
        with self._lock:
            if token in self._pins:
                _, who, until = self._pins[token]
                self._pins[token] = (cid, who, until)

    def release(self, token: int, grace: float = 0.0, now: float | None = None) -> None:
        """Let go of ``token``, ``grace`` seconds from now."""
        with self._lock:
            if token not in self._pins:
                return
            if grace <= 0:
                del self._pins[token]
            else:
                cid, who, _ = self._pins[token]
                t = time.monotonic() if now is None else now
                self._pins[token] = (cid, who, t + grace)

    def settle(self, cid: int) -> None:
        """A SYNC from ``cid`` arrived: a snapshot sent at ``cid`` has been
        installed, and that SYNC pins what it needs itself."""
        with self._lock:
            for token, (c, who, _) in self._pins.items():
                if c == cid and who.startswith(SNAPSHOT):
                    del self._pins[token]  # one follower's: others may still be installing
                    return

    def held(self, now: float | None = None) -> list[tuple[int, str]]:
        """(cid, who) of every pin still held."""
        t = time.monotonic() if now is None else now
        with self._lock:
            for token in [k for k, (_, _, until) in self._pins.items() if until <= t]:
                del self._pins[token]
            return [(cid, who) for cid, who, _ in self._pins.values()]


@dataclass(frozen=True)
class Cut:
    """Truncate below ``min_cid``; ``forced``: past what ``left_behind`` need."""

    min_cid: int
    forced: bool = False
    left_behind: tuple[tuple[int, str], ...] = ()


def plan(
    policy: RetentionPolicy,
    *,
    baseline: int,
    snapshot: int,
    total_bytes: int,
    cid_for_bytes: Callable[[int], int],
    aged_cid: int | None,
    needs: list[tuple[int, str]],
    floor: int | None = None,
) -> Cut | None:
    """Where to cut the journal now (None: nowhere). ``cid_for_bytes(n)``:
    the lowest cid c such that the entries below c hold at least n bytes;
    ``aged_cid``: the newest cid older than ``policy.seconds`` (None if
    unknown); ``needs``: (cid, who) whose following entries are needed;
    ``floor``: a cid whose following entries are kept even past the hard cap
    (the archive's end: what it has not stored is nowhere else)."""
    first = baseline + 1
    soft = first
    if policy.cids:
        soft = max(soft, snapshot - policy.cids + 1)
    if policy.seconds and aged_cid is not None:
        soft = max(soft, aged_cid + 1)
    if policy.bytes and total_bytes > policy.bytes:
        soft = max(soft, cid_for_bytes(total_bytes - policy.bytes))
    cut = soft
    # a need below the baseline cannot be met any more (that follower bootstraps)
    needs = [(cid, who) for cid, who in needs if cid >= baseline]
    if needs:
        cut = min(cut, min(cid for cid, _ in needs) + 1)
    forced = False
    if policy.max_bytes and total_bytes > policy.max_bytes:
        hard = cid_for_bytes(total_bytes - policy.max_bytes)
        if hard > cut:
            cut, forced = hard, True
    cut = min(cut, snapshot + 1)
    if floor is not None:
        cut = min(cut, floor + 1)
    if cut <= first:
        return None
    behind = tuple(sorted((c, w) for c, w in needs if c + 1 < cut)) if forced else ()
    return Cut(cut, forced, behind)


class Retainer:
    """The leader's retention thread (``hct-retention``)."""

    def __init__(
        self,
        db: Store,
        policy: RetentionPolicy,
        pins: Pins,
        needs: Callable[[], list[tuple[int, str]]],
        interval: float = 1.0,
        floor: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.db = db
        self.policy = policy
        self.pins = pins
        self.needs = needs  # connected followers' (applied cid, name)
        self.floor = floor  # what is kept even past the hard cap (the archive's end)
        self.interval = interval
        self.truncated = 0  # entries removed so far
        self.forced = 0  # cuts past what a connected follower needed
        self._marks: deque[tuple[float, int]] = deque()  # (when, newest cid), for ages
        self._failing = False
        self._conn: apsw.Connection | None = None

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.wait(self.interval):
                try:
                    self.pass_once(stop)
                except (apsw.Error, HctError) as e:  # busy, a full disk: try again next pass
                    if not self._failing:
                        log.warning("journal retention failed (%s); retrying", e)
                    self._failing = True
                    continue
                if self._failing:
                    log.warning("journal retention works again")
                    self._failing = False
        finally:
            self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _aged(self, now: float, newest: int) -> int | None:
        """The newest cid committed more than ``policy.seconds`` ago, as far
        as this process has seen (entries from before it started count as
        made when it started: kept a little longer, never less)."""
        marks = self._marks
        marks.append((now, newest))
        horizon = now - self.policy.seconds
        aged = None
        while marks and marks[0][0] <= horizon:
            aged = marks.popleft()[1]
        if aged is not None:
            marks.appendleft((horizon, aged))
        return aged

    def pass_once(self, stop: threading.Event | None = None) -> int:
        """Measure, plan and truncate once; returns the entries removed."""
        if not self.policy.active:
            return 0
        st = self.db.status()
        now = time.monotonic()
        baseline, snap = st["baseline_cid"], st["snapshot"]
        aged = self._aged(now, snap) if self.policy.seconds else None
        needs = [*self.needs(), *self.pins.held(now)]
        cut = plan(
            self.policy,
            baseline=baseline,
            snapshot=snap,
            total_bytes=st["journal_bytes"],
            cid_for_bytes=lambda n: self._cid_for_bytes(baseline, n),
            aged_cid=aged,
            needs=needs,
            floor=self.floor(),
        )
        if cut is None:
            return 0
        if cut.forced:
            self.forced += 1
            who = ", ".join(f"{w} (at cid {c})" for c, w in cut.left_behind) or "none"
            log.warning(
                "the journal passed the hard cap (retain-max-bytes %d): truncating to cid %d,"
                " past what %s still needed; a follower left behind bootstraps from a snapshot",
                self.policy.max_bytes,
                cut.min_cid - 1,
                who,
            )
        removed = 0
        lo = baseline + 1
        while lo < cut.min_cid and not (stop is not None and stop.is_set()):
            if self.db.checkpoint_wanted:
                break  # the checkpointer waits for the writer lock: the next pass goes on
            step = min(cut.min_cid, lo + STEP_ROWS)
            if not cut.forced:  # a reply may have started since the plan: its pin holds
                held = [cid for cid, _ in self.pins.held() if cid >= lo - 1]
                step = min([step, *(cid + 1 for cid in held)])
                if step <= lo:
                    break
            with self.db.share:  # as a writer: in line with this process's commits
                removed += self.db.truncate(step)
            lo = step
        self.truncated += removed
        log.debug("retention: truncated %d entries (baseline now cid %d)", removed, lo - 1)
        return removed

    def _cid_for_bytes(self, baseline: int, need: int) -> int:
        """The lowest cid c with at least ``need`` bytes of entries below it."""
        if self._conn is None:
            self._conn = self.db.open_connection()
        total, after = 0, baseline
        while True:
            rows = fetchall(
                self._conn,
                f"SELECT cid, {ENTRY_BYTES} FROM hct_journal WHERE cid>? ORDER BY cid LIMIT ?",
                (after, STEP_ROWS),
            )
            if not rows:
                return after + 1
            for cid, n in rows:
                total += n
                if total >= need:
                    return int(cid) + 1
            after = rows[-1][0]
