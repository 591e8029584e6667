"""Group commit: many journaled transactions in one SQLite transaction.

A transaction submitted whole (:meth:`GroupCommitter.transact`: a list of
statements with their bindings) joins a queue. The first submitter to find
no group running leads: it takes the queue and runs every transaction in
it on the committer's own connection, each inside a savepoint of one
``BEGIN IMMEDIATE`` … ``COMMIT``. Each one is atomic on its own (a failing
one rolls back to its savepoint alone and its caller gets the error), each
gets its own cid and journal entry, and every caller returns only after the
``COMMIT`` of its group. Then the leader hands the lead to the first
submitter that queued meanwhile, whose group is already waiting.

So while SQLite commits one group (the GIL released), the other threads
queue the next: concurrent writers pay one ``BEGIN``/``COMMIT`` (and one
WAL sync) per group instead of one each.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import apsw

from ..errors import BusyError, UnsupportedStatementError
from . import hctcapture
from .append import Appended
from .authorizer import Authorizer
from .capture import Capture, uncaptured
from .gate import Ticket, check_durability
from .sqltext import Kind, parse
from .store import CommitHook, Store
from .transaction import CidTracker, Transactions, disk_full, run_hooks


class Committed(NamedTuple):
    """What :meth:`GroupCommitter.transact` returns."""

    cid: int  # its journal entry's cid; 0 if it changed nothing (no entry)
    rows: list[list[tuple[Any, ...]]]  # each statement's result rows


Statements = Sequence[Any]  # each: "sql" or ("sql", bindings)


class _Work:
    __slots__ = (
        "done", "durability", "entry", "error", "hooks", "rows", "statements", "ticket",
        "tracker", "wake",
    )  # fmt: skip

    def __init__(
        self,
        statements: Prepared,
        hooks: tuple[CommitHook, ...],
        tracker: CidTracker | None,
        durability: str | None = None,
    ) -> None:
        self.durability = durability
        self.statements = statements
        self.hooks = hooks
        self.tracker = tracker
        # released when it is done, or must lead; made only for a transaction
        # that queues behind a group (a lone writer leads at once and needs none)
        self.wake: threading.Lock | None = None
        self.done = False
        self.entry: Appended | None = None
        self.rows: list[list[tuple[Any, ...]]] = []
        self.error: BaseException | None = None
        self.ticket: Ticket | None = None  # the gate's admission of its group


Prepared = list[tuple[str, Any, bool]]  # (sql, bindings, writes)


def prepare(statements: Iterable[Any]) -> Prepared:
    """Check a transaction's statements before it is queued: each one
    statement of INSERT/UPDATE/DELETE/REPLACE or a read."""
    out = []
    for item in statements:
        sql, bindings = (item, None) if isinstance(item, str) else item
        stmts = parse(sql)
        if len(stmts) != 1:
            raise UnsupportedStatementError(
                f"transact() takes one statement per item, not {len(stmts)}: {sql[:60]!r}"
            )
        if stmts[0].kind not in (Kind.WRITE, Kind.READ):
            raise UnsupportedStatementError(
                "transact() runs INSERT/UPDATE/DELETE/REPLACE and SELECT statements;"
                f" run {stmts[0].kind.value} statements with execute(): {sql[:60]!r}"
            )
        out.append((stmts[0].text, bindings, stmts[0].kind is Kind.WRITE))
    if not out:
        raise UnsupportedStatementError("transact() needs at least one statement")
    return out


class GroupCommitter:
    """One per database file and process; thread-safe."""

    def __init__(self, db: Store) -> None:
        self.db = db
        self._mu = threading.Lock()
        self._queue: list[_Work] = []
        self._busy = False
        self._conn: apsw.Connection | None = None
        self._txs: Transactions | None = None
        self.groups = 0  # groups committed (for /status and the bench)
        self.transactions = 0

    def transact(
        self,
        statements: Prepared,
        hooks: tuple[CommitHook, ...] = (),
        tracker: CidTracker | None = None,
        durability: str | None = None,
    ) -> tuple[Appended | None, list[list[tuple[Any, ...]]]]:
        """Run prepared statements as one journaled transaction, in a group;
        ``durability``: its own (``"local"``, ``"replicated"``), None for the
        node's (see :meth:`hctserver.journal.gate.Gate.acknowledge`)."""
        w = _Work(statements, hooks, tracker, check_durability(durability))
        with self._mu:
            self._queue.append(w)
            lead = not self._busy
            if not lead:
                w.wake = wake = threading.Lock()
                wake.acquire()
            self._busy = True
        if not lead:
            wake.acquire()
        if not w.done:
            self._lead()
        if w.error is not None:
            raise w.error
        if w.entry is not None and w.ticket is not None:
            # in the caller's own thread, after the lead has passed on: the next
            # groups commit while this one waits for its acknowledgement
            self.db.gate.acknowledge(w.ticket, w.entry.cid, w.durability)
        return w.entry, w.rows

    def busy(self) -> bool:
        """A group is being committed."""
        with self._mu:
            return self._busy

    def queued(self) -> int:
        """Transactions waiting for a group (the one being committed aside)."""
        with self._mu:
            return len(self._queue)

    def _lead(self) -> None:
        """Commit the queue as one group, then hand the lead to the first
        transaction queued meanwhile (its thread wakes and commits the next
        group, its own among them). Going on leading instead would keep
        this thread from queueing its caller's next transaction."""
        with self._mu:
            batch, self._queue = self._queue, []
        try:
            self._commit_group(batch)
        finally:
            with self._mu:
                nxt = self._queue[0] if self._queue else None
                self._busy = nxt is not None
            for w in batch:
                w.done = True
                if w.wake is not None:  # queued behind a group: its thread waits
                    w.wake.release()
            if nxt is not None:
                assert nxt.wake is not None  # queued while this group committed
                nxt.wake.release()  # not done: it leads the next group

    # --- one group --------------------------------------------------------

    def _open(self) -> Transactions:
        if self._txs is None:
            conn = self.db.open_connection()
            self._conn = conn
            auth = Authorizer(conn)
            cap = Capture(conn, self.db.share, track_keys=self.db.format == "hctree")
            self._txs = Transactions(conn, self.db, cap, auth)
        return self._txs

    def _commit_group(self, batch: list[_Work]) -> None:
        try:
            txs = self._open()
            txs.begin(eager=True)
            txs.start_writing()  # the writer lock, and LEADER mode checked under it
        except BaseException as exc:
            if self._txs is not None:
                self._txs.abort()
            for w in batch:
                w.error = exc
            return
        conn, share = txs.conn, self.db.share
        alone = len(batch) == 1
        try:
            for w in batch:
                self._one(txs, w, alone)
                if conn.get_autocommit():  # an error ended the whole transaction
                    raise w.error or BusyError("the group's transaction ended early; retry")
            for w in batch:
                if w.entry is not None:
                    ticket = self.db.gate.admit()  # under the writer lock
                    for w2 in batch:
                        w2.ticket = ticket
                    break
            conn.execute("COMMIT")
        except BaseException as exc:
            share.tail = None
            share.schema_epoch += 1
            for w in batch:
                if w.entry is not None and w.tracker is not None:
                    w.tracker.discard(w.entry.cid)
                w.entry = None
                w.error = w.error or (disk_full(self.db.path) if _full(exc) else exc)
            txs.abort()
            return
        txs.end()
        self.groups += 1
        last = None
        for w in batch:
            if w.entry is not None:
                last = w.entry
        if last is not None:
            self.db.notify_snapshot(last.cid)
        for w in batch:
            if w.entry is not None:
                self.transactions += 1
                run_hooks((*w.hooks, *self.db.commit_hooks), w.entry)

    def _one(self, txs: Transactions, w: _Work, alone: bool) -> None:
        """One transaction of the group, inside its own savepoint; a group of
        one needs none: if it fails, the whole SQLite transaction rolls back
        (a failure after its statements ran, in capture or in the journal
        insert, must undo them too)."""
        conn, cap, share = txs.conn, txs.cap, self.db.share
        tail = share.tail
        if not alone:
            conn.execute("SAVEPOINT hct_group")
        wrote = False
        try:
            rows = []
            for sql, bindings, writes in w.statements:
                rows.append(list(conn.execute(sql, bindings)))
                wrote = wrote or writes
            if cap.broken is not None:
                raise uncaptured(cap.broken)
            data = cap.take()
            hctree = self.db.format == "hctree"
            if hctree:
                data = hctcapture.entry_data(conn, cap.touched, data, "")
                cap.touched = {}
            if data or (hctree and wrote):
                txs.tracker = w.tracker
                w.entry = txs.journal("", data)
                share.tail = w.entry.next_tail()  # the group's next one builds on it
            if not alone:
                conn.execute("RELEASE hct_group")
            w.rows = rows
        except BaseException as exc:
            w.error = disk_full(self.db.path) if _full(exc) else exc
            if w.entry is not None and w.tracker is not None:
                w.tracker.discard(w.entry.cid)
            w.entry = None
            share.tail = tail
            cap.take()  # forget what it recorded
            cap.touched = {}
            if conn.get_autocommit():
                pass  # SQLite ended the whole transaction already
            elif alone:
                conn.execute("ROLLBACK")  # the group ends here (see _commit_group)
            else:
                conn.execute("ROLLBACK TO hct_group")
                conn.execute("RELEASE hct_group")
            if not isinstance(exc, Exception):
                raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            self._txs = None


def _full(exc: BaseException) -> bool:
    return isinstance(exc, apsw.FullError)
