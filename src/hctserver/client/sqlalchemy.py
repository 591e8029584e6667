"""A SQLAlchemy 2.x dialect over :mod:`hctserver.client.dbapi`.

URLs (the dialect is registered as ``sqlite.hctserver`` and ``hctserver``)::

    sqlite+hctserver:///relative/file.db      a database file on this machine
    sqlite+hctserver:////absolute/file.db
    sqlite+hctserver://host:port              a node over HTTP
    sqlite+hctserver://host:port?tls=1&ca=/path/ca.pem&token_file=/path/token

A node's bearer token comes from ``token_file`` (read at every new
connection, so that a rotated token is picked up), ``token=`` or the URL's
password (``sqlite+hctserver://:TOKEN@host:port``). ``timeout``,
``consistency`` and ``detect_types`` go to the driver.

Transactions are the driver's ``autocommit=False`` mode: every statement,
reads included, runs in a transaction that SQLAlchemy's commit or rollback
ends (SAVEPOINTs nest in it), rather than :mod:`sqlite3`'s legacy mode that
leaves reads outside. The isolation levels are ``SERIALIZABLE`` (that) and
``AUTOCOMMIT``; no PRAGMA is run on connect.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

from sqlalchemy import exc, pool
from sqlalchemy.dialects.sqlite.base import SQLiteDialect
from sqlalchemy.engine import URL
from sqlalchemy.engine.interfaces import IsolationLevel

from ..errors import ConnectError, ConnectionLostError, StreamLostError
from ..journal.systables import SYSTEM_TABLES

_HIDDEN = SYSTEM_TABLES | {"hct_txid"}  # and the client transaction ids' table
_DRIVER_OPTIONS = {"timeout": float, "detect_types": int}
_REMOTE_OPTIONS = ("token", "token_file", "ca", "consistency")
_TRUE = ("1", "true", "yes", "on")


class HctDialect(SQLiteDialect):
    """SQLite's SQL dialect, hctserver's driver."""

    driver = "hctserver"
    default_paramstyle = "qmark"
    supports_statement_cache = True
    returns_native_bytes = True
    description_encoding = None

    @classmethod
    def import_dbapi(cls) -> ModuleType:
        from . import dbapi

        return dbapi

    @classmethod
    def get_pool_class(cls, url: URL) -> type[pool.Pool]:
        return pool.QueuePool

    def create_connect_args(self, url: URL) -> tuple[list[Any], dict[str, Any]]:
        query = dict(url.query)
        opts: dict[str, Any] = {"autocommit": False, "check_same_thread": False}
        for key, kind in _DRIVER_OPTIONS.items():
            if key in query:
                opts[key] = kind(query.pop(key))
        if url.host:
            scheme = "https" if str(query.pop("tls", "0")).lower() in _TRUE else "http"
            target = f"{scheme}://{url.host}" + (f":{url.port}" if url.port else "")
            for key in _REMOTE_OPTIONS:
                if key in query:
                    opts[key] = query.pop(key)
            if url.password and "token" not in opts:
                opts["token"] = url.password
        else:
            if not url.database or url.database == ":memory:":
                raise exc.ArgumentError(
                    "hctserver needs a database file (sqlite+hctserver:///file.db)"
                    " or a node (sqlite+hctserver://host:port), not an in-memory database"
                )
            target = os.path.abspath(url.database)
        if query:
            raise exc.ArgumentError(f"unknown option(s) in the URL: {', '.join(sorted(query))}")
        return [target], opts

    def on_connect(self) -> None:
        """Nothing: no PRAGMA (a node may refuse them), no Python functions
        (a node cannot call them)."""
        return None

    def _get_server_version_info(self, connection: Any) -> tuple[int, ...]:
        version = connection.exec_driver_sql("SELECT sqlite_version()").scalar()
        return tuple(int(x) for x in str(version).split("."))

    # --- isolation: the driver's autocommit flag, no PRAGMA ------------------

    def get_isolation_level_values(self, dbapi_connection: Any) -> list[IsolationLevel]:
        return ["SERIALIZABLE", "AUTOCOMMIT"]

    def set_isolation_level(self, dbapi_connection: Any, level: IsolationLevel) -> None:
        if level not in ("SERIALIZABLE", "AUTOCOMMIT"):
            raise exc.ArgumentError(
                f"isolation level {level!r}: hctserver has SERIALIZABLE and AUTOCOMMIT"
            )
        dbapi_connection.autocommit = level == "AUTOCOMMIT"

    def get_isolation_level(self, dbapi_connection: Any) -> IsolationLevel:
        return "AUTOCOMMIT" if dbapi_connection.autocommit is True else "SERIALIZABLE"

    def get_default_isolation_level(self, dbapi_conn: Any) -> IsolationLevel:
        return "SERIALIZABLE"

    def detect_autocommit_setting(self, dbapi_conn: Any) -> bool:
        return bool(dbapi_conn.autocommit is True)

    # --- errors and reflection -----------------------------------------------

    def is_disconnect(self, e: Any, connection: Any, cursor: Any) -> bool:
        """A closed connection, a node that could not be reached or went away,
        or a stream (with its transaction) the node forgot."""
        if isinstance(e.__cause__, (ConnectError, ConnectionLostError, StreamLostError)):
            return True
        return "Cannot operate on a closed database." in str(e)

    def get_table_names(
        self,
        connection: Any,
        schema: str | None = None,
        sqlite_include_internal: bool = False,
        **kw: Any,
    ) -> list[str]:
        """The user's tables: hctserver's system tables count as internal."""
        tables: Callable[..., list[str]] = super().get_table_names  # untyped in SQLAlchemy
        names = tables(connection, schema, sqlite_include_internal=sqlite_include_internal, **kw)
        if sqlite_include_internal:
            return names
        return [n for n in names if n not in _HIDDEN]


dialect = HctDialect
