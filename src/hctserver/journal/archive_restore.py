"""Point-in-time restore from an archive, and the archive's listing,
verification and retention (docs/ARCHIVE.md).

:func:`restore` reads and checks everything it needs before it writes
anything: the nearest snapshot at or below the target and every segment
after it, each entry's hash and each link of the chain. It then builds
the database in a temporary folder beside ``out`` and renames it into
place, so ``out`` is a whole database at exactly the target or absent.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone

import apsw

from ..errors import ConfigError, HctError, ProtocolError
from ..position import fold
from . import guard, snapshot
from .archive_catalog import (
    Anchor,
    CachedFetch,
    Catalog,
    Reached,
    follow,
    snapshot_anchor,
)
from .archive_format import (
    ArchiveError,
    ObjectMissingError,
    SnapshotRef,
    decode_snapshot,
    segment_name,
)
from .archive_store import ObjectStore, open_store
from .database import Database

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _store(source: str | ObjectStore) -> ObjectStore:
    return open_store(source) if isinstance(source, str) else source


def to_us(t: float | datetime) -> int:
    """Unix microseconds of ``t`` (seconds since the epoch, or a datetime;
    a naive one is local time)."""
    if isinstance(t, datetime):
        aware = t if t.tzinfo is not None else t.astimezone()
        return (aware - _EPOCH) // _US
    return round(t * 1_000_000)


_US = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=timezone.utc) - _EPOCH


def parse_time(text: str) -> datetime:
    """A time as the command line takes it: ISO 8601 (``2024-05-01T12:00:00Z``,
    local time without a zone) or ``@`` and Unix seconds (``@1714564800.5``)."""
    try:
        if text.startswith("@"):
            return datetime.fromtimestamp(float(text[1:]), tz=timezone.utc)
        return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except (ValueError, OverflowError):
        raise ConfigError(
            f"{text!r} is not a time: write ISO 8601 (2024-05-01T12:00:00Z) or @UNIX-SECONDS"
        ) from None


def show_time(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc).isoformat(timespec="microseconds")


# --- restore ---------------------------------------------------------------------


@dataclass(frozen=True)
class Restored:
    """What :func:`restore` wrote: the database's position and where it started."""

    path: str
    cid: int
    hash: bytes
    time_us: int
    anchor: str
    entries: int


@dataclass
class _Plan:
    anchor: Anchor
    target: int
    hash: bytes
    time_us: int
    fetch: CachedFetch


def restore(
    source: str | ObjectStore,
    out: str,
    *,
    cid: int | None = None,
    time: float | datetime | None = None,
) -> Restored:
    """Write to ``out`` (a new file) the replication database at ``cid``, at
    the last cid committed at or before ``time``, or (neither given) at the
    newest cid the archive holds. ArchiveError, naming the object, if
    anything needed is missing, damaged, out of place or of another history;
    ``out`` is then not written."""
    if cid is not None and time is not None:
        raise ConfigError("restore to a cid or to a time, not both")
    if cid is not None and cid < 0:
        raise ConfigError(f"cid {cid} is not a cid")
    out = os.path.abspath(out)
    if os.path.lexists(out):
        raise ConfigError(f"{out} exists: restore writes a new database (move it away first)")
    if not os.path.isdir(os.path.dirname(out)):
        raise ConfigError(f"{os.path.dirname(out)}: no such directory to restore into")
    store = _store(source)
    cat = Catalog.load(store)
    if cat.empty:
        raise ArchiveError(f"{store.url} holds no archive (nothing under v1/)")
    plan = _plan(cat, cid, None if time is None else to_us(time))
    n = _build(cat, plan, out)
    return Restored(out, plan.target, plan.hash, plan.time_us, plan.anchor.name, n)


def _pick_anchor(cat: Catalog, cid: int | None, time_us: int | None) -> Anchor:
    snaps = cat.snapshots
    if time_us is not None:
        snaps = [s for s in snaps if s.time_us <= time_us]
    elif cid is not None:
        snaps = [s for s in snaps if s.cid <= cid]
    if snaps:
        return snapshot_anchor(snaps[-1])
    start = cat.genesis()
    if start is not None and (cid is None or start.cid <= cid):
        return start
    oldest = cat.snapshots[0] if cat.snapshots else None
    what = (
        f"the oldest snapshot is {oldest.name} (cid {oldest.cid}, {show_time(oldest.time_us)})"
        if oldest
        else "it holds no snapshot and its segments do not start at the beginning"
    )
    asked = f"cid {cid}" if time_us is None else show_time(time_us)
    raise ArchiveError(f"{cat.store.url} has nothing to restore {asked} from: {what}")


def _plan(cat: Catalog, cid: int | None, time_us: int | None) -> _Plan:
    """Read and check every object the restore needs; nothing is written."""
    anchor = _pick_anchor(cat, cid, time_us)
    fetch = CachedFetch(cat)
    reached = Reached(anchor.cid, anchor.hash, anchor.name, anchor.time_us)
    for _ in follow(cat, anchor, reached, upto=cid, upto_time=time_us, fetch=fetch):
        pass
    if not reached.done:
        nxt = cat.after(reached.cid)
        if nxt is not None:
            lo, hi = reached.cid + 1, nxt.first - 1
            raise ObjectMissingError(
                f"missing: no segment holds cids {lo}..{hi} (after {reached.obj},"
                f" before {nxt.name})",
                segment_name(lo, hi),
            )
        if cid is not None and reached.cid < cid:
            raise ArchiveError(
                f"{cat.store.url} ends at cid {reached.cid} ({reached.obj}): cid {cid} is not in it"
            )
    if time_us is not None and anchor.ref is None and reached.cid == anchor.cid:
        raise ArchiveError(f"{cat.store.url} holds no commit at or before {show_time(time_us)}")
    return _Plan(anchor, reached.cid, reached.hash, reached.time_us, fetch)


def _build(cat: Catalog, plan: _Plan, out: str) -> int:
    tmpdir = tempfile.mkdtemp(prefix=os.path.basename(out) + ".restore-", dir=os.path.dirname(out))
    try:
        image = os.path.join(tmpdir, "restore.db")
        anchor = plan.anchor
        if anchor.ref is not None:
            _unpack(cat.store, anchor.ref, image)
        else:
            _empty(image, anchor.cid)
        db = Database(image, init=False)
        try:
            n = _replay(db, cat, plan)
            pos = db.position()
        finally:
            db.close()
        if (pos.cid, pos.hash) != (plan.target, plan.hash):
            raise ArchiveError(f"the restored database ended at {pos}, not at cid {plan.target}")
        _settle(image)
        _publish(image, out)
        return n
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _unpack(store: ObjectStore, ref: SnapshotRef, image: str) -> None:
    blob = store.get(ref.name)
    with open(image, "wb") as f:
        decode_snapshot(blob, ref, f)
    try:
        snapshot.check(image, ref.cid, ref.hash)
    except ProtocolError as e:
        raise ArchiveError(f"the snapshot is refused: {e}", ref.name) from None
    conn = apsw.Connection(image)
    try:
        guard.allow(conn)
        conn.execute("DELETE FROM hct_local WHERE key='role'")  # as `hctserver backup`'s
    finally:
        conn.close()


def _empty(image: str, cid: int) -> None:
    db = Database(image)
    try:
        if cid > 0:
            db.adopt_baseline(cid)  # a history that starts above 0 (hctree's)
    finally:
        db.close()


def _replay(db: Database, cat: Catalog, plan: _Plan) -> int:
    anchor, n = plan.anchor, 0
    reached = Reached(anchor.cid, anchor.hash, anchor.name, anchor.time_us)
    ap = db.applier()
    try:
        for ref, entries in follow(cat, anchor, reached, upto=plan.target, fetch=plan.fetch):
            try:
                for te in entries:
                    ap.add(te.entry)
                ap.apply()
            except HctError as e:
                raise ArchiveError(f"applying its entries failed: {e}", ref.name) from None
            n += len(entries)
    finally:
        ap.close()
    return n


def _settle(image: str) -> None:
    """Everything into the main file, so that the file alone is the database."""
    conn = apsw.Connection(image)
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0]
    finally:
        conn.close()
    wal = image + "-wal"
    if busy or (os.path.exists(wal) and os.path.getsize(wal)):
        raise ArchiveError(f"could not checkpoint the restored database {image}")


def _publish(image: str, out: str) -> None:
    snapshot.fsync_file(image)
    try:
        os.link(image, out)  # never over a file that appeared meanwhile
    except FileExistsError:
        raise ConfigError(f"{out} exists: restore writes a new database") from None
    snapshot.fsync_dir(out)


# --- listing, verifying, pruning ---------------------------------------------------


@dataclass
class Listing:
    """What an archive holds: its snapshots, its segments' cid ranges, and
    the commit times of its first and last archived entries."""

    url: str
    snapshots: list[SnapshotRef]
    segments: int
    ranges: list[tuple[int, int]]
    first_time_us: int | None = None
    last_time_us: int | None = None


def ls(source: str | ObjectStore) -> Listing:
    cat = Catalog.load(_store(source))
    ranges: list[tuple[int, int]] = []
    for s in cat.segments:
        if ranges and ranges[-1][1] + 1 == s.first:
            ranges[-1] = (ranges[-1][0], s.last)
        else:
            ranges.append((s.first, s.last))
    listing = Listing(cat.store.url, cat.snapshots, len(cat.segments), ranges)
    if cat.segments:
        listing.first_time_us = cat.fetch(cat.segments[0]).first_time_us
        listing.last_time_us = cat.fetch(cat.segments[-1]).last_time_us
    return listing


@dataclass
class Verified:
    """What :func:`verify` checked: every object, and the chain's runs (a
    run restarts after a gap that a snapshot bridges)."""

    segments: int = 0
    snapshots: int = 0
    entries: int = 0
    runs: list[tuple[int, int]] = field(default_factory=list)
    unchecked_snapshots: list[str] = field(default_factory=list)  # outside every run


def verify(source: str | ObjectStore) -> Verified:
    """Check every object of the archive and the whole chain; ArchiveError
    names the first bad object."""
    cat = Catalog.load(_store(source))
    res = Verified()
    by_cid: dict[int, list[SnapshotRef]] = {}
    for snap in cat.snapshots:
        decode_snapshot(cat.store.get(snap.name), snap, None)
        by_cid.setdefault(snap.cid, []).append(snap)
        res.snapshots += 1
    checked: set[str] = set()

    def at(cid: int, h: bytes) -> None:
        for s in by_cid.get(cid, ()):
            if s.hash != h:
                raise ArchiveError(
                    f"its version hash is not the chain's at cid {cid} (another history)",
                    s.name,
                )
            checked.add(s.name)

    prev = None
    for ref in cat.segments:
        seg = cat.fetch(ref)
        if prev is not None and seg.first == prev[0] + 1:
            if seg.prev_hash != prev[1]:
                raise ArchiveError(f"its chain does not follow {prev[2]}", ref.name)
            res.runs[-1] = (res.runs[-1][0], seg.last)
        else:
            if prev is not None and not any(
                s.hash == seg.prev_hash for s in by_cid.get(seg.first - 1, ())
            ):
                raise ObjectMissingError(
                    f"missing: no segment holds cids {prev[0] + 1}..{seg.first - 1} (after"
                    f" {prev[2]}, before {ref.name}) and no snapshot bridges the gap",
                    segment_name(prev[0] + 1, seg.first - 1),
                )
            res.runs.append((seg.first, seg.last))
        at(seg.first - 1, seg.prev_hash)
        h = seg.prev_hash
        for te in seg.entries:
            h = fold(h, te.hash)
            at(te.entry.cid, h)
        res.segments += 1
        res.entries += len(seg.entries)
        prev = (seg.last, seg.hash, ref.name)
    res.unchecked_snapshots = [s.name for s in cat.snapshots if s.name not in checked]
    return res


@dataclass
class Pruned:
    kept_snapshot: str | None
    deleted: list[str]


def prune(
    source: str | ObjectStore,
    keep_seconds: float,
    *,
    now: float | datetime | None = None,
    dry_run: bool = False,
) -> Pruned:
    """Delete what no restore to a time within the last ``keep_seconds`` needs:
    the snapshots older than the newest one committed before that horizon,
    and the segments wholly at or below it. That snapshot is always kept, and
    nothing is deleted while no snapshot is that old."""
    if keep_seconds < 0:
        raise ConfigError("keep_seconds must be >= 0")
    cat = Catalog.load(_store(source))
    horizon = to_us(datetime.now(timezone.utc) if now is None else now) - round(
        keep_seconds * 1_000_000
    )
    old = [s for s in cat.snapshots if s.time_us <= horizon]
    if not old:
        return Pruned(None, [])
    keep = old[-1]
    doomed = [s.name for s in cat.segments if s.last <= keep.cid]
    doomed += [s.name for s in cat.snapshots if s.cid < keep.cid]
    if not dry_run:
        for name in doomed:  # oldest first: a crash leaves a usable tail
            cat.store.delete(name)
    return Pruned(keep.name, doomed)
