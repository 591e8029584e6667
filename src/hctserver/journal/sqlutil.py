"""Small helpers over apsw connections: rows, transactions, table shapes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import apsw

from ..errors import JournalError
from . import patchset


def fetchall(conn: apsw.Connection, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
    """Rows of one statement, typed loosely (SQLite values are dynamic)."""
    rows: list[Any] = conn.execute(sql, args).fetchall()
    return rows


def fetchone(conn: apsw.Connection, sql: str, args: tuple[Any, ...] = ()) -> Any:
    return conn.execute(sql, args).fetchone()


@contextlib.contextmanager
def write_transaction(conn: apsw.Connection) -> Iterator[apsw.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK if the block raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if not conn.get_autocommit():
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def table_info(c: apsw.Connection, table: str) -> tuple[list[str], list[int], bool]:
    """(columns as the session extension sees them, pk flags, has implicit rowid).

    Tables without a declared primary key get the rowid as a leading column
    (session object config "rowid")."""
    cols: list[str] = []
    pk: list[int] = []
    for _cid, name, _type, _notnull, _dflt, pkpos in fetchall(
        c, f"PRAGMA main.table_info({quote_ident(table)})"
    ):
        cols.append(name)
        pk.append(pkpos)
    if not cols:
        raise JournalError(f"no such table: {table}")
    if not any(pk):
        return ["rowid", *cols], [1] + [0] * len(cols), True
    return cols, pk, False


def table_rows_patchset(
    c: apsw.Connection, table: str, where: str = "", args: tuple[Any, ...] = ()
) -> bytes:
    """A patchset inserting every row of ``table`` (optionally filtered)."""
    cols, pk, rowid = table_info(c, table)
    sel = ", ".join(("rowid" if rowid and i == 0 else quote_ident(n)) for i, n in enumerate(cols))
    rows = c.execute(f"SELECT {sel} FROM main.{quote_ident(table)} {where}", args)
    body = b"".join(patchset.encode_insert(r) for r in rows)
    return patchset.encode_table(table, pk) + body if body else b""
