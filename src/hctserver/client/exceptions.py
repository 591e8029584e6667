"""The DB-API 2.0 exceptions, under :mod:`sqlite3`'s names and classes.

Each class also derives from the standard library's class of the same
name, so that code written for :mod:`sqlite3` (``except
sqlite3.IntegrityError``) handles this driver's errors unchanged. Errors
that come from the database carry ``sqlite_errorcode`` (the extended result
code) and ``sqlite_errorname`` (its name), as :mod:`sqlite3`'s do; errors the
driver raises itself (a closed cursor, a bad parameter) have None there.

Result codes map to classes as CPython's ``Modules/_sqlite/util.c`` maps
them, but for ``SQLITE_NOMEM``: :mod:`sqlite3` raises :class:`MemoryError`,
here it is an :class:`OperationalError` (the memory ran out in the database,
possibly on another machine, not in this process).
"""

from __future__ import annotations

import sqlite3

import apsw

from ..errors import (
    BusyError,
    CommitUnknownError,
    DiskFullError,
    HctError,
    ModeError,
    NotReplicationDatabaseError,
    TransientError,
    UnsupportedStatementError,
)


class Warning(sqlite3.Warning):
    """PEP 249's warning (never raised by this driver, as by :mod:`sqlite3`)."""


class Error(sqlite3.Error):
    """The base class of every error of this driver."""

    sqlite_errorcode: int | None = None
    sqlite_errorname: str | None = None


class InterfaceError(Error, sqlite3.InterfaceError):
    """The driver was misused (SQLite's MISUSE and RANGE)."""


class DatabaseError(Error, sqlite3.DatabaseError):
    """An error of the database."""


class DataError(DatabaseError, sqlite3.DataError):
    """A value was too big (SQLITE_TOOBIG)."""


class OperationalError(DatabaseError, sqlite3.OperationalError):
    """The database could not do it now or here: busy, locked, read-only,
    not the leader, disk full, bad SQL (SQLITE_ERROR, as in :mod:`sqlite3`)."""


class IntegrityError(DatabaseError, sqlite3.IntegrityError):
    """A constraint failed (SQLITE_CONSTRAINT_*, SQLITE_MISMATCH)."""


class InternalError(DatabaseError, sqlite3.InternalError):
    """SQLite's INTERNAL and NOTFOUND."""


class ProgrammingError(DatabaseError, sqlite3.ProgrammingError):
    """The program used the API wrongly: closed objects, wrong bindings."""


class NotSupportedError(DatabaseError, sqlite3.NotSupportedError):
    """The statement or call is not supported here (a statement that
    replication cannot carry, such as VACUUM)."""


# CPython's table (Modules/_sqlite/util.c), by primary result code; others: DatabaseError
_CLASS_OF: tuple[tuple[str, type[Error]], ...] = (
    ("INTERNAL NOTFOUND", InternalError),
    ("NOMEM ERROR PERM ABORT BUSY LOCKED READONLY INTERRUPT IOERR FULL", OperationalError),
    ("CANTOPEN PROTOCOL EMPTY SCHEMA", OperationalError),
    ("CORRUPT", DatabaseError),
    ("TOOBIG", DataError),
    ("CONSTRAINT MISMATCH", IntegrityError),
    ("MISUSE RANGE", InterfaceError),
)
_BY_PRIMARY: dict[int, type[Error]] = {
    int(apsw.mapping_result_codes["SQLITE_" + name]): cls
    for names, cls in _CLASS_OF
    for name in names.split()
}


def code_of(name: str) -> int | None:
    """The number of a result code's name (primary or extended), None if unknown."""
    code = apsw.mapping_extended_result_codes.get(name, apsw.mapping_result_codes.get(name))
    return code if isinstance(code, int) else None


def name_of(code: int) -> str | None:
    """The name of a result code (primary or extended), None if unknown."""
    name = apsw.mapping_extended_result_codes.get(code, apsw.mapping_result_codes.get(code))
    return name if isinstance(name, str) else None


def _coded(cls: type[Error], message: str, code: int | None, name: str | None) -> Error:
    err = cls(message)
    err.sqlite_errorcode = code
    err.sqlite_errorname = name
    return err


def from_code(name: str, message: str) -> Error:
    """The error for a result code given by name (``"SQLITE_CONSTRAINT_UNIQUE"``):
    what a node reports over the network. Unknown names give DatabaseError."""
    code = code_of(name)
    cls = DatabaseError if code is None else _BY_PRIMARY.get(code & 0xFF, DatabaseError)
    return _coded(cls, message, code, name)


# apsw's own errors that are not SQLite result codes
_APSW_MISUSE: tuple[type[apsw.Error], ...] = (
    apsw.BindingsError,
    apsw.ConnectionClosedError,
    apsw.CursorClosedError,
    apsw.ThreadingViolationError,
)


def from_apsw(e: apsw.Error) -> Error:
    """The error for an exception of apsw (the local database)."""
    message = str(e)
    if isinstance(e, _APSW_MISUSE):
        return ProgrammingError(message)
    code = getattr(e, "extendedresult", None)
    if not isinstance(code, int) or code < 0:
        code = getattr(e, "result", None)
    if not isinstance(code, int) or code < 0:
        return InterfaceError(message)
    name = name_of(code) or name_of(code & 0xFF)
    cls = _BY_PRIMARY.get(code & 0xFF, DatabaseError)
    return _coded(cls, message, code, name)


# hctserver's errors, as the SQLite code nearest to what they mean
_HCT: tuple[tuple[type[HctError], type[Error], str | None], ...] = (
    (ModeError, OperationalError, "SQLITE_READONLY"),  # NotLeaderError, NoNodeError too
    (BusyError, OperationalError, "SQLITE_BUSY"),
    (DiskFullError, OperationalError, "SQLITE_FULL"),
    (CommitUnknownError, OperationalError, None),
    (UnsupportedStatementError, NotSupportedError, "SQLITE_AUTH"),
    (NotReplicationDatabaseError, DatabaseError, "SQLITE_NOTADB"),
    (TransientError, OperationalError, None),
)


def from_hct(e: HctError) -> Error:
    """The error for one of hctserver's: a refused or uncertain commit is an
    :class:`OperationalError`, a statement replication cannot carry a
    :class:`NotSupportedError`; the message is kept."""
    for kind, cls, name in _HCT:
        if isinstance(e, kind):
            return _coded(cls, str(e), None if name is None else code_of(name), name)
    return DatabaseError(str(e))
