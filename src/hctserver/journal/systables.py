"""The system tables of a replication-enabled database, and their SQL.

::

    hct_journal(cid INTEGER PRIMARY KEY, schema TEXT, data BLOB,
                schemacid INTEGER, hash BLOB, vhash BLOB)
    hct_baseline(cid INTEGER, schemacid INTEGER, hash BLOB)      -- one row
    hct_local(key TEXT PRIMARY KEY, value)                       -- not replicated

``vhash`` is our extra journal column: the version hash H folded up to that
row, so H at any cid is one primary-key lookup. It is NULL for an entry
stored above a hole (received out of order, not yet applied to the user's
tables), which also makes "is this row applied" a property of the row.

``hct_local`` holds what belongs to this file only: the role the last node
gave it, and the schema fingerprint of the guard (:mod:`hctserver.journal.guard`).
"""

from __future__ import annotations

from typing import Any

import apsw

from .sqlutil import fetchall, fetchone

JOURNAL = "hct_journal"
BASELINE = "hct_baseline"
LOCAL = "hct_local"
SYSTEM_TABLES = frozenset({JOURNAL, BASELINE, LOCAL})
TXIDS = "hct_txid"  # replicated: client transaction ids and their outcomes (txids.py)
GUARD_PREFIX = "hct_guard_"  # hctserver's own triggers (see guard.py)

CREATE_JOURNAL = (
    "CREATE TABLE IF NOT EXISTS hct_journal(cid INTEGER PRIMARY KEY, schema TEXT NOT NULL,"
    " data BLOB NOT NULL, schemacid INTEGER NOT NULL, hash BLOB NOT NULL, vhash BLOB)"
)
CREATE_BASELINE = (
    "CREATE TABLE IF NOT EXISTS hct_baseline(cid INTEGER NOT NULL,"
    " schemacid INTEGER NOT NULL, hash BLOB NOT NULL)"
)
CREATE_LOCAL = "CREATE TABLE IF NOT EXISTS hct_local(key TEXT PRIMARY KEY, value)"
INSERT_ENTRY = (
    "INSERT INTO hct_journal(cid, schema, data, schemacid, hash, vhash) VALUES(?,?,?,?,?,?)"
)
INSERT_UNAPPLIED = (
    "INSERT INTO hct_journal(cid, schema, data, schemacid, hash, vhash) VALUES(?,?,?,?,?,NULL)"
)
# Position: the newest applied row, else the baseline. One statement, so atomic.
POSITION = (
    "SELECT cid, vhash FROM (SELECT cid, vhash FROM hct_journal WHERE vhash IS NOT NULL"
    " ORDER BY cid DESC LIMIT 1) UNION ALL SELECT cid, hash FROM hct_baseline"
)
# What the next leader commit builds on: (cid, schemacid for the next entry, H).
TAIL = (
    "SELECT cid, iif(schema<>'', cid, schemacid), vhash FROM (SELECT cid, schema,"
    " schemacid, vhash FROM hct_journal ORDER BY cid DESC LIMIT 1)"
    " UNION ALL SELECT cid, schemacid, hash FROM hct_baseline"
)
# User objects as a replay would create them (no system tables, no guards).
USER_OBJECTS_WHERE = (
    "name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT IN ('hct_journal', 'hct_baseline',"
    " 'hct_local') AND NOT (type='trigger' AND name LIKE 'hct\\_guard\\_%' ESCAPE '\\')"
)

# Bytes of one entry's text (schema and data), as the journal's sizes count them.
ENTRY_BYTES = "length(CAST(schema AS BLOB))+length(data)"

Tail = tuple[int, int, bytes]


def read_position(conn: apsw.Connection) -> tuple[int, bytes]:
    cid, h = max(fetchall(conn, POSITION), key=lambda r: r[0])
    return cid, bytes(h)


FORMATS = ("session", "hctree")  # of the entries a leader writes (hctserver.journal.codec)
HCTREE_BASE = 6  # a fresh hctree journal's baseline cid (FORMAT.md, section 2)


def read_tail(conn: apsw.Connection) -> Tail:
    cid, schemacid, h = max(fetchall(conn, TAIL), key=lambda r: r[0])
    return cid, schemacid, bytes(h)


def get_local(conn: apsw.Connection, key: str) -> Any:
    row = fetchone(conn, "SELECT value FROM hct_local WHERE key=?", (key,))
    return None if row is None else row[0]


def set_local(conn: apsw.Connection, key: str, value: Any) -> None:
    conn.execute("INSERT OR REPLACE INTO hct_local(key, value) VALUES(?, ?)", (key, value))
