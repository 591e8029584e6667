"""Reading an archive: what its listing holds (:class:`Catalog`) and walking
its chain of segments from an anchor (:func:`follow`), every link checked.

An *anchor* is where a restore starts: a snapshot, or the start of the
history (a first segment whose chain starts from the zero hash).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..position import ZERO_HASH, fold
from .archive_format import (
    PREFIX,
    SEGMENTS,
    SNAPSHOTS,
    ArchiveError,
    Segment,
    SegmentRef,
    SnapshotRef,
    TimedEntry,
    decode_segment,
    parse_segment_name,
    parse_snapshot_name,
    read_header,
)
from .archive_store import ObjectStore

GENESIS = "the start of the history"
_VERSION_RE = re.compile(r"v(\d+)/")


@dataclass(frozen=True)
class Anchor:
    """A position a restore can start from: a snapshot's, or the start of
    the history (``ref`` None: an empty database at ``cid``)."""

    cid: int
    hash: bytes
    time_us: int
    ref: SnapshotRef | None

    @property
    def name(self) -> str:
        return self.ref.name if self.ref is not None else GENESIS


@dataclass
class Catalog:
    """The archive's objects as its listing names them, in cid order."""

    store: ObjectStore
    segments: list[SegmentRef]
    snapshots: list[SnapshotRef]

    @classmethod
    def load(cls, store: ObjectStore) -> Catalog:
        names = store.list(PREFIX)
        if not names:
            newer = sorted({m[0] for n in store.list("v") if (m := _VERSION_RE.match(n))})
            if newer:
                raise ArchiveError(
                    f"{store.url} holds archive format {', '.join(newer)}; this hctserver"
                    f" reads {PREFIX}"
                )
        segments, snapshots = [], []
        for n in names:
            if n.startswith(SEGMENTS):
                segments.append(parse_segment_name(n))
            elif n.startswith(SNAPSHOTS):
                snapshots.append(parse_snapshot_name(n))
            else:
                raise ArchiveError("an object the archive format does not know", n)
        segments.sort()
        snapshots.sort()
        for a, b in itertools.pairwise(segments):
            if b.first <= a.last:
                raise ArchiveError(
                    f"it overlaps {a.name} (two archivers wrote to this archive)", b.name
                )
        return cls(store, segments, snapshots)

    @property
    def empty(self) -> bool:
        return not self.segments and not self.snapshots

    def containing(self, cid: int) -> SegmentRef | None:
        """The segment holding ``cid``, if any."""
        i = bisect.bisect_right([s.first for s in self.segments], cid) - 1
        if i >= 0 and self.segments[i].last >= cid:
            return self.segments[i]
        return None

    def after(self, cid: int) -> SegmentRef | None:
        """The first segment that starts after ``cid``."""
        return next((s for s in self.segments if s.first > cid), None)

    def fetch(self, ref: SegmentRef) -> Segment:
        return decode_segment(self.store.get(ref.name), ref)

    def genesis(self) -> Anchor | None:
        """The start of the history, if the oldest segment starts there."""
        if not self.segments:
            return None
        ref = self.segments[0]
        header, _ = read_header(self.store.get(ref.name), ref.name, "segment")
        if header.get("prev_hash") != ZERO_HASH.hex():
            return None
        return Anchor(ref.first - 1, ZERO_HASH, 0, None)

    def end(self) -> int:
        """The newest cid any object names."""
        ends = [s.last for s in self.segments[-1:]] + [s.cid for s in self.snapshots[-1:]]
        return max(ends, default=0)


def snapshot_anchor(ref: SnapshotRef) -> Anchor:
    return Anchor(ref.cid, ref.hash, ref.time_us, ref)


Fetch = Callable[[SegmentRef], Segment]


@dataclass
class Reached:
    """Where a walk along the chain got to: (cid, H) and the last object read."""

    cid: int
    hash: bytes
    obj: str
    time_us: int
    done: bool = False  # stopped by its limit (cid or time), not by the chain's end


def follow(
    cat: Catalog,
    anchor: Anchor,
    reached: Reached,
    *,
    upto: int | None = None,
    upto_time: int | None = None,
    fetch: Fetch | None = None,
) -> Iterator[tuple[SegmentRef, list[TimedEntry]]]:
    """The entries after ``anchor`` up to cid ``upto`` or to the last one
    committed at or before ``upto_time``, a segment at a time; ``reached``
    (starting at the anchor) is kept up to date. Each segment must link to
    what came before it; ArchiveError names the first that does not."""
    get = fetch or cat.fetch
    while not reached.done:
        if upto is not None and reached.cid >= upto:
            reached.done = True
            break
        ref = cat.containing(reached.cid + 1)
        if ref is None:
            break
        seg = get(ref)
        _link(seg, ref, anchor, reached)
        out = []
        for te in seg.entries:
            c = te.entry.cid
            if c <= reached.cid:
                continue
            if (upto is not None and c > upto) or (
                upto_time is not None and te.time_us > upto_time
            ):
                reached.done = True
                break
            out.append(te)
            reached.hash = fold(reached.hash, te.hash)
            reached.cid, reached.time_us = c, te.time_us
        reached.obj = ref.name
        yield ref, out


def _link(seg: Segment, ref: SegmentRef, anchor: Anchor, reached: Reached) -> None:
    if seg.first == reached.cid + 1:
        if seg.prev_hash != reached.hash:
            raise ArchiveError(
                f"its chain does not follow {reached.obj} (another database's archive,"
                " or an object replaced)",
                ref.name,
            )
        return
    h = seg.prev_hash  # a segment that spans the anchor: its first part must lead to it
    for te in seg.entries:
        if te.entry.cid > reached.cid:
            break
        h = fold(h, te.hash)
    if h != anchor.hash:
        raise ArchiveError(
            f"its chain does not lead to {anchor.name} (at cid {anchor.cid}):"
            " they are of different histories",
            ref.name,
        )


class CachedFetch:
    """Fetches segments for a two-pass restore: the first pass keeps each
    object's digest (and the object itself, up to ``keep_bytes`` in all);
    the second gets the same bytes back or refuses."""

    def __init__(self, cat: Catalog, keep_bytes: int = 256 << 20) -> None:
        self.cat = cat
        self.keep_bytes = keep_bytes
        self._digests: dict[str, bytes] = {}
        self._blobs: dict[str, bytes] = {}

    def __call__(self, ref: SegmentRef) -> Segment:
        blob = self._blobs.get(ref.name)
        if blob is None:
            blob = self.cat.store.get(ref.name)
        digest = hashlib.sha256(blob).digest()
        seen = self._digests.setdefault(ref.name, digest)
        if seen != digest:
            raise ArchiveError("it changed while the restore read it", ref.name)
        if ref.name not in self._blobs and len(blob) <= self.keep_bytes:
            self.keep_bytes -= len(blob)
            self._blobs[ref.name] = blob
        return decode_segment(blob, ref)
