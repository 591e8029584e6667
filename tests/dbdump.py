"""Independent snapshots of a database for comparisons in tests.

Written with plain apsw, not the library, so a bug in the library's own
comparison code cannot hide a bug in replication.
"""

from __future__ import annotations

from typing import Any

import apsw

# hctserver's own objects: the system tables (hct_local holds per-file state,
# never replicated) and the guard triggers, which carry random names.
SYSTEM = ("hct_journal", "hct_baseline", "hct_local")


# The session extension compares reals numerically, so an UPDATE that only
# flips the sign of a zero is not a change to it (docs/JOURNAL.md, limits).
# Comparisons after random UPDATEs therefore see -0.0 as 0.0; the sign of an
# inserted -0.0 is checked exactly in test_journal.py.
ZERO_SIGN_MATTERS = False


def norm(v: Any) -> Any:
    """A value with its storage class made explicit."""
    if isinstance(v, float):
        if v == 0.0 and not ZERO_SIGN_MATTERS:
            v = 0.0
        return ("real", v.hex())
    if isinstance(v, int):
        return ("int", v)
    if isinstance(v, str):
        return ("text", v)
    if isinstance(v, bytes):
        return ("blob", v)
    return ("null",)


def user_tables(conn: apsw.Connection) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type='table' AND name NOT LIKE 'sqlite_%'"
            " AND name NOT IN ('hct_journal','hct_baseline','hct_local') ORDER BY name"
        )
    ]


def tables(path: str) -> dict[str, list[tuple[Any, ...]]]:
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        out = {}
        for t in user_tables(conn):
            q = '"' + t.replace('"', '""') + '"'
            has_pk = any(r[5] for r in conn.execute(f"PRAGMA table_info({q})"))
            sel = f"SELECT * FROM {q}" if has_pk else f"SELECT rowid, * FROM {q}"
            out[t] = sorted((tuple(norm(v) for v in r) for r in conn.execute(sel)), key=repr)
        return out
    finally:
        conn.close()


def schema(path: str) -> list[tuple[Any, ...]]:
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_schema"
            " WHERE name NOT IN ('hct_journal','hct_baseline','hct_local')"
            " AND name NOT LIKE 'sqlite_autoindex_hct_local%'"
            " AND NOT (type='trigger' AND name LIKE 'hct_guard_%') ORDER BY type, name"
        ).fetchall()
    finally:
        conn.close()


def journal(path: str) -> list[tuple[Any, ...]]:
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute(
            "SELECT cid, schema, data, schemacid, hash, vhash FROM hct_journal ORDER BY cid"
        ).fetchall()
    finally:
        conn.close()


def everything(path: str) -> dict[str, Any]:
    return {"tables": tables(path), "schema": schema(path), "journal": journal(path)}
