"""Connections for user code: every write transaction becomes a journal entry.

In LEADER mode a write transaction runs under the process-wide writer lock
while :mod:`hctserver.capture` records its row changes. At COMMIT the
connection turns them into a patchset, allocates the next cid, computes the
hashes and inserts the journal row, all inside the same SQLite transaction,
then commits and calls the commit hooks.

Transaction forms: ``BEGIN [DEFERRED|IMMEDIATE|EXCLUSIVE|CONCURRENT]`` …
``COMMIT``/``END``/``ROLLBACK``; ``SAVEPOINT``/``RELEASE`` (an outermost
SAVEPOINT starts a transaction, its RELEASE commits it); ``with conn:``; and
a single writing statement outside any transaction, which is wrapped in one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import apsw

from . import patchset, sqltext
from .capture import Capture
from .errors import BusyError, ModeError, UnsupportedStatementError
from .journal import (
    _INSERT_ENTRY,
    SYSTEM_TABLES,
    TAIL,
    CommitHook,
    Database,
    Mode,
    fetchall,
    fetchone,
    merge_patchsets,
    table_rows_patchset,
)
from .position import entry_hash, fold
from .sqltext import Kind, Statement

log = logging.getLogger("hctserver")

_WRITE_OPS = frozenset({apsw.SQLITE_INSERT, apsw.SQLITE_UPDATE, apsw.SQLITE_DELETE})
_DDL_OPS = frozenset({apsw.SQLITE_DROP_TABLE, apsw.SQLITE_ALTER_TABLE})


class Rows:
    """The rows of a statement that already ran to completion."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self._it = iter(rows)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return self._it

    def __next__(self) -> tuple[Any, ...]:
        return next(self._it)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self._it)

    def fetchone(self) -> tuple[Any, ...] | None:
        return next(self._it, None)


_NO_ROWS = Rows([])
_parse = sqltext.parse


class _Tx:
    __slots__ = ("acc", "ddl", "implicit", "locked", "reshapes", "savepoints", "writing")

    def __init__(self, implicit: bool = False) -> None:
        self.writing = False  # the writer lock is held and capture runs
        self.acc = b""  # changes before the last ALTER/DROP TABLE, in the current schema
        self.ddl: list[str] = []
        self.locked = False
        self.implicit = implicit  # started by SAVEPOINT: its outermost RELEASE commits
        self.savepoints: list[tuple[str, int, int]] = []  # (name, len(ddl), reshapes)
        self.reshapes = 0


class JournaledConnection:
    """A connection to a :class:`~hctserver.journal.Database` for user code.

    One per thread. ``execute`` accepts one or several statements; bindings
    only with a single statement.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn = db.open_connection()
        self._tx: _Tx | None = None
        self._epoch = -1
        self._internal = False
        self._hooks: list[CommitHook] = []
        self._ctx: list[str | None] = []
        self._cap = Capture(self._conn, db.writer_lock)
        self._conn.set_authorizer(self._authorize)

    # --- public API ----------------------------------------------------------

    def execute(self, sql: str, bindings: Any = None) -> Any:
        """Run SQL; returns a cursor (or, for a statement wrapped in its own
        transaction, its rows already fetched)."""
        if self._epoch != self.db._mode_epoch:
            self._sync_mode()
        stmts = _parse(sql)
        if len(stmts) == 1:
            return self._run(stmts[0], bindings)
        if not stmts:
            return self._conn.execute(sql, bindings)
        if len(stmts) > 1:
            if bindings is not None:
                raise UnsupportedStatementError(
                    "bindings were given with several statements; execute them one at a time"
                )
            for st in stmts[:-1]:
                for _ in self._run(st, None):
                    pass
        return self._run(stmts[-1], bindings)

    def executemany(self, sql: str, sequence: Iterable[Any]) -> Any:
        """Run one statement for each set of bindings; outside a transaction all
        of them form one journaled transaction."""
        if self._epoch != self.db._mode_epoch:
            self._sync_mode()
        stmts = sqltext.parse(sql)
        if len(stmts) != 1:
            raise UnsupportedStatementError("executemany takes exactly one statement")
        st = stmts[0]
        if st.kind not in (Kind.WRITE, Kind.READ):
            raise UnsupportedStatementError(
                f"executemany runs INSERT/UPDATE/DELETE/SELECT, not {st.kind.value} statements"
            )
        if st.kind is Kind.READ:
            return self._conn.executemany(st.text, sequence)
        self._check_writable()
        if self._tx is not None:
            self._start_writing()
            return self._guard(lambda: self._conn.executemany(st.text, sequence))
        self._begin(eager=True)
        try:
            rows = list(self._conn.executemany(st.text, sequence))
            self._commit(None)
        except BaseException:
            self._abort()
            raise
        return Rows(rows)

    def add_commit_hook(self, hook: CommitHook) -> None:
        """Call ``hook(cid, schema, data, schemacid)`` after each journaled commit
        of this connection (the leader streams a job's commits from here)."""
        self._hooks = [*self._hooks, hook]

    @property
    def in_transaction(self) -> bool:
        return self._tx is not None

    def snapshot(self) -> int:
        return self.db.snapshot()

    def changes(self) -> int:
        return int(self._conn.changes())

    def last_insert_rowid(self) -> int:
        return int(self._conn.last_insert_rowid())

    def close(self) -> None:
        if self._tx is not None:
            self._abort()
        self._conn.close()

    def __enter__(self) -> JournaledConnection:
        if self._tx is None:
            self.execute("BEGIN IMMEDIATE")
            self._ctx.append(None)
        else:
            name = f"hct_ctx_{len(self._ctx)}"
            self.execute(f"SAVEPOINT {name}")
            self._ctx.append(name)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        name = self._ctx.pop()
        if name is None:
            if self._tx is not None:
                self.execute("COMMIT" if exc_type is None else "ROLLBACK")
        elif self._tx is not None:
            if exc_type is not None:
                self.execute(f"ROLLBACK TO {name}")
            self.execute(f"RELEASE {name}")

    # --- dispatch ----------------------------------------------------------

    def _run(self, st: Statement, bindings: Any) -> Any:
        k = st.kind
        if k is Kind.READ or k is Kind.OTHER:
            return self._conn.execute(st.text, bindings)
        if k is Kind.WRITE or k is Kind.DDL or k is Kind.DDL_RESHAPE:
            if self.db._mode is not Mode.LEADER:
                self._check_writable()
            tx = self._tx
            if tx is None:
                return self._autocommit(st, bindings)
            if not tx.writing:
                self._start_writing()
            try:
                return self._write(st, bindings)
            except BaseException:
                self._failed()
                raise
        if k is Kind.BEGIN:
            if self._tx is not None:  # let SQLite report the nesting error
                return self._conn.execute(st.text)
            self._begin(eager=st.eager)
            return _NO_ROWS
        if k is Kind.COMMIT:
            if self._tx is None:
                return self._conn.execute(st.text)
            self._commit(None)
            return _NO_ROWS
        if k is Kind.ROLLBACK:
            if self._tx is None:
                return self._conn.execute(st.text)
            self._abort()
            return _NO_ROWS
        if k is Kind.SAVEPOINT:
            return self._savepoint(st)
        if k is Kind.RELEASE:
            return self._release(st)
        if k is Kind.ROLLBACK_TO:
            return self._rollback_to(st)
        raise UnsupportedStatementError(
            "VACUUM can renumber the rowids of tables without an INTEGER PRIMARY KEY,"
            " which would break replication; use VACUUM INTO 'file' for a compact copy"
        )

    def _write(self, st: Statement, bindings: Any) -> Any:
        tx = self._tx
        assert tx is not None
        if self._cap.large and not tx.savepoints:
            # not inside a savepoint: a ROLLBACK TO could not undo what was encoded
            self._cap.switch_if_large()
        if st.kind is Kind.DDL_RESHAPE or st.create_as:
            return self._schema_change(st, bindings)
        cur = self._conn.execute(st.text, bindings)
        if self._cap.broken is not None:
            table = self._cap.broken
            self._abort()
            raise BusyError(
                f"rows of table {table} (it has generated columns) could not be captured"
                " in this transaction, which was rolled back: retry it"
            )
        if st.kind is Kind.DDL:
            tx.ddl.append(st.text)
            self._cap.invalidate()
        return cur

    def _guard(self, fn: Any) -> Any:
        """Run fn; on error see :meth:`_failed`."""
        try:
            return fn()
        except BaseException:
            self._failed()
            raise

    def _failed(self) -> None:
        # SQLite undid the statement's row changes, which the hook does not see;
        # and if it ended the whole transaction, forget ours too
        self._cap.reread = True
        if self._tx is not None and self._conn.get_autocommit():
            self._end()

    def _autocommit(self, st: Statement, bindings: Any) -> Rows:
        self._begin(eager=True)
        try:
            rows = list(self._write(st, bindings))
            self._commit(None)
        except BaseException:
            self._abort()
            raise
        return Rows(rows)

    # --- mode --------------------------------------------------------------

    def _sync_mode(self) -> None:
        epoch = self.db._mode_epoch
        follower = self.db.mode is Mode.FOLLOWER
        self._conn.execute(f"PRAGMA query_only={int(follower)}")
        self._epoch = epoch

    def _check_writable(self) -> None:
        if self.db.mode is not Mode.LEADER:
            raise ModeError(
                f"{self.db.path} is in FOLLOWER mode: writes are refused (it is a replica;"
                " write on the leader, or set_mode('leader') on a database without holes)"
            )

    def _authorize(
        self, op: int, p1: str | None, p2: str | None, dbname: str | None, trigger: str | None
    ) -> int:
        if self._internal:
            return apsw.SQLITE_OK
        if (op in _WRITE_OPS and p1 in SYSTEM_TABLES) or (
            op in _DDL_OPS and (p1 in SYSTEM_TABLES or p2 in SYSTEM_TABLES)
        ):
            return apsw.SQLITE_DENY
        return apsw.SQLITE_OK

    # --- transactions --------------------------------------------------------

    def _lock(self) -> None:
        if self.db._ckpt_wanted:
            time.sleep(0)  # let the checkpointer take the lock first
        if not self.db.writer_lock.acquire(timeout=self.db.busy_timeout):
            raise BusyError(
                f"database is locked: another writer in this process held {self.db.path}"
                f" for more than {self.db.busy_timeout:g} s; retry the transaction"
            )

    def _begin(self, *, eager: bool, implicit: bool = False) -> None:
        tx = _Tx(implicit)
        if eager and self.db.mode is Mode.LEADER:
            self._lock()
            tx.locked = True
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.db.writer_lock.release()
                raise
            self._tx = tx
            self._start_writing()
        else:
            if not implicit:  # an outermost SAVEPOINT begins the transaction itself
                self._conn.execute("BEGIN DEFERRED")
            self._tx = tx

    def _start_writing(self) -> None:
        tx = self._tx
        assert tx is not None
        if tx.writing:
            return
        if not tx.locked:
            self._lock()
            tx.locked = True
        self._cap.begin()
        tx.writing = True

    def _end(self) -> None:
        tx = self._tx
        self._tx = None
        if tx is None:
            return
        if tx.writing:
            self._cap.end()
            if tx.ddl or tx.reshapes:  # committed or not, shapes may have changed
                self._cap.invalidate()
        if tx.locked:
            self.db.writer_lock.release()

    def _abort(self) -> None:
        try:
            if not self._conn.get_autocommit():
                self._conn.execute("ROLLBACK")
        finally:
            self._end()

    def _commit(self, release: str | None) -> None:
        tx = self._tx
        assert tx is not None
        entry: tuple[int, str, bytes, int] | None = None
        lock = self.db.writer_lock
        try:
            if tx.writing:
                data = merge_patchsets([tx.acc, self._cap.take()])
                schema = ";".join(tx.ddl)
                if data or schema:
                    entry = self._journal(schema, data)
            self._conn.execute(release or "COMMIT")
        except BaseException:
            lock.tail = None
            self._abort()
            raise
        if entry is not None:
            cid, schema, data, schemacid = entry
            lock.tail = (cid, cid if schema else schemacid, self._vhash)
            if schema:
                lock.schema_epoch += 1
        self._end()
        if entry is not None:
            self.db.notify_snapshot(entry[0])
            for hook in (*self._hooks, *self.db._hooks):
                try:
                    hook(*entry)
                except Exception:
                    log.exception("commit hook %r failed for cid %d", hook, entry[0])

    def _journal(self, schema: str, data: bytes) -> tuple[int, str, bytes, int]:
        """Insert the journal row. The tail (cid, schemacid, H) of the last
        commit in this process is cached on the writer lock; a row already
        at the next cid means another process wrote: the transaction is
        refused with BusyError, to be retried with fresh state."""
        c = self._conn
        lock = self.db.writer_lock
        self._internal = True
        try:
            tail = lock.tail
            if tail is None:
                tail = max(fetchall(c, TAIL), key=lambda r: r[0])
            prev, schemacid, prev_h = tail
            cid = prev + 1
            h = entry_hash(cid, schema, data, schemacid)
            vh = fold(prev_h, h)
            try:
                c.execute(_INSERT_ENTRY, (cid, schema, data, schemacid, h, vh))
            except apsw.ConstraintError:
                if lock.tail is None:
                    raise
                # another process committed since our last commit (and may have
                # changed the schema our capture relied on): start over
                lock.tail = None
                lock.schema_epoch += 1
                raise BusyError(
                    f"another process committed to {self.db.path} during this transaction;"
                    " it was rolled back: retry it"
                ) from None
        finally:
            self._internal = False
        self._vhash = vh
        return cid, schema, data, schemacid

    # --- savepoints --------------------------------------------------------

    def _savepoint(self, st: Statement) -> Any:
        if self._tx is None:
            self._begin(eager=False, implicit=True)
        tx = self._tx
        assert tx is not None
        try:
            cur = self._conn.execute(st.text)
        except BaseException:
            if self._conn.get_autocommit():
                self._end()
            raise
        tx.savepoints.append((st.name, len(tx.ddl), tx.reshapes))
        return cur

    def _find(self, name: str) -> int:
        tx = self._tx
        assert tx is not None
        for i in range(len(tx.savepoints) - 1, -1, -1):
            if tx.savepoints[i][0] == name:
                return i
        return -1

    def _release(self, st: Statement) -> Any:
        tx = self._tx
        if tx is None:
            return self._conn.execute(st.text)
        i = self._find(st.name)
        if i == 0 and tx.implicit:
            self._commit(st.text)
            return Rows([])
        cur = self._guard(lambda: self._conn.execute(st.text))
        if i >= 0:
            del tx.savepoints[i:]
        return cur

    def _rollback_to(self, st: Statement) -> Any:
        tx = self._tx
        if tx is None:
            return self._conn.execute(st.text)
        i = self._find(st.name)
        if i >= 0 and tx.savepoints[i][2] != tx.reshapes:
            self._abort()
            raise UnsupportedStatementError(
                "ROLLBACK TO across an ALTER TABLE or DROP TABLE cannot be journaled;"
                " the whole transaction was rolled back"
            )
        cur = self._guard(lambda: self._conn.execute(st.text))
        self._cap.reread = True  # rows were restored behind the hook's back
        if i >= 0:
            nddl = tx.savepoints[i][1]
            del tx.ddl[nddl:]
            del tx.savepoints[i + 1 :]
        return cur

    # --- schema changes ------------------------------------------------------

    def _schema_change(self, st: Statement, bindings: Any) -> Any:
        """ALTER TABLE, DROP TABLE, CREATE TABLE ... AS: the session cannot follow
        a table through the first two and does not see the rows of the third.
        So close it, run the statement, re-express what it recorded so far
        against the new shape of the tables (the follower runs the schema
        first, then the data), add the new table's rows, start a new session."""
        tx = self._tx
        assert tx is not None and tx.writing
        cap = self._cap
        saved = cap.save()
        before = cap.take()  # encoded while the tables still have their old shape
        roots = self._rootpages()
        try:
            cur = self._conn.execute(st.text, bindings)
            cap.invalidate()
        except BaseException:
            if saved is not None:  # nothing changed: carry on as if not taken
                cap.restore(saved)
            else:
                tx.acc = merge_patchsets([tx.acc, before])
                tx.reshapes += 1
            raise
        acc = merge_patchsets([tx.acc, before])
        tx.reshapes += 1
        try:
            if st.kind is Kind.DDL_RESHAPE:
                if acc:
                    acc = self._reexpress(acc, roots)
                tx.ddl.append(st.text)
            else:
                created = self._created_table(st.name, roots)
                if created is not None:
                    self._internal = True
                    try:
                        acc = merge_patchsets([acc, table_rows_patchset(self._conn, created)])
                        (sql,) = fetchone(
                            self._conn,
                            "SELECT sql FROM sqlite_schema WHERE type='table' AND name=?",
                            (created,),
                        )
                    finally:
                        self._internal = False
                    tx.ddl.append(sql)
            tx.acc = acc
        except BaseException:
            self._abort()
            raise
        return cur

    def _created_table(self, name: str, roots_before: dict[str, int]) -> str | None:
        if name.lower() in roots_before:
            return None  # IF NOT EXISTS met an existing table: nothing happened
        for (real,) in self._conn.execute(
            "SELECT name FROM sqlite_schema WHERE type='table' AND name=? COLLATE NOCASE", (name,)
        ):
            return str(real)
        return None

    def _rootpages(self) -> dict[str, int]:
        self._internal = True
        try:
            return {
                name.lower(): root
                for name, root in self._conn.execute(
                    "SELECT name, rootpage FROM sqlite_schema WHERE type='table'"
                )
            }
        finally:
            self._internal = False

    def _reexpress(self, acc: bytes, roots_before: dict[str, int]) -> bytes:
        """Rewrite recorded changes after the schema changed under them: follow
        renamed tables by root page, drop dropped ones, and read each touched
        row back in its new shape."""
        names_after = {root: name for name, root in self._rootpages().items()}
        real_names = {
            n.lower(): n
            for (n,) in self._conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")
        }
        out = []
        self._internal = True
        try:
            for table in patchset.decode(acc):
                root = roots_before.get(table.name.lower())
                new = names_after.get(root) if root is not None else None
                if new is None:
                    continue  # dropped: its rows went with it
                out.append(self._reexpress_table(real_names[new], table))
        finally:
            self._internal = False
        return b"".join(out)

    def _reexpress_table(self, name: str, table: patchset.Table) -> bytes:
        sh = self._cap.shape(name)  # the table's new shape
        # primary-key values travel in primary-key order, go out in column order
        order = sorted(range(len(sh.pkcols)), key=lambda k: sh.pkcols[k])
        parts = [sh.header]
        for op, indirect, old, newrow in table.changes:
            src = newrow if op == patchset.INSERT else old
            key = [src[c] for c in table.pk_columns]
            if op == patchset.DELETE:
                parts.append(patchset.encode_delete([key[k] for k in order], indirect))
                continue
            row = self._conn.execute(sh.select, key).fetchone()
            if row is None:
                continue
            if op == patchset.INSERT:
                parts.append(patchset.encode_insert(row, indirect))
            else:
                others = [row[i] for i in sh.others]
                parts.append(patchset.encode_update([key[k] for k in order], others, indirect))
        return b"".join(parts) if len(parts) > 1 else b""
