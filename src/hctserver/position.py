"""Journal entries, their hash, and a database's position (SPEC section 1).

Pure functions over bytes: no SQLite, no sockets.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any, NamedTuple

from . import speedups

HASH_SIZE = 16
ZERO_HASH = bytes(HASH_SIZE)

_be64 = struct.Struct(">q").pack
_md5 = hashlib.md5


class Entry(NamedTuple):
    """One committed write transaction, as journaled and as sent on the wire."""

    cid: int
    schemacid: int
    schema: str
    data: bytes

    def hash(self) -> bytes:
        return entry_hash(self.cid, self.schema, self.data, self.schemacid)


class Position(NamedTuple):
    """(cid, H): the newest contiguous cid and the version hash folded up to it."""

    cid: int
    hash: bytes

    def __str__(self) -> str:
        return f"{self.cid}:{self.hash.hex()}"


def py_entry_hash(cid: int, schema: str | bytes, data: bytes, schemacid: int) -> bytes:
    """MD5(be64(cid) || schema || data || be64(schemacid))."""
    if not schema:
        return _md5(_be64(cid) + data + _be64(schemacid)).digest()
    s = schema.encode() if isinstance(schema, str) else schema
    return _md5(_be64(cid) + s + data + _be64(schemacid)).digest()


def py_fold(h: bytes, entry_hash_: bytes) -> bytes:
    """One step of the version hash: MD5(H || entry.hash)."""
    return _md5(h + entry_hash_).digest()


def fold_all(h: bytes, entry_hashes: list[bytes]) -> bytes:
    """Fold many entry hashes, in order, into H."""
    for e in entry_hashes:
        h = _md5(h + e).digest()
    return h


def py_chain(entries: list[Entry], cid: int, h: bytes, tag: object) -> tuple[list[Any], int, bytes]:
    """Hash entries that follow position (cid, h) in cid order: for each,
    (entry hash, H after it, tag) or None once the run stops being contiguous.
    Returns (hashes, next expected cid, H)."""
    out: list[Any] = []
    append = out.append
    be64, md5 = _be64, _md5
    nxt = cid + 1
    for e in entries:
        c, schemacid, schema, data = e
        if c != nxt:
            append(None)
            continue
        if schema:
            eh = md5(be64(c) + schema.encode() + data + be64(schemacid)).digest()
        else:
            eh = md5(be64(c) + data + be64(schemacid)).digest()
        h = md5(h + eh).digest()
        append((eh, h, tag))
        nxt += 1
    return out, nxt - 1, h


entry_hash = py_entry_hash
fold = py_fold
chain = py_chain
_native: Any = speedups.native()
if _native is not None:  # compiled twins (tests/test_speedups.py checks they agree)
    entry_hash, fold, chain = _native.entry_hash, _native.fold, _native.chain
