"""A PEP 249 (DB-API 2.0) driver for hctserver databases, modelled on :mod:`sqlite3`.

``connect(path)`` opens a database file on this machine (a new file becomes
a replication-enabled database); ``connect("http://host:port")`` (or
``https://``, ``hct://``, ``hcts://``) talks to a node over the network.
Code written for :mod:`sqlite3` runs unchanged: the same exceptions (they
also derive from :mod:`sqlite3`'s), parameters (``?`` or ``:name``,
``@name``, ``$name``), adapters and converters, row factories and
transaction rules (``isolation_level``'s implicit BEGIN before a write, or
``autocommit`` as in Python 3.12). Every statement's rows are read whole
when it runs.
"""

from __future__ import annotations

import importlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Union

import apsw

from ..journal import sqltext
from ..journal.sqltext import Kind
from .backend import Backend, Params, Result
from .dbtypes import (
    BINARY,
    DATETIME,
    NUMBER,
    PARSE_COLNAMES,
    PARSE_DECLTYPES,
    ROWID,
    STRING,
    Binary,
    Date,
    DateFromTicks,
    Row,
    Time,
    TimeFromTicks,
    Timestamp,
    TimestampFromTicks,
    adapt_params,
    adapters,
    as_bytes,
    column_converters,
    column_name,
    converters,
    register_adapter,
    register_converter,
)
from .exceptions import (
    DatabaseError,
    DataError,
    Error,
    IntegrityError,
    InterfaceError,
    InternalError,
    NotSupportedError,
    OperationalError,
    ProgrammingError,
    Warning,
)
from .local import LocalBackend
from .statements import one_statement

__all__ = [
    "BINARY",
    "DATETIME",
    "LEGACY_TRANSACTION_CONTROL",
    "NUMBER",
    "PARSE_COLNAMES",
    "PARSE_DECLTYPES",
    "ROWID",
    "STRING",
    "Binary",
    "Connection",
    "Cursor",
    "DataError",
    "DatabaseError",
    "Date",
    "DateFromTicks",
    "Error",
    "IntegrityError",
    "InterfaceError",
    "InternalError",
    "NotSupportedError",
    "OperationalError",
    "ProgrammingError",
    "Row",
    "Time",
    "TimeFromTicks",
    "Timestamp",
    "TimestampFromTicks",
    "Warning",
    "adapters",
    "apilevel",
    "connect",
    "converters",
    "paramstyle",
    "register_adapter",
    "register_converter",
    "sqlite_version",
    "sqlite_version_info",
    "threadsafety",
]

apilevel = "2.0"
threadsafety = 1  # threads may share the module, not connections
paramstyle = "qmark"  # named styles (:name, @name, $name) work too, as in sqlite3
sqlite_version = apsw.sqlite_lib_version()
sqlite_version_info = tuple(int(x) for x in sqlite_version.split("."))

LEGACY_TRANSACTION_CONTROL = -1
_ISOLATION_LEVELS = ("", "DEFERRED", "IMMEDIATE", "EXCLUSIVE")
_SCHEMES = {"http": "http", "https": "https", "hct": "http", "hcts": "https"}
_REMOTE_ONLY = ("token", "token_file", "ca", "consistency")

RowFactory = Callable[[Any, tuple[Any, ...]], Any]
Database = Union[str, "os.PathLike[str]", Backend]


def connect(
    database: Database,
    timeout: float = 5.0,
    detect_types: int = 0,
    isolation_level: str | None = "",
    check_same_thread: bool = False,
    factory: type[Connection] | None = None,
    cached_statements: int = 128,
    *,
    autocommit: bool | int = LEGACY_TRANSACTION_CONTROL,
    token: str | None = None,
    token_file: str | None = None,
    ca: str | None = None,
    consistency: str | None = None,
    **options: Any,
) -> Connection:
    """Open a connection (arguments as :func:`sqlite3.connect`'s).

    ``database``: a file path, a node's URL, or a :class:`Backend`.
    ``timeout``: how long a write waits for the lock (a file's busy timeout),
    or for a node's answer. ``token`` (or ``token_file``), ``ca``,
    ``consistency``: for a node (its bearer token, the CA file that signed
    its certificate, and what reads must see). ``check_same_thread`` is off by default, unlike
    :mod:`sqlite3`: a connection may move between threads, one at a time.
    ``options`` go to ``hctserver.connect`` for a file. ``cached_statements``
    is accepted and ignored."""
    return (factory or Connection)(
        database,
        timeout,
        detect_types,
        isolation_level,
        check_same_thread,
        autocommit=autocommit,
        token=token,
        token_file=token_file,
        ca=ca,
        consistency=consistency,
        **options,
    )


def open_backend(database: Database, timeout: float, options: dict[str, Any]) -> Backend:
    """The backend for a file path or a node's URL (a backend as it is);
    ``options``: a node's (``token``, ``token_file``, ``ca``,
    ``consistency``) or ``hctserver.connect``'s."""
    if not isinstance(database, (str, os.PathLike)):
        return database
    target = os.fspath(database)
    scheme, sep, rest = target.partition("://")
    if sep and scheme.lower() in _SCHEMES:
        remote = importlib.import_module("hctserver.client.remote")
        url = f"{_SCHEMES[scheme.lower()]}://{rest}"
        backend: Backend = remote.RemoteBackend(url, timeout=timeout, **options)
        return backend
    if target in ("", ":memory:"):
        raise NotSupportedError("a replicated database is a file: give its path, not :memory:")
    for key in _REMOTE_ONLY:
        if options.pop(key) is not None:
            raise ProgrammingError(f"{key} is an option for a node's URL, not for a file")
    options.setdefault("busy_timeout", timeout)
    return LocalBackend(target, **options)


class Connection:
    """A connection: transactions, cursors, and :mod:`sqlite3`'s shortcuts.

    ``last_cid`` (an hctserver extra) is the cid of the last transaction
    this connection committed: what a reader elsewhere waits for to see its
    writes."""

    Warning = Warning
    Error = Error
    InterfaceError = InterfaceError
    DatabaseError = DatabaseError
    DataError = DataError
    OperationalError = OperationalError
    IntegrityError = IntegrityError
    InternalError = InternalError
    ProgrammingError = ProgrammingError
    NotSupportedError = NotSupportedError

    def __init__(
        self,
        database: Database,
        timeout: float = 5.0,
        detect_types: int = 0,
        isolation_level: str | None = "",
        check_same_thread: bool = False,
        *,
        autocommit: bool | int = LEGACY_TRANSACTION_CONTROL,
        token: str | None = None,
        token_file: str | None = None,
        ca: str | None = None,
        consistency: str | None = None,
        **options: Any,
    ) -> None:
        self._isolation_level = _checked_level(isolation_level)
        self._autocommit = _checked_autocommit(autocommit)
        self._thread = threading.get_ident() if check_same_thread else None
        self._backend: Backend | None = None
        remote = {"token": token, "token_file": token_file, "ca": ca, "consistency": consistency}
        self._backend = open_backend(database, timeout, {**remote, **options})
        self.detect_types = detect_types
        self.row_factory: RowFactory | None = None
        self.text_factory: Callable[[bytes], Any] = str

    # --- PEP 249 -------------------------------------------------------------

    def cursor(self, factory: Callable[[Connection], Cursor] | None = None) -> Cursor:
        self.check()
        cur = (factory or Cursor)(self)
        if not isinstance(cur, Cursor):
            raise TypeError("factory must return a cursor, not " + type(cur).__name__)
        cur.row_factory = self.row_factory
        return cur

    def commit(self) -> None:
        """Commit the open transaction, if any (in ``autocommit=True`` mode: nothing)."""
        backend = self.check()
        if self._autocommit is not True and backend.in_transaction:
            backend.execute("COMMIT", None)

    def rollback(self) -> None:
        """Roll back the open transaction, if any (in ``autocommit=True`` mode: nothing)."""
        backend = self.check()
        if self._autocommit is not True and backend.in_transaction:
            backend.execute("ROLLBACK", None)

    def close(self) -> None:
        """Close; an open transaction is rolled back (not committed, as in sqlite3)."""
        if self._backend is not None:
            self.check_thread()
            backend, self._backend = self._backend, None
            backend.close()

    # --- sqlite3's shortcuts and attributes ----------------------------------

    def execute(self, sql: str, parameters: Any = ()) -> Cursor:
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any]) -> Cursor:
        return self.cursor().executemany(sql, seq_of_parameters)

    def executescript(self, sql_script: str) -> Cursor:
        return self.cursor().executescript(sql_script)

    @property
    def in_transaction(self) -> bool:
        return self.check().in_transaction

    @property
    def last_cid(self) -> int:
        return self.check().last_cid

    @property
    def isolation_level(self) -> str | None:
        return self._isolation_level

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        level = _checked_level(value)
        if level is None and self._autocommit == LEGACY_TRANSACTION_CONTROL:
            self.commit()  # as sqlite3: None means autocommit from now on
        self._isolation_level = level

    @property
    def autocommit(self) -> bool | int:
        """Python 3.12's transaction control: ``LEGACY_TRANSACTION_CONTROL``
        (-1, the default: ``isolation_level`` decides), ``True`` (statements
        run as they are; commit() and rollback() do nothing) or ``False``
        (always in a transaction: the first statement after connect, commit()
        or rollback() opens one, so that an idle connection holds none)."""
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value: bool | int) -> None:
        value = _checked_autocommit(value)
        if value is True and self.in_transaction:
            self.check().execute("COMMIT", None)
        self._autocommit = value

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        """Commit on success, roll back on an exception (which propagates)."""
        if exc_type is not None:
            self.rollback()
            return
        try:
            self.commit()
        except BaseException:
            self.rollback()
            raise

    # --- what cursors call ---------------------------------------------------

    def check(self) -> Backend:
        """The backend, if this connection is open and used from its thread."""
        self.check_thread()
        if self._backend is None:
            raise ProgrammingError("Cannot operate on a closed database.")
        return self._backend

    def check_thread(self) -> None:
        if self._thread is not None and self._thread != threading.get_ident():
            raise ProgrammingError(
                "SQLite objects created in a thread can only be used in that same thread."
                f" The object was created in thread id {self._thread} and this is"
                f" thread id {threading.get_ident()}."
            )

    def run(self, sql: str, params: Params, *, implicit: bool = True) -> Result:
        """One statement, after the BEGIN that the transaction rules call for."""
        backend = self.check()
        st = one_statement(sql)
        if implicit and st is not None:
            self._begin(backend, st.kind)
        return backend.execute(sql, params)

    def run_many(self, sql: str, seq: Iterable[Params]) -> Result:
        """One writing statement per parameter set (sqlite3's executemany)."""
        backend = self.check()
        st = one_statement(sql)
        if st is None or st.kind is not Kind.WRITE:
            raise ProgrammingError("executemany() can only execute DML statements.")
        self._begin(backend, st.kind)
        return backend.executemany(sql, seq)

    def _begin(self, backend: Backend, kind: Kind) -> None:
        """BEGIN before any statement with ``autocommit=False``; before a
        write with ``isolation_level`` not None in legacy mode."""
        if backend.in_transaction:
            return
        if self._autocommit is False:
            backend.execute("BEGIN", None)
        elif (
            self._autocommit == LEGACY_TRANSACTION_CONTROL
            and self._isolation_level is not None
            and kind is Kind.WRITE
        ):
            backend.execute(f"BEGIN {self._isolation_level}", None)

    def run_script(self, script: str) -> None:
        """Statements one after the other, after committing an open
        transaction (legacy mode: no implicit BEGIN, as in sqlite3)."""
        backend = self.check()
        legacy = self._autocommit == LEGACY_TRANSACTION_CONTROL
        if legacy and backend.in_transaction:
            backend.execute("COMMIT", None)
        for text in sqltext.split(script):
            self.run(text, None, implicit=not legacy)


def _checked_level(value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("isolation_level must be str or None, not " + type(value).__name__)
    if value.upper() not in _ISOLATION_LEVELS:
        raise ValueError(
            "isolation_level string must be '', 'DEFERRED', 'IMMEDIATE', or 'EXCLUSIVE'"
        )
    return value


def _checked_autocommit(value: bool | int) -> bool | int:
    if value is True or value is False or value == LEGACY_TRANSACTION_CONTROL:
        return value
    raise ValueError("autocommit must be True, False, or LEGACY_TRANSACTION_CONTROL")


class Cursor:
    """A statement's results, read whole when it ran; fetched one row at a time."""

    arraysize = 1

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.row_factory: RowFactory | None = None
        self.description: tuple[tuple[Any, ...], ...] | None = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        self._rows: Iterator[tuple[Any, ...]] = iter(())
        self._converters: list[Callable[[bytes], Any] | None] = []
        self._closed = False

    def execute(self, sql: str, parameters: Any = ()) -> Cursor:
        self._check()
        if not isinstance(sql, str):
            raise TypeError("execute() argument 1 must be str, not " + type(sql).__name__)
        res = self.connection.run(sql, adapt_params(parameters))
        self._show(res)
        self.lastrowid = res.lastrowid
        return self

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any]) -> Cursor:
        self._check()
        res = self.connection.run_many(sql, (adapt_params(p) for p in seq_of_parameters))
        self._show(res)
        self.description = None
        return self

    def executescript(self, sql_script: str) -> Cursor:
        self._check()
        if not isinstance(sql_script, str):
            raise ValueError("script argument must be unicode.")
        self._show(Result())
        self.connection.run_script(sql_script)
        return self

    def fetchone(self) -> Any:
        self._check()
        raw = next(self._rows, None)
        return None if raw is None else self._row(raw)

    def fetchmany(self, size: int | None = None) -> list[Any]:
        n = self.arraysize if size is None else size
        out: list[Any] = []
        while len(out) < n and (row := self.fetchone()) is not None:
            out.append(row)
        return out

    def fetchall(self) -> list[Any]:
        self._check()
        return [self._row(raw) for raw in self._rows]

    def __iter__(self) -> Cursor:
        return self

    def __next__(self) -> Any:
        row = self.fetchone()
        if row is None:
            raise StopIteration
        return row

    def close(self) -> None:
        self.connection.check_thread()
        self._rows = iter(())
        self._closed = True

    def setinputsizes(self, sizes: Any) -> None:
        """PEP 249: does nothing here."""

    def setoutputsize(self, size: Any, column: Any = None) -> None:
        """PEP 249: does nothing here."""

    # --- helpers -------------------------------------------------------------

    def _check(self) -> None:
        self.connection.check()
        if self._closed:
            raise ProgrammingError("Cannot operate on a closed cursor.")

    def _show(self, res: Result) -> None:
        detect = self.connection.detect_types
        names = [column_name(n, detect) for n, _ in res.columns]
        self.description = tuple((n, None, None, None, None, None, None) for n in names) or None
        self.rowcount = res.rowcount
        self._converters = column_converters(res.columns, detect) if detect else []
        self._rows = iter(res.rows)

    def _row(self, raw: tuple[Any, ...]) -> Any:
        text = self.connection.text_factory
        if self._converters or text is not str:
            raw = tuple(self._value(i, v, text) for i, v in enumerate(raw))
        factory = self.row_factory
        if factory is None:
            return raw
        return (Row if factory is sqlite3.Row else factory)(self, raw)

    def _value(self, i: int, value: Any, text: Callable[[bytes], Any]) -> Any:
        if value is None:
            return None
        conv = self._converters[i] if self._converters else None
        if conv is not None:
            return conv(as_bytes(value))
        if isinstance(value, str) and text is not str:
            return value.encode() if text is bytes else text(value.encode())
        return value
