"""What a leader's entries may do to a follower's database.

A follower runs an entry's ``schema`` text and applies its ``data``; a
hostile or broken leader must not be able to do anything else with that.
The rules are enforced by SQLite itself, not by parsing SQL:

* **Schema text** runs under :class:`SchemaPolicy`, an authorizer that
  allows only the DDL of the main database's own tables, indexes, views,
  triggers and (built-in) virtual tables, and setting ``PRAGMA
  user_version``/``application_id``: no ATTACH or DETACH, no other PRAGMA,
  no transaction control, nothing in ``temp``, nothing on hctserver's system
  tables or guards, and no rows written except by the DDL statement that
  creates or drops their table.
* **Data** is applied with :class:`DataPolicy` as the changeset filter: it
  may touch only user tables that exist in ``main``.

A violation raises ProtocolError naming the entry's cid; the batch rolls
back, so nothing of it is applied.
"""

from __future__ import annotations

import apsw

from .systables import GUARD_PREFIX, SYSTEM_TABLES

_DDL_NAMED = {  # action -> which argument names the object, which its table
    apsw.SQLITE_CREATE_TABLE: (0, 0),
    apsw.SQLITE_DROP_TABLE: (0, 0),
    apsw.SQLITE_CREATE_INDEX: (0, 1),
    apsw.SQLITE_DROP_INDEX: (0, 1),
    apsw.SQLITE_CREATE_VIEW: (0, 0),
    apsw.SQLITE_DROP_VIEW: (0, 0),
    apsw.SQLITE_CREATE_TRIGGER: (0, 1),
    apsw.SQLITE_DROP_TRIGGER: (0, 1),
    apsw.SQLITE_CREATE_VTABLE: (0, 0),
    apsw.SQLITE_DROP_VTABLE: (0, 0),
}
_ROW_WRITES = frozenset({apsw.SQLITE_INSERT, apsw.SQLITE_UPDATE, apsw.SQLITE_DELETE})
_HARMLESS = frozenset(
    {apsw.SQLITE_READ, apsw.SQLITE_SELECT, apsw.SQLITE_FUNCTION, apsw.SQLITE_RECURSIVE,
     apsw.SQLITE_REINDEX}
)  # fmt: skip
_CATALOG = frozenset({"sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_sequence"})
_SET_PRAGMAS = frozenset({"user_version", "application_id"})  # what a leader may journal
VTABLE_MODULES = frozenset({"fts3", "fts4", "fts5", "rtree", "rtree_i32", "geopoly"})
_NAMES = {
    getattr(apsw, f"SQLITE_{n}"): n.replace("_", " ")
    for n in (
        "ATTACH",
        "DETACH",
        "PRAGMA",
        "TRANSACTION",
        "SAVEPOINT",
        "ANALYZE",
        "COPY",
        "CREATE_TEMP_TABLE",
        "CREATE_TEMP_INDEX",
        "CREATE_TEMP_VIEW",
        "CREATE_TEMP_TRIGGER",
        "DROP_TEMP_TABLE",
        "DROP_TEMP_INDEX",
        "DROP_TEMP_VIEW",
        "DROP_TEMP_TRIGGER",
    )
    if hasattr(apsw, f"SQLITE_{n}")
}


def _reserved(name: str | None) -> bool:
    if not name:
        return False
    low = name.lower()
    return low in SYSTEM_TABLES or low.startswith(("sqlite_", GUARD_PREFIX))


class SchemaPolicy:
    """The authorizer for one entry's schema text, statement by statement."""

    def __init__(self) -> None:
        self.refused: str | None = None  # what was refused, for the error
        self._owned: set[str] = set()  # tables this statement creates or drops

    def run(self, conn: apsw.Connection, schema: str) -> None:
        """Run ``schema`` on ``conn`` under this policy (raises apsw.AuthError)."""
        conn.authorizer = self
        conn.exec_trace = self._next_statement
        try:
            for _ in conn.execute(schema):
                pass
        finally:
            conn.exec_trace = None
            conn.authorizer = None

    def _next_statement(self, cursor: object, sql: str, bindings: object) -> bool:
        # SQLite authorizes a statement while preparing it, and apsw calls this
        # just before running it: what the next statement may write starts empty.
        self._owned = set()
        return True

    def __call__(
        self, op: int, p1: str | None, p2: str | None, dbname: str | None, trigger: str | None
    ) -> int:
        if op in _HARMLESS:
            return apsw.SQLITE_OK
        named = _DDL_NAMED.get(op)
        if named is not None:
            obj = (p1, p2)[named[0]]
            table = (p1, p2)[named[1]]
            if dbname != "main":
                return self._refuse(f"a schema change outside the main database ({dbname})")
            if obj and obj.lower().startswith("sqlite_autoindex_") and not _reserved(table):
                return apsw.SQLITE_OK  # the index of a UNIQUE or PRIMARY KEY constraint
            if op == apsw.SQLITE_CREATE_TABLE and (obj or "").lower() == "sqlite_sequence":
                return apsw.SQLITE_OK  # made by the first AUTOINCREMENT table
            if (
                op == apsw.SQLITE_DROP_TRIGGER
                and (obj or "").lower().startswith(GUARD_PREFIX)
                and (table or "").lower() in self._owned
                and not _reserved(table)
            ):
                return apsw.SQLITE_OK  # a guard goes with the table this statement drops
            for name in (obj, table):
                if _reserved(name):
                    return self._refuse(f"a schema change of hctserver's or SQLite's own {name!r}")
            if op in (apsw.SQLITE_CREATE_VTABLE, apsw.SQLITE_DROP_VTABLE) and (
                (p2 or "").lower() not in VTABLE_MODULES
            ):
                return self._refuse(f"a virtual table of module {p2!r}")
            if obj:
                self._owned.add(obj.lower())
            return apsw.SQLITE_OK
        if op == apsw.SQLITE_PRAGMA and (p1 or "").lower() in _SET_PRAGMAS:
            if p2 is None or dbname not in (None, "main"):
                return self._refuse(f"PRAGMA {p1} without a value, or outside main")
            return apsw.SQLITE_OK  # the leader's PRAGMA user_version = N (journaled)
        if op == apsw.SQLITE_ALTER_TABLE:
            if p1 != "main" or _reserved(p2):
                return self._refuse(f"ALTER TABLE of {p1}.{p2}")
            return apsw.SQLITE_OK
        if op in _ROW_WRITES:
            name = (p1 or "").lower()
            if name in _CATALOG and dbname in ("main", "temp"):
                return apsw.SQLITE_OK  # the DDL statement's own bookkeeping
            if name in self._owned or any(name.startswith(o + "_") for o in self._owned):
                return apsw.SQLITE_OK  # rows of the table this statement creates or drops
            return self._refuse(f"a row write to {p1} in schema text")
        return self._refuse(_NAMES.get(op, f"SQLite action {op}"))

    def _refuse(self, what: str) -> int:
        if self.refused is None:
            self.refused = what
        return apsw.SQLITE_DENY


_USER_TABLES = (
    "SELECT name FROM pragma_table_list WHERE schema='main' AND type IN ('table', 'shadow')"
)


def user_tables(conn: apsw.Connection) -> frozenset[str]:
    """The tables of ``main`` a leader's data may write."""
    return frozenset(name for (name,) in conn.execute(_USER_TABLES) if not _reserved(name))


class DataPolicy:
    """The changeset filter: only user tables (and virtual tables' shadow
    tables, which capture records like any other) that exist in ``main``.

    ``tables`` (from :func:`user_tables`) skips reading them again; use
    :class:`DataPolicies` to keep them across transactions."""

    __slots__ = ("refused", "tables")

    def __init__(self, conn: apsw.Connection, tables: frozenset[str] | None = None) -> None:
        self.tables = user_tables(conn) if tables is None else tables
        self.refused: str | None = None

    def __call__(self, table: str) -> bool:
        if table in self.tables:
            return True
        if self.refused is None:
            self.refused = f"changes to {table!r}, which is not a table of the follower's schema"
        return False


class DataPolicies:
    """A :class:`DataPolicy` for each transaction of one connection, its
    tables read again only when the schema changed: :meth:`get` compares
    ``PRAGMA schema_version`` (read inside the caller's write transaction,
    so it is the schema the data meets), which every change of the schema
    moves, whoever makes it."""

    __slots__ = ("_cookie", "_tables")

    def __init__(self) -> None:
        self._cookie: int | None = None
        self._tables: frozenset[str] = frozenset()

    def get(self, conn: apsw.Connection, cookie: int | None = None) -> DataPolicy:
        """A fresh policy (nothing refused yet) for ``conn``'s current schema;
        ``cookie``: its schema_version, if the caller read it already."""
        if cookie is None:
            cookie = schema_cookie(conn)
        if cookie != self._cookie:
            self._tables = user_tables(conn)
            self._cookie = cookie
        return DataPolicy(conn, self._tables)

    def forget(self) -> None:
        """Read the tables again next time, whatever the cookie says."""
        self._cookie = None


def schema_cookie(conn: apsw.Connection) -> int:
    for (cookie,) in conn.execute("PRAGMA schema_version"):
        return int(cookie)
    raise apsw.SQLError("PRAGMA schema_version returned nothing")  # not reached
