"""Capturing one transaction's row changes as a patchset.

Two mechanisms, one result:

* **Row log** (the default): the preupdate hook appends each changed row to a
  list; at commit the list is reduced to one change per primary key (as the
  session extension does: the first old row against the final row) and
  encoded. This costs a few microseconds per row and nothing per
  transaction, where a session object costs two SQL compilations per
  transaction.
* **Session**: for large transactions. Past ``log_limit`` rows the log is
  encoded so far and a session object (C, no Python per row) takes over.

If a statement failed (SQLite undid its row changes, which the hook does not
report) or the transaction rolled back to a savepoint, the final rows are
read back from the database instead of taken from the log.
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

import apsw

from ..errors import BusyError
from . import patchset
from .sqlutil import fetchall, quote_ident, table_info
from .systables import SYSTEM_TABLES

_INSERT = apsw.SQLITE_INSERT
_DELETE = apsw.SQLITE_DELETE
_ROWID = apsw.SQLITE_SESSION_OBJCONFIG_ROWID


class TableShape(NamedTuple):
    name: str
    pk: bytes  # per column: 0 or 1-based position in the primary key
    pkcols: tuple[int, ...]  # primary-key columns in primary-key order
    colorder: tuple[int, ...]  # primary-key columns in column order
    rowid: bool  # implicit rowid prepended as column 0
    select: str  # the row by primary key, every column
    key: Any  # row -> primary key tuple (primary-key order)
    pkvalues: Any  # row -> primary-key values in column order
    others: tuple[int, ...]  # the other columns
    header: bytes  # the patchset's table header


def _shape(conn: apsw.Connection, table: str) -> TableShape:
    cols, pk, rowid = table_info(conn, table)
    pkcols = tuple(sorted((i for i in range(len(pk)) if pk[i]), key=lambda i: pk[i]))
    sel = ", ".join("rowid" if rowid and i == 0 else quote_ident(c) for i, c in enumerate(cols))
    where = " AND ".join(
        ("rowid" if rowid and i == 0 else quote_ident(cols[i])) + " IS ?" for i in pkcols
    )
    colorder = tuple(sorted(pkcols))
    return TableShape(
        table,
        bytes(pk),
        pkcols,
        colorder,
        rowid,
        f"SELECT {sel} FROM main.{quote_ident(table)} WHERE {where}",
        _getter(pkcols),
        _getter(colorder),
        tuple(i for i in range(len(pk)) if not pk[i]),
        patchset.encode_table(table, pk),
    )


def _getter(cols: tuple[int, ...]) -> Any:
    """row -> tuple of the row's values at ``cols``."""
    if len(cols) == 1:
        (i,) = cols
        return lambda row: (row[i],)
    return operator.itemgetter(*cols)


def same_value(a: object, b: object) -> bool:
    """Equal values of the same storage class (-0.0 and 0.0 differ)."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)  # type: ignore[arg-type,unused-ignore]
    return a == b


LOG_LIMIT = 2000  # rows logged before a session object takes over


class Capture:
    """Row capture for one connection; :meth:`begin` per transaction."""

    def __init__(
        self,
        conn: apsw.Connection,
        shared: Any,
        log_limit: int | None = None,
        track_keys: bool = False,
    ) -> None:
        self.conn = conn
        self.shared = shared  # the file's writer lock: schema_epoch counts schema changes
        self.log_limit = LOG_LIMIT if log_limit is None else log_limit
        self.log: list[tuple[Any, ...]] | None = None
        self.carried = b""  # encoded before a hand-over to a session
        self.session: apsw.Session | None = None
        self.reread = False
        self.large = False  # the log passed log_limit: switch at the next statement
        self.broken: str | None = None  # a table whose rows the hook could not read
        self._shapes: dict[str, TableShape] = {}
        self._generated: bool | None = None  # does some table have generated columns?
        self._epoch = -1
        self._hooked = False
        # rowids this transaction wrote, per table, even to no effect (an
        # hctree-format leader journals each one's final state)
        self.track_keys = track_keys
        self.touched: dict[str, set[int]] = {}

    # --- recording -----------------------------------------------------------

    def _hook(self, u: Any) -> None:
        log = self.log
        if log is None or u.database_name != "main":
            return
        name = u.table_name
        if name in SYSTEM_TABLES:
            return
        op = u.opcode
        if self.track_keys:
            keys = self.touched.setdefault(name, set())
            keys.add(u.rowid)
            if op != _INSERT and op != _DELETE:
                keys.add(u.rowid_new)
        try:
            if op == _INSERT:
                log.append((name, op, u.rowid, None, u.new))
            elif op == _DELETE:
                log.append((name, op, u.rowid, u.old, None))
            else:
                log.append((name, op, u.rowid, u.old, u.new, u.rowid_new))
        except apsw.Error:
            # SQLite cannot hand over rows of tables with generated columns:
            # such databases are captured by session objects (see begin())
            self.broken = name
            self._generated = True
        if len(log) > self.log_limit:
            self.large = True

    def _rehook(self) -> None:
        if not self._hooked:
            self.conn.preupdate_hook(self._hook, id="hctserver")
            self._hooked = True

    def begin(self) -> None:
        self.log = []
        self.touched = {}
        self.carried = b""
        self.reread = False
        self.large = False
        self.broken = None
        self._check_epoch()
        self._record()

    def _record(self) -> None:
        """Record the next rows through the hook, or through a session object
        while the database has tables with generated columns."""
        if self._generated is None:
            self._generated = _has_generated_columns(self.conn)
        if self._generated:
            self._start_session()
        else:
            self._rehook()

    def end(self) -> None:
        self.log = None
        self.carried = b""
        if self.session is not None:
            self.session.close()
            self.session = None
        self._rehook()

    def switch_if_large(self) -> None:
        """Between statements: hand a large transaction to a session object."""
        if not self.large or self.session is not None:
            return
        assert self.log is not None
        self.carried = patchset.merge([self.carried, self._encode(self.log)])
        self.large = False
        self._start_session()

    def _start_session(self) -> None:
        if self.session is not None:
            return
        self.log = None
        # the session extension owns the preupdate hook while it lives
        self.conn.preupdate_hook(None, id="hctserver")
        self._hooked = False
        s = apsw.Session(self.conn, "main")
        s.config(_ROWID, 1)
        s.table_filter(_user_table)
        s.attach()
        self.session = s

    def save(self) -> tuple[Any, ...] | None:
        """The recording so far, to :meth:`restore` after a :meth:`take` whose
        cause failed; None once a session has taken over (it cannot be)."""
        if self.session is not None:
            return None
        return (self.log, self.carried, self.reread, self.large)

    def restore(self, saved: tuple[Any, ...]) -> None:
        self.log, self.carried, self.reread, self.large = saved

    # --- producing patchsets --------------------------------------------------

    def take(self) -> bytes:
        """The changes recorded since begin() or the last take(), as a patchset;
        recording goes on (in log mode) afterwards."""
        log = self.log
        if log is not None and self._hooked and not self.carried and not self._generated:
            # the usual case: a small transaction recorded by the hook alone
            data = self._encode(log) if log else b""
            self.log = []
            self.reread = False
            self.large = False
            return data
        parts = [self.carried]
        if self.log:
            parts.append(self._encode(self.log))
        if self.session is not None:
            parts.append(self.session.patchset())
            self.session.close()
            self.session = None
        self.log = []
        self.carried = b""
        self.reread = False
        self.large = False
        self._record()
        return patchset.merge(parts)

    def shape(self, table: str) -> TableShape:
        sh = self._shapes.get(table)
        if sh is None:
            sh = self._shapes[table] = _shape(self.conn, table)
        return sh

    def invalidate(self) -> None:
        """Forget table shapes (this connection changed the schema)."""
        self._shapes.clear()
        self._generated = None

    def _check_epoch(self) -> None:
        if self._epoch != self.shared.schema_epoch:  # another connection changed the schema
            self.invalidate()
            self._epoch = self.shared.schema_epoch

    def _encode(self, log: list[tuple[Any, ...]]) -> bytes:
        """Reduce the log to one change per key and encode it."""
        self._check_epoch()
        tables: dict[str, dict[tuple[Any, ...], list[Any]]] = {}
        shapes: dict[str, TableShape] = {}
        for rec in log:
            name = rec[0]
            rows = tables.get(name)
            if rows is None:
                rows = tables[name] = {}
                shapes[name] = self.shape(name)
            sh = shapes[name]
            op = rec[1]
            if op == _INSERT:
                new = (rec[2], *rec[4]) if sh.rowid else rec[4]
                _put(rows, sh.key(new), False, None, new)
            elif op == _DELETE:
                old = (rec[2], *rec[3]) if sh.rowid else rec[3]
                _put(rows, sh.key(old), True, old, None)
            else:
                old = (rec[2], *rec[3]) if sh.rowid else rec[3]
                new = (rec[5], *rec[4]) if sh.rowid else rec[4]
                kold, knew = sh.key(old), sh.key(new)
                if kold == knew:
                    _put(rows, kold, True, old, new)
                else:  # the key changed: a delete and an insert, as for the session
                    _put(rows, kold, True, old, None)
                    _put(rows, knew, False, None, new)
        parts = []
        enc, encode_values = patchset.encode_value, patchset.encode_values
        for name, rows in tables.items():
            sh = shapes[name]
            body = []
            for key, (existed, old, final) in rows.items():
                if self.reread:
                    final = self.conn.execute(sh.select, key).fetchone()
                if final is None:
                    if existed:
                        body.append(patchset.encode_delete(sh.pkvalues(old)))
                elif not existed:
                    body.append(patchset.encode_insert(final))
                else:
                    changed = [
                        _UNDEF_BYTES if same_value(old[i], final[i]) else enc(final[i])
                        for i in sh.others
                    ]
                    if any(c is not _UNDEF_BYTES for c in changed):
                        body.append(
                            _UPDATE_OP + encode_values(sh.pkvalues(old)) + b"".join(changed)
                        )
            if body:
                parts.append(sh.header)
                parts.extend(body)
        return b"".join(parts)


_UNDEF_BYTES = b"\x00"
_UPDATE_OP = b"\x17\x00"


def _put(
    rows: dict[tuple[Any, ...], list[Any]],
    key: tuple[Any, ...],
    existed: bool,
    old: Any,
    final: Any,
) -> None:
    """Record a change of ``key``: the first one fixes what the row was before
    the transaction (existed, old); each one sets the final row."""
    st = rows.get(key)
    if st is None:
        rows[key] = [existed, old, final]
    else:
        st[2] = final


def uncaptured(table: str) -> BusyError:
    """What a transaction whose rows of ``table`` (it has generated columns)
    the preupdate hook could not read raises, once rolled back."""
    return BusyError(
        f"rows of table {table} (it has generated columns) could not be captured"
        " in this transaction, which was rolled back: retry it"
    )


def _has_generated_columns(conn: apsw.Connection) -> bool:
    for (name,) in fetchall(
        conn,
        "SELECT name FROM sqlite_schema WHERE type='table' AND sql LIKE '%GENERATED%'"
        " OR type='table' AND sql LIKE '% AS (%' OR type='table' AND sql LIKE '% AS(%'",
    ):
        for row in conn.execute(f"PRAGMA main.table_xinfo({quote_ident(name)})"):
            if row[6] in (2, 3):
                return True
    return False


def _user_table(name: str) -> bool:
    return name not in SYSTEM_TABLES
