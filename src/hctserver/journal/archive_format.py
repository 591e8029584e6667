"""The continuous archive's object format, version 1 (docs/ARCHIVE.md).

Pure encoding and decoding: no store, no database. Every object is::

    MAGIC (8 bytes) ‖ be32 header length ‖ header (JSON, UTF-8) ‖ zstd frame

A *segment* holds a contiguous run of journal entries; its frame is the
entries, each ``be64 cid ‖ be64 schemacid ‖ be64 time_us ‖ be32 len(schema)
‖ be32 len(data) ‖ hash (16) ‖ schema ‖ data``. Its header names the run
(first, last, count) and the version hash before and after it, so a chain
of segments is checked without a database. A *snapshot* holds a database
file made by :func:`hctserver.journal.snapshot.make`.

Names sort by cid: ``v1/segments/<first:020d>-<last:020d>.seg.zst`` and
``v1/snapshots/<cid:020d>-<H hex>-<time_us:020d>.db.zst`` (the version hash
and commit time in the name, so that listing alone plans a restore).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import zstandard

from ..errors import HctError
from ..position import HASH_SIZE, Entry, entry_hash, fold

FORMAT = 1
MAGIC = b"HCTARCH\n"
PREFIX = f"v{FORMAT}/"
SEGMENTS = PREFIX + "segments/"
SNAPSHOTS = PREFIX + "snapshots/"
MAX_HEADER = 64 << 10
MAX_SEGMENT_BODY = 1 << 31  # an entry is at most SQLite's blob limit; a segment a few
ZSTD_LEVEL = 3

_ENTRY = struct.Struct(">qqqII16s")
_LEN = struct.Struct(">I")
_SEG_RE = re.compile(r"(\d{20})-(\d{20})\.seg\.zst")
_SNAP_RE = re.compile(r"(\d{20})-([0-9a-f]{32})-(\d{20})\.db\.zst")


class ArchiveError(HctError):
    """The archive cannot be used as asked: an object is missing, damaged,
    out of place or of another history. ``obj`` names the object (or None)."""

    def __init__(self, message: str, obj: str | None = None) -> None:
        super().__init__(f"{obj}: {message}" if obj else message)
        self.obj = obj


class ObjectMissingError(ArchiveError):
    """An object the archive lists, or should hold, is not there."""


class ArchiveMismatchError(ArchiveError):
    """The archive holds another history than the database's."""


class ArchiveGapError(ArchiveError):
    """The database's journal no longer holds what the archive needs next:
    it was truncated before it was shipped. A snapshot bridges the gap."""


# --- names -----------------------------------------------------------------------


def segment_name(first: int, last: int) -> str:
    return f"{SEGMENTS}{first:020d}-{last:020d}.seg.zst"


def segment_prefix(first: int) -> str:
    """The names of every segment that starts at ``first``."""
    return f"{SEGMENTS}{first:020d}-"


def snapshot_name(cid: int, h: bytes, time_us: int) -> str:
    return f"{SNAPSHOTS}{cid:020d}-{h.hex()}-{time_us:020d}.db.zst"


@dataclass(frozen=True, order=True)
class SegmentRef:
    """A segment as its name describes it."""

    first: int
    last: int
    name: str


@dataclass(frozen=True, order=True)
class SnapshotRef:
    """A snapshot as its name describes it: position (cid, hash), commit time."""

    cid: int
    hash: bytes
    time_us: int
    name: str


def parse_segment_name(name: str) -> SegmentRef:
    m = _SEG_RE.fullmatch(name[len(SEGMENTS) :]) if name.startswith(SEGMENTS) else None
    if m is None or int(m[1]) > int(m[2]) or int(m[1]) < 1:
        raise ArchiveError("not a segment name (first-last.seg.zst, 20 digits each)", name)
    return SegmentRef(int(m[1]), int(m[2]), name)


def parse_snapshot_name(name: str) -> SnapshotRef:
    m = _SNAP_RE.fullmatch(name[len(SNAPSHOTS) :]) if name.startswith(SNAPSHOTS) else None
    if m is None:
        raise ArchiveError("not a snapshot name (cid-hash-time.db.zst)", name)
    return SnapshotRef(int(m[1]), bytes.fromhex(m[2]), int(m[3]), name)


# --- framing ---------------------------------------------------------------------


def _frame(header: dict[str, Any], body: bytes) -> bytes:
    head = json.dumps({"format": FORMAT, **header}, sort_keys=True).encode()
    return MAGIC + _LEN.pack(len(head)) + head + body


def read_header(blob: bytes, name: str, kind: str) -> tuple[dict[str, Any], int]:
    """(header, offset of the zstd frame); ArchiveError if it is not one of ours."""
    if len(blob) < len(MAGIC) + 4 or not blob.startswith(MAGIC):
        raise ArchiveError("not an hctserver archive object (bad magic or truncated)", name)
    (n,) = _LEN.unpack_from(blob, len(MAGIC))
    start = len(MAGIC) + 4
    if n > MAX_HEADER or start + n > len(blob):
        raise ArchiveError("its header is truncated or too large", name)
    try:
        header = json.loads(blob[start : start + n])
    except ValueError:
        raise ArchiveError("its header is not valid JSON", name) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        fmt = header.get("format") if isinstance(header, dict) else None
        raise ArchiveError(f"archive format {fmt!r}, this hctserver reads {FORMAT}", name)
    if header.get("kind") != kind:
        raise ArchiveError(f"a {header.get('kind')!r} object where a {kind} belongs", name)
    return header, start + n


# --- segments --------------------------------------------------------------------


@dataclass(frozen=True)
class TimedEntry:
    """An entry as archived: the journal's columns, its hash and commit time."""

    entry: Entry
    hash: bytes
    time_us: int


@dataclass
class Segment:
    """A decoded, checked segment."""

    first: int
    last: int
    prev_hash: bytes  # H at first-1
    hash: bytes  # H at last
    first_time_us: int
    last_time_us: int
    entries: list[TimedEntry]


def encode_segment(entries: list[TimedEntry], prev_hash: bytes, last_hash: bytes) -> bytes:
    parts = []
    for te in entries:
        e = te.entry
        schema = e.schema.encode()
        parts.append(_ENTRY.pack(e.cid, e.schemacid, te.time_us, len(schema), len(e.data), te.hash))
        parts.append(schema)
        parts.append(e.data)
    body = b"".join(parts)
    header = {
        "kind": "segment",
        "first": entries[0].entry.cid,
        "last": entries[-1].entry.cid,
        "count": len(entries),
        "prev_hash": prev_hash.hex(),
        "hash": last_hash.hex(),
        "first_time_us": entries[0].time_us,
        "last_time_us": entries[-1].time_us,
        "body_bytes": len(body),
    }
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
    return _frame(header, cctx.compress(body))


def decode_segment(blob: bytes, ref: SegmentRef) -> Segment:
    """Decode and check a segment: its header against its name, every entry's
    hash, the run's contiguity and its chain from prev_hash to hash."""
    name = ref.name
    header, at = read_header(blob, name, "segment")
    try:
        first, last, count = int(header["first"]), int(header["last"]), int(header["count"])
        prev_hash, want = bytes.fromhex(header["prev_hash"]), bytes.fromhex(header["hash"])
        size = int(header["body_bytes"])
    except (KeyError, TypeError, ValueError):
        raise ArchiveError("its header lacks a field or has a bad one", name) from None
    if (first, last) != (ref.first, ref.last):
        raise ArchiveError(
            f"its header says cids {first}..{last}: the object was renamed or moved", name
        )
    if count != last - first + 1 or len(prev_hash) != HASH_SIZE or not 0 <= size < MAX_SEGMENT_BODY:
        raise ArchiveError("its header is inconsistent", name)
    try:
        body = zstandard.ZstdDecompressor().decompress(blob[at:], max_output_size=size)
    except zstandard.ZstdError as e:
        raise ArchiveError(f"its data is truncated or damaged ({e})", name) from None
    if len(body) != size:
        raise ArchiveError("its data is truncated", name)
    entries = list(_entries(body, name))
    seg = Segment(first, last, prev_hash, want, 0, 0, entries)
    _check_chain(seg, name)
    seg.first_time_us, seg.last_time_us = entries[0].time_us, entries[-1].time_us
    return seg


def _entries(body: bytes, name: str) -> Iterator[TimedEntry]:
    view, at, n = memoryview(body), 0, len(body)
    while at < n:
        if at + _ENTRY.size > n:
            raise ArchiveError("its last entry is truncated", name)
        cid, schemacid, t, ls, ld, h = _ENTRY.unpack_from(view, at)
        at += _ENTRY.size
        if at + ls + ld > n:
            raise ArchiveError(f"cid {cid} is truncated", name)
        try:
            schema = bytes(view[at : at + ls]).decode()
        except UnicodeDecodeError:
            raise ArchiveError(f"cid {cid}: its schema text is not UTF-8", name) from None
        data = bytes(view[at + ls : at + ls + ld])
        at += ls + ld
        yield TimedEntry(Entry(cid, schemacid, schema, data), h, t)


def _check_chain(seg: Segment, name: str) -> None:
    h, expect, last_t = seg.prev_hash, seg.first, -1
    for te in seg.entries:
        e = te.entry
        if e.cid != expect:
            raise ArchiveError(f"cid {expect} is missing (found cid {e.cid})", name)
        if entry_hash(e.cid, e.schema, e.data, e.schemacid) != te.hash:
            raise ArchiveError(
                f"cid {e.cid}: its hash does not match its schema, data and schemacid"
                " (the entry was edited)",
                name,
            )
        if te.time_us < last_t:
            raise ArchiveError(f"cid {e.cid}: its commit time goes backwards", name)
        h, expect, last_t = fold(h, te.hash), expect + 1, te.time_us
    if expect != seg.last + 1:
        raise ArchiveError(f"it ends at cid {expect - 1}, its header says {seg.last}", name)
    if h != seg.hash:
        raise ArchiveError("its entries do not fold to the version hash in its header", name)


# --- snapshots -------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotHeader:
    cid: int
    hash: bytes
    schemacid: int
    time_us: int
    db_bytes: int
    sha256: str


def snapshot_head(raw: bytes, cid: int, h: bytes, schemacid: int, time_us: int) -> SnapshotHeader:
    return SnapshotHeader(cid, h, schemacid, time_us, len(raw), hashlib.sha256(raw).hexdigest())


def encode_snapshot(raw: bytes, head: SnapshotHeader) -> bytes:
    """A database file's bytes, compressed behind a snapshot header."""
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
    header = {
        "kind": "snapshot",
        "cid": head.cid,
        "hash": head.hash.hex(),
        "schemacid": head.schemacid,
        "time_us": head.time_us,
        "db_bytes": head.db_bytes,
        "sha256": head.sha256,
    }
    return _frame(header, cctx.compress(raw))


def snapshot_header(blob: bytes, ref: SnapshotRef) -> tuple[SnapshotHeader, int]:
    """The header of a snapshot object, checked against its name."""
    header, at = read_header(blob, ref.name, "snapshot")
    try:
        head = SnapshotHeader(
            int(header["cid"]),
            bytes.fromhex(header["hash"]),
            int(header["schemacid"]),
            int(header["time_us"]),
            int(header["db_bytes"]),
            str(header["sha256"]),
        )
    except (KeyError, TypeError, ValueError):
        raise ArchiveError("its header lacks a field or has a bad one", ref.name) from None
    if (head.cid, head.hash, head.time_us) != (ref.cid, ref.hash, ref.time_us):
        raise ArchiveError(
            f"its header says cid {head.cid}: the object was renamed or moved", ref.name
        )
    return head, at


def decode_snapshot(blob: bytes, ref: SnapshotRef, out: IO[bytes] | None) -> SnapshotHeader:
    """Decompress a snapshot into ``out`` (or only check it, with None): its
    header against its name, its size and digest against its header."""
    head, at = snapshot_header(blob, ref)
    digest, size = hashlib.sha256(), 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(memoryview(blob)[at:])
        while chunk := reader.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
            if out is not None:
                out.write(chunk)
    except zstandard.ZstdError as e:
        raise ArchiveError(f"its data is truncated or damaged ({e})", ref.name) from None
    if size != head.db_bytes or digest.hexdigest() != head.sha256:
        raise ArchiveError("its data is truncated or damaged (size or digest differs)", ref.name)
    return head


def check_name(name: str) -> None:
    """An object name an archive may hold: relative, no empty or dot part."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ArchiveError(f"invalid object name {name!r}")
    if any(p.startswith(".") for p in parts):
        raise ArchiveError(f"invalid object name {name!r} (a part starts with '.')")
