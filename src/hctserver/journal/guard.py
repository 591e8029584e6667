"""Guards against writes that bypass the journal.

A plain SQLite client (the ``sqlite3`` shell, Python's ``sqlite3``, another
program) that writes to a replicated database would make it diverge
silently: its rows never reach the journal. Two mechanisms stop that:

* **Refused row writes.** Every table has three ``BEFORE INSERT/UPDATE/
  DELETE`` triggers named ``hct_guard_…`` that abort with a message naming
  hctserver, unless ``sqlite_compileoption_used('HCTSERVER_JOURNALED')`` is
  true. That built-in function is false on every SQLite connection except
  hctserver's own, which override it (:func:`allow`). Follower apply runs
  with triggers off, so the guards cost it nothing; on a leader they cost
  one call per written row (and one per commit, for the journal row).
  Cheaper-looking conditions cost more: reading a pragma (``pragma_…``
  table) prepares a statement on every row.
* **Detected schema changes.** Triggers cannot stop DDL. hctserver records
  the schema as the journal left it (``PRAGMA schema_version`` and a listing
  of every object) in ``hct_local``, in the same transaction as every
  journaled or applied schema change; :func:`check` compares. Nodes run it
  every 250 ms and stop with :class:`UnjournaledWriteError` on a mismatch.

Limits: this protects against mistakes, not malice. A client that drops the
triggers and writes in one transaction before the next check, defines its
own ``sqlite_compileoption_used``, turns triggers off, or edits
``schema_version`` is caught only partly or not at all. File permissions are
the defence against a hostile local user.
"""

from __future__ import annotations

import json
import os
from typing import Any

import apsw

from .sqlutil import fetchall, quote_ident, quote_text
from .systables import GUARD_PREFIX, get_local, set_local

TOKEN = "HCTSERVER_JOURNALED"
MESSAGE = (
    "hctserver: this database is replicated, and plain SQLite writes to it are refused"
    " (the followers would never see them, or the follower would diverge). Write through"
    " hctserver.connect() on the leader's database; a follower's database is read-only"
)
_OPS = (("i", "INSERT"), ("u", "UPDATE"), ("d", "DELETE"))
_KEY_COOKIE = "schema_cookie"
_KEY_SCHEMA = "schema_objects"
_OBJECTS = (
    "SELECT type, name, tbl_name, sql FROM sqlite_schema"
    " WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY type, name"
)


def _compile_options() -> frozenset[str]:
    return frozenset(o.upper() for o in apsw.compile_options)


_OPTIONS = _compile_options()


def _option_used(*args: Any) -> int:
    name = args[0]
    if not isinstance(name, str):
        return 0
    n = name.upper()
    if n == TOKEN:
        return 1
    n = n.removeprefix("SQLITE_")
    return int(any(o == n or o.startswith(n + "=") for o in _OPTIONS))


def allow(conn: apsw.Connection) -> None:
    """Let ``conn`` through the guards: an hctserver connection journals its writes."""
    conn.create_scalar_function(
        "sqlite_compileoption_used",
        _option_used,
        1,
        deterministic=True,
        flags=apsw.SQLITE_INNOCUOUS,
    )


def _guard_sql(name: str, op: str, table: str) -> str:
    return (
        f"CREATE TRIGGER main.{quote_ident(name)} BEFORE {op} ON {quote_ident(table)}"
        f" WHEN NOT sqlite_compileoption_used('{TOKEN}')"
        f" BEGIN SELECT RAISE(ABORT, {quote_text(MESSAGE)}); END"
    )


def unguarded_tables(conn: apsw.Connection) -> list[str]:
    """Ordinary tables (user and system) that lack one of their three guards."""
    tables = [
        name
        for name, typ in fetchall(
            conn, "SELECT name, type FROM pragma_table_list WHERE schema='main'"
        )
        if typ == "table" and not name.startswith("sqlite_")
    ]
    have: dict[str, set[str]] = {}
    for tbl, name in fetchall(
        conn,
        "SELECT tbl_name, name FROM sqlite_schema WHERE type='trigger'"
        " AND name LIKE 'hct\\_guard\\_%' ESCAPE '\\'",
    ):
        have.setdefault(tbl.lower(), set()).add(name.rsplit("_", 1)[-1])
    return [t for t in tables if not {"i", "u", "d"} <= have.get(t.lower(), set())]


def protect(conn: apsw.Connection) -> None:
    """Guard every table that is not yet guarded and record the schema as
    the journal leaves it. Call inside the write transaction that changed
    the schema, so that both commit together."""
    for table in unguarded_tables(conn):
        tag = os.urandom(6).hex()
        for suffix, op in _OPS:
            conn.execute(_guard_sql(f"{GUARD_PREFIX}{tag}_{suffix}", op, table))
    conn.execute(_ORDER)
    record(conn)


# A writer whose cached tail went stale under a truncate by another process
# would append at or below the new baseline; this makes that insert fail, so
# the writer re-reads the tail (transaction.py). Not for the applier (triggers
# off there), and cheap: one lookup of the one-row baseline.
_ORDER = (
    f"CREATE TRIGGER IF NOT EXISTS main.{GUARD_PREFIX}order BEFORE INSERT ON hct_journal"
    " WHEN NEW.cid <= (SELECT cid FROM hct_baseline)"
    " BEGIN SELECT RAISE(ABORT, 'hctserver: a journal entry at or below the baseline'); END"
)


def _objects(conn: apsw.Connection) -> list[list[Any]]:
    return [list(r) for r in fetchall(conn, _OBJECTS)]


def _cookie(conn: apsw.Connection) -> int:
    return int(fetchall(conn, "PRAGMA schema_version")[0][0])


def record(conn: apsw.Connection) -> None:
    set_local(conn, _KEY_COOKIE, _cookie(conn))
    set_local(conn, _KEY_SCHEMA, json.dumps(_objects(conn)))


def recorded(conn: apsw.Connection) -> bool:
    return get_local(conn, _KEY_SCHEMA) is not None


def check(conn: apsw.Connection) -> str | None:
    """None when the schema is as the journal left it; otherwise what changed.

    Cheap when nothing changed: one read of the schema cookie. A changed
    cookie with the same objects (ANALYZE, PRAGMA optimize) is not a finding.
    """
    conn.execute("BEGIN")
    try:
        cookie = _cookie(conn)
        stored = get_local(conn, _KEY_COOKIE)
        if stored is None or stored == cookie:
            return None
        text = get_local(conn, _KEY_SCHEMA)
        now = _objects(conn)
    finally:
        conn.execute("COMMIT")
    want = json.loads(text) if text else []
    return describe(want, now)


def describe(want: list[list[Any]], now: list[list[Any]]) -> str | None:
    before = {(t, n): s for t, n, _tbl, s in want}
    after = {(t, n): s for t, n, _tbl, s in now}
    for key in sorted(set(before) | set(after)):
        typ, name = key
        if key not in after:
            return f"{typ} {name} was dropped"
        if key not in before:
            return f"{typ} {name} was created"
        if before[key] != after[key]:
            return f"{typ} {name} was altered"
    return None
