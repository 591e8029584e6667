"""Snapshots: a database's user tables, schema and position in a file of its own.

A snapshot is an ordinary replication database whose journal is empty and
whose baseline is the position it was taken at: what a follower that
replayed the whole journal would hold, less the journal itself. It is what
a leader sends a follower that cannot replay (bootstrap), and what
``hctserver backup`` writes.

* :func:`make` builds one from one read transaction of the source (the
  source keeps committing meanwhile). Rows are copied by SQLite, table by
  table, rowids included; indexes, views and triggers are created after
  the rows, so they are built once.
* :func:`check` examines a file received from a leader before anything
  trusts it: SQLite's own ``quick_check``, the system tables' shape, the
  position it claims, and the schema, which must pass the same policy as
  schema text in a journal entry. It then remakes the file's guards and
  local state as this node's own.
* :func:`install` replaces a database's contents with a checked file in one
  SQLite write transaction (the backup API): a crash at any moment leaves
  the old contents or the new, never a mix, and readers in any process see
  one or the other.

This module has no networking.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import apsw

from .. import faults
from ..errors import ConfigError, DiskFullError, JournalError, ProtocolError
from . import guard
from .policy import SchemaPolicy
from .sqlutil import fetchall, fetchone, quote_ident
from .store import Store
from .systables import (
    BASELINE,
    CREATE_BASELINE,
    CREATE_JOURNAL,
    CREATE_LOCAL,
    JOURNAL,
    LOCAL,
    SYSTEM_TABLES,
    USER_OBJECTS_WHERE,
    set_local,
)

log = logging.getLogger("hctserver")

CACHE_KIB = 32 << 10  # page cache of the connections here: bounds their memory
INSTALL_STEP_PAGES = 64  # pages copied per backup step (a crash point in tests)
_OBJECT_ORDER = (
    "CASE type WHEN 'table' THEN 0 WHEN 'index' THEN 1 WHEN 'view' THEN 2 ELSE 3 END, rowid"
)


@dataclass(frozen=True)
class SnapshotInfo:
    """Where a snapshot stands: the position (cid, H) and the schemacid a
    transaction after it runs against; its size and what it holds."""

    cid: int
    schemacid: int
    hash: bytes
    size: int = 0
    tables: int = 0
    rows: int = 0


def _expected_sql(create: str) -> str:
    return create.replace(" IF NOT EXISTS", "", 1)


_SYSTEM_SQL = {
    JOURNAL: _expected_sql(CREATE_JOURNAL),
    BASELINE: _expected_sql(CREATE_BASELINE),
    LOCAL: _expected_sql(CREATE_LOCAL),
}


def _open(path: str, *, readonly: bool = False) -> apsw.Connection:
    flags = (
        apsw.SQLITE_OPEN_READONLY
        if readonly
        else (apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE)
    )
    conn = apsw.Connection(path, flags=flags, vfs=faults.vfs_name())
    conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    guard.allow(conn)
    return conn


def remove_files(path: str) -> None:
    """Remove a database file and its journals, if there."""
    for suffix in ("", "-journal", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path)


def fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- making ----------------------------------------------------------------------


def make(db: Store, out: str, *, role: str | None = None) -> SnapshotInfo:
    """Write a snapshot of ``db`` to ``out`` (replaced if it exists; written
    under a temporary name and renamed, so ``out`` is whole or absent)."""
    if os.path.abspath(out) == db.path:
        raise ConfigError(f"{out} is the database itself: write the snapshot to another file")
    tmp = out + ".part"
    remove_files(tmp)
    try:
        info = _build(db.path, tmp, role)
        _publish(tmp, out)
    except apsw.FullError as e:
        remove_files(tmp)
        raise DiskFullError(f"the disk is full: writing the snapshot {out} failed ({e})") from None
    except BaseException:
        remove_files(tmp)
        raise
    return SnapshotInfo(info.cid, info.schemacid, info.hash, os.path.getsize(out),
                        info.tables, info.rows)  # fmt: skip


def _build(src_path: str, path: str, role: str | None) -> SnapshotInfo:
    conn = _open(path)
    try:
        conn.execute("PRAGMA journal_mode=OFF").fetchall()
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("ATTACH ? AS src", (src_path,))
        (page_size,) = fetchone(conn, "PRAGMA src.page_size")
        conn.execute(f"PRAGMA main.page_size={int(page_size)}")
        conn.execute("BEGIN")  # one read transaction of the source, to COMMIT
        try:
            cid, h, schemacid = _source_position(conn)
            objects = _user_objects(conn, "src")
            for typ, _name, sql in objects:
                if typ == "table":
                    conn.execute(sql)  # virtual tables make their shadow tables here
            tables, rows = _copy_rows(conn, _shadow_tables(conn, "src"))
            conn.execute("COMMIT")
        except BaseException:
            if not conn.get_autocommit():
                conn.execute("ROLLBACK")
            raise
        conn.execute("DETACH src")
        conn.execute("BEGIN")
        for typ, _name, sql in objects:
            if typ != "table":
                conn.execute(sql)
        conn.execute(CREATE_JOURNAL)
        conn.execute(CREATE_BASELINE)
        conn.execute(CREATE_LOCAL)
        conn.execute("INSERT INTO hct_baseline VALUES(?, ?, ?)", (cid, schemacid, h))
        guard.protect(conn)
        if role is not None:
            set_local(conn, "role", role)
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL").fetchall()  # as every replication database
    finally:
        conn.close()
    return SnapshotInfo(cid, schemacid, h, 0, tables, rows)


def _source_position(conn: apsw.Connection) -> tuple[int, bytes, int]:
    """(cid, H, schemacid for the next entry) of the source's snapshot."""
    bcid, bschemacid, bhash = fetchone(conn, "SELECT cid, schemacid, hash FROM src.hct_baseline")
    row = fetchone(
        conn,
        "SELECT cid, vhash FROM src.hct_journal WHERE vhash IS NOT NULL ORDER BY cid DESC LIMIT 1",
    )
    cid, h = (row[0], bytes(row[1])) if row else (bcid, bytes(bhash))
    (sc,) = fetchone(
        conn,
        "SELECT max(iif(schema<>'', cid, schemacid)) FROM src.hct_journal WHERE cid<=?",
        (cid,),
    )
    return cid, h, max(bschemacid, sc or 0)


def _user_objects(conn: apsw.Connection, schema: str) -> list[tuple[str, str, str]]:
    """(type, name, sql) of the user's objects in ``schema``, in the order to
    create them; not the shadow tables, which their virtual tables make."""
    shadow = _shadow_tables(conn, schema)
    return [
        (typ, name, sql)
        for typ, name, sql in fetchall(
            conn,
            f"SELECT type, name, sql FROM {schema}.sqlite_schema WHERE sql IS NOT NULL"
            f" AND {USER_OBJECTS_WHERE} ORDER BY {_OBJECT_ORDER}",
        )
        if not (typ == "table" and name.lower() in shadow)
    ]


def _shadow_tables(conn: apsw.Connection, schema: str) -> set[str]:
    return {
        name.lower()
        for (name,) in fetchall(
            conn, "SELECT name FROM pragma_table_list WHERE schema=? AND type='shadow'", (schema,)
        )
    }


def _copy_rows(conn: apsw.Connection, shadow: set[str]) -> tuple[int, int]:
    """Copy every user table's rows (and shadow tables': a virtual table's
    index as it is) from ``src`` to ``main``; (tables, rows)."""
    tables = rows = 0
    for name, typ, without_rowid in fetchall(
        conn, "SELECT name, type, wr FROM pragma_table_list WHERE schema='src'"
    ):
        low = name.lower()
        if typ not in ("table", "shadow") or low in SYSTEM_TABLES or low.startswith("sqlite_"):
            continue
        cols = [
            quote_ident(col)
            for col, hidden in fetchall(
                conn, "SELECT name, hidden FROM pragma_table_xinfo(?, 'src')", (name,)
            )
            if hidden == 0  # not generated, not a virtual table's hidden column
        ]
        if not without_rowid:
            lower = {c.strip('"').lower() for c in cols}
            rid = next((r for r in ("rowid", "_rowid_", "oid") if r not in lower), None)
            if rid is not None:
                cols.insert(0, rid)
        q = quote_ident(name)
        if low in shadow:
            conn.execute(f"DELETE FROM main.{q}")  # what creating the table put there
        collist = ", ".join(cols)
        conn.execute(f"INSERT INTO main.{q}({collist}) SELECT {collist} FROM src.{q}")
        rows += conn.changes()
        tables += 1
    if fetchone(conn, "SELECT 1 FROM src.sqlite_schema WHERE name='sqlite_sequence'"):
        conn.execute("DELETE FROM main.sqlite_sequence")
        conn.execute("INSERT INTO main.sqlite_sequence SELECT * FROM src.sqlite_sequence")
    return tables, rows


# --- checking a received one -----------------------------------------------------


def check(path: str, cid: int, h: bytes, *, role: str = "follower") -> SnapshotInfo:
    """Examine a snapshot received from a leader, which claimed position
    (``cid``, ``h``); raise ProtocolError saying what is wrong. On success
    the file's guards and local state are remade as this node's own."""
    try:
        conn = _open(path)
        try:
            return _check(conn, cid, h, role)
        finally:
            conn.close()
    except apsw.Error as e:
        raise ProtocolError(f"the snapshot from the leader is damaged: {e}") from None


def _check(conn: apsw.Connection, cid: int, h: bytes, role: str) -> SnapshotInfo:
    bad = "the snapshot from the leader is refused: "
    found = [r[0] for r in fetchall(conn, "PRAGMA quick_check")]
    if found != ["ok"]:
        raise ProtocolError(bad + f"SQLite finds it damaged ({'; '.join(found[:3])})")
    for name, want in _SYSTEM_SQL.items():
        row = fetchone(conn, "SELECT sql FROM sqlite_schema WHERE type='table' AND name=?", (name,))
        if row is None or row[0] != want:
            raise ProtocolError(bad + f"its {name} table is missing or not hctserver's")
    base = fetchall(conn, "SELECT cid, schemacid, hash FROM hct_baseline")
    if len(base) != 1 or base[0][0] != cid or base[0][2] != h:
        raise ProtocolError(bad + f"it is not at the position it was announced at (cid {cid})")
    schemacid = base[0][1]
    if not isinstance(schemacid, int) or not 0 <= schemacid <= cid:
        raise ProtocolError(bad + f"its baseline schemacid {schemacid!r} is impossible")
    if fetchone(conn, "SELECT 1 FROM hct_journal LIMIT 1"):
        raise ProtocolError(bad + "its journal is not empty")
    _check_schema(conn, bad)
    conn.execute("BEGIN")
    for (name,) in fetchall(
        conn,
        "SELECT name FROM sqlite_schema WHERE type='trigger'"
        " AND name LIKE 'hct\\_guard\\_%' ESCAPE '\\'",
    ):
        conn.execute(f"DROP TRIGGER main.{quote_ident(name)}")  # ours are made below
    conn.execute("DELETE FROM hct_local")
    guard.protect(conn)
    set_local(conn, "role", role)
    conn.execute("COMMIT")
    (tables,) = fetchone(
        conn, f"SELECT count(*) FROM sqlite_schema WHERE type='table' AND {USER_OBJECTS_WHERE}"
    )
    return SnapshotInfo(cid, schemacid, h, os.path.getsize(conn.filename), tables)


def _check_schema(conn: apsw.Connection, bad: str) -> None:
    """Every user object must be one that schema text in an entry could make:
    create them all again in an empty database under the same policy."""
    objects = [sql for _typ, _name, sql in _user_objects(conn, "main")]
    scratch = apsw.Connection(":memory:")
    try:
        for create in _SYSTEM_SQL.values():  # so that what touches them is refused by name
            scratch.execute(create)
        for sql in objects:
            policy = SchemaPolicy()
            try:
                policy.run(scratch, sql)
            except apsw.Error as e:
                what = policy.refused or str(e)
                raise ProtocolError(bad + f"its schema holds {what} ({sql[:80]!r})") from None
    finally:
        scratch.close()


# --- installing ------------------------------------------------------------------


def install(db: Store, image: str, *, aside: str | None = None) -> None:
    """Replace ``db``'s contents with the checked snapshot ``image``, in one
    write transaction. With ``aside``, first keep a copy of the old contents
    there (a consistent one, made by SQLite, and synced)."""
    if aside is not None:
        copy(db, aside)
    src = _open(image, readonly=True)
    dest = db.open_connection()
    try:
        dest.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        (want,) = fetchone(dest, "PRAGMA page_size")
        (have,) = fetchone(src, "PRAGMA page_size")
        if want != have:  # a WAL database keeps its page size: convert the image
            src.close()
            _repage(image, want)
            src = _open(image, readonly=True)
        with db.share:  # the writers of this process wait (as for a checkpoint)
            with dest.backup("main", src, "main") as b:
                while not b.done:
                    b.step(INSTALL_STEP_PAGES)
                    faults.kill_point("install-step")
            db.share.tail = None
            db.share.schema_epoch += 1
    except apsw.FullError as e:
        raise DiskFullError(f"the disk is full: installing the snapshot failed ({e})") from None
    except apsw.Error as e:  # busy, I/O: nothing was installed
        raise JournalError(f"installing the snapshot into {db.path} failed: {e}") from None
    finally:
        src.close()
        dest.close()


def _repage(path: str, page_size: int) -> None:
    conn = _open(path)
    try:
        conn.execute("PRAGMA journal_mode=DELETE").fetchall()
        conn.execute(f"PRAGMA page_size={page_size}")
        conn.execute("VACUUM")
    finally:
        conn.close()


def copy(db: Store, out: str) -> None:
    """A consistent copy of ``db``'s file at ``out`` (SQLite's backup API)."""
    tmp = out + ".part"
    remove_files(tmp)
    src = db.open_connection()
    dest = _open(tmp)
    try:
        with dest.backup("main", src, "main") as b:
            b.step(-1)
    except apsw.Error as e:
        dest.close()
        remove_files(tmp)
        raise JournalError(f"cannot copy {db.path} to {out}: {e}") from None
    finally:
        src.close()
    dest.close()
    _publish(tmp, out)


def _publish(tmp: str, out: str) -> None:
    """Sync ``tmp`` and rename it to ``out``: ``out`` is whole or absent."""
    fsync_file(tmp)
    remove_files(out)  # an older file's WAL must not meet this one
    os.replace(tmp, out)
    fsync_dir(out)


def describe(info: SnapshotInfo) -> dict[str, Any]:
    return {
        "cid": info.cid,
        "schemacid": info.schemacid,
        "hash": info.hash.hex(),
        "bytes": info.size,
        "tables": info.tables,
        "rows": info.rows,
    }
