"""Applying hctree entry data (:mod:`hctserver.journal.hctformat`) to SQLite, as the
C follower does it (FORMAT.md, section 7), without its defects.

Every record is the key's *final* state, so each is applied with REPLACE
semantics: ``'i'``/``'I'`` replace the whole row, ``'d'``/``'D'`` delete the
key (a key that is not there is no error: the vectors' insert-then-delete
leaves one). Fields bind by position in table order (WITHOUT ROWID: the
primary key columns in key order first); a record shorter than the table
leaves the rest to their defaults (a row written before ``ALTER TABLE ADD
COLUMN``); an INTEGER PRIMARY KEY's field is NULL and takes the rowid.
Integers take the column's affinity on insert, as in any SQL INSERT.
The connection's triggers and foreign keys must be off (the entry holds
their effects already).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import apsw

from ..errors import ApplyError, ProtocolError
from . import hctformat
from .sqlutil import quote_ident


class Shape(NamedTuple):
    """What applying a record needs to know about a table."""

    columns: tuple[str, ...]  # in table order, hidden ones left out
    without_rowid: bool
    ipk: int | None  # the INTEGER PRIMARY KEY column (a rowid alias)
    pk: tuple[int, ...]  # primary key columns, in key order
    rowid_name: str  # how to name the rowid in SQL


def shape_of(conn: apsw.Connection, table: str) -> Shape | None:
    """``table``'s shape in ``main``, or None if there is no such table."""
    row = conn.execute(
        "SELECT wr FROM pragma_table_list WHERE schema='main' AND name=? AND type='table'",
        (table,),
    ).fetchone()
    if row is None:
        return None
    without_rowid = bool(row[0])
    cols = list(conn.execute("SELECT name, pk, hidden FROM pragma_table_xinfo(?)", (table,)))
    columns = tuple(c[0] for c in cols if not c[2])
    pk = tuple(columns.index(c[0]) for c in sorted((c for c in cols if c[1]), key=lambda c: c[1]))
    ipk = None
    if not without_rowid and len(pk) == 1:
        autoindex = conn.execute(
            "SELECT 1 FROM pragma_index_list(?) WHERE origin='pk'", (table,)
        ).fetchone()
        if autoindex is None:
            ipk = pk[0]
    lower = {c.lower() for c in columns}
    rowid_name = next((n for n in ("rowid", "_rowid_", "oid") if n not in lower), "rowid")
    return Shape(columns, without_rowid, ipk, pk, rowid_name)


class HctApplier:
    """Applies entries' data on one connection; caches table shapes and
    statements until :meth:`schema_changed`."""

    def __init__(self, conn: apsw.Connection) -> None:
        self._conn = conn
        self._shapes: dict[str, Shape | None] = {}
        self._plans: dict[tuple[str, str, int], tuple[str, tuple[int, ...]]] = {}

    def schema_changed(self) -> None:
        self._shapes.clear()
        self._plans.clear()

    def apply(self, data: bytes, allowed: Callable[[str], bool], where: str) -> None:
        """Apply one entry's data (``where`` names it in errors); ``allowed``
        says which tables an entry may write."""
        self.apply_many([data], allowed, where)

    def apply_many(self, datas: list[bytes], allowed: Callable[[str], bool], where: str) -> None:
        """Apply consecutive entries' data (no schema change among them) as
        one: every record is its key's final state, so only each key's last
        one counts, and records of one shape go to SQLite in one
        ``executemany`` (a C loop)."""
        final: dict[str, dict[Any, hctformat.RawOp | hctformat.Op]] = {}
        npks: dict[str, int] = {}  # tables checked so far: their key's width
        scan = hctformat.scan
        for data in datas:
            for name, raw in scan(data):
                ops = final.get(name)
                if ops is None:
                    if not allowed(name):
                        raise ProtocolError(
                            f"changes to {name!r}, which is not a table of the follower's schema"
                        )
                    sh = self._shape(name)
                    if sh is None:
                        raise ApplyError(f"{where}: no table {name!r} on this follower")
                    ops = final[name] = {}
                    npks[name] = len(sh.pk)
                for r in raw:
                    if r[0] in "id":
                        ops[r[1]] = r  # decoded only if it stays the last
                    else:
                        op = r.op()
                        ops[op.values[: npks[name]]] = op
        for name, ops in final.items():
            decoded = [o.op() if isinstance(o, hctformat.RawOp) else o for o in ops.values()]
            self._apply_table(name, self._shapes[name], decoded, where)

    def _shape(self, name: str) -> Shape | None:
        if name not in self._shapes:
            self._shapes[name] = shape_of(self._conn, name)
        return self._shapes[name]

    def _apply_table(
        self, name: str, sh: Shape | None, ops: list[hctformat.Op], where: str
    ) -> None:
        assert sh is not None
        groups: dict[str, list[Any]] = {}
        for op in ops:
            sql, fields = self._plan(name, sh, op.kind, len(op.values), where)
            args = [op.values[i] for i in fields]
            if op.kind in "id":
                args.append(op.rowid)
            groups.setdefault(sql, []).append(args)
        for sql, rows in groups.items():
            self._conn.executemany(sql, rows)

    def _plan(
        self, name: str, sh: Shape, kind: str, n: int, where: str
    ) -> tuple[str, tuple[int, ...]]:
        """The statement for a ``kind`` record of ``n`` fields of ``name``,
        and which fields it binds (then the rowid, for ``'i'`` and ``'d'``)."""
        key = (name, kind, n)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _statement(name, sh, kind, n, where)
        return plan


def _statement(name: str, sh: Shape, kind: str, n: int, where: str) -> tuple[str, tuple[int, ...]]:
    t = quote_ident(name)
    if (kind in ("I", "D")) != sh.without_rowid:
        table_kind = "WITHOUT ROWID" if sh.without_rowid else "rowid"
        raise ApplyError(f"{where}: a {kind!r} record for the {table_kind} table {name!r}")
    if kind == "d":
        return f"DELETE FROM {t} WHERE {sh.rowid_name}=?", ()
    if kind == "D":
        if n != len(sh.pk):
            raise ApplyError(f"{where}: a key of {n} fields for {name!r}")
        cond = " AND ".join(f"{quote_ident(sh.columns[i])}=?" for i in sh.pk)
        return f"DELETE FROM {t} WHERE {cond}", tuple(range(n))
    order = _field_order(sh)
    if n > len(order):
        raise ApplyError(
            f"{where}: a record of {n} fields for {name!r}, which has {len(order)} columns"
        )
    # the INTEGER PRIMARY KEY's field is NULL in the record: the rowid is its value
    fields = tuple(f for f in range(n) if order[f] != sh.ipk)
    names = [quote_ident(sh.columns[order[f]]) for f in fields]
    if kind == "i":
        names.append(sh.rowid_name if sh.ipk is None else quote_ident(sh.columns[sh.ipk]))
    marks = ",".join("?" * len(names))
    return f"INSERT OR REPLACE INTO {t}({','.join(names)}) VALUES({marks})", fields


def _field_order(sh: Shape) -> list[int]:
    """Which column each field of a full record is."""
    if not sh.without_rowid:
        return list(range(len(sh.columns)))
    return [*sh.pk, *(i for i in range(len(sh.columns)) if i not in sh.pk)]
