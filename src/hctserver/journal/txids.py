"""Client transaction ids: a retried transaction is answered, not applied twice.

A client (``hctserver.connect()`` forwarding a write, the DB-API driver, any
HTTP client) may give a transaction an id. The leader records the id and
the answer it gave in ``hct_txid``, inside the transaction itself: so the
record commits exactly when the transaction does, is journaled and
replicated like any row, and survives a failover (the new leader has it).
A retry with a known id gets the recorded answer. Records older than the
window are deleted by the next recording transaction.

``hct_txid(id TEXT PRIMARY KEY, cid INTEGER, at INTEGER, outcome TEXT)``:
``at`` is the leader's wall clock (seconds), ``outcome`` the answer (JSON).
"""

from __future__ import annotations

import time

import apsw

from .sqlutil import fetchone
from .systables import TXIDS, read_tail

WINDOW = 24 * 3600  # seconds a transaction id is remembered at least

CREATE = (
    f"CREATE TABLE IF NOT EXISTS {TXIDS}(id TEXT PRIMARY KEY, cid INTEGER NOT NULL,"
    " at INTEGER NOT NULL, outcome TEXT NOT NULL)"
)
INDEX = f"CREATE INDEX IF NOT EXISTS {TXIDS}_at ON {TXIDS}(at)"


def exists(conn: apsw.Connection) -> bool:
    return fetchone(conn, "SELECT 1 FROM sqlite_schema WHERE name=?", (TXIDS,)) is not None


def recall(conn: apsw.Connection, txid: str) -> tuple[int, str] | None:
    """(cid, outcome) recorded for ``txid``, or None."""
    if not exists(conn):
        return None
    row = fetchone(conn, f"SELECT cid, outcome FROM {TXIDS} WHERE id=?", (txid,))
    return None if row is None else (int(row[0]), str(row[1]))


def record(conn: apsw.Connection, txid: str, outcome: str, window: float) -> int:
    """In the open write transaction (its writer lock held, the table made):
    record ``txid``; returns the cid the transaction will commit as. Records
    older than ``window`` seconds go in the same transaction (whichever
    connection records: a lookup in the index on ``at`` says whether any)."""
    cid = read_tail(conn)[0] + 1  # the writer lock is held: nobody else appends
    now = int(time.time())
    cutoff = now - int(window)
    oldest = fetchone(conn, f"SELECT min(at) FROM {TXIDS}")  # the index on at: one lookup
    if oldest is not None and oldest[0] is not None and oldest[0] < cutoff:
        conn.execute(f"DELETE FROM {TXIDS} WHERE at < ?", (cutoff,))
    conn.execute(
        f"INSERT INTO {TXIDS}(id, cid, at, outcome) VALUES(?, ?, ?, ?)", (txid, cid, now, outcome)
    )
    return cid
