"""The driver's backend for a database file on this machine.

It runs each statement on a :class:`~hctserver.journal.connection.JournaledConnection`
(what ``hctserver.connect(path)`` returns) and gives its whole outcome at
once, as a node would over the network. A writing statement outside a
transaction runs in a transaction of this backend's own (``BEGIN IMMEDIATE``,
the statement, ``COMMIT``): the connection's own one-statement transactions
hand back rows without their column names, and its COMMIT's journal row
would show in ``changes()``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

import apsw

from ..errors import HctError
from ..journal import database
from ..journal.connection import JournaledConnection
from ..journal.sqltext import Kind, Statement
from .backend import Params, Result
from .connect import connect
from .exceptions import DataError, ProgrammingError, from_apsw, from_hct
from .statements import may_return_rows, one_statement, sets_rowid


@contextlib.contextmanager
def mapped() -> Iterator[None]:
    """Raise apsw's and hctserver's errors as the driver's."""
    try:
        yield
    except apsw.Error as e:
        raise from_apsw(e) from e
    except HctError as e:
        raise from_hct(e) from e
    except KeyError as e:  # apsw: a named parameter missing from the mapping
        raise ProgrammingError(
            f"You did not supply a value for binding parameter :{e.args[0]}."
        ) from e


def raw_connection(jc: JournaledConnection) -> apsw.Connection:
    """The SQLite connection under a journaled one (asked before any
    transaction: in one forwarded to a leader, a read would go there too)."""
    cur = jc.execute("SELECT 1")
    conn = cur.connection
    assert isinstance(conn, apsw.Connection)
    return conn


def row_bytes(row: Any) -> int:
    """About what a row takes in a JSON answer (integers as strings, blobs
    in base64, each value in its typed object)."""
    return sum(
        len(v) * 4 // 3 + 40 if isinstance(v, bytes) else len(v) + 40 if isinstance(v, str) else 48
        for v in row
    )


class LocalBackend:
    """A database file opened with ``hctserver.connect(path, **options)``:
    a new file becomes a replication-enabled database."""

    def __init__(self, path: str | os.PathLike[str], **options: Any) -> None:
        self.max_bytes: int | None = None
        with mapped():
            self._jc = connect(path, **options)  # on a follower's file: writes forwarded
            self._sqlite = raw_connection(self._jc)
        self._lastrowid = 0

    @classmethod
    def over(cls, db: database.Database, max_bytes: int | None = None) -> LocalBackend:
        """A backend on a connection to ``db``, a database this process has
        open already (a node's: its SQL endpoint's streams). ``max_bytes``:
        a statement whose rows would take more is refused (DataError)."""
        self = cls.__new__(cls)
        self.max_bytes = max_bytes
        self._jc = db.connect()
        self._sqlite = raw_connection(self._jc)
        self._lastrowid = 0
        return self

    @property
    def connection(self) -> JournaledConnection:
        """The journaled connection under this backend."""
        return self._jc

    def execute(self, sql: str, params: Params) -> Result:
        st = one_statement(sql)
        jc = self._jc
        before = jc.last_cid
        try:
            with mapped():
                if st is not None and st.kind is Kind.WRITE:
                    res = self._write(st, sql, [params])
                else:
                    columns, rows = self._fetch(jc.execute(sql, params), st, sql, params)
                    res = Result(columns, rows, lastrowid=self._lastrowid)
        finally:
            self._keep_rowid()
        res.cid = jc.last_cid if jc.last_cid != before else 0
        return res

    def executemany(self, sql: str, seq: Iterable[Params]) -> Result:
        st = one_statement(sql)
        if st is None or st.kind is not Kind.WRITE:
            raise ProgrammingError("executemany() can only execute DML statements.")
        before = self._jc.last_cid
        try:
            with mapped():
                res = self._write(st, sql, seq, many=True)
        finally:
            self._keep_rowid()
        res.cid = self._jc.last_cid if self._jc.last_cid != before else 0
        return res

    @property
    def in_transaction(self) -> bool:
        return self._jc.in_transaction

    @property
    def last_cid(self) -> int:
        return self._jc.last_cid

    def close(self) -> None:
        with mapped():
            self._jc.close()

    # --- helpers -------------------------------------------------------------

    def _write(self, st: Statement, sql: str, seq: Iterable[Params], many: bool = False) -> Result:
        """Run a writing statement once per parameter set, inside a transaction
        (the open one, else one of its own); ``rowcount`` is the sum."""
        jc = self._jc
        own = not jc.in_transaction
        if own:
            jc.execute("BEGIN IMMEDIATE")
        inserts = sets_rowid(st)
        try:
            res = Result(rowcount=0)
            for params in seq:
                columns, rows = self._fetch(jc.execute(sql, params), st, sql, params)
                if not many:
                    res.columns, res.rows = columns, rows
                n = jc.changes()
                res.rowcount += n
                if inserts and n > 0:
                    self._lastrowid = jc.last_insert_rowid()
            res.lastrowid = self._lastrowid
            if own:
                jc.execute("COMMIT")
        except BaseException:
            if own and jc.in_transaction:
                with contextlib.suppress(apsw.Error, HctError):
                    jc.execute("ROLLBACK")
            raise
        return res

    def _keep_rowid(self) -> None:
        """The connection's last insert rowid is the last one a statement of
        this backend inserted, as in SQLite: not the journal's own rows, which
        a COMMIT inserts on the same connection."""
        with contextlib.suppress(apsw.Error, HctError):
            self._sqlite.set_last_insert_rowid(self._lastrowid)

    def _fetch(
        self, out: Any, st: Statement | None, sql: str, params: Params
    ) -> tuple[list[tuple[str, str | None]], list[tuple[Any, ...]]]:
        """Columns and rows of what ``JournaledConnection.execute`` returned:
        an apsw cursor, or rows already fetched (here, or by the leader for a
        forwarded statement, with their description)."""
        columns: list[tuple[str, str | None]] = []
        describe = getattr(out, "getdescription", None)
        if describe is not None:
            with contextlib.suppress(apsw.ExecutionCompleteError):
                columns = [(str(name), decltype) for name, decltype in describe()]
        reads = st is not None and st.kind is not Kind.WRITE  # a write's rows: it ran already
        rows = (
            self._bounded(out) if self.max_bytes is not None and reads else [tuple(r) for r in out]
        )
        if not columns:
            columns = self._describe(sql, params) if may_return_rows(st) else []
        return columns, rows

    def _bounded(self, out: Any) -> list[tuple[Any, ...]]:
        """The rows, refused past :attr:`max_bytes` (roughly counted) before
        they are all in memory."""
        limit = self.max_bytes
        assert limit is not None
        rows, size = [], 0
        for r in out:
            size += row_bytes(r)
            if size > limit:
                raise DataError(
                    f"the result would exceed {limit} bytes: ask for fewer rows (LIMIT/OFFSET,"
                    " or a narrower WHERE)"
                )
            rows.append(tuple(r))
        return rows

    def _describe(self, sql: str, params: Params) -> list[tuple[str, str | None]]:
        """The result columns of a statement that gave no rows (SQLite names
        them only while a statement is under way): prepared again on the same
        connection, stopped before it runs."""
        found: list[tuple[str, str | None]] = []

        def stop(cur: apsw.Cursor, _sql: str, _bindings: Any) -> bool:
            found.extend(cur.get_description())
            return False

        cur = self._sqlite.cursor()
        cur.exec_trace = stop
        try:
            cur.execute(sql, params)
        except apsw.ExecTraceAbort:
            pass
        finally:
            cur.close()
        return found
