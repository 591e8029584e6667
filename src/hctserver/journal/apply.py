"""Applying journal entries on a follower.

Entries may be added in any order and more than once. :meth:`Applier.apply`
applies the contiguous run above the snapshot, strictly in cid order, many
entries per SQLite transaction (group commit): their patchsets are merged
into one by SQLite's changegroup and applied in one call, so per-entry work
in Python is a hash and a row for the journal; a lone entry (a synchronous
leader's stream) is applied as it is. The data filter's list of tables is
read again only when ``PRAGMA schema_version`` moved. An entry that changes
the schema is applied in a transaction of its own.

Entries above a hole wait in memory up to ``window_bytes``; beyond that they
are stored as journal rows with ``vhash`` NULL (received, not applied) and
read back once the hole fills. ``Database.rollback`` discards such rows.

Each transaction moves the snapshot from one consistent position to the
next: a crash at any point leaves the database at the last committed batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import apsw

from .. import speedups
from ..errors import ApplyError, DiskFullError, DivergenceError, ModeError, ProtocolError
from ..position import Entry, Position, entry_hash, fold
from . import guard
from .codec import FORMATS, SESSION, Codec, codec_of, runs, where
from .policy import DataPolicies, DataPolicy, SchemaPolicy
from .sqlutil import fetchone, write_transaction
from .store import Mode, Store
from .systables import INSERT_ENTRY, INSERT_UNAPPLIED

log = logging.getLogger("hctserver")

_ABORT = apsw.SQLITE_CHANGESET_ABORT
_CONFLICT_NAMES = {
    apsw.SQLITE_CHANGESET_DATA: "the row differs from what the entry expects",
    apsw.SQLITE_CHANGESET_NOTFOUND: "the row to change does not exist",
    apsw.SQLITE_CHANGESET_CONFLICT: "a row with that key already exists",
    apsw.SQLITE_CHANGESET_CONSTRAINT: "a constraint failed",
    apsw.SQLITE_CHANGESET_FOREIGN_KEY: "a foreign key check failed",
}


_ENCODINGS = frozenset(c.tag for c in FORMATS.values())
_BY_TAG: dict[int, Codec] = {c.tag: c for c in FORMATS.values()}
NO_DATA, MIXED = -2, -1  # journal_rows' tag when no entry has data, or their formats differ


def py_journal_rows(
    entries: Sequence[Entry], hashes: Sequence[Any]
) -> tuple[list[tuple[Any, ...]], int, int, int]:
    """A run's journal rows (cid, schema, data, schemacid, hash, H), its size
    in bytes, the index of its first schema entry (-1: none) and the first
    byte its entries' data share (NO_DATA, MIXED)."""
    rows = [(e[0], e[2], e[3], e[1], h[0], h[1]) for e, h in zip(entries, hashes, strict=True)]
    nbytes = sum(len(e[3]) + len(e[2]) for e in entries)
    schema_at = next((i for i, e in enumerate(entries) if e[2]), -1)
    tags = {e[3][0] for e in entries if e[3]}
    tag = NO_DATA if not tags else (tags.pop() if len(tags) == 1 else MIXED)
    return rows, nbytes, schema_at, tag


_native: Any = speedups.native()
journal_rows = py_journal_rows if _native is None else _native.journal_rows


def check_encoding(e: Entry) -> None:
    codec_of(e.cid, e.data)


class Applier:
    """Applies entries to a FOLLOWER database. Not thread-safe: one owner thread.

    ``batch_entries``/``batch_bytes`` bound one group commit; ``window_bytes``
    bounds entries held in memory above a hole.
    """

    def __init__(
        self,
        db: Store,
        *,
        batch_entries: int = 50_000,
        batch_bytes: int = 32 << 20,
        window_bytes: int = 64 << 20,
    ) -> None:
        if db.mode is Mode.LEADER:
            raise ModeError(
                f"{db.path} is in LEADER mode: applying journal entries is refused"
                " (a leader makes its own history)"
            )
        self.db = db
        self.batch_entries = max(1, batch_entries)
        self.batch_bytes = max(1, batch_bytes)
        self.window_bytes = max(0, window_bytes)
        self._conn = db.open_connection(apply=True)
        self._position = db.position()
        self._snapshot = self._position.cid
        self._baseline = db.baseline()[0]
        self._pending: dict[int, Entry] = {}
        self._pending_bytes = 0
        self._spilled: set[int] = {
            r[0]
            for r in self._conn.execute(
                "SELECT cid FROM hct_journal WHERE cid>?", (self._snapshot,)
            )
        }
        self._pre: dict[int, Any] = {}  # cid -> (hash, H, chain id) computed by a receiver
        # the fast path: contiguous entries from the snapshot on, hashed by the
        # receiver along one chain, kept as journal rows (see add_many)
        # (rows, bytes, tag, a schema entry)
        self._run: list[tuple[list[tuple[Any, ...]], int, int, bool]] = []
        self._run_count = 0
        self._run_next = 0  # the cid the run goes on with
        self._run_chain: object = None
        self._conflict: str | None = None
        self._policies = DataPolicies()  # the data filter, its tables kept until the schema moves
        self._interrupted = False
        self.applied = 0  # entries applied by this object
        self.duplicates = 0
        self.fast = 0  # of them, applied as a run (see add_many)

    @property
    def snapshot(self) -> int:
        return self._snapshot

    @property
    def position(self) -> Position:
        """(snapshot, H); safe to read from other threads."""
        return self._position

    @property
    def pending(self) -> int:
        """Entries received above the snapshot, not yet applied."""
        return len(self._pending) + len(self._spilled) + self._run_count

    def close(self) -> None:
        self._conn.close()

    def interrupt(self) -> None:
        """Stop applying, from any thread: the batch being applied rolls back
        whole, no other starts, and :meth:`apply` raises ApplyError."""
        self._interrupted = True
        self._conn.interrupt()

    # --- receiving -------------------------------------------------------------

    def add(self, e: Entry) -> bool:
        """Accept an entry. Returns False for a duplicate (same cid, same hash);
        raises DivergenceError for same cid with a different hash, before
        anything of it is applied."""
        cid = e.cid
        if cid <= 0:
            raise ApplyError(f"invalid cid {cid}: cids start at 1")
        if cid <= self._snapshot or cid in self._pending or cid in self._spilled:
            self._check_duplicate(e)
            self.duplicates += 1
            return False
        check_encoding(e)
        self._pending[cid] = e
        self._pending_bytes += len(e.data) + len(e.schema)
        return True

    def add_many(self, entries: Iterable[Entry], hashes: Sequence[Any] | None = None) -> None:
        """Add entries; ``hashes``, if given, holds for each entry its hash and
        the version hash H after it, computed by the caller along a contiguous
        chain tagged with an id: (hash, H, chain id), or None.

        Catching up, entries come in cid order from the snapshot on, all
        hashed along one chain: such a run skips the per-entry bookkeeping
        below and is kept as ready journal rows."""
        if hashes is not None and isinstance(entries, list) and self._extends_run(entries, hashes):
            rows, nbytes, schema_at, tag = journal_rows(entries, hashes)
            if tag == NO_DATA or tag in _ENCODINGS:
                if schema_at < 0:
                    self._run.append((rows, nbytes, tag, False))
                else:
                    self._split_run(rows, tag)
                self._run_count += len(rows)
                self._run_next = entries[-1][0] + 1
                self._run_chain = hashes[0][2]
                return
        self._drain_run()
        self._add_many(entries, hashes)

    def _split_run(self, rows: list[tuple[Any, ...]], tag: int) -> None:
        """Add rows to the run with each schema entry as a chunk of its own."""
        start = 0
        for i, r in enumerate(rows):
            if r[1]:
                for seg, schema in ((rows[start:i], False), ([r], True)):
                    if seg:
                        nbytes = sum(len(x[1]) + len(x[2]) for x in seg)
                        self._run.append((seg, nbytes, tag, schema))
                start = i + 1
        if start < len(rows):
            seg = rows[start:]
            self._run.append((seg, sum(len(x[1]) + len(x[2]) for x in seg), tag, False))

    def _extends_run(self, entries: list[Entry], hashes: Sequence[Any]) -> bool:
        if not entries:
            return False
        h0, h1 = hashes[0], hashes[-1]
        if h0 is None or h1 is None or h1[2] is not h0[2]:
            return False
        first = entries[0][0]
        if entries[-1][0] - first != len(entries) - 1:  # then every one is hashed
            return False
        if self._run:
            return first == self._run_next and h0[2] is self._run_chain
        return (
            not self._pending
            and not self._spilled
            and first == self._snapshot + 1
            and fold(self._position.hash, h0[0]) == h0[1]  # the chain starts at our H
        )

    def _drain_run(self) -> None:
        """Hand the run to the general path (before anything else is added)."""
        if not self._run:
            return
        run, self._run, self._run_count = self._run, [], 0
        chain = self._run_chain
        for rows, _, _, _ in run:
            self._add_many(
                [Entry(r[0], r[3], r[1], r[2]) for r in rows], [(r[4], r[5], chain) for r in rows]
            )

    def _add_many(self, entries: Iterable[Entry], hashes: Sequence[Any] | None) -> None:
        pending, spilled, pre = self._pending, self._spilled, self._pre
        snap = self._snapshot
        nbytes = 0
        for i, e in enumerate(entries):
            cid, _, schema, data = e
            if cid > snap and cid not in pending and cid not in spilled:
                if data and data[0] not in _ENCODINGS:
                    check_encoding(e)
                pending[cid] = e
                nbytes += len(data) + len(schema)
                if hashes is not None and hashes[i] is not None:
                    pre[cid] = hashes[i]
            else:
                self.add(e)  # duplicates and bad cids
        self._pending_bytes += nbytes

    def _check_duplicate(self, e: Entry) -> None:
        have = self._pending.get(e.cid)
        if have is not None:
            if have.hash() == e.hash():
                return
            raise DivergenceError(
                f"cid {e.cid} arrived twice with different contents: the sources disagree"
            )
        if e.cid <= self._baseline:
            return  # truncated here: already folded into the baseline
        row = self._conn.execute("SELECT hash FROM hct_journal WHERE cid=?", (e.cid,)).fetchone()
        if row is not None and bytes(row[0]) == e.hash():
            return
        if row is None and e.cid > self._snapshot:
            return
        if row is None:  # retention may have moved the baseline since we looked
            self._baseline = self.db.baseline()[0]
            if e.cid <= self._baseline:
                return
        raise DivergenceError(
            f"cid {e.cid} is already in {self.db.path} with a different hash: this database"
            " and the leader have diverged; nothing was applied (re-seed the follower)"
        )

    # --- applying --------------------------------------------------------------

    def apply(self) -> int:
        """Apply every entry that is now contiguous; return the new snapshot."""
        if self._run:
            self._apply_run()
        while True:
            if self._interrupted:
                raise ApplyError(f"applying to {self.db.path} was interrupted (stopping)")
            batch = self._take_batch()
            if not batch:
                break
            self._apply_batch(batch)
        if self._pending_bytes > self.window_bytes:
            self._spill()
        return self._snapshot

    def _take_batch(self) -> list[Entry]:
        batch: list[Entry] = []
        size = 0
        cid = self._snapshot + 1
        pending, pop, spilled = self._pending, self._pending.pop, self._spilled
        limit, max_bytes = self.batch_entries, self.batch_bytes
        while len(batch) < limit and size < max_bytes:
            e = pop(cid, None)
            if e is None:
                if cid not in spilled:
                    break
                e = self._load(cid)
                self._pending_bytes += len(e.data) + len(e.schema)  # taken off just below
            n = len(e.data) + len(e.schema)
            if e.schema and batch:
                pending[cid] = e  # schema entries go alone; keep it for next time
                break
            self._pending_bytes -= n
            batch.append(e)
            size += n
            cid += 1
            if e.schema:
                break
        return batch

    def _load(self, cid: int) -> Entry:
        cid_, schemacid, schema, data = fetchone(
            self._conn, "SELECT cid, schemacid, schema, data FROM hct_journal WHERE cid=?", (cid,)
        )
        return Entry(cid_, schemacid, schema, bytes(data))

    def _on_conflict(self, reason: int, change: Any) -> int:
        try:
            key = change.old if change.old is not None else change.new
            what = f"table {change.name}, {change.op} of key {_key(key, change.pk_columns)}"
        except Exception:  # the change object can be out of scope
            what = "unknown row"
        self._conflict = f"{what}: {_CONFLICT_NAMES.get(reason, f'conflict {reason}')}"
        return _ABORT

    def _apply_batch(self, batch: list[Entry]) -> None:
        last = batch[-1].cid
        rows = []
        vh = self._position.hash
        pre = self._pre
        chain = None
        for e in batch:
            p = pre.pop(e.cid, None)
            if p is not None and p[2] is chain is not None:
                h, vh = p[0], p[1]  # the same chain as the previous entry: H follows
            else:
                h = p[0] if p is not None else entry_hash(e.cid, e.schema, e.data, e.schemacid)
                vh = fold(vh, h)
                chain = p[2] if p is not None and p[1] == vh else None
            rows.append((e.cid, e.schema, e.data, e.schemacid, h, vh))
        self._conflict = None
        with self.db.share:  # a background checkpointer waits on it to finish the WAL
            self._commit_batch(batch, rows)
        if self._spilled:
            for e in batch:
                self._spilled.discard(e.cid)
        self._advance(last, vh, len(batch), bool(batch[0].schema))

    def _advance(self, last: int, vh: bytes, n: int, schema: bool) -> None:
        """A batch ending at ``last`` (H ``vh``) of ``n`` entries committed."""
        lock = self.db.share
        lock.tail = None  # what a leader in this process cached is stale now
        if schema:
            lock.schema_epoch += 1
        self._position = Position(last, vh)
        self._snapshot = last
        self.applied += n
        self.db.notify_snapshot(last)

    def _apply_run(self) -> None:
        """Apply the run in batches, a schema entry alone. Anything unusual
        (an error above all) is handed to the general path, which says what
        went wrong."""
        run = self._run
        while run:
            if self._interrupted:
                raise ApplyError(f"applying to {self.db.path} was interrupted (stopping)")
            if run[0][3]:  # a schema entry: through the general commit, alone
                rows = run[0][0]
                r = rows[0]
                try:
                    with self.db.share:
                        self._commit_batch([Entry(r[0], r[3], r[1], r[2])], rows)
                except Exception:
                    del run[0]  # _commit_batch keeps it pending
                    self._run_count -= 1
                    self._drain_run()
                    raise
                del run[0]
                self._run_count -= 1
                self._advance(r[0], r[5], 1, True)
                continue
            n = size = k = 0
            while k < len(run) and not run[k][3] and n < self.batch_entries:
                if size >= self.batch_bytes:
                    break
                n += len(run[k][0])
                size += run[k][1]
                k += 1
            chunks = run[:k]
            tags = {c[2] for c in chunks if c[2] != NO_DATA}
            rows = chunks[0][0] if k == 1 else [r for c in chunks for r in c[0]]
            try:
                if len(tags) > 1:
                    raise ValueError("formats differ")
                with self.db.share:
                    self._commit_rows(rows, _BY_TAG[tags.pop()] if tags else None)
            except Exception:
                self._drain_run()  # the general path applies them, or names the error
                return
            del run[:k]
            self._run_count -= len(rows)
            last = rows[-1]
            self.fast += len(rows)
            self._advance(last[0], last[5], len(rows), False)

    def _commit_rows(self, rows: list[tuple[Any, ...]], codec: Codec | None) -> None:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            if codec is not None:
                data_policy = self._policies.get(c)
                datas = [r[2] for r in rows]
                codec.apply(
                    c, datas, where(rows[0][0], rows[-1][0]), data_policy, self._on_conflict
                )
                if data_policy.refused is not None:
                    raise ProtocolError(data_policy.refused)
            c.executemany(INSERT_ENTRY, rows)
            c.execute("COMMIT")
        except BaseException:
            if not c.get_autocommit():
                c.execute("ROLLBACK")
            raise

    def _commit_batch(self, batch: list[Entry], rows: list[Any]) -> None:
        c = self._conn
        first, last = batch[0].cid, batch[-1].cid
        schema_policy: SchemaPolicy | None = None
        data_policy: DataPolicy | None = None
        c.execute("BEGIN IMMEDIATE")
        try:
            if batch[0].schema:
                schema_policy = SchemaPolicy()
                schema_policy.run(c, batch[0].schema)
                guard.protect(c)
            if len(batch) == 1:  # a synchronous leader's usual batch: no grouping
                data = batch[0].data
                codec = codec_of(first, data)  # None: no data
                if codec is not None:
                    data_policy = self._policies.get(c)
                    codec.apply(c, [data], where(first, first), data_policy, self._on_conflict)
                    if data_policy.refused is not None:
                        raise ProtocolError(data_policy.refused)
            else:
                for codec, datas in runs([(e.cid, e.data) for e in batch]):
                    if data_policy is None:
                        data_policy = self._policies.get(c)
                    codec.apply(
                        c,
                        [d for _, d in datas],
                        where(datas[0][0], datas[-1][0]),
                        data_policy,
                        self._on_conflict,
                    )
                    if data_policy.refused is not None:
                        raise ProtocolError(data_policy.refused)
            if self._spilled:
                c.executemany("DELETE FROM hct_journal WHERE cid=?", [(r[0],) for r in rows])
            c.executemany(INSERT_ENTRY, rows)
            c.execute("COMMIT")
        except BaseException as exc:
            if not c.get_autocommit():
                c.execute("ROLLBACK")
            for e in batch:  # keep them: a caller may fix the cause and retry
                if e.cid not in self._spilled:
                    self._pending[e.cid] = e
                    self._pending_bytes += len(e.data) + len(e.schema)
            span = where(first, last)
            if isinstance(exc, apsw.FullError):
                raise DiskFullError(
                    f"{self.db.path}: the disk is full; {span} were not applied and will be"
                    " once space is freed"
                ) from exc
            if schema_policy is not None and schema_policy.refused is not None:
                raise ProtocolError(
                    f"cid {first}: the leader sent a schema change a follower does not run"
                    f" ({schema_policy.refused}); nothing of it was applied"
                ) from None
            if isinstance(exc, ProtocolError) and (
                data_policy is None or data_policy.refused is None
            ):
                raise ProtocolError(f"{exc}; nothing of {span} was applied") from None
            if isinstance(exc, ProtocolError) or (
                data_policy is not None and data_policy.refused is not None
            ):
                refused = (data_policy.refused if data_policy is not None else None) or str(exc)
                raise ProtocolError(
                    f"{_culprit(batch, refused)}: the leader sent {refused}; nothing of"
                    f" {span} was applied"
                ) from None
            if isinstance(exc, (apsw.CorruptError, ValueError)):
                raise ProtocolError(
                    f"{_corrupt(batch)}: the entry's data is not a valid session patchset"
                    f" ({exc}); nothing of {span} was applied"
                ) from exc
            if isinstance(exc, apsw.Error):
                detail = self._conflict or str(exc)
                raise ApplyError(
                    f"cannot apply {span} to {self.db.path}: {detail}; nothing of it was"
                    " applied (the follower is not at the state these entries build on)"
                ) from exc
            raise

    def _spill(self) -> None:
        """Store the entries waiting above a hole as unapplied journal rows."""
        ents = sorted(self._pending.values())
        try:
            with write_transaction(self._conn) as c:
                c.executemany(
                    INSERT_UNAPPLIED,
                    [(e.cid, e.schema, e.data, e.schemacid, e.hash()) for e in ents],
                )
        except apsw.FullError as e:
            raise DiskFullError(
                f"{self.db.path}: the disk is full; {len(ents)} entries above the hole at cid"
                f" {self._snapshot + 1} stay in memory"
            ) from e
        self._spilled.update(e.cid for e in ents)
        self._pending.clear()
        self._pending_bytes = 0
        log.debug("spilled %d entries above the hole at cid %d", len(ents), self._snapshot + 1)


def _key(row: Any, pk_columns: Any) -> str:
    try:
        return repr(tuple(row[i] for i in sorted(pk_columns)))
    except Exception:
        return "?"


def _corrupt(batch: list[Entry]) -> str:
    """Which entry of ``batch`` holds data SQLite cannot read ("cid N")."""
    for e in batch:
        if not e.data or e.data[0] != SESSION.tag:
            continue
        builder = apsw.ChangesetBuilder()  # type: ignore[no-untyped-call]
        try:
            builder.add(e.data)
            builder.output()
        except (apsw.Error, ValueError):
            return f"cid {e.cid}"
        finally:
            builder.close()
    return f"cids {batch[0].cid}..{batch[-1].cid}"


def _culprit(batch: list[Entry], refused: str) -> str:
    """Which entry of ``batch`` touched the table named in ``refused``."""
    for e in batch:
        try:
            codec = codec_of(e.cid, e.data)
            names = codec.tables(e.data) if codec is not None else set()
        except Exception:
            continue
        if any(repr(n) in refused for n in names):
            return f"cid {e.cid}"
    return f"cids {batch[0].cid}..{batch[-1].cid}"
