"""Connections for user code: every write transaction becomes a journal entry.

Statements are sorted (:mod:`hctserver.journal.sqltext`) and dispatched: reads run
as they are; writes run inside a journaled transaction
(:mod:`hctserver.journal.transaction`); ALTER/DROP TABLE and CREATE TABLE ... AS go
through :mod:`hctserver.journal.reshape`; the authorizer keeps user SQL off the
system tables.

Transaction forms: ``BEGIN [DEFERRED|IMMEDIATE|EXCLUSIVE|CONCURRENT]`` …
``COMMIT``/``END``/``ROLLBACK``; ``SAVEPOINT``/``RELEASE`` (an outermost
SAVEPOINT starts a transaction, its RELEASE commits it); ``with conn:``; and
a single writing statement outside any transaction, which is wrapped in one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import apsw

from ..errors import DuplicateTransactionError, LagError, UnsupportedStatementError
from . import sqltext, txids
from .authorizer import Authorizer
from .capture import Capture, uncaptured
from .gate import FOLLOWER, check_durability
from .groupcommit import Committed, GroupCommitter, Statements, prepare
from .reshape import Reshaper
from .sqltext import Kind, Statement, ddl_texts
from .store import CommitHook, Mode, Store
from .transaction import CidTracker, Transactions, disk_full, not_leader


class Rows:
    """The rows of a statement that already ran to completion (here, or on
    the leader for a forwarded statement): ``description`` as an apsw
    cursor's ``getdescription()``; ``changes`` and ``lastrowid`` as the
    connection's after it."""

    def __init__(
        self,
        rows: list[tuple[Any, ...]],
        description: tuple[tuple[str, str | None], ...] = (),
        changes: int = 0,
        lastrowid: int = 0,
    ) -> None:
        self._it = iter(rows)
        self.description = description
        self.changes = changes
        self.lastrowid = lastrowid

    def getdescription(self) -> tuple[tuple[str, str | None], ...]:
        return self.description

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
_FORWARDED = frozenset({Kind.WRITE, Kind.DDL, Kind.DDL_RESHAPE, Kind.BEGIN, Kind.SAVEPOINT})
APPLY_TIMEOUT = 10.0  # seconds a forwarded write waits to be applied here
APPLY_POLL = 0.0005  # seconds between looks at the file meanwhile (another process applies)


class RemoteStream(Protocol):
    """A SQL session on the leader (:mod:`hctserver.client.remote`): how a
    connection on a follower's file runs its writes."""

    @property
    def cid(self) -> int:
        """The newest cid this stream committed (0 if none)."""
        ...

    @property
    def in_transaction(self) -> bool: ...

    def execute(self, sql: str, bindings: Any) -> Rows: ...

    def transact(self, statements: Statements, txid: str | None = None) -> Committed: ...

    def leader_snapshot(self) -> int:
        """The leader's newest cid, asked while its lease holds."""
        ...

    def close(self) -> None: ...


Forwarder = Callable[[], RemoteStream]  # a new stream to the current leader


class JournaledConnection:
    """A connection to a replication-enabled database for user code.

    One per thread. ``execute`` accepts one or several statements; bindings
    only with a single statement. ``with conn:`` is a transaction (a
    savepoint when one is already open). A connection reads its own writes.
    """

    def __init__(
        self,
        db: Store,
        *,
        owns_db: bool = False,
        committer: GroupCommitter | None = None,
        forward: Forwarder | None = None,
    ) -> None:
        self.db = db
        self._forward = forward  # where writes go while this file follows
        self._remote: RemoteStream | None = None  # a forwarded transaction, open
        self._remote_rows: Rows | None = None  # the last forwarded statement's
        self._owns_db = owns_db
        self._committer = committer
        self._own_committer: GroupCommitter | None = None
        self._conn = db.open_connection()
        self._epoch = -1
        self._ctx: list[str | None] = []
        self._auth = Authorizer(self._conn)
        self._cap = Capture(self._conn, db.share, track_keys=db.format == "hctree")
        self._txs = Transactions(self._conn, db, self._cap, self._auth)
        self._reshaper = Reshaper(self._conn, self._cap, self._auth)

    # --- public API ----------------------------------------------------------

    def execute(self, sql: str, bindings: Any = None) -> Any:
        """Run SQL; returns a cursor (or, for a statement wrapped in its own
        transaction, its rows already fetched)."""
        if self._epoch != self.db.mode_epoch:
            self._sync_mode()
        try:
            return self._execute(sql, bindings)
        except apsw.AuthError as e:
            raise self._refusal(e) from None

    def _refusal(self, e: apsw.AuthError) -> BaseException:
        why, self._auth.refused = self._auth.refused, None
        return e if why is None else UnsupportedStatementError(why)

    def _execute(self, sql: str, bindings: Any) -> Any:
        stmts = _parse(sql)
        if stmts and any(self._forwarding(st) for st in stmts):
            if len(stmts) > 1 and bindings is not None:
                raise UnsupportedStatementError(
                    "bindings were given with several statements; execute them one at a time"
                )
            rows = _NO_ROWS
            for st in stmts:
                rows = self._forwarded(st.text, bindings)
            return rows
        if len(stmts) == 1:
            return self._run(stmts[0], bindings)
        if not stmts:
            return self._conn.execute(sql, bindings)
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
        if self._epoch != self.db.mode_epoch:
            self._sync_mode()
        stmts = _parse(sql)
        if len(stmts) != 1:
            raise UnsupportedStatementError("executemany takes exactly one statement")
        st = stmts[0]
        if st.kind not in (Kind.WRITE, Kind.READ):
            raise UnsupportedStatementError(
                f"executemany runs INSERT/UPDATE/DELETE/SELECT, not {st.kind.value} statements"
            )
        if st.kind is Kind.READ:
            return self._conn.executemany(st.text, sequence)
        if self._forwarding(st):
            if self._remote is not None:
                n = 0
                for b in sequence:
                    n += self._forwarded(st.text, b).changes
                return Rows([], changes=n)
            done = self._forward_transact([(st.text, b) for b in sequence])
            return Rows(done.rows[-1] if done.rows else [])
        self._check_writable()
        txs = self._txs
        if txs.tx is not None:
            txs.start_writing()
            return txs.guarded(lambda: self._conn.executemany(st.text, sequence))
        txs.begin(eager=True)
        try:
            rows = list(self._conn.executemany(st.text, sequence))
            txs.commit()
        except BaseException:
            txs.abort()
            raise
        return Rows(rows)

    def transact(
        self, statements: Statements, txid: str | None = None, durability: str | None = None
    ) -> Committed:
        """Run ``statements`` (each ``"sql"`` or ``("sql", bindings)``: one
        INSERT/UPDATE/DELETE/REPLACE or SELECT each) as one journaled
        transaction, in one call. Transactions that threads submit at the
        same time are committed together (group commit), each atomic on its
        own with its own cid; this returns once its group is committed, with
        the cid (0 if it changed nothing) and each statement's rows. If one
        statement fails, the transaction is rolled back and the error raised.

        ``txid``: the transaction's id (see :mod:`hctserver.journal.txids`): if
        a transaction with this id was committed before (an answer lost, a
        failover), nothing runs and its cid is returned (its rows are not kept).
        ``durability``: this transaction's own (see :meth:`set_durability`)."""
        check_durability(durability)
        if self._epoch != self.db.mode_epoch:
            self._sync_mode()
        prepared = prepare(statements)
        if self._remote is not None:
            raise UnsupportedStatementError(
                "transact() runs a transaction of its own: commit or roll back the open one first"
            )
        if self._forward is not None and self._txs.tx is None and self._follows():
            if durability is not None:
                raise UnsupportedStatementError(
                    "a forwarded transaction commits with the leader's durability setting"
                )
            return self._forward_transact([(sql, b) for sql, b, _ in prepared], txid)
        if txid is not None:
            return self._transact_once(prepared, txid, durability)
        self._check_writable()
        if self._txs.tx is not None:
            raise UnsupportedStatementError(
                "transact() runs a transaction of its own: commit or roll back the open one first"
            )
        if self._committer is None:  # a connection on a bare Store: a committer of its own
            self._committer = self._own_committer = GroupCommitter(self.db)
        txs = self._txs
        entry, rows = self._committer.transact(prepared, txs.hooks, txs.tracker, durability)
        if entry is None:
            return Committed(0, rows)
        txs.last_cid = entry.cid
        return Committed(entry.cid, rows)

    def set_durability(self, durability: str | None) -> None:
        """The open transaction's own durability, as PostgreSQL's ``SET LOCAL
        synchronous_commit``: ``"local"``, its COMMIT waits for no follower
        (the leader's lease is still checked); ``"replicated"``, for the
        node's K followers, or one where the node has no synchronous commit;
        None, the node's setting. Lasts until its COMMIT or ROLLBACK. In a
        transaction forwarded to the leader it is refused: the leader's
        setting applies there."""
        if self._remote is not None:
            raise UnsupportedStatementError(
                "a forwarded transaction commits with the leader's durability setting"
            )
        self._txs.set_durability(durability)

    def add_commit_hook(self, hook: CommitHook) -> None:
        """Call ``hook(cid, schema, data, schemacid)`` after each journaled commit
        of this connection (the leader streams a job's commits from here)."""
        self._txs.hooks = (*self._txs.hooks, hook)

    def track_cids(self, tracker: CidTracker | None) -> None:
        """Tell ``tracker`` every cid this connection commits, before the
        commit becomes visible (and again if it then fails)."""
        self._txs.tracker = tracker

    @property
    def last_cid(self) -> int:
        """The cid of the last transaction this connection committed (0 if none):
        what a reader on a follower waits for to read its writes
        (``follower_db.wait_for(conn.last_cid)``)."""
        return self._txs.last_cid

    @property
    def in_transaction(self) -> bool:
        return self._txs.tx is not None or self._remote is not None

    def snapshot(self) -> int:
        return self.db.snapshot()

    def wait_for(self, cid: int, timeout: float | None = None) -> bool:
        """Wait until the database's snapshot reaches ``cid`` (see Store.wait_for):
        the ``at_least(cid)`` read consistency."""
        return self.db.wait_for(cid, timeout)

    def catch_up_with_leader(self, timeout: float = APPLY_TIMEOUT) -> int:
        """The ``leader`` read consistency: return once this file holds
        everything the leader had committed when this was called (on a
        follower's file: its newest cid, asked of it, applied here; on the
        leader's: it still leads). Reads made after it are linearizable.
        Returns that cid; raises LagError (not applied in time) or
        NotLeaderError/NoNodeError (no leader to ask)."""
        if not self._follows() or self._forward is None:
            self.db.gate.admit()  # leads now (its lease valid): nothing newer elsewhere
            return self.db.snapshot()
        remote = self._forward()
        try:
            cid = remote.leader_snapshot()
        finally:
            remote.close()
        self._applied(cid, timeout, wrote=False)
        return cid

    def changes(self) -> int:
        if self._remote_rows is not None:
            return self._remote_rows.changes
        return int(self._conn.changes())

    def last_insert_rowid(self) -> int:
        if self._remote_rows is not None:
            return self._remote_rows.lastrowid
        return int(self._conn.last_insert_rowid())

    # --- transaction ids ------------------------------------------------------

    def recall(self, txid: str) -> tuple[int, str] | None:
        """The (cid, outcome) recorded for a client transaction id, if any
        (see :mod:`hctserver.journal.txids`)."""
        with self._auth.bypass():
            return txids.recall(self._conn, txid)

    def remember(self, txid: str, outcome: str, window: float = txids.WINDOW) -> int:
        """Record ``txid`` and its ``outcome`` in the open transaction: they
        commit with it. Returns the cid it will commit as."""
        txs = self._txs
        if txs.tx is None:
            raise UnsupportedStatementError("a transaction id is recorded in an open transaction")
        if not txs.tx.writing:
            txs.start_writing()
        with self._auth.bypass():
            if not txids.exists(self._conn):
                for sql in (txids.CREATE, txids.INDEX):
                    self._write(_parse(sql)[0], None)
            found = txids.recall(self._conn, txid)  # the writer lock is held: final
            if found is not None:
                raise DuplicateTransactionError(
                    f"transaction id {txid!r} was committed already (cid {found[0]})",
                    cid=found[0],
                    outcome=found[1],
                )
            return txids.record(self._conn, txid, outcome, window)

    def interrupt(self) -> None:
        """Stop the statement running on this connection (from any thread):
        it fails with apsw.InterruptError."""
        self._conn.interrupt()

    def _transact_once(self, prepared: Any, txid: str, durability: str | None) -> Committed:
        """transact() with a transaction id, here (not group-committed)."""
        self._check_writable()
        if self._txs.tx is not None:
            raise UnsupportedStatementError(
                "transact() runs a transaction of its own: commit or roll back the open one first"
            )
        found = self.recall(txid)
        if found is not None:
            return Committed(found[0], [])
        txs = self._txs
        txs.begin(eager=True)
        try:
            txs.set_durability(durability)
            rows = [list(self._write(_parse(sql)[0], b)) for sql, b, _ in prepared]
            self.remember(txid, "[]")
            txs.commit()
        except DuplicateTransactionError as e:  # a retry of it committed meanwhile
            txs.abort()
            return Committed(e.cid, [])
        except BaseException:
            txs.abort()
            raise
        return Committed(txs.last_cid, rows)

    # --- forwarding (a follower's file) ---------------------------------------

    def _follows(self) -> bool:
        st = self.db.gate.state()
        return st is not None and st.state == FOLLOWER

    def _forwarding(self, st: Statement) -> bool:
        """Does this statement go to the leader? Everything in a forwarded
        transaction; outside one, writes and transaction starts on a
        follower's file (reads stay here)."""
        if self._remote is not None:
            return True
        return (
            self._forward is not None
            and st.kind in _FORWARDED
            and self._txs.tx is None
            and self._follows()
        )

    def _forwarded(self, sql: str, bindings: Any) -> Rows:
        remote = self._remote
        if remote is None:
            assert self._forward is not None
            remote = self._remote = self._forward()
        try:
            rows = remote.execute(sql, bindings)
        except BaseException:
            if not remote.in_transaction:
                self._end_remote()
            raise
        self._remote_rows = rows
        if not remote.in_transaction:
            self._end_remote()
        return rows

    def _end_remote(self) -> None:
        remote, self._remote = self._remote, None
        if remote is None:
            return
        cid = remote.cid
        remote.close()
        if cid:
            self._applied(cid)

    def _forward_transact(self, statements: Statements, txid: str | None = None) -> Committed:
        assert self._forward is not None
        remote = self._forward()
        try:
            done = remote.transact(statements, txid)
        finally:
            remote.close()
        if done.cid:
            self._applied(done.cid)
        return done

    def _applied(self, cid: int, timeout: float = APPLY_TIMEOUT, wrote: bool = True) -> None:
        """Return once this file has applied ``cid`` (read your writes)."""
        if wrote:
            self._txs.last_cid = cid
        db = self.db
        if db.snapshot() >= cid:
            return
        db.gate.want(cid)
        if not db.wait_for(cid, timeout, poll=APPLY_POLL):
            what = "the write was committed" if wrote else "the leader had committed up to"
            raise LagError(
                f"{what} on the leader as cid {cid}, but {db.path} has not applied it"
                f" within {timeout:g} s: it will; read on the leader or wait for it (wait_for)",
                cid=cid,
            )

    def close(self) -> None:
        if self._remote is not None:
            remote, self._remote = self._remote, None
            remote.close()
        if self._txs.tx is not None:
            self._txs.abort()
        self._conn.close()
        if self._own_committer is not None:
            self._own_committer.close()
        if self._owns_db:
            self.db.close()

    def __enter__(self) -> JournaledConnection:
        if not self.in_transaction:
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
            if self.in_transaction:
                self.execute("COMMIT" if exc_type is None else "ROLLBACK")
        elif self.in_transaction:
            if exc_type is not None:
                self.execute(f"ROLLBACK TO {name}")
            self.execute(f"RELEASE {name}")

    # --- dispatch ----------------------------------------------------------

    def _run(self, st: Statement, bindings: Any) -> Any:
        k = st.kind
        txs = self._txs
        if k is Kind.READ or k is Kind.OTHER:
            return self._conn.execute(st.text, bindings)
        if k is Kind.WRITE or k is Kind.DDL or k is Kind.DDL_RESHAPE:
            if self.db.mode is not Mode.LEADER:
                self._check_writable()
            tx = txs.tx
            if tx is None:
                return self._autocommit(st, bindings)
            if not tx.writing:
                txs.start_writing()
            try:
                return self._write(st, bindings)
            except BaseException as exc:
                txs.failed()
                if isinstance(exc, apsw.FullError):
                    raise disk_full(self.db.path) from exc
                raise
        if k is Kind.BEGIN:
            if txs.tx is not None:  # let SQLite report the nesting error
                return self._conn.execute(st.text)
            txs.begin(eager=st.eager)
            return _NO_ROWS
        if k is Kind.COMMIT or k is Kind.ROLLBACK:
            if txs.tx is None:
                return self._conn.execute(st.text)
            if k is Kind.COMMIT:
                txs.commit()
            else:
                txs.abort()
            return _NO_ROWS
        if k is Kind.SAVEPOINT:
            return txs.savepoint(st)
        if k is Kind.RELEASE or k is Kind.ROLLBACK_TO:
            cur = txs.release(st) if k is Kind.RELEASE else txs.rollback_to(st)
            return _NO_ROWS if cur is None else cur
        raise UnsupportedStatementError(
            "VACUUM can renumber the rowids of tables without an INTEGER PRIMARY KEY,"
            " which would break replication; use VACUUM INTO 'file' for a compact copy"
        )

    def _write(self, st: Statement, bindings: Any) -> Any:
        txs = self._txs
        tx = txs.tx
        assert tx is not None
        cap = self._cap
        if cap.large and not tx.savepoints:
            # not inside a savepoint: a ROLLBACK TO could not undo what was encoded
            cap.switch_if_large()
        if st.kind is Kind.DDL_RESHAPE or st.create_as:
            return self._reshaper.execute(st, bindings, tx, txs.abort)
        cur = self._conn.execute(st.text, bindings)
        if cap.broken is not None:
            table = cap.broken
            txs.abort()
            raise uncaptured(table)
        if st.kind is Kind.DDL:
            tx.ddl.append(ddl_texts(st))
            cap.invalidate()
        return cur

    def _autocommit(self, st: Statement, bindings: Any) -> Rows:
        txs = self._txs
        txs.begin(eager=True)
        try:
            rows = list(self._write(st, bindings))
            txs.commit()
        except BaseException as exc:
            txs.abort()
            if isinstance(exc, apsw.FullError):
                raise disk_full(self.db.path) from exc
            raise
        return Rows(rows)

    # --- mode --------------------------------------------------------------

    def _sync_mode(self) -> None:
        epoch = self.db.mode_epoch
        follower = self.db.mode is Mode.FOLLOWER
        with self._auth.bypass():
            self._conn.execute(f"PRAGMA query_only={int(follower)}")
        self._epoch = epoch

    def _check_writable(self) -> None:
        if self.db.mode is not Mode.LEADER:
            raise not_leader(self.db.path)
