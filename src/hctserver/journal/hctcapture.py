"""What an hctree-format leader journals for a transaction (FORMAT.md,
section 6): per table it wrote (in creation order), the final state of each
rowid it touched, in rowid order: ``'i'`` and the whole row, or ``'d'``.

Read at commit, inside the transaction, from the rows themselves: a key
written to no effect (an UPDATE that changed nothing, an INSERT then
DELETE of a new key) is journaled as hctree journals it. The record is
built as SQLite's OP_MakeRecord builds it (an INTEGER PRIMARY KEY's field is
NULL; a REAL column's integral value is stored as an integer), except that
negative integers always take 8 bytes: the original C follower misreads
shorter ones (FORMAT.md, section 7).
"""

from __future__ import annotations

from collections.abc import Mapping

import apsw

from ..errors import UnsupportedStatementError
from . import hctformat, patchset
from .hctapply import Shape, shape_of
from .sqlutil import quote_ident

_REAL_AS_INT = 1 << 47  # OP_MakeRecord keeps integral REALs within 6 bytes as integers


def entry_data(
    conn: apsw.Connection, touched: Mapping[str, set[int]], patch: bytes, schema: str
) -> bytes:
    """The hctree data of the transaction that touched ``touched`` (the row
    log's keys) and ``patch`` (what a session object recorded, which lists
    only real changes)."""
    if schema:
        refuse_without_rowid(conn)
    keys = {name: set(rowids) for name, rowids in touched.items()}
    for table in patchset.decode(patch) if patch else ():
        (k,) = table.pk_columns[:1] or (0,)
        rows = keys.setdefault(table.name, set())
        for _, _, old, new in table.changes:
            for row in (old, new):
                key = row[k] if row else None
                if isinstance(key, int):
                    rows.add(key)
    tables = conn.execute("SELECT name FROM sqlite_schema WHERE type='table' ORDER BY rowid")
    order = [name for (name,) in tables if name in keys]
    gone = [name for name in keys if keys[name] and name not in order]
    if gone and "RENAME" in schema.upper():
        raise UnsupportedStatementError(
            f"table {gone[0]!r} was written and then renamed in one transaction: an"
            " hctree-format leader could not journal those rows under its new name; the"
            " transaction was rolled back (rename it in a transaction of its own)"
        )
    out = []
    for name in order:
        sh = shape_of(conn, name)
        if sh is None or not keys[name]:
            continue  # dropped by the transaction: hctree journals the DROP alone
        out.append(hctformat.TableOps(name, _table_ops(conn, name, sh, sorted(keys[name]))))
    return hctformat.encode(out, wide_negatives=True)


def _table_ops(
    conn: apsw.Connection, name: str, sh: Shape, rowids: list[int]
) -> list[hctformat.Op]:
    """Each rowid's final state: ``'i'`` and its row as a record holds it, or ``'d'``."""
    cols = ", ".join(quote_ident(c) for c in sh.columns)
    select = f"SELECT {cols} FROM main.{quote_ident(name)} WHERE {sh.rowid_name}=?"
    types = [r[0] for r in conn.execute("SELECT type FROM pragma_table_info(?)", (name,))]
    reals = [i for i, t in enumerate(types) if _affinity(t) == "REAL"]
    ops = []
    for rowid in rowids:
        row = conn.execute(select, (rowid,)).fetchone()
        if row is None:
            ops.append(hctformat.Op("d", rowid, ()))
            continue
        values = list(row)
        if sh.ipk is not None:
            values[sh.ipk] = None  # the rowid is its value
        for i in reals:
            v = values[i]
            if isinstance(v, float) and v.is_integer() and -_REAL_AS_INT <= v < _REAL_AS_INT:
                values[i] = int(v)
        ops.append(hctformat.Op("i", rowid, tuple(values)))
    return ops


def _affinity(declared: str) -> str:
    """SQLite's column affinity rules (datatype3.html, section 3.1)."""
    t = declared.upper()
    if "INT" in t:
        return "INTEGER"
    if any(w in t for w in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if "BLOB" in t or not t:
        return "BLOB"
    if any(w in t for w in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


def refuse_without_rowid(conn: apsw.Connection) -> None:
    for (name,) in conn.execute(
        "SELECT name FROM pragma_table_list WHERE schema='main' AND type='table' AND wr"
    ):
        raise UnsupportedStatementError(
            f"table {name!r} is WITHOUT ROWID: an hctree-format database cannot hold one (the"
            " original C follower crashes on CREATE TABLE ... WITHOUT ROWID and cannot apply"
            " its rows); the transaction was rolled back"
        )
