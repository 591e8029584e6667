"""Appending one entry to the journal: the next cid, its hash, H after it.

Shared by leader commits (:mod:`hctserver.journal.connection`) and by adopting an
existing database as cid 1 (:mod:`hctserver.journal.store`).
"""

from __future__ import annotations

from typing import NamedTuple

import apsw

from ..position import entry_hash, fold
from .systables import INSERT_ENTRY, Tail


class Appended(NamedTuple):
    cid: int
    schema: str
    data: bytes
    schemacid: int
    vhash: bytes

    def next_tail(self) -> Tail:
        """What the following commit builds on."""
        return self.cid, self.cid if self.schema else self.schemacid, self.vhash


def append_entry(conn: apsw.Connection, tail: Tail, schema: str, data: bytes) -> Appended:
    """Insert the journal row after ``tail`` (cid, schemacid, H) inside the
    caller's write transaction. Raises apsw.ConstraintError if that cid is
    already taken (another writer got there first)."""
    prev, schemacid, prev_h = tail
    cid = prev + 1
    h = entry_hash(cid, schema, data, schemacid)
    vh = fold(prev_h, h)
    conn.execute(INSERT_ENTRY, (cid, schema, data, schemacid, h, vh))
    return Appended(cid, schema, data, schemacid, vh)
