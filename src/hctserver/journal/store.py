"""The replication-enabled database file: the store behind leaders and followers.

A :class:`Store` is an ordinary SQLite file plus the system tables of
:mod:`hctserver.journal.systables` (SPEC section 1). It owns set-up and adoption,
the mode, the position and the journal's reading, rollback and truncate,
commit hooks and waiting for the snapshot. Writing user transactions
(:mod:`hctserver.journal.connection`) and applying entries (:mod:`hctserver.journal.apply`)
are built on it; :class:`hctserver.journal.database.Database` joins the three.

This module has no networking.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import apsw

from .. import faults
from ..errors import (
    ConfigError,
    JournalError,
    ModeError,
    NotReplicationDatabaseError,
    UnjournaledWriteError,
)
from ..position import ZERO_HASH, Entry, Position, entry_hash, fold
from . import guard
from .append import append_entry
from .gate import Gate, GatePublisher
from .sqlutil import fetchall, fetchone, table_rows_patchset, write_transaction
from .systables import (
    BASELINE,
    CREATE_BASELINE,
    CREATE_JOURNAL,
    CREATE_LOCAL,
    ENTRY_BYTES,
    FORMATS,
    HCTREE_BASE,
    JOURNAL,
    LOCAL,
    USER_OBJECTS_WHERE,
    Tail,
    get_local,
    read_position,
    set_local,
)

log = logging.getLogger("hctserver")

CommitHook = Callable[[int, str, bytes, int], None]

SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
WAL_SIZE_LIMIT = 64 << 20  # bytes the WAL file is cut back to once checkpointed
ROLES = ("leader", "follower")


class Mode(enum.Enum):
    LEADER = "leader"
    FOLLOWER = "follower"


class FileShare:
    """What the connections of one process share about one database file:
    the writer lock (threads queue on it instead of spinning in SQLite's
    busy handler; other processes meet busy_timeout), ``tail`` = (cid,
    schemacid for the next entry, H) after this process's last journaled
    commit or None when unknown, and ``schema_epoch``, which counts schema
    changes made here (cached table shapes follow it)."""

    __slots__ = ("__weakref__", "_lock", "acquire", "release", "schema_epoch", "tail")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acquire = self._lock.acquire
        self.release = self._lock.release
        self.tail: Tail | None = None
        self.schema_epoch = 0

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


_shares: weakref.WeakValueDictionary[str, FileShare] = weakref.WeakValueDictionary()
_shares_guard = threading.Lock()


def file_share(path: str) -> FileShare:
    """The one :class:`FileShare` of ``path`` in this process."""
    with _shares_guard:
        share = _shares.get(path)
        if share is None:
            share = _shares[path] = FileShare()
        return share


class Store:
    """A replication-enabled SQLite database.

    Opening a file creates the system tables if needed. A plain SQLite
    database that already holds tables is *adopted*: its schema and rows
    become journal entry cid 1, so that replaying the journal reproduces it.
    Every table gets hctserver's guards (:mod:`hctserver.journal.guard`).

    The mode starts as FOLLOWER, as in the original. Durability: WAL mode
    with ``synchronous=NORMAL`` by default (a commit survives a process
    crash; the last commits may be lost on power loss). Pass
    ``synchronous="FULL"`` to fsync every commit.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        init: bool = True,
        adopt: bool = True,
        synchronous: str = "NORMAL",
        wal: bool = True,
        busy_timeout: float = 5.0,
        format: str | None = None,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        if format not in (None, *FORMATS):
            raise ConfigError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
        sync = synchronous.upper()
        if sync not in SYNCHRONOUS:
            raise ConfigError(
                f"synchronous must be one of {', '.join(SYNCHRONOUS)}, not {synchronous!r}"
            )
        if not busy_timeout >= 0 or math.isinf(busy_timeout):
            raise ConfigError("busy_timeout must be a finite number of seconds >= 0")
        self.synchronous = sync
        self.wal = wal
        self.busy_timeout = busy_timeout
        self._mode = Mode.FOLLOWER
        self._mode_epoch = 0  # bumped on every mode change; connections compare it
        self._hooks: tuple[CommitHook, ...] = ()
        self._listeners: tuple[Callable[[int], None], ...] = ()
        self._lock = threading.Lock()  # guards self._conn
        self._publisher: GatePublisher | None = None
        self.closed = False
        self._totals = JournalTotals()  # under self._status_lock
        self._status_lock = threading.Lock()
        self._status_conn: apsw.Connection | None = None
        self._cond = threading.Condition()  # signalled when the snapshot moves
        self._known_snapshot = 0
        self._data_version = -1
        # a background checkpointer runs: new connections leave checkpoints to it
        self.background_checkpoints = False
        # the checkpointer wants the writer lock: writers let it have it first
        self.checkpoint_wanted = False
        self.share = file_share(self.path)
        if not init and not _exists(self.path):
            raise NotReplicationDatabaseError(
                f"{self.path}: no such database (create it with `hctserver init`)"
            )
        self.adopt = adopt
        self._conn = self.open_connection()
        try:
            self._setup(init, format)
            self.format: str = get_local(self._conn, "format") or "session"
            if format is not None and format != self.format:
                raise ConfigError(
                    f"{self.path} writes entries in the {self.format} format; a database's"
                    " format is chosen when it is created"
                )
            self._known_snapshot = self.position().cid
            # the commit gate: open only on a file no node has ever served
            self.gate = Gate(self.path, standalone=get_local(self._conn, "role") is None)
        except BaseException:
            self._conn.close()
            raise

    # --- connections -----------------------------------------------------

    def open_connection(self, *, apply: bool = False) -> apsw.Connection:
        """A raw apsw connection with this database's settings, let through
        the guards (it is hctserver's own).

        ``apply=True`` gives a connection for applying journal entries:
        triggers and foreign keys off, since their effects are already in
        the entries.
        """
        try:
            conn = apsw.Connection(self.path, vfs=faults.vfs_name())
            conn.set_busy_timeout(int(self.busy_timeout * 1000))
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            # after a checkpoint lets the WAL start over, cut its file back to this
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            if self.background_checkpoints:
                conn.execute("PRAGMA wal_autocheckpoint=0")
            if apply:
                conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
                conn.execute("PRAGMA foreign_keys=OFF")
            guard.allow(conn)
        except apsw.CantOpenError as e:
            why = "permission denied" if _denied(self.path) else str(e)
            raise NotReplicationDatabaseError(f"{self.path}: cannot open: {why}") from None
        except apsw.NotADBError:
            raise NotReplicationDatabaseError(f"{self.path}: not an SQLite database") from None
        return conn

    @property
    def publisher(self) -> GatePublisher:
        """The commit gate's publisher: used only by the node serving this file."""
        with self._lock:
            if self._publisher is None:
                self._publisher = GatePublisher(self.path)
            return self._publisher

    def close(self) -> None:
        self.closed = True
        self.gate.close()
        with self._lock:
            if self._publisher is not None:
                self._publisher.close()
                self._publisher = None
            self._conn.close()
        with self._status_lock:
            if self._status_conn is not None:
                self._status_conn.close()
                self._status_conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- set-up and adoption ---------------------------------------------

    def _setup(self, init: bool, format: str | None) -> None:
        c = self._conn
        try:
            present = {
                r[0]
                for r in c.execute(
                    "SELECT name FROM sqlite_schema WHERE type='table' AND name IN (?, ?, ?)",
                    (JOURNAL, BASELINE, LOCAL),
                )
            }
        except apsw.NotADBError:
            raise NotReplicationDatabaseError(f"{self.path}: not an SQLite database") from None
        if present == {JOURNAL, BASELINE, LOCAL}:
            return
        if {JOURNAL, BASELINE} - present and not init:
            raise NotReplicationDatabaseError(
                f"{self.path}: not a replication database (no hct_journal/hct_baseline);"
                " run `hctserver init` on it first"
            )
        if (
            not present
            and not self.adopt
            and fetchall(c, f"SELECT 1 FROM sqlite_schema WHERE {USER_OBJECTS_WHERE} LIMIT 1")
        ):
            raise NotReplicationDatabaseError(
                f"{self.path} holds tables but is not a replication database: it is not"
                " taken over without being asked. Make it a leader's database with"
                f" `hctserver init {self.path}` (or hctserver.connect(path, adopt=True)),"
                " or replicate into a new file"
            )
        if self.wal:
            c.execute("PRAGMA journal_mode=WAL").fetchall()
        with write_transaction(c):
            c.execute(CREATE_JOURNAL)
            c.execute(CREATE_BASELINE)
            c.execute(CREATE_LOCAL)
            hctree = format == "hctree" and not present
            if hctree:
                if fetchall(c, f"SELECT 1 FROM sqlite_schema WHERE {USER_OBJECTS_WHERE}"):
                    raise ConfigError(
                        f"{self.path} holds tables: an hctree-format database starts empty"
                        " (create a new file, then load it through hctserver)"
                    )
                set_local(c, "format", "hctree")
            if not c.execute("SELECT 1 FROM hct_baseline").fetchall():
                # hctree's fresh journal starts after cid 6 (FORMAT.md, section 2)
                c.execute(
                    f"INSERT INTO hct_baseline VALUES({HCTREE_BASE if hctree else 0},"
                    " 0, zeroblob(16))"
                )
            if not c.execute("SELECT 1 FROM hct_journal LIMIT 1").fetchall():
                self._adopt(c)
            if not guard.recorded(c):
                guard.protect(c)

    def _adopt(self, c: apsw.Connection) -> None:
        """Turn existing user objects and rows into journal entry cid 1."""
        objs = fetchall(
            c,
            f"SELECT type, name, sql FROM sqlite_schema WHERE sql IS NOT NULL"
            f" AND {USER_OBJECTS_WHERE} ORDER BY CASE type WHEN 'table' THEN 0"
            " WHEN 'index' THEN 1 WHEN 'view' THEN 2 ELSE 3 END, rowid",
        )
        if not objs:
            return
        schema = ";".join(sql for _, _, sql in objs)
        data = b"".join(table_rows_patchset(c, name) for typ, name, _ in objs if typ == "table")
        append_entry(c, (0, 0, ZERO_HASH), schema, data)
        log.info("adopted %d schema objects of %s as cid 1", len(objs), self.path)

    # --- mode and role ----------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def mode_epoch(self) -> int:
        """Changes whenever the mode does (connections cache their mode by it)."""
        return self._mode_epoch

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

    @property
    def role(self) -> str | None:
        """The role the last node run on this file gave it ("leader",
        "follower"), recorded in the file; None if no node has run on it."""
        with self._lock:
            value = get_local(self._conn, "role")
        return str(value) if value is not None else None

    def set_role(self, role: str) -> None:
        if role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if self.role == role:
            return  # a refused follower's file stays byte for byte as it was
        with self._lock, write_transaction(self._conn) as c:
            set_local(c, "role", role)
        self.gate.standalone = False

    # --- guards -------------------------------------------------------------------

    def check_unjournaled(self) -> None:
        """Raise UnjournaledWriteError if the schema was changed behind the
        journal's back (see :mod:`hctserver.journal.guard`)."""
        with self._lock:
            found = guard.check(self._conn)
        if found is not None:
            raise UnjournaledWriteError(
                f"{self.path} was changed outside hctserver: {found}. A plain SQLite"
                " client bypassed the journal, so this copy no longer matches its"
                " history; it was left as found. Restore it from its leader (re-seed"
                " a follower from an empty file) and write only through hctserver"
            )

    # --- reading the journal ------------------------------------------------

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return fetchall(self._conn, sql, args)

    def position(self) -> Position:
        """(snapshot cid, version hash H at it)."""
        with self._lock:
            return Position(*read_position(self._conn))

    def snapshot(self) -> int:
        """The newest cid whose changes (and all before it) are in the user tables."""
        return self.position().cid

    def max_cid(self) -> int:
        rows = self._query(
            "SELECT max(cid) FROM hct_journal UNION ALL SELECT cid FROM hct_baseline"
        )
        return int(max(r[0] for r in rows if r[0] is not None))

    def first_hole(self) -> int | None:
        """The lowest missing cid below the newest stored one, or None. One
        statement, so one read snapshot: another process committing between
        two queries would look like a hole."""
        ((base, applied, stored),) = self._query(
            "SELECT (SELECT cid FROM hct_baseline),"
            " (SELECT max(cid) FROM hct_journal WHERE vhash IS NOT NULL),"
            " (SELECT max(cid) FROM hct_journal)"
        )
        snap = max(base, applied or base)
        return snap + 1 if max(base, stored or base) > snap else None

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
        if rows:
            return bytes(rows[0][0])
        if self.format == "hctree" and 0 <= cid < HCTREE_BASE and self._fresh_hctree():
            return ZERO_HASH  # before a fresh hctree journal nothing was: as the C leader
        return None

    def _fresh_hctree(self) -> bool:
        return self.baseline() == (HCTREE_BASE, 0, ZERO_HASH)

    def sync_start(self, after: int) -> int:
        """Where a SYNC reply from ``after`` starts: a follower below a fresh
        hctree journal's start (an empty one) gets it from that start."""
        if self.format == "hctree" and after < HCTREE_BASE and self._fresh_hctree():
            return HCTREE_BASE
        return after

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
        n, size = self._query(f"SELECT count(*), {_ROW_BYTES} FROM hct_journal")[0]
        return n, size

    def status(self) -> dict[str, Any]:
        """The file's state at one moment (one read transaction). Journal
        totals are counted once and then only for new rows, so this is cheap
        enough for a scrape every second on a journal of millions of rows."""
        with self._status_lock:  # a connection of its own: a first count of a
            # large journal holds up no one else
            if self._status_conn is None:
                self._status_conn = self.open_connection()
            c = self._status_conn
            c.execute("BEGIN")
            try:
                cid, h = read_position(c)
                rows = fetchall(
                    c, "SELECT max(cid) FROM hct_journal UNION ALL SELECT cid FROM hct_baseline"
                )
                top = int(max(r[0] for r in rows if r[0] is not None))
                bcid, bschemacid, _ = fetchone(c, "SELECT cid, schemacid, hash FROM hct_baseline")
                n, size = self._totals.read(c, bcid, cid)
            finally:
                c.execute("COMMIT")
        return {
            "path": self.path,
            "mode": self._mode.value,
            "role": self.role,
            "snapshot": cid,
            "max_cid": top,
            "first_hole": cid + 1 if top > cid else None,
            "hash": bytes(h).hex(),
            "baseline_cid": bcid,
            "baseline_schemacid": bschemacid,
            "journal_entries": n,
            "journal_bytes": size,
        }

    def check_journal(self) -> str | None:
        """Recompute every applied entry's hash and the version-hash chain from
        the baseline; None if all match, else what the first bad row is.
        (An edit to an old row's ``schema``, ``data``, ``hash`` or ``vhash``
        shows here; a position check at SYNC sees only the newest row.)"""
        conn = self.open_connection()
        try:
            conn.execute("BEGIN")
            bcid, _, h = fetchone(conn, "SELECT cid, schemacid, hash FROM hct_baseline")
            h, expect = bytes(h), bcid + 1
            for cid, schema, data, schemacid, eh, vh in conn.execute(
                "SELECT cid, CAST(schema AS BLOB), CAST(data AS BLOB), schemacid, hash, vhash"
                " FROM hct_journal WHERE vhash IS NOT NULL ORDER BY cid"
            ):
                if cid != expect:
                    return f"cid {expect} is missing (the next applied row is cid {cid})"
                if entry_hash(cid, schema, data, schemacid) != eh:
                    return (
                        f"cid {cid}: its hash column does not match its schema, data and"
                        " schemacid (the row was edited)"
                    )
                h = fold(h, eh)
                if bytes(vh) != h:
                    return f"cid {cid}: its vhash does not follow from the rows before it"
                expect += 1
            return None
        finally:
            conn.close()

    # --- changing the journal ---------------------------------------------

    def rollback(self) -> int:
        """Discard every journal entry above the first hole; return how many.

        Such entries were stored but never applied to the user's tables, so
        only journal rows go. Call it before starting an applier (the
        original does this at start-up).
        """
        with self._lock, write_transaction(self._conn) as c:
            snap = read_position(c)[0]
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
            snap = read_position(c)[0]
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
            (size,) = fetchone(c, f"SELECT {_ROW_BYTES} FROM hct_journal WHERE cid<?", (min_cid,))
            c.execute("DELETE FROM hct_journal WHERE cid<?", (min_cid,))
            n: int = c.changes()
        with self._status_lock:
            self._totals.forget(bcid, newcid, n, size)
        return n

    def adopt_baseline(self, cid: int) -> None:
        """An empty database takes (``cid``, schemacid 0, a zero hash) as its
        baseline: an hctree leader's journal starts above one (at cid 7 for
        a fresh one: FORMAT.md, section 2), and its first reply says so."""
        with self._lock, write_transaction(self._conn) as c:
            bcid = fetchone(c, "SELECT cid FROM hct_baseline")[0]
            rows = fetchone(c, "SELECT count(*) FROM hct_journal")[0]
            if bcid != 0 or rows:
                raise JournalError(
                    f"{self.path} is not empty (baseline cid {bcid}, {rows} journal rows):"
                    " only an empty follower adopts its leader's baseline"
                )
            c.execute("UPDATE hct_baseline SET cid=?, schemacid=0, hash=zeroblob(16)", (cid,))
        with self._status_lock:
            self._totals.forget(0, cid, 0, 0)

    # --- hooks and waiting ------------------------------------------------

    @property
    def commit_hooks(self) -> tuple[CommitHook, ...]:
        return self._hooks

    def add_commit_hook(self, hook: CommitHook) -> None:
        """Call ``hook(cid, schema, data, schemacid)`` after every journaled commit
        made through this object's connections (in the committing thread)."""
        self._hooks = (*self._hooks, hook)

    def remove_commit_hook(self, hook: CommitHook) -> None:
        self._hooks = tuple(h for h in self._hooks if h is not hook)

    def add_snapshot_listener(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(cid)`` whenever this process moves the snapshot
        (a leader commit or a follower's applied batch), in that thread."""
        self._listeners = (*self._listeners, listener)

    def remove_snapshot_listener(self, listener: Callable[[int], None]) -> None:
        self._listeners = tuple(x for x in self._listeners if x is not listener)

    def notify_snapshot(self, cid: int) -> None:
        """Record that the snapshot reached ``cid`` and wake :meth:`wait_for`."""
        with self._cond:
            if cid > self._known_snapshot:
                self._known_snapshot = cid
                self._cond.notify_all()
        for listener in self._listeners:
            listener(cid)

    def _changed_elsewhere(self) -> bool:
        """Has another connection (any process) committed since we last looked?"""
        with self._lock:
            (v,) = fetchone(self._conn, "PRAGMA data_version")
        changed = v != self._data_version
        self._data_version = v
        return bool(changed)

    def wait_for(self, cid: int, timeout: float | None = None, poll: float = 0.01) -> bool:
        """Block until the snapshot reaches ``cid`` (read-your-writes on a
        follower). Returns False on timeout.

        A commit or apply made in this process wakes the waiter at once.
        Changes made by another process (a follower node, an application
        writing to a leader) are seen by polling: every ``poll`` seconds one
        ``PRAGMA data_version`` (a few microseconds), and a position read
        only when the file changed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._known_snapshot >= cid:
                    return True
                if self._changed_elsewhere():
                    self._known_snapshot = max(self._known_snapshot, self.snapshot())
                    continue
                left = poll if deadline is None else min(poll, deadline - time.monotonic())
                if left <= 0:
                    return False
                self._cond.wait(left)


def _exists(path: str) -> bool:
    """Whether ``path`` exists; a path we may not look at raises a clear error
    (os.path.exists would call it missing)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except PermissionError:
        raise NotReplicationDatabaseError(
            f"{path}: cannot open: permission denied (check the file's and its"
            " directories' permissions for this user)"
        ) from None
    return True


def _denied(path: str) -> bool:
    parent = os.path.dirname(path) or "."
    return not os.access(parent, os.W_OK | os.X_OK) or (
        os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK)
    )


_ROW_BYTES = f"coalesce(sum({ENTRY_BYTES}),0)"


class JournalTotals:
    """Rows and bytes of the journal, counted in full once and then only for
    the applied rows added since (rows above a hole are few: counted each
    time). A new baseline or a lower snapshot (truncate, rollback) counts
    again from scratch."""

    def __init__(self) -> None:
        self._key = (-1, -1)  # (baseline cid, snapshot) the totals below cover
        self._rows = self._bytes = 0

    def forget(self, baseline: int, new_baseline: int, rows: int, nbytes: int) -> None:
        """Entries up to ``new_baseline`` were truncated (they were all
        applied): take them off, if they were counted."""
        base, upto = self._key
        if base == baseline and upto >= new_baseline:
            self._key = (new_baseline, upto)
            self._rows -= rows
            self._bytes -= nbytes

    def read(self, c: apsw.Connection, baseline: int, snapshot: int) -> tuple[int, int]:
        """Inside the caller's read transaction."""
        base, upto = self._key
        if base != baseline or snapshot < upto:
            base, upto, self._rows, self._bytes = baseline, -1, 0, 0
        if snapshot > upto:
            n, size = fetchone(
                c,
                f"SELECT count(*), {_ROW_BYTES} FROM hct_journal WHERE cid>? AND cid<=?",
                (upto, snapshot),
            )
            self._rows += n
            self._bytes += size
        self._key = (base, snapshot)
        n, size = fetchone(
            c, f"SELECT count(*), {_ROW_BYTES} FROM hct_journal WHERE cid>?", (snapshot,)
        )
        return self._rows + n, self._bytes + size


class JournalReader:
    """A read connection of its own on the journal, for streaming entries out
    (a leader's SYNC replies and its stream of other writers' commits)."""

    def __init__(self, db: Store) -> None:
        self.conn = db.open_connection()
        self._version = -1

    def changed(self) -> bool:
        """Has any other connection committed since the last call?"""
        (v,) = fetchone(self.conn, "PRAGMA data_version")
        changed = v != self._version
        self._version = v
        return bool(changed)

    def newest(self) -> int:
        """The newest applied cid (the baseline's if the journal is empty)."""
        return read_position(self.conn)[0]

    def raw_chunk(self, after: int, upto: int, rows: int) -> list[tuple[Any, ...]]:
        """Up to ``rows`` of :meth:`raw_entries`, read and released at once: a
        read transaction that lasts one query, never a send to a slow peer."""
        return fetchall(
            self.conn,
            "SELECT cid, schemacid, CAST(schema AS BLOB), data FROM hct_journal"
            " WHERE cid>? AND cid<=? AND vhash IS NOT NULL ORDER BY cid LIMIT ?",
            (after, upto, rows),
        )

    def raw_entries(self, after: int, upto: int | None = None) -> Iterator[tuple[Any, ...]]:
        """(cid, schemacid, schema as bytes, data) of the applied entries with
        ``after < cid <= upto``, in cid order, from one read transaction."""
        hi = upto if upto is not None else (1 << 63) - 1
        yield from self.conn.execute(
            "SELECT cid, schemacid, CAST(schema AS BLOB), data FROM hct_journal"
            " WHERE cid>? AND cid<=? AND vhash IS NOT NULL ORDER BY cid",
            (after, hi),
        )

    def close(self) -> None:
        self.conn.close()
