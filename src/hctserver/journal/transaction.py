"""The transactions of one journaled connection, and their savepoints.

While a transaction writes it holds the file's writer lock and
:mod:`hctserver.journal.capture` records its row changes. At COMMIT the changes
become a patchset, the journal row is appended (next cid, hash, H) inside
the same SQLite transaction, the guard's record of the schema is updated if
the schema changed, and then SQLite commits. Commit hooks run afterwards.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import apsw

from ..errors import BusyError, DiskFullError, ModeError, UnsupportedStatementError
from . import guard, hctcapture, patchset
from .append import Appended, append_entry
from .authorizer import Authorizer
from .capture import Capture
from .gate import Ticket, check_durability
from .sqltext import Statement
from .store import CommitHook, Mode, Store
from .systables import read_tail

log = logging.getLogger("hctserver")


class CidTracker(Protocol):
    """Told each cid a connection commits, before the commit is visible."""

    def add(self, cid: int) -> None: ...

    def discard(self, cid: int) -> None: ...


class Transaction:
    """The state of one open transaction."""

    __slots__ = (
        "acc", "ddl", "durability", "implicit", "locked", "reshapes", "savepoints", "writing"
    )  # fmt: skip

    def __init__(self, implicit: bool = False) -> None:
        self.writing = False  # the writer lock is held and capture runs
        self.acc = b""  # changes before the last ALTER/DROP TABLE, in the current schema
        # each schema statement: (as we journal it, as hctree does: its text
        # as written, with the ";" that ended it)
        self.ddl: list[tuple[str, str]] = []
        self.locked = False
        self.implicit = implicit  # started by SAVEPOINT: its outermost RELEASE commits
        self.savepoints: list[tuple[str, int, int]] = []  # (name, len(ddl), reshapes)
        self.reshapes = 0
        self.durability: str | None = None  # its own choice (set_durability); None: the node's

    def find(self, name: str) -> int:
        """Index of the innermost savepoint called ``name``, or -1."""
        for i in range(len(self.savepoints) - 1, -1, -1):
            if self.savepoints[i][0] == name:
                return i
        return -1


class Transactions:
    """Begin, commit, abort and savepoints for one connection."""

    def __init__(self, conn: apsw.Connection, db: Store, cap: Capture, auth: Authorizer) -> None:
        self.conn = conn
        self.db = db
        self.cap = cap
        self.auth = auth
        self.tx: Transaction | None = None
        self.hooks: tuple[CommitHook, ...] = ()
        self.tracker: CidTracker | None = None
        self.last_cid = 0

    # --- begin and end ------------------------------------------------------------

    def lock(self) -> None:
        db = self.db
        db.gate.admit()  # refused at once, without taking the writer lock (checked again at COMMIT)
        if db.checkpoint_wanted:
            time.sleep(0)  # let the checkpointer take the lock first
        if not db.share.acquire(timeout=db.busy_timeout):
            raise BusyError(
                f"database is locked: another writer in this process held {db.path}"
                f" for more than {db.busy_timeout:g} s; retry the transaction"
            )
        if db.mode is not Mode.LEADER:  # it changed while we waited (a node fenced itself)
            db.share.release()
            raise not_leader(db.path)

    def begin(self, *, eager: bool, implicit: bool = False) -> None:
        tx = Transaction(implicit)
        if eager and self.db.mode is Mode.LEADER:
            self.lock()
            tx.locked = True
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except apsw.BusyError:
                self.db.share.release()
                raise BusyError(
                    f"database is locked: another process held the write lock on {self.db.path}"
                    f" for more than the busy timeout; retry the transaction"
                ) from None
            except BaseException:
                self.db.share.release()
                raise
            self.tx = tx
            self.start_writing()
        else:
            if not implicit:  # an outermost SAVEPOINT begins the transaction itself
                self.conn.execute("BEGIN DEFERRED")
            self.tx = tx

    def start_writing(self) -> None:
        tx = self.tx
        assert tx is not None
        if tx.writing:
            return
        if not tx.locked:
            self.lock()
            tx.locked = True
        self.cap.begin()
        tx.writing = True

    def end(self) -> None:
        tx = self.tx
        self.tx = None
        if tx is None:
            return
        if tx.writing:
            self.cap.end()
            if tx.ddl or tx.reshapes:  # committed or not, shapes may have changed
                self.cap.invalidate()
        if tx.locked:
            self.db.share.release()

    def abort(self) -> None:
        try:
            if not self.conn.get_autocommit():
                self.conn.execute("ROLLBACK")
        finally:
            self.end()

    def failed(self) -> None:
        """A statement failed: SQLite undid its row changes, which the hook
        does not see; and if it ended the whole transaction, forget ours too."""
        self.cap.reread = True
        if self.tx is not None and self.conn.get_autocommit():
            self.end()

    def set_durability(self, durability: str | None) -> None:
        """This transaction's durability (as PostgreSQL's ``SET LOCAL
        synchronous_commit``, for the open transaction only): ``"local"``, its
        COMMIT waits for no follower; ``"replicated"``, for the node's K
        followers, or one on a node without synchronous commit; None, the
        node's setting (see :meth:`hctserver.journal.gate.Gate.acknowledge`)."""
        check_durability(durability)
        if self.tx is None:
            raise UnsupportedStatementError(
                "a transaction's durability is set inside it: BEGIN first (it lasts until"
                " its COMMIT or ROLLBACK)"
            )
        self.tx.durability = durability

    # --- commit -----------------------------------------------------------------------

    def commit(self, release: str | None = None) -> None:
        tx = self.tx
        assert tx is not None
        entry: Appended | None = None
        ticket: Ticket | None = None
        share = self.db.share
        rowid = self.conn.last_insert_rowid()  # the journal's rows are not the application's
        try:
            if tx.writing:
                data = patchset.merge([tx.acc, self.cap.take()])
                hctree = self.db.format == "hctree"
                schema = ";".join(d[1] if hctree else d[0] for d in tx.ddl)
                if hctree:
                    data = hctcapture.entry_data(self.conn, self.cap.touched, data, schema)
                if data or schema or hctree:  # hctree journals every write transaction
                    entry = self.journal(schema, data)
                if schema:
                    with self.auth.bypass():
                        guard.protect(self.conn)
            if entry is not None:
                ticket = self.db.gate.admit()  # the writer lock is held: nothing can change
            self.conn.set_last_insert_rowid(rowid)
            self.conn.execute(release or "COMMIT")
        except BaseException as exc:
            share.tail = None  # unknown now; and shapes may be stale too
            share.schema_epoch += 1
            if entry is not None and self.tracker is not None:
                self.tracker.discard(entry.cid)  # before ROLLBACK frees the cid
            self.abort()
            if isinstance(exc, apsw.FullError):
                raise disk_full(self.db.path) from exc
            raise
        if entry is not None:
            self.last_cid = entry.cid
            share.tail = entry.next_tail()
            if entry.schema:
                share.schema_epoch += 1
        self.end()
        if entry is not None:
            self.db.notify_snapshot(entry.cid)
            run_hooks((*self.hooks, *self.db.commit_hooks), entry)
            assert ticket is not None
            self.db.gate.acknowledge(ticket, entry.cid, tx.durability)

    def journal(self, schema: str, data: bytes) -> Appended:
        """Append the journal row. The tail of the last commit in this process
        is cached; if another process committed since, the insert meets its
        row, and the transaction carries on from the fresh tail, unless that
        process changed the schema (then the capture may be stale: BusyError,
        retry)."""
        c = self.conn
        share = self.db.share
        with self.auth.bypass():
            tail = share.tail
            if tail is None:
                tail = read_tail(c)
            try:
                entry = append_entry(c, tail, schema, data)
            except apsw.ConstraintError:
                fresh = read_tail(c)
                if share.tail is None or fresh[1] != tail[1]:
                    share.tail = None
                    share.schema_epoch += 1
                    raise BusyError(
                        f"another process changed the schema of {self.db.path} during this"
                        " transaction; it was rolled back: retry it"
                    ) from None
                entry = append_entry(c, fresh, schema, data)
        if self.tracker is not None:
            self.tracker.add(entry.cid)
        return entry

    # --- savepoints ---------------------------------------------------------------------

    def savepoint(self, st: Statement) -> Any:
        if self.tx is None:
            self.begin(eager=False, implicit=True)
        tx = self.tx
        assert tx is not None
        try:
            cur = self.conn.execute(st.text)
        except BaseException:
            if self.conn.get_autocommit():
                self.end()
            raise
        tx.savepoints.append((st.name, len(tx.ddl), tx.reshapes))
        return cur

    def release(self, st: Statement) -> Any:
        tx = self.tx
        if tx is None:
            return self.conn.execute(st.text)
        i = tx.find(st.name)
        if i == 0 and tx.implicit:
            self.commit(st.text)
            return None
        cur = self.guarded(lambda: self.conn.execute(st.text))
        if i >= 0:
            del tx.savepoints[i:]
        return cur

    def rollback_to(self, st: Statement) -> Any:
        tx = self.tx
        if tx is None:
            return self.conn.execute(st.text)
        i = tx.find(st.name)
        if i >= 0 and tx.savepoints[i][2] != tx.reshapes:
            self.abort()
            raise UnsupportedStatementError(
                "ROLLBACK TO across an ALTER TABLE or DROP TABLE cannot be journaled;"
                " the whole transaction was rolled back"
            )
        cur = self.guarded(lambda: self.conn.execute(st.text))
        self.cap.reread = True  # rows were restored behind the hook's back
        if i >= 0:
            nddl = tx.savepoints[i][1]
            del tx.ddl[nddl:]
            del tx.savepoints[i + 1 :]
        return cur

    def guarded(self, fn: Any) -> Any:
        """Run fn; if it fails see :meth:`failed`."""
        try:
            return fn()
        except BaseException:
            self.failed()
            raise


def not_leader(path: str) -> ModeError:
    """What a write on a database that is not in LEADER mode raises."""
    return ModeError(
        f"{path} is in FOLLOWER mode: writes are refused (it is a replica;"
        " write on the leader, or set_mode('leader') on a database without holes)"
    )


def run_hooks(hooks: tuple[CommitHook, ...], entry: Appended) -> None:
    """Tell each hook of a commit; a failing hook is logged, not raised."""
    args = (entry.cid, entry.schema, entry.data, entry.schemacid)
    for hook in hooks:
        try:
            hook(*args)
        except Exception:
            log.exception("commit hook %r failed for cid %d", hook, entry.cid)


def disk_full(path: str) -> DiskFullError:
    """What a transaction that met a full disk raises (instead of apsw.FullError)."""
    return DiskFullError(
        f"{path}: the disk is full; the transaction was rolled back: free space and retry it"
    )
