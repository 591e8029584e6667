"""What user SQL may do on a journaled connection: everything SQLite allows,
except what followers could not reproduce from the journal and what would
break replication: writing or dropping hctserver's system tables and guard
triggers, ATTACH and DETACH (another file's changes are not journaled),
objects in ``temp`` (they live in one connection, never in the journal),
and ``PRAGMA writable_schema``. A refusal says why (:attr:`Authorizer.refused`).
hctserver's own statements run inside :meth:`Authorizer.bypass`."""

from __future__ import annotations

import apsw

from .systables import GUARD_PREFIX, SYSTEM_TABLES, TXIDS

_OURS = SYSTEM_TABLES | {TXIDS}  # tables user SQL may read but not change

_REFUSED = {
    apsw.SQLITE_ATTACH: "ATTACH: changes to another database file are not journaled, so"
    " followers would never have them",
    apsw.SQLITE_DETACH: "DETACH (ATTACH is refused on a replicated database)",
    **{
        op: "objects in temp: they are not journaled; use a table in the main database"
        for op in (
            apsw.SQLITE_CREATE_TEMP_TABLE,
            apsw.SQLITE_CREATE_TEMP_INDEX,
            apsw.SQLITE_CREATE_TEMP_VIEW,
            apsw.SQLITE_CREATE_TEMP_TRIGGER,
        )
    },
}
_WRITE_OPS = frozenset({apsw.SQLITE_INSERT, apsw.SQLITE_UPDATE, apsw.SQLITE_DELETE})
_DDL_OPS = frozenset({apsw.SQLITE_DROP_TABLE, apsw.SQLITE_ALTER_TABLE})
_TRIGGER_OPS = frozenset({apsw.SQLITE_CREATE_TRIGGER, apsw.SQLITE_DROP_TRIGGER})
# what SQLite asks while it prepares a DROP TABLE (anything else ends it)
_DROPPING_OPS = frozenset(
    {apsw.SQLITE_DELETE, apsw.SQLITE_DROP_TABLE, apsw.SQLITE_DROP_TRIGGER, apsw.SQLITE_READ}
)


class Authorizer:
    """Installed on one connection; see the module's docstring."""

    def __init__(self, conn: apsw.Connection) -> None:
        self._internal = 0
        self._dropping: str | None = None  # the table a DROP TABLE being prepared drops
        self.refused: str | None = None  # why the last refused statement was refused
        conn.set_authorizer(self)

    def bypass(self) -> Authorizer:
        """``with auth.bypass():`` hctserver's own statements (a plain class
        instead of a generator: this is on every commit's path)."""
        return self

    def __enter__(self) -> None:
        self._internal += 1

    def __exit__(self, *exc: object) -> None:
        self._internal -= 1

    def __call__(
        self, op: int, p1: str | None, p2: str | None, dbname: str | None, trigger: str | None
    ) -> int:
        if self._internal:
            # hctserver's statements; but a user's trigger they fire is user code
            if trigger is None or trigger.startswith(GUARD_PREFIX):
                return apsw.SQLITE_OK
            self.refused = (
                f"refused on a replicated database: trigger {trigger} acts inside"
                " hctserver's own statements"
            )
            return apsw.SQLITE_DENY
        why = _REFUSED.get(op)
        if why is None and op == apsw.SQLITE_PRAGMA and (p1 or "").lower() == "writable_schema":
            why = "PRAGMA writable_schema: schema edits behind SQLite's back cannot be journaled"
        pragma = (p1 or "").lower() if op == apsw.SQLITE_PRAGMA else ""
        if why is None and pragma == "query_only" and p2 is not None:
            why = "PRAGMA query_only: hctserver keeps a follower's connections read-only"
        if why is not None:
            self.refused = f"refused on a replicated database: {why}"
            return apsw.SQLITE_DENY
        if op in _WRITE_OPS:
            return apsw.SQLITE_DENY if p1 in _OURS else apsw.SQLITE_OK
        if op in _DDL_OPS and (p1 in _OURS or p2 in _OURS):
            return apsw.SQLITE_DENY
        if op == apsw.SQLITE_DROP_TABLE:
            self._dropping = p1  # its guard triggers go with it, authorized next
        elif op not in _DROPPING_OPS:
            self._dropping = None
        if op in _TRIGGER_OPS and p1 is not None and p1.startswith(GUARD_PREFIX):
            if op == apsw.SQLITE_DROP_TRIGGER and p2 is not None and p2 == self._dropping:
                return apsw.SQLITE_OK
            return apsw.SQLITE_DENY
        if op in _TRIGGER_OPS and p2 in _OURS:
            self.refused = f"refused on a replicated database: a trigger on {p2} (hctserver's)"
            return apsw.SQLITE_DENY
        return apsw.SQLITE_OK
