"""The formats of an entry's data, behind one interface.

Two codecs: ours (:data:`SESSION`, the session extension's patchsets, tag
``'P'``) and hctree's (:data:`HCTREE`, FORMAT.md, tag ``'T'``). A follower
tells them apart by an entry's first byte, so a leader of either kind can
be followed; a leader writes the one its database was made with
(``hctserver init --format``). Session *changesets* (also tag ``'T'``) are
not read: hctserver never wrote them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import apsw

from ..errors import ApplyError, ProtocolError
from . import hctformat, patchset
from .hctapply import HctApplier

_NOSAVEPOINT = apsw.SQLITE_CHANGESETAPPLY_NOSAVEPOINT

Allowed = Callable[[str], bool]
OnConflict = Callable[[int, Any], int]


class Codec:
    """What the applier needs of a format."""

    name = ""
    tag = 0

    def tables(self, data: bytes) -> set[str]:
        """The tables ``data`` writes (raises if it is malformed)."""
        raise NotImplementedError

    def apply(
        self,
        conn: apsw.Connection,
        datas: list[bytes],
        where: str,
        allowed: Allowed,
        on_conflict: OnConflict,
    ) -> None:
        """Apply consecutive entries' data, in cid order, inside the caller's
        transaction; ``where`` names the entries in errors ("cids 7..9")."""
        raise NotImplementedError


class SessionCodec(Codec):
    name = "session"
    tag = patchset.PATCHSET

    def tables(self, data: bytes) -> set[str]:
        return {t.name for t in patchset.decode(data)}

    def apply(
        self,
        conn: apsw.Connection,
        datas: list[bytes],
        where: str,
        allowed: Allowed,
        on_conflict: OnConflict,
    ) -> None:
        # merged by SQLite's changegroup and applied in one call: per-entry
        # work in Python stays a hash and a journal row
        data = patchset.merge(datas)
        if data:
            apsw.Changeset.apply(
                data, conn, flags=_NOSAVEPOINT, conflict=on_conflict, filter=allowed
            )


class HctreeCodec(Codec):
    name = "hctree"
    tag = hctformat.TABLE

    def tables(self, data: bytes) -> set[str]:
        return {t.name for t in hctformat.decode(data)}

    def apply(
        self,
        conn: apsw.Connection,
        datas: list[bytes],
        where: str,
        allowed: Allowed,
        on_conflict: OnConflict,
    ) -> None:
        applier = HctApplier(conn)  # a new one: a schema entry may come before
        try:
            applier.apply_many(datas, allowed, where)
        except ProtocolError as e:
            raise ProtocolError(f"{where}: {e}") from None


SESSION = SessionCodec()
HCTREE = HctreeCodec()
FORMATS: dict[str, Codec] = {c.name: c for c in (SESSION, HCTREE)}
_BY_TAG: dict[int, Codec] = {c.tag: c for c in (SESSION, HCTREE)}


def codec_of(cid: int, data: bytes) -> Codec | None:
    """The codec of an entry's data; None for no data."""
    if not data:
        return None
    codec = _BY_TAG.get(data[0])
    if codec is None:
        raise ApplyError(
            f"cid {cid}: unknown data encoding 0x{data[0]:02x} (this version reads session"
            " patchsets and hctree records); upgrade hctserver"
        )
    return codec


def where(first: int, last: int) -> str:
    """How errors name the entries from ``first`` to ``last``."""
    return f"cid {first}" if first == last else f"cids {first}..{last}"


def runs(entries: Sequence[tuple[int, bytes]]) -> list[tuple[Codec, list[tuple[int, bytes]]]]:
    """Consecutive entries with data, grouped by codec, in order."""
    out: list[tuple[Codec, list[tuple[int, bytes]]]] = []
    for cid, data in entries:
        codec = codec_of(cid, data)
        if codec is None:
            continue
        if out and out[-1][0] is codec:
            out[-1][1].append((cid, data))
        else:
            out.append((codec, [(cid, data)]))
    return out
