"""Comparing two replication-enabled databases: position, schema, every row.

When one database's history is a strict prefix of the other's (a follower
that is merely behind), the answer is :class:`Behind`, not a difference.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import apsw

from .sqlutil import fetchall, quote_ident, table_info
from .store import Store
from .systables import USER_OBJECTS_WHERE


@dataclass
class Difference:
    """The first difference found, where it is, and what it is."""

    what: str
    table: str | None = None
    key: tuple[Any, ...] | None = None
    column: str | None = None

    def __str__(self) -> str:
        where = []
        if self.table is not None:
            where.append(f"table {self.table}")
        if self.key is not None:
            where.append(f"key {_show_key(self.key)}")
        if self.column is not None:
            where.append(f"column {self.column}")
        return (", ".join(where) + ": " if where else "") + self.what


@dataclass
class Behind:
    """``behind``'s history is a strict prefix of ``ahead``'s."""

    behind: str
    ahead: str
    cids: int
    at: int

    def __str__(self) -> str:
        return f"{self.behind} is behind {self.ahead} by {self.cids} cids (at cid {self.at})"


def _show_key(key: tuple[Any, ...]) -> str:
    return "(" + ", ".join(_show(v) for v in key) + ")"


def _show(v: Any) -> str:
    if isinstance(v, bytes):
        return f"x'{v[:16].hex()}{'...' if len(v) > 16 else ''}'"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str) and len(v) > 40:
        return repr(v[:40] + "...")
    return repr(v)


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (a == b and math.copysign(1, a) == math.copysign(1, b)) or (a != a and b != b)
    return bool(a == b)


def _tables(c: apsw.Connection) -> list[str]:
    return [
        r[0]
        for r in fetchall(
            c,
            f"SELECT name FROM sqlite_schema WHERE type='table' AND {USER_OBJECTS_WHERE}"
            " ORDER BY name",
        )
    ]


def _schema(c: apsw.Connection) -> dict[tuple[str, str], str]:
    return {
        (t, n): s
        for t, n, s in fetchall(
            c, f"SELECT type, name, sql FROM sqlite_schema WHERE {USER_OBJECTS_WHERE}"
        )
    }


def compare(path1: str, path2: str) -> Difference | Behind | None:
    """None when both databases have the same user tables, schema and position;
    :class:`Behind` when one's history is a strict prefix of the other's;
    otherwise the first difference (user data first, as it is the most telling)."""
    d1, d2 = Store(path1, init=False), Store(path2, init=False)
    try:
        p1, p2 = d1.position(), d2.position()
        if p1.cid < p2.cid and d2.hash_at(p1.cid) == p1.hash:
            return Behind(path1, path2, p2.cid - p1.cid, p1.cid)
        if p2.cid < p1.cid and d1.hash_at(p2.cid) == p2.hash:
            return Behind(path2, path1, p1.cid - p2.cid, p2.cid)
        c1, c2 = d1.open_connection(), d2.open_connection()
        try:
            c1.execute("BEGIN")
            c2.execute("BEGIN")
            diff = _compare_schema(c1, c2) or _compare_rows(c1, c2)
            c1.execute("COMMIT")
            c2.execute("COMMIT")
        finally:
            c1.close()
            c2.close()
        if diff is None and p1 != p2:
            diff = Difference(f"the histories differ: positions {p1} and {p2}")
        return diff
    finally:
        d1.close()
        d2.close()


def _compare_schema(c1: apsw.Connection, c2: apsw.Connection) -> Difference | None:
    s1, s2 = _schema(c1), _schema(c2)
    for key in sorted(set(s1) | set(s2)):
        typ, name = key
        if key not in s2:
            return Difference(f"{typ} {name} exists only in the first database")
        if key not in s1:
            return Difference(f"{typ} {name} exists only in the second database")
        if s1[key] != s2[key]:
            return Difference(f"{typ} {name} is defined differently: {s1[key]!r} != {s2[key]!r}")
    return None


def _compare_rows(c1: apsw.Connection, c2: apsw.Connection) -> Difference | None:
    for table in _tables(c1):
        cols, pk, rowid = table_info(c1, table)
        order = sorted((i for i in range(len(pk)) if pk[i]), key=lambda i: pk[i])
        sel = ", ".join("rowid" if rowid and i == 0 else quote_ident(n) for i, n in enumerate(cols))
        by = ", ".join("rowid" if rowid and i == 0 else quote_ident(cols[i]) for i in order)
        sql = f"SELECT {sel} FROM main.{quote_ident(table)} ORDER BY {by}"
        rows1, rows2 = c1.execute(sql), c2.execute(sql)
        for r1, r2 in itertools.zip_longest(rows1, rows2):
            if r1 is None or r2 is None:
                r = r1 if r2 is None else r2
                side = "second" if r2 is None else "first"
                key = tuple(r[i] for i in order)
                return Difference(f"row missing from the {side} database", table, key)
            k1, k2 = tuple(r1[i] for i in order), tuple(r2[i] for i in order)
            if not all(_same(a, b) for a, b in zip(k1, k2, strict=True)):
                return Difference(
                    f"a row with this key is in the first database where the second has"
                    f" {_show_key(k2)}",
                    table,
                    k1,
                )
            for i, (a, b) in enumerate(zip(r1, r2, strict=True)):
                if not _same(a, b):
                    return Difference(
                        f"{_show(a)} ({type(a).__name__}) != {_show(b)} ({type(b).__name__})",
                        table,
                        k1,
                        cols[i],
                    )
    return None
