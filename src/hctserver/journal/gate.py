"""The commit gate: one decision, for every writer of a database file, on
whether a commit may be made and whether it may be acknowledged.

A node that serves a file (leader or follower) publishes its state in a
small shared-memory file beside the database, ``DB-hctgate`` (as SQLite
keeps its WAL index in ``DB-shm``): whether it leads, until when it may
acknowledge commits (a point on the machine's monotonic clock, which every
process of the machine shares), how many followers must acknowledge a
commit, and the newest cid that many have acknowledged. Only the node
writes it (:class:`GatePublisher`); every writer reads it (:class:`Gate`):
the node's own jobs, ``hctserver.connect()`` in the node's process or in
any other, a forwarded write.

* Before COMMIT (:meth:`Gate.admit`, with the writer lock held) a commit is
  refused unless a node leads this file and its acknowledgement deadline
  lies ahead: nothing is written, the writer gets :class:`NotLeaderError`
  or :class:`NoNodeError`.
* After COMMIT (:meth:`Gate.acknowledge`) the writer waits, with K > 0,
  until K followers have acknowledged the cid, then checks once more that
  the same leadership still holds and its deadline has not passed. If the
  acknowledgement did not arrive (the node stopped or lost its lease, the
  sync timeout passed while waiting) the writer gets
  :class:`CommitUnknownError`: committed here, perhaps not replicated.

The deadline is the fencing: a cluster node publishes the time until which
its lease is certainly valid in etcd, less a margin; a plain leader a
heartbeat a few seconds ahead. Nothing has to happen for a writer to stop
at that time (no thread, no etcd call): a paused node publishes nothing,
and its deadline simply passes. docs/FAILOVER.md gives the argument.

The record is a seqlock: the publisher makes the sequence odd, writes the
fields, makes it even; a reader retries until it reads one even sequence
on both sides of its copy.
"""

from __future__ import annotations

import contextlib
import heapq
import mmap
import os
import struct
import threading
import time
from dataclasses import astuple, dataclass, replace
from typing import Any, NamedTuple, cast

from ..errors import CommitUnknownError, ConfigError, NoNodeError, NotLeaderError

MAGIC = b"hctgate1"
_HEAD = struct.Struct("<8sQ")  # magic, sequence
_BODY = struct.Struct("<qqqqqqqqqq")
_LEADER_AT = _HEAD.size + _BODY.size
_LEADER_MAX = 240  # bytes of the leader's address (for errors and forwarding)
_CLIENT_AT, _CLIENT_MAX = 512, 512  # the leader's client (SQL over HTTP) URL
_WANT = struct.Struct("<q")  # outside the seqlock: any process may write it
_WANT_AT = 2048
SIZE = 4096

NONE, LEADER, FOLLOWER = 0, 1, 2
HEARTBEAT = 3.0  # seconds a plain leader's published deadline lies ahead
_POLL_MIN, _POLL_MAX = 0.0002, 0.002  # a waiter in another process polls between these


LOCAL, REPLICATED = "local", "replicated"
DURABILITIES = (LOCAL, REPLICATED)  # a transaction's own choice; None: the node's


def check_durability(durability: str | None) -> str | None:
    """A transaction's durability as given: None (the node's setting),
    ``"local"`` or ``"replicated"``."""
    if durability is not None and durability not in DURABILITIES:
        raise ConfigError(
            f"durability must be one of {', '.join(DURABILITIES)} (or None for the node's"
            f" setting), not {durability!r}"
        )
    return durability


def gate_path(db_path: str) -> str:
    return db_path + "-hctgate"


@dataclass(frozen=True)
class GateState:
    pid: int
    generation: int  # moves each time a node starts or stops leading
    state: int  # NONE, LEADER or FOLLOWER
    valid_until_ns: int  # monotonic ns until which the leader may acknowledge
    sync_k: int
    sync_timeout_ms: int  # -1: wait as long as it takes
    acked_cid: int  # newest cid sync_k followers acknowledged (this generation)
    degraded: int  # 1 while synchronous commit has given up (asynchronous)
    # with sync_k 0: the newest cid one follower acknowledged (at the node's level),
    # what a transaction that asks for replicated durability waits for
    acked_one: int
    spare2: int  # room for a later field, the layout unchanged
    leader: str  # the leader's address, as known to this node ("" if none)
    client: str = ""  # the leader's client URL, where writes here are forwarded


_EMPTY = GateState(0, 0, NONE, 0, 0, -1, 0, 0, 0, 0, "")
TORN = GateState(
    0, 0, NONE, 0, 0, -1, 0, 0, 0, 0, ""
)  # a record a dead publisher left half written
TORN_AFTER = 1.0  # seconds a record may stay half written before it is taken for torn


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


class Ticket(NamedTuple):
    """What :meth:`Gate.admit` saw: the leadership a commit was made under."""

    generation: int
    degraded: bool  # asynchronous from the start: nothing to wait for
    open: bool  # no node has ever served this file: no gate at all


_OPEN = Ticket(0, True, True)


def _decode(m: mmap.mmap) -> tuple[bytes, int, int, GateState]:
    """(magic, sequence before, sequence after, the record) as they are now."""
    magic, s1 = _HEAD.unpack_from(m, 0)
    body = _BODY.unpack_from(m, _HEAD.size)
    raw = m[_LEADER_AT : _LEADER_AT + _LEADER_MAX]
    client = m[_CLIENT_AT : _CLIENT_AT + _CLIENT_MAX]
    _, s2 = _HEAD.unpack_from(m, 0)
    state = cast(Any, GateState)(*body, _text(raw), _text(client))
    return magic, s1, s2, state


def _read(m: mmap.mmap) -> GateState:
    """The record, read whole (a seqlock). One that stays half written for
    :data:`TORN_AFTER` seconds was left by a publisher killed mid-write:
    :data:`TORN` (no node leads: commits are refused, none acknowledged)
    until the next node publishes over it."""
    odd_since = None
    while True:
        magic, s1, s2, state = _decode(m)
        if magic != MAGIC:
            return _EMPTY
        if s1 == s2 and not s1 & 1:
            return state
        if s1 == s2:  # odd and not moving
            now = time.monotonic()
            if odd_since is None:
                odd_since = now
            elif now - odd_since > TORN_AFTER:
                return TORN
        else:
            odd_since = None
        time.sleep(0)


class _Reader:
    """Reads one mapping, decoding the record only when its sequence moved:
    a commit reads the gate two or three times, and the node publishes every
    50 ms (and at each acknowledgement), so most reads are one unpack."""

    __slots__ = ("_last", "map")

    def __init__(self, m: mmap.mmap) -> None:
        self.map = m
        self._last: tuple[int, GateState] = (-1, _EMPTY)

    def read(self) -> GateState:
        magic, seq = _HEAD.unpack_from(self.map, 0)
        last = self._last  # one tuple: threads may share the reader
        if seq == last[0] and magic == MAGIC:
            return last[1]
        while True:
            st = _read(self.map)
            magic, again = _HEAD.unpack_from(self.map, 0)
            if again == seq or st is _EMPTY or st is TORN:
                if not seq & 1 and st is not _EMPTY and st is not TORN:
                    self._last = (seq, st)
                return st
            seq = again  # it moved while we read: read the newer one


def _open_map(path: str, create: bool) -> mmap.mmap | None:
    """Map the gate file; with ``create``, make it first (atomically: a
    reader never maps a half-written file, and an existing one is kept, so
    that processes that mapped it go on seeing what is published)."""
    if create and not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(_HEAD.pack(MAGIC, 0) + _BODY.pack(*astuple(_EMPTY)[:-2]))
            f.truncate(SIZE)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    try:
        fd = os.open(path, os.O_RDWR if create else os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if os.fstat(fd).st_size < SIZE:
            return None
        access = mmap.ACCESS_WRITE if create else mmap.ACCESS_READ
        return mmap.mmap(fd, SIZE, access=access)
    finally:
        os.close(fd)


class _Waiters:
    """This process's writers waiting for an acknowledgement of one file,
    each on a lock of its own: an acknowledgement wakes only those whose cid
    it covers, any other change of leadership or settings wakes them all, a
    moved deadline none (each waits until the deadline it read)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._heap: list[tuple[int, int, threading.Lock]] = []  # (cid, serial, its lock)
        self._serial = 0

    def add(self, cid: int) -> threading.Lock:
        w = threading.Lock()
        w.acquire()
        with self.lock:
            self._serial += 1
            heapq.heappush(self._heap, (cid, self._serial, w))
        return w

    def discard(self, w: threading.Lock) -> None:
        with self.lock:
            for i, item in enumerate(self._heap):
                if item[2] is w:
                    self._heap[i] = self._heap[-1]
                    self._heap.pop()
                    heapq.heapify(self._heap)
                    return

    def release(self, upto: int | None) -> None:
        """Wake the waiters for cids up to ``upto`` (None: every waiter)."""
        woken = []
        with self.lock:
            heap = self._heap
            if upto is None:
                woken, self._heap = heap, []
            else:
                while heap and heap[0][0] <= upto:
                    woken.append(heapq.heappop(heap))
        for _, _, w in woken:
            w.release()


class _Local:
    """Publishers and gates of one process, by file: a publish wakes this
    process's waiters at once (others poll)."""

    lock = threading.Lock()
    waiters: dict[str, _Waiters] = {}

    @classmethod
    def of(cls, path: str) -> _Waiters:
        with cls.lock:
            w = cls.waiters.get(path)
            if w is None:
                w = cls.waiters[path] = _Waiters()
            return w


class GatePublisher:
    """The node's side: the only writer of the gate file. Thread-safe."""

    def __init__(self, db_path: str) -> None:
        self.path = gate_path(db_path)
        m = _open_map(self.path, create=True)
        if m is None:
            raise OSError(f"{self.path}: cannot create the commit gate file")
        self._map = m
        self._lock = threading.Lock()
        self._waiters = _Local.of(self.path)
        st = _read(m)
        if st is TORN:  # its last publisher died mid-write: go on past its generation
            raw = _decode(m)[3]
            st = replace(raw, generation=raw.generation + 2, state=NONE, valid_until_ns=0)
        self._state = replace(st, pid=os.getpid())

    @property
    def state(self) -> GateState:
        return self._state

    def _publish(self, st: GateState) -> None:
        m = self._map
        _, seq = _HEAD.unpack_from(m, 0)
        seq += seq & 1  # a publisher killed mid-write left it odd
        _HEAD.pack_into(m, 0, MAGIC, seq + 1)
        _BODY.pack_into(m, _HEAD.size, *astuple(st)[:-2])
        raw = st.leader.encode()[: _LEADER_MAX - 1]
        m[_LEADER_AT : _LEADER_AT + _LEADER_MAX] = raw.ljust(_LEADER_MAX, b"\0")
        raw = st.client.encode()[: _CLIENT_MAX - 1]
        m[_CLIENT_AT : _CLIENT_AT + _CLIENT_MAX] = raw.ljust(_CLIENT_MAX, b"\0")
        _HEAD.pack_into(m, 0, MAGIC, seq + 2)
        old, self._state = self._state, st
        # after the record: a waiter registers, then reads it (Gate.acknowledge)
        moved = replace(
            old, acked_cid=st.acked_cid, acked_one=st.acked_one, valid_until_ns=st.valid_until_ns
        )
        if moved != st:
            self._waiters.release(None)  # leadership or settings changed: all look again
        elif st.acked_cid != old.acked_cid or st.acked_one != old.acked_one:
            self._waiters.release(max(st.acked_cid, st.acked_one))

    def lead(self, *, sync_k: int, sync_timeout: float | None, valid_until: float) -> None:
        """A leader starts: a new generation (commits of an earlier one that
        still wait will never be acknowledged)."""
        with self._lock:
            st = self._state
            self._publish(
                replace(
                    st,
                    pid=os.getpid(),
                    generation=st.generation + 1,
                    state=LEADER,
                    valid_until_ns=int(valid_until * 1e9),
                    sync_k=sync_k,
                    sync_timeout_ms=-1 if sync_timeout is None else int(sync_timeout * 1000),
                    acked_cid=0,
                    acked_one=0,
                    degraded=0,
                    leader="",
                    client="",
                )
            )

    def extend(self, valid_until: float) -> None:
        """Move the deadline (a renewed lease, a heartbeat); never while not leading."""
        with self._lock:
            st = self._state
            if st.state == LEADER:
                self._publish(replace(st, valid_until_ns=int(valid_until * 1e9)))

    def acked(self, cid: int) -> None:
        """``sync_k`` followers have acknowledged every cid up to ``cid``."""
        with self._lock:
            st = self._state
            if st.state == LEADER and cid > st.acked_cid:
                self._publish(replace(st, acked_cid=cid))

    def acked_one(self, cid: int) -> None:
        """One follower has acknowledged every cid up to ``cid`` (published
        while ``sync_k`` is 0, for transactions that ask for replication)."""
        with self._lock:
            st = self._state
            if st.state == LEADER and cid > st.acked_one:
                self._publish(replace(st, acked_one=cid))

    def set_degraded(self, degraded: bool) -> None:
        with self._lock:
            st = self._state
            if st.state == LEADER and st.degraded != int(degraded):
                self._publish(replace(st, degraded=int(degraded)))

    def follow(self, leader: str = "") -> None:
        """This node follows ``leader`` (its address, if known)."""
        with self._lock:
            st = self._state
            gen = st.generation + (st.state == LEADER)
            self._publish(
                replace(
                    st,
                    pid=os.getpid(),
                    generation=gen,
                    state=FOLLOWER,
                    valid_until_ns=0,
                    leader=leader,
                    client="" if leader != st.leader else st.client,
                )
            )

    def leader_client(self, url: str) -> None:
        """The leader this node follows serves clients at ``url``: writers
        on this file forward their writes there."""
        with self._lock:
            st = self._state
            if st.state == FOLLOWER and st.client != url:
                self._publish(replace(st, client=url))

    def wanted(self) -> int:
        """The newest cid a reader of this file waits to see applied (a
        forwarded write reading its own write): the applier should not
        hold it back to batch."""
        return int(_WANT.unpack_from(self._map, _WANT_AT)[0])

    def stop(self) -> None:
        """No node serves the file any more: every waiting commit gets
        CommitUnknownError, every new one NoNodeError."""
        with self._lock:
            st = self._state
            gen = st.generation + (st.state == LEADER)
            self._publish(replace(st, generation=gen, state=NONE, valid_until_ns=0))

    def close(self) -> None:
        with self._lock, contextlib.suppress(ValueError, BufferError):
            self._map.close()


class Gate:
    """A writer's side, one per database object; thread-safe.

    ``standalone``: no node has ever served the file (its recorded role is
    none): until a gate file appears, commits are neither refused nor held.
    """

    def __init__(self, db_path: str, *, standalone: bool) -> None:
        self.db_path = db_path
        self.path = gate_path(db_path)
        self.standalone = standalone
        self._map: mmap.mmap | None = None
        self._reader: _Reader | None = None
        self._want_map: mmap.mmap | None = None
        self._lock = threading.Lock()
        self._waiters = _Local.of(self.path)

    def _attach(self) -> _Reader | None:
        r = self._reader
        if r is None:
            with self._lock:
                if self._reader is None:
                    m = self._map = _open_map(self.path, create=False)
                    self._reader = None if m is None else _Reader(m)
                r = self._reader
        return r

    def state(self) -> GateState | None:
        """What the node serving the file published; None if no gate file."""
        r = self._attach()
        return None if r is None else r.read()

    def admit(self) -> Ticket:
        """Before COMMIT: may this commit be made? Raises NotLeaderError or
        NoNodeError (nothing is written; the caller rolls back)."""
        st = self.state()
        if st is None and self.standalone:
            return _OPEN
        if st is not None and st.state == LEADER and time.monotonic_ns() < st.valid_until_ns:
            return Ticket(st.generation, bool(st.degraded) or st.sync_k <= 0, False)
        if st is not None and st.state == FOLLOWER:
            where = f" (it follows {st.leader})" if st.leader else ""
            raise NotLeaderError(
                f"{self.db_path} is a follower's database now{where}: writes are refused;"
                " write on the leader",
                leader=st.leader or None,
            )
        if st is not None and st.state == LEADER:
            raise NotLeaderError(
                f"{self.db_path}: its node's leadership has lapsed (no lease renewal"
                " or heartbeat in time): writes are refused until it leads again",
                leader=None,
            )
        raise NoNodeError(
            f"{self.db_path} has been served by a replication node, and no node serves it"
            " now (it stopped or was killed): a write here would reach no follower. Start"
            " its node (`hctserver leader`/`node`), or write through the node that leads"
        )

    def acknowledge(self, ticket: Ticket, cid: int, durability: str | None = None) -> None:
        """After COMMIT of ``cid`` (and of every smaller cid of this writer):
        return once the commit may be reported to the writer; else raise
        CommitUnknownError.

        ``durability``: this transaction's own choice (as PostgreSQL's ``SET
        LOCAL synchronous_commit``): ``"local"`` waits for no follower (the
        leadership is still checked); ``"replicated"`` waits for K followers
        as the node does, and on a node without synchronous commit (K = 0)
        for one follower, at the node's level (``--sync-level``), within
        ``--sync-timeout`` if set; None: the node's setting."""
        if ticket.open:
            return
        r = self._attach()
        assert r is not None  # admit() mapped it
        t0 = time.monotonic_ns()
        poll = _POLL_MIN
        waiter: threading.Lock | None = None
        here = 0  # this process's id, once it has to wait (a forked child has its own)
        try:
            while True:
                st = r.read()
                now = time.monotonic_ns()
                if st.generation != ticket.generation or st.state != LEADER:
                    raise self._unknown(cid, "the node stopped leading before it was acknowledged")
                if now >= st.valid_until_ns:
                    raise self._unknown(
                        cid, "the leader's lease (or heartbeat) ran out before it was acknowledged"
                    )
                if durability == LOCAL:
                    return
                if st.sync_k <= 0:
                    if durability != REPLICATED or st.acked_one >= cid:
                        return
                elif ticket.degraded or st.acked_cid >= cid:
                    return
                if st.degraded and st.sync_k > 0:
                    raise self._unknown(
                        cid, "synchronous commit gave up waiting for followers (--sync-timeout)"
                    )
                left_ns = st.valid_until_ns - now
                if st.sync_timeout_ms >= 0:
                    waited = now - t0
                    limit = st.sync_timeout_ms * 1_000_000
                    if waited >= limit:
                        raise self._unknown(
                            cid,
                            f"{max(1, st.sync_k)} followers did not acknowledge it within"
                            f" {st.sync_timeout_ms / 1000:g} s (--sync-timeout)",
                        )
                    left_ns = min(left_ns, limit - waited)
                left = left_ns / 1e9
                here = here or os.getpid()
                if st.pid != here:  # published by another process: poll it
                    time.sleep(min(poll, left))
                    poll = min(_POLL_MAX, poll * 2)
                elif waiter is None:
                    # registered before the next read: an acknowledgement published
                    # after that read releases this lock (see GatePublisher._publish)
                    waiter = self._waiters.add(cid)
                else:
                    if waiter.acquire(timeout=left):
                        waiter = None  # released: look again (and register again if need be)
        finally:
            if waiter is not None:
                self._waiters.discard(waiter)

    def want(self, cid: int) -> None:
        """Ask the node to apply up to ``cid`` without waiting to batch (a
        hint: a process that may not write the file just waits longer)."""
        if self._attach() is None:  # no node serves the file: nobody to ask
            return
        with self._lock:
            if self._want_map is None:
                try:
                    self._want_map = _open_map(self.path, create=True)
                except OSError:
                    return
            m = self._want_map
        if m is not None and _WANT.unpack_from(m, _WANT_AT)[0] < cid:
            _WANT.pack_into(m, _WANT_AT, cid)

    def _unknown(self, cid: int, why: str) -> CommitUnknownError:
        return CommitUnknownError(
            f"cid {cid} was committed on {self.db_path}, but {why}: it may not be on any"
            " follower, and may be discarded if another node leads. Check for it (by its"
            " contents) on the leader before retrying",
            cid=cid,
        )

    def close(self) -> None:
        with self._lock:
            maps = (self._map, self._want_map)
            self._map = self._want_map = None
            self._reader = None
        for m in maps:
            if m is not None:
                with contextlib.suppress(ValueError, BufferError):
                    m.close()
