"""The replication-enabled database: the store behind leaders and followers.

A :class:`Database` is an ordinary SQLite file plus two system tables
(SPEC section 1)::

    hct_journal(cid INTEGER PRIMARY KEY, schema TEXT, data BLOB,
                schemacid INTEGER, hash BLOB, vhash BLOB)
    hct_baseline(cid INTEGER, schemacid INTEGER, hash BLOB)

``vhash`` is our extra column: the version hash H folded up to that row, so
H at any cid is one primary-key lookup. It is NULL for an entry stored above
a hole (received out of order, not yet applied to the user's tables), which
also makes "is this row applied" a property of the row itself.

This module has no networking; leaders and followers are built on it.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import apsw

from . import patchset
from .errors import (
    ConfigError,
    JournalError,
    ModeError,
    NotReplicationDatabaseError,
)
from .position import ZERO_HASH, Entry, Position, entry_hash, fold

if TYPE_CHECKING:
    from .apply import Applier
    from .connection import JournaledConnection

log = logging.getLogger("hctserver")

JOURNAL = "hct_journal"
BASELINE = "hct_baseline"
SYSTEM_TABLES = frozenset({JOURNAL, BASELINE})

CommitHook = Callable[[int, str, bytes, int], None]

_CREATE_JOURNAL = (
    "CREATE TABLE IF NOT EXISTS hct_journal(cid INTEGER PRIMARY KEY, schema TEXT NOT NULL,"
    " data BLOB NOT NULL, schemacid INTEGER NOT NULL, hash BLOB NOT NULL, vhash BLOB)"
)
_CREATE_BASELINE = (
    "CREATE TABLE IF NOT EXISTS hct_baseline(cid INTEGER NOT NULL,"
    " schemacid INTEGER NOT NULL, hash BLOB NOT NULL)"
)
_INSERT_ENTRY = (
    "INSERT INTO hct_journal(cid, schema, data, schemacid, hash, vhash) VALUES(?,?,?,?,?,?)"
)
# Position: the newest applied row, else the baseline. One statement, so atomic.
_POSITION = (
    "SELECT cid, vhash FROM (SELECT cid, vhash FROM hct_journal WHERE vhash IS NOT NULL"
    " ORDER BY cid DESC LIMIT 1) UNION ALL SELECT cid, hash FROM hct_baseline"
)
# What the next leader commit builds on: (cid, schemacid for the next entry, H).
TAIL = (
    "SELECT cid, iif(schema<>'', cid, schemacid), vhash FROM (SELECT cid, schema,"
    " schemacid, vhash FROM hct_journal ORDER BY cid DESC LIMIT 1)"
    " UNION ALL SELECT cid, schemacid, hash FROM hct_baseline"
)

SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


class Mode(enum.Enum):
    LEADER = "leader"
    FOLLOWER = "follower"


# One writer lock per database file per process: threads queue on it instead
# of spinning in SQLite's busy handler. Other processes meet busy_timeout.
_writer_locks: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_writer_locks_guard = threading.Lock()


def _writer_lock(path: str) -> Any:
    with _writer_locks_guard:
        lock = _writer_locks.get(path)
        if lock is None:
            lock = _WriterLock()
            _writer_locks[path] = lock
        return lock


class _WriterLock:
    """The writer lock of one database file, and what this process shares
    about the file: ``tail`` = (cid, schemacid for the next entry, H) after
    its last journaled commit, or None when unknown; ``schema_epoch``
    counts schema changes committed here (cached table shapes follow it)."""

    __slots__ = ("__weakref__", "_lock", "acquire", "release", "schema_epoch", "tail")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acquire = self._lock.acquire
        self.release = self._lock.release
        self.tail: tuple[int, int, bytes] | None = None
        self.schema_epoch = 0

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def fetchall(conn: apsw.Connection, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
    """Rows of one statement, typed loosely (SQLite values are dynamic)."""
    rows: list[Any] = conn.execute(sql, args).fetchall()
    return rows


def fetchone(conn: apsw.Connection, sql: str, args: tuple[Any, ...] = ()) -> Any:
    return conn.execute(sql, args).fetchone()


@contextlib.contextmanager
def write_transaction(conn: apsw.Connection) -> Iterator[apsw.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK if the block raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if not conn.get_autocommit():
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def merge_patchsets(datas: list[bytes]) -> bytes:
    """Many patchsets as one, merged by SQLite's changegroup (in C)."""
    datas = [d for d in datas if d]
    if len(datas) <= 1:
        return datas[0] if datas else b""
    data = b"".join(datas)  # a patchset may hold a table's block more than once
    builder = apsw.ChangesetBuilder()  # type: ignore[no-untyped-call]
    try:
        builder.add(data)
        out: bytes = builder.output()
    finally:
        builder.close()
    return out


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Database:
    """A replication-enabled SQLite database.

    Opening a file creates the system tables if needed. A plain SQLite
    database that already holds tables is *adopted*: its schema and rows
    become journal entry cid 1, so that replaying the journal reproduces it.

    The mode starts as FOLLOWER, as in the original. Connections from
    :meth:`connect` refuse writes in FOLLOWER mode; :meth:`applier` refuses
    to exist in LEADER mode.

    Durability: WAL mode with ``synchronous=NORMAL`` by default (a commit
    survives a process crash; the last commits may be lost on power loss).
    Pass ``synchronous="FULL"`` to fsync every commit.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        init: bool = True,
        synchronous: str = "NORMAL",
        wal: bool = True,
        busy_timeout: float = 5.0,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        sync = synchronous.upper()
        if sync not in SYNCHRONOUS:
            raise ConfigError(
                f"synchronous must be one of {', '.join(SYNCHRONOUS)}, not {synchronous!r}"
            )
        if busy_timeout < 0:
            raise ConfigError("busy_timeout must be >= 0 seconds")
        self.synchronous = sync
        self.wal = wal
        self.busy_timeout = busy_timeout
        self._mode = Mode.FOLLOWER
        self._mode_epoch = 0  # bumped on every mode change; connections compare it
        self._hooks: list[CommitHook] = []
        self._listeners: list[Callable[[int], None]] = []
        self._lock = threading.Lock()  # guards self._conn
        self._cond = threading.Condition()  # signalled when the snapshot moves
        self._known_snapshot = 0
        self._waiters = 0
        self._checkpointer: threading.Thread | None = None
        self._ckpt_stop = threading.Event()
        self._ckpt_wanted = False
        self.writer_lock = _writer_lock(self.path)
        if not init and not os.path.exists(self.path):
            raise NotReplicationDatabaseError(
                f"{self.path}: no such database (create it with `hctserver init`)"
            )
        self._conn = self.open_connection()
        try:
            self._setup(init)
            self._known_snapshot = self.position().cid
        except BaseException:
            self._conn.close()
            raise

    # --- connections -----------------------------------------------------

    def open_connection(self, *, apply: bool = False) -> apsw.Connection:
        """A raw apsw connection with this database's settings.

        ``apply=True`` gives a connection for applying journal entries:
        triggers and foreign keys off, since their effects are already in
        the entries.
        """
        try:
            conn = apsw.Connection(self.path)
            conn.set_busy_timeout(int(self.busy_timeout * 1000))
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            if self._checkpointer is not None:
                conn.execute("PRAGMA wal_autocheckpoint=0")
            if apply:
                conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
                conn.execute("PRAGMA foreign_keys=OFF")
        except apsw.CantOpenError as e:
            raise NotReplicationDatabaseError(f"{self.path}: cannot open: {e}") from None
        except apsw.NotADBError:
            raise NotReplicationDatabaseError(f"{self.path}: not an SQLite database") from None
        return conn

    def connect(self) -> JournaledConnection:
        """A connection for user code: journals writes in LEADER mode."""
        from .connection import JournaledConnection

        return JournaledConnection(self)

    def applier(self, **options: Any) -> Applier:
        """The follower's entry applier (see :class:`hctserver.apply.Applier`)."""
        from .apply import Applier

        return Applier(self, **options)

    def close(self) -> None:
        self.stop_checkpointer()
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- set-up and adoption ---------------------------------------------

    def _setup(self, init: bool) -> None:
        c = self._conn
        try:
            present = {
                r[0]
                for r in c.execute(
                    "SELECT name FROM sqlite_schema WHERE type='table' AND name IN (?, ?)",
                    (JOURNAL, BASELINE),
                )
            }
        except apsw.NotADBError:
            raise NotReplicationDatabaseError(f"{self.path}: not an SQLite database") from None
        if present == SYSTEM_TABLES:
            return
        if not init:
            raise NotReplicationDatabaseError(
                f"{self.path}: not a replication database (no hct_journal/hct_baseline);"
                " run `hctserver init` on it first"
            )
        if self.wal:
            c.execute("PRAGMA journal_mode=WAL").fetchall()
        with write_transaction(c):
            c.execute(_CREATE_JOURNAL)
            c.execute(_CREATE_BASELINE)
            if not c.execute("SELECT 1 FROM hct_baseline").fetchall():
                c.execute("INSERT INTO hct_baseline VALUES(0, 0, zeroblob(16))")
            if not c.execute("SELECT 1 FROM hct_journal LIMIT 1").fetchall():
                self._adopt(c)

    def _adopt(self, c: apsw.Connection) -> None:
        """Turn existing user objects and rows into journal entry cid 1."""
        objs = fetchall(
            c,
            "SELECT type, name, sql FROM sqlite_schema WHERE sql IS NOT NULL"
            " AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT IN (?, ?)"
            " ORDER BY CASE type WHEN 'table' THEN 0 WHEN 'index' THEN 1"
            " WHEN 'view' THEN 2 ELSE 3 END, rowid",
            (JOURNAL, BASELINE),
        )
        if not objs:
            return
        schema = ";".join(sql for _, _, sql in objs)
        parts = []
        for typ, name, _ in objs:
            if typ == "table":
                parts.append(table_rows_patchset(c, name))
        data = b"".join(parts)
        h = entry_hash(1, schema, data, 0)
        c.execute(_INSERT_ENTRY, (1, schema, data, 0, h, fold(ZERO_HASH, h)))
        log.info("adopted %d schema objects of %s as cid 1", len(objs), self.path)

    # --- mode ---------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(self, mode: Mode | str) -> None:
        m = Mode(mode.lower()) if isinstance(mode, str) else mode
        if m is Mode.LEADER:
            hole = self.first_hole()
            if hole is not None:
                raise ModeError(
                    f"cannot become LEADER: the journal has a hole at cid {hole}"
                    " (entries above it were received but not applied); call rollback() first"
                )
        self._mode = m
        self._mode_epoch += 1

    # --- reading the journal ------------------------------------------------

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return fetchall(self._conn, sql, args)

    def position(self) -> Position:
        """(snapshot cid, version hash H at it)."""
        rows = self._query(_POSITION)
        cid, h = max(rows, key=lambda r: r[0])
        return Position(cid, bytes(h))

    def snapshot(self) -> int:
        """The newest cid whose changes (and all before it) are in the user tables."""
        return self.position().cid

    def max_cid(self) -> int:
        rows = self._query(
            "SELECT max(cid) FROM hct_journal UNION ALL SELECT cid FROM hct_baseline"
        )
        return int(max(r[0] for r in rows if r[0] is not None))

    def first_hole(self) -> int | None:
        """The lowest missing cid below the newest stored one, or None."""
        snap = self.snapshot()
        return snap + 1 if self.max_cid() > snap else None

    def baseline(self) -> tuple[int, int, bytes]:
        cid, schemacid, h = self._query("SELECT cid, schemacid, hash FROM hct_baseline")[0]
        return cid, schemacid, bytes(h)

    def hash_at(self, cid: int) -> bytes | None:
        """H at ``cid``, or None if cid is not an applied position of this database
        (above the snapshot, or below the baseline where truncate forgot it)."""
        rows = self._query(
            "SELECT vhash FROM hct_journal WHERE cid=? AND vhash IS NOT NULL"
            " UNION ALL SELECT hash FROM hct_baseline WHERE cid=?",
            (cid, cid),
        )
        return bytes(rows[0][0]) if rows else None

    def entry(self, cid: int) -> Entry | None:
        rows = self._query(
            "SELECT cid, schemacid, schema, data FROM hct_journal WHERE cid=?", (cid,)
        )
        return Entry(rows[0][0], rows[0][1], rows[0][2], bytes(rows[0][3])) if rows else None

    def iter_entries(self, after: int = 0, upto: int | None = None) -> Iterator[Entry]:
        """Applied entries with ``after < cid <= upto``, in cid order, streamed from
        a read transaction of its own (a consistent view; no lock held)."""
        conn = self.open_connection()
        try:
            hi = upto if upto is not None else (1 << 63) - 1
            cur = conn.execute(
                "SELECT cid, schemacid, schema, data FROM hct_journal"
                " WHERE cid>? AND cid<=? AND vhash IS NOT NULL ORDER BY cid",
                (after, hi),
            )
            for cid, schemacid, schema, data in cur:
                yield Entry(cid, schemacid, schema, data)
        finally:
            conn.close()

    def journal_stats(self) -> tuple[int, int]:
        """(number of journal rows, total bytes of schema and data)."""
        n, size = self._query(
            "SELECT count(*), coalesce(sum(length(CAST(schema AS BLOB))+length(data)),0)"
            " FROM hct_journal"
        )[0]
        return n, size

    def status(self) -> dict[str, Any]:
        pos = self.position()
        bcid, bschemacid, _ = self.baseline()
        n, size = self.journal_stats()
        return {
            "path": self.path,
            "mode": self._mode.value,
            "snapshot": pos.cid,
            "max_cid": self.max_cid(),
            "first_hole": self.first_hole(),
            "hash": pos.hash.hex(),
            "baseline_cid": bcid,
            "baseline_schemacid": bschemacid,
            "journal_entries": n,
            "journal_bytes": size,
        }

    # --- changing the journal ---------------------------------------------

    def rollback(self) -> int:
        """Discard every journal entry above the first hole; return how many.

        Such entries were stored but never applied to the user's tables, so
        only journal rows go. Call it before starting an applier (the
        original does this at start-up).
        """
        with self._lock, write_transaction(self._conn) as c:
            snap = max(r[0] for r in fetchall(c, _POSITION))
            c.execute("DELETE FROM hct_journal WHERE cid>?", (snap,))
            n = c.changes()
        if n:
            log.info("rollback discarded %d entries above cid %d", n, snap)
        return n

    def truncate(self, min_cid: int) -> int:
        """Delete entries below ``min_cid``, folding them into the baseline.

        The baseline takes cid ``min_cid-1``, H at that cid, and the schemacid
        a transaction after it would run against (the largest schemacid of
        the folded entries, counting a schema-changing entry's own cid).
        Returns the number of entries removed.
        """
        with self._lock, write_transaction(self._conn) as c:
            bcid, bschema = fetchone(c, "SELECT cid, schemacid FROM hct_baseline")
            snap = max(r[0] for r in fetchall(c, _POSITION))
            if min_cid > snap + 1:
                raise JournalError(
                    f"cannot truncate below cid {min_cid}: the snapshot is {snap};"
                    f" pick a min-cid of at most {snap + 1}"
                )
            if min_cid <= bcid + 1:
                return 0
            newcid = min_cid - 1
            (vh,) = fetchone(c, "SELECT vhash FROM hct_journal WHERE cid=?", (newcid,))
            (sc,) = fetchone(
                c,
                "SELECT max(iif(schema<>'', cid, schemacid)) FROM hct_journal WHERE cid<?",
                (min_cid,),
            )
            c.execute(
                "UPDATE hct_baseline SET cid=?, schemacid=?, hash=?",
                (newcid, max(bschema, sc or 0), vh),
            )
            c.execute("DELETE FROM hct_journal WHERE cid<?", (min_cid,))
            n: int = c.changes()
        return n

    # --- checkpoints -------------------------------------------------------------

    def start_checkpointer(self, interval: float = 0.1, frames: int = 16000) -> None:
        """Checkpoint the WAL from a thread of its own instead of in the
        committing thread (SQLite's autocheckpoint): connections made from now
        on do not checkpoint. Most of the copying overlaps with the writers;
        the last frames are copied holding the writer lock, so that the WAL
        can start over (a checkpoint racing with appends never completes)."""
        if self._checkpointer is not None:
            return
        self._ckpt_stop.clear()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop,
            args=(interval, frames),
            name="hct-checkpoint",
            daemon=True,
        )
        self._checkpointer.start()

    def stop_checkpointer(self) -> None:
        t = self._checkpointer
        if t is None:
            return
        self._ckpt_stop.set()
        t.join()
        self._checkpointer = None

    def _checkpoint_loop(self, interval: float, frames: int) -> None:
        conn = self.open_connection()
        try:
            while not self._ckpt_stop.wait(interval):
                _, in_wal, _copied = fetchone(conn, "PRAGMA wal_checkpoint(PASSIVE)")
                if in_wal >= frames:
                    self._ckpt_wanted = True  # writers let us have the lock
                    if self.writer_lock.acquire(timeout=1.0):
                        try:
                            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                        finally:
                            self.writer_lock.release()
                    self._ckpt_wanted = False
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except apsw.Error:
            log.exception("background checkpoint failed; SQLite's own checkpoints continue")
        finally:
            conn.close()

    # --- hooks and waiting ------------------------------------------------

    def add_commit_hook(self, hook: CommitHook) -> None:
        """Call ``hook(cid, schema, data, schemacid)`` after every journaled commit
        made through this object's connections (in the committing thread)."""
        self._hooks = [*self._hooks, hook]

    def remove_commit_hook(self, hook: CommitHook) -> None:
        self._hooks = [h for h in self._hooks if h is not hook]

    def add_snapshot_listener(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(cid)`` whenever this process moves the snapshot
        (a leader commit or a follower's applied batch), in that thread."""
        self._listeners = [*self._listeners, listener]

    def notify_snapshot(self, cid: int) -> None:
        """Record that the snapshot reached ``cid`` and wake :meth:`wait_for`."""
        if cid > self._known_snapshot:
            self._known_snapshot = cid
            if self._waiters:
                with self._cond:
                    self._cond.notify_all()
        for listener in self._listeners:
            listener(cid)

    def wait_for(self, cid: int, timeout: float | None = None) -> bool:
        """Block until this process has seen the snapshot reach ``cid``
        (read-your-writes on a follower). Returns False on timeout."""
        with self._cond:
            if self._known_snapshot < cid:
                self._known_snapshot = max(self._known_snapshot, self.snapshot())
            self._waiters += 1
            try:
                return self._cond.wait_for(lambda: self._known_snapshot >= cid, timeout)
            finally:
                self._waiters -= 1


def table_info(c: apsw.Connection, table: str) -> tuple[list[str], list[int], bool]:
    """(columns as the session extension sees them, pk flags, has implicit rowid).

    Tables without a declared primary key get the rowid as a leading column
    (session object config "rowid")."""
    cols: list[str] = []
    pk: list[int] = []
    for _cid, name, _type, _notnull, _dflt, pkpos in fetchall(
        c, f"PRAGMA main.table_info({quote_ident(table)})"
    ):
        cols.append(name)
        pk.append(pkpos)
    if not cols:
        raise JournalError(f"no such table: {table}")
    if not any(pk):
        return ["rowid", *cols], [1] + [0] * len(cols), True
    return cols, pk, False


def table_rows_patchset(
    c: apsw.Connection, table: str, where: str = "", args: tuple[Any, ...] = ()
) -> bytes:
    """A patchset inserting every row of ``table`` (optionally filtered)."""
    cols, pk, rowid = table_info(c, table)
    sel = ", ".join(("rowid" if rowid and i == 0 else quote_ident(n)) for i, n in enumerate(cols))
    rows = c.execute(f"SELECT {sel} FROM main.{quote_ident(table)} {where}", args)
    body = b"".join(patchset.encode_insert(r) for r in rows)
    return patchset.encode_table(table, pk) + body if body else b""
