"""The leader node (SPEC section 3, run as a service).

LEADER mode, listen, run the jobs, answer SYNC and SUB requests. The rules
of each request are :class:`hctserver.protocol.session.LeaderSession`'s; this module
carries them out with the threads of one :class:`~hctserver.net.tasks.TaskGroup`:

* one thread per job, each with its own connection; a commit hook queues
  the job's commits for its stream's subscribers (:mod:`hctserver.node.streamer`);
* the *other writers* stream: commits no job made (an application writing
  through :func:`hctserver.connect` in this process or another, a plain
  connection of :meth:`Database.connect`) are found by polling the journal
  every few milliseconds and streamed as one more job: the leader announces
  ``nJob = jobs + 1`` and the last stream carries them, in cid order;
* an acceptor, a bounded pool of request handlers, the streamer, the WAL
  checkpointer and the guard's watchdog.

With jobs, the run ends when they all have (the original's behaviour);
without, the leader serves until stopped (or ``seconds`` pass).
:meth:`Leader.close` stops in order: new requests, jobs, the other-writers
stream's last commits, the streams (flushed, then closed), requests in
progress, and a final WAL checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import apsw

from ..errors import (
    AuthError,
    ConfigError,
    ConnectionLostError,
    PlainClientError,
    ProtocolError,
    TimedOutError,
)
from ..journal.checkpoint import Checkpointer
from ..journal.database import Database
from ..journal.gate import HEARTBEAT
from ..journal.retention import Pins, Retainer, RetentionPolicy
from ..journal.store import JournalReader, Mode
from ..journal.watchdog import watch
from ..net.security import Security, describe
from ..net.tasks import Task, TaskGroup
from ..net.transport import TCP, Conn, Listener, TcpTransport, Transport, Waker, is_loopback
from ..position import Position
from ..protocol import auth, wire
from ..protocol.session import (
    BUSY,
    LeaderSession,
    NoRequest,
    Refuse,
    ServeFeedback,
    ServeSnapshot,
    ServeSub,
    ServeSync,
)
from .archiving import ArchiveTask
from .bootserve import SnapshotServer, clean_temp
from .feedbackhub import FeedbackHub
from .followers import CommitClock, FollowerTable
from .jobs import Job, Timeout, run_job
from .nodelock import NodeLock
from .streamer import Streamer, Subscriber
from .synccommit import LEVELS as SYNC_LEVELS
from .synccommit import TICK as SYNC_TICK
from .synccommit import SyncCommit
from .trace import Trace

log = logging.getLogger("hctserver")

_SEND_CHUNK = 1 << 20
_SYNC_ROWS = 2048  # rows read per short read transaction of a SYNC reply
_PIN_AFTER_SYNC = 2.0  # seconds the journal after a SYNC reply's end stays pinned
_MIN_EVICT_AGE = 0.5  # a connection that has not sent its request in this long may be cut


class CidSet:
    """Cids committed by the leader's jobs, noted before the commit is visible,
    so that the other-writers stream can tell them from everyone else's.
    Each operation is one call into the set, atomic under the GIL: no lock."""

    def __init__(self) -> None:
        self._cids: set[int] = set()
        self.add = self._cids.add
        self.discard = self._cids.discard

    def __contains__(self, cid: int) -> bool:
        return cid in self._cids

    def others(self, lo: int, hi: int) -> list[int]:
        """The cids in [lo, hi] that were not the jobs' (and forget the jobs').
        Every cid up to ``hi`` is committed, so no job adds one meanwhile."""
        rng = range(lo, hi + 1)
        mine = self._cids.intersection(rng)
        self._cids.difference_update(mine)
        if len(mine) == len(rng):
            return []  # all the jobs': the usual case, with no loop in Python
        return [c for c in rng if c not in mine]


class OtherWriters:
    """Finds commits that no job made and streams them, in cid order.

    Every ``poll`` seconds while the stream has subscribers (``idle_poll``
    while it has none: the jobs' cids must still be forgotten) it asks
    SQLite whether anyone committed, and reads only the new rows that are
    not the jobs'. Rows committed while nobody subscribed are not read at
    all: a new subscriber's final SYNC covers them."""

    def __init__(
        self,
        db: Database,
        after: int,
        targets: Any,
        send: Any,
        idle_poll: float = 0.1,
        clock: CommitClock | None = None,
    ) -> None:
        self.db = db
        self.clock = clock or CommitClock()
        self.jobs = CidSet()
        self.last = after
        self.streamed = 0
        self.idle_poll = idle_poll
        self._targets = targets  # () -> the stream's live subscribers
        self._send = send  # send(frames)
        self._wake = threading.Event()
        self._reader: JournalReader | None = None

    def wake(self) -> None:
        """A subscriber arrived, or the node stops: look now."""
        self._wake.set()

    def committed(self, cid: int, *_: Any) -> None:
        """A commit hook: a commit in this process that no job made (the SQL
        endpoint's, an application's connect() here) is streamed at once,
        not at the next poll (a forwarded write waits for it on a follower)."""
        if cid not in self.jobs:
            self._wake.set()

    def run(self, stop: threading.Event, poll: float) -> None:
        self._reader = JournalReader(self.db)
        failing = False
        while not stop.is_set():
            self._wake.wait(poll if self._targets() else self.idle_poll)
            self._wake.clear()
            if stop.is_set():
                break
            try:
                self.catch_up()
            except apsw.Error as e:  # a read that failed (busy, I/O): try again next pass
                if not failing:
                    log.warning("reading new commits of %s failed (%s); retrying", self.db.path, e)
                failing = True
                stop.wait(self.idle_poll)
                continue
            if failing:
                log.warning("reading new commits of %s works again", self.db.path)
                failing = False

    def catch_up(self) -> None:
        """One pass: everything committed since the last one."""
        reader = self._reader
        if reader is None or not reader.changed():
            return
        hi = reader.newest()
        self.clock.note(hi)
        if hi <= self.last:
            return
        others = self.jobs.others(self.last + 1, hi)
        self.last = hi
        if not others or not self._targets():
            return
        for lo, up in _runs(others):
            frames = [
                wire.encode_entry(c, sc, s, d) for c, sc, s, d in reader.raw_entries(lo - 1, up)
            ]
            self.streamed += len(frames)
            self._send(frames)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def _runs(cids: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted cids as (first, last) pairs."""
    out: list[tuple[int, int]] = []
    for c in cids:
        if out and out[-1][1] == c - 1:
            out[-1] = (out[-1][0], c)
        else:
            out.append((c, c))
    return out


class Leader:
    """Serve a database as the leader while ``jobs`` run (or until stopped).

    ``port=0`` listens on an ephemeral port, available as :attr:`port` after
    :meth:`start`.
    """

    def __init__(
        self,
        db: Database,
        jobs: Sequence[Job],
        *,
        host: str = "127.0.0.1",
        port: int = 21212,
        seconds: float = 0,
        max_subscribers: int = 16,
        sub_buffer_bytes: int = 64 << 20,
        request_timeout: float = 5.0,
        send_timeout: float = 30.0,
        max_connections: int = 64,
        max_syncs: int = 2,
        sub_stall_timeout: float = 10.0,
        background_checkpoint: bool = True,
        linger: float = 1.0,
        linger_max: float = 30.0,
        poll_interval: float = 0.005,
        watch_interval: float = 0.25,
        flush_timeout: float = 3.0,
        feedback: bool = True,
        max_feedback: int = 64,
        snapshots: bool = True,
        max_snapshots: int = 2,
        retention: RetentionPolicy | None = None,
        retain_interval: float = 1.0,
        trace: Trace | None = None,
        transport: Transport | None = None,
        security: Security | None = None,
        sync_followers: int = 0,
        sync_timeout: float | None = None,
        sync_level: str = "durable",
        lease: Callable[[], float] | None = None,
        archive: str | None = None,
        archive_max_delay: float = 1.0,
        archive_snapshot_every: float = 3600.0,
        archive_keep: float = 0.0,
    ) -> None:
        # the keywords as given (after defaults): what reached this role, for /status and tests
        self.settings = {k: v for k, v in locals().items() if k not in ("self", "db", "jobs")}
        if not 0 <= port <= 65535:
            raise ConfigError(f"port must be between 0 and 65535, not {port}")
        if sync_followers < 0:
            raise ConfigError(f"sync_followers must be 0 or more, not {sync_followers}")
        if sync_followers and not feedback:
            raise ConfigError(
                "synchronous commit needs the followers' feedback channel: do not turn"
                " feedback off with --sync-followers"
            )
        if sync_level not in SYNC_LEVELS:
            raise ConfigError(
                f"sync level must be one of {', '.join(SYNC_LEVELS)}, not {sync_level!r}"
            )
        if sync_timeout is not None and sync_timeout <= 0:
            raise ConfigError(
                f"sync timeout must be more than 0 s, not {sync_timeout:g} (leave it out to wait"
                " for as long as it takes)"
            )
        self.db = db
        self.jobs = list(jobs)
        self.host = host
        self.port = port
        self.timeout = Timeout(seconds)
        self._max_subscribers = max_subscribers
        self.request_timeout = request_timeout
        self.send_timeout = send_timeout
        self.trace = trace or Trace()
        self.background_checkpoint = background_checkpoint
        self.linger = linger
        self.linger_max = linger_max
        self.poll_interval = poll_interval
        self.watch_interval = watch_interval
        self.flush_timeout = flush_timeout
        self.security = security or Security()
        tls = self.security.server_tls()
        self.transport = transport or (TcpTransport(server_tls=tls) if tls else TCP)
        self._secret = self.security.secret()
        self.group = TaskGroup("leader")
        self._draining = False
        self._last_accept = 0.0
        self._streamer = Streamer(
            sub_buffer_bytes, stall_timeout=sub_stall_timeout, on_drop=self._forget
        )
        self._subs: list[list[Subscriber]] = [[] for _ in range(self.njob)]
        self._sub_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._syncs = threading.BoundedSemaphore(max_syncs)  # SYNC replies at once
        self._reading: dict[Conn, float] = {}  # connection -> when it came (request unread)
        self._serving: set[Conn] = set()  # requests being served
        self._served = threading.Condition()  # notified when one ends
        self._waker = Waker()
        self._listener: Listener | None = None
        self._checkpointer = Checkpointer(db)
        self._node_lock = NodeLock(db.path)
        self._others: OtherWriters | None = None
        self._job_tasks: list[Task] = []
        self._run_tasks: list[Task] = []
        self._named: dict[str, Task] = {}
        self._closed = False
        self._leading = False  # the gate says this node leads
        self.started_at = time.monotonic()
        self.start_cid = 0
        self.syncs_served = 0
        self.sync_bytes = 0
        self.refused = 0
        self.refused_by: dict[str, int] = {}
        self.clock = CommitClock()
        self.followers = FollowerTable(self.clock)
        self._feedback = feedback
        self._hub = FeedbackHub(self.followers, lambda: self.clock.newest, max_feedback)
        if sync_followers:
            # commits wait for the followers: they apply and report what arrives at
            # once (STATE's WAITS), and the streamer sends each commit at once
            # (what is committed while it sends goes in its next send)
            self._hub.waits = True
            self._streamer.coalesce = 0.0
            # other writers' commits (hctserver.connect() in other processes) are
            # found by polling: look every millisecond, not every 5
            self.poll_interval = min(poll_interval, 0.001)
        self.sync = SyncCommit(
            self.followers, sync_followers, level=sync_level, timeout=sync_timeout
        )
        # until when this node may acknowledge commits (a monotonic time): the
        # cluster's lease less its margin; a plain leader, a heartbeat ahead
        self._lease = lease or (lambda: time.monotonic() + HEARTBEAT)
        self.pins = Pins()  # what the journal must keep for requests in progress
        self._snapshots_on = snapshots
        self.snapshot_server = SnapshotServer(
            db,
            self.pins,
            max_snapshots=max_snapshots,
            request_timeout=request_timeout,
            send_timeout=send_timeout,
        )
        # a synchronous leader archives only what K followers acknowledged: after
        # a failover the new leader holds all of it and continues the same chain
        acked = (lambda: self.sync.acked_cid) if sync_followers else None
        self.archive = None if archive is None else ArchiveTask(
            db, archive, max_delay=archive_max_delay, snapshot_every=archive_snapshot_every,
            keep=archive_keep, ceiling=acked)  # fmt: skip
        self.retainer = Retainer(
            db,
            retention if retention is not None else RetentionPolicy(),
            self.pins,
            self.followers.needs,
            retain_interval,
            floor=(lambda: None) if self.archive is None else self.archive.floor,
        )

    def protection(self) -> str:
        """How followers are authenticated, in words (for the log and /status)."""
        tls = None
        if self.transport.tls:
            mutual = self.security.client_ca is not None
            tls = "TLS with client certificates" if mutual else "TLS"
        return describe(tls, self._secret is not None)

    def serve_clients_at(self, url: str) -> None:
        """Tell followers (in ACCEPT) that this leader serves SQL clients at ``url``."""
        self._hub.client_url = url

    # --- what the rules see (session.LeaderView) -------------------------------------

    @property
    def njob(self) -> int:
        """Streams announced: one per job, then the other writers' stream."""
        return len(self.jobs) + 1

    @property
    def max_subscribers(self) -> int:
        return self._max_subscribers

    @property
    def draining(self) -> bool:
        return self._draining

    def position(self) -> Position:
        return self.db.position()

    def hash_at(self, cid: int) -> bytes | None:
        return self.db.hash_at(cid)

    @property
    def feedback(self) -> bool:
        return self._feedback

    @property
    def snapshots(self) -> bool:
        return self._snapshots_on

    def live_subscribers(self, job: int) -> int:
        return sum(1 for s in self._subs[job] if not s.dead)

    def subscriber_counts(self) -> list[int]:
        """Live subscribers per stream (the last one: other writers)."""
        with self._sub_lock:
            return [self.live_subscribers(k) for k in range(self.njob)]

    def subscriptions(self) -> list[dict[str, Any]]:
        """Every live subscriber: its stream, peer, feedback id and bytes."""
        with self._sub_lock:
            subs = [s for k in range(self.njob) for s in self._subs[k] if not s.dead]
        return [
            {
                "stream": s.job,
                "peer": s.peer,
                "follower": s.follower,
                "queued_bytes": s.pending_bytes,
                "sent_bytes": s.sent,
            }
            for s in subs
        ]

    @property
    def sent_bytes(self) -> int:
        """Bytes sent on streams and in SYNC replies."""
        return self._streamer.bytes_sent + self.sync_bytes

    @property
    def dropped(self) -> int:
        """Subscribers dropped so far (slow, or gone)."""
        return self._streamer.dropped

    @property
    def error(self) -> BaseException | None:
        return self.group.error

    @property
    def other_writers(self) -> OtherWriters | None:
        """The stream of commits no job made (None before :meth:`start`)."""
        return self._others

    # --- life cycle ------------------------------------------------------------

    def start(self) -> None:
        db = self.db
        self._node_lock.acquire("leader")
        try:
            db.check_unjournaled()
            db.set_mode(Mode.LEADER)
            self._listener = self.transport.listen(self.host, self.port)
            db.set_role("leader")
        except BaseException:
            self._node_lock.release()
            raise
        if self.background_checkpoint:
            self._checkpointer.take_over()  # before the jobs' connections open
        self.port = self._listener.port
        clean_temp(db.path)
        self.start_cid = db.snapshot()
        self.clock.note(self.start_cid)
        gate = db.publisher
        self._leading = True
        gate.lead(
            sync_k=self.sync.k,
            sync_timeout=self.sync.timeout,
            valid_until=self._lease(),
        )
        self.sync.attach(gate, self.start_cid)
        self.followers.on_change = self.sync.refresh
        g = self.group
        stop = g.stopping
        self._named["gate"] = g.spawn("hct-gate", self._keep_gate, stop)
        self._named["watchdog"] = g.spawn("hct-watchdog", watch, db, stop, self.watch_interval)
        if self.background_checkpoint:
            self._named["checkpoint"] = g.spawn("hct-checkpoint", self._checkpointer.run, stop)
        self._named["streamer"] = g.spawn(
            "hct-streamer", self._streamer.run, stop, on_stop=self._streamer.wake
        )
        others = self._others = OtherWriters(
            db, db.snapshot(), lambda: self._subs[-1], self._send_others, clock=self.clock
        )
        self._named["others"] = g.spawn(
            "hct-others", others.run, stop, self.poll_interval, on_stop=others.wake
        )
        db.add_commit_hook(others.committed)  # this process's other writers: at once
        if self.retainer.policy.active:
            self._named["retention"] = g.spawn("hct-retention", self.retainer.run, stop)
        if self.archive is not None:
            self.archive.start(g)
        if self._feedback:
            self._named["feedback"] = g.spawn(
                "hct-feedback", self._hub.run, stop, on_stop=self._hub.wake
            )
        self._named["accept"] = g.spawn("hct-accept", self._accept_loop, on_stop=self._waker.wake)
        for i, job in enumerate(self.jobs):
            t = g.spawn(
                f"hct-job-{i}-{job.name}",
                run_job,
                i,
                job,
                db.connect,
                self.timeout,
                self._hook_installer(i),
                on_stop=self.timeout.expire,
            )
            self._job_tasks.append(t)
        if self.jobs:
            self._run_tasks = self._job_tasks
        else:
            self._run_tasks = [
                g.spawn("hct-timer", self.timeout.wait_expired, on_stop=self.timeout.expire)
            ]
        log.info(
            "leader on %s:%d: %d jobs, cid %d; %s",
            self.host,
            self.port,
            len(self.jobs),
            db.snapshot(),
            self.protection(),
        )
        if not self.transport.tls and self._secret is None and not is_loopback(self.host):
            log.warning(
                "listening on %s:%d, beyond this machine, with no TLS and no authentication:"
                " anyone who can reach this port can read the whole database"
                " (docs/SECURITY.md); listen on loopback or a private network",
                self.host,
                self.port,
            )
        self.trace("listening on %s:%d with %d jobs", self.host, self.port, len(self.jobs))

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the run to end (every job ended, ``seconds`` passed, a stop,
        or a failure), then close. Raises the first error (a failed job:
        JobError). Returns False if ``timeout`` passed first."""
        if not self.group.wait(self._run_tasks, timeout):
            return False
        if not self.group.stopping.is_set():
            self._linger()
        self.close()
        self.group.raise_error()
        return True

    def run(self) -> None:
        self.start()
        self.wait()

    def stop(self) -> None:
        """Ask the leader to stop (safe from any thread; see :meth:`close`)."""
        self._draining = True
        self._release_gate()
        self.group.stop()

    def _release_gate(self) -> None:
        """This node no longer leads: no commit is acknowledged any more, and
        those waiting for followers get CommitUnknownError (committed here,
        perhaps not on any follower)."""
        self.sync.attach(None)
        self.followers.on_change = None
        if self._leading and not self.db.closed:
            self._leading = False
            self.db.publisher.stop()

    def _keep_gate(self, stop: threading.Event) -> None:
        """The ``hct-gate`` thread: move the acknowledgement deadline forward
        (never needed for safety: if this thread stalls, the deadline passes
        and writers stop), and give up synchronous waits that took too long."""
        gate = self.db.publisher
        while not stop.wait(SYNC_TICK):
            if not self._draining:
                gate.extend(self._lease())
            self.sync.tick()

    def _linger(self) -> None:
        """The run has ended: keep answering while followers are still
        arriving (a follower between its catch-up SYNC and its final SYNC
        needs a few more requests), until ``linger`` seconds pass without a
        new connection or ``linger_max`` seconds in all."""
        if self.linger <= 0:
            return
        stop = self.group.stopping
        end = time.monotonic() + self.linger_max
        while not stop.is_set():
            now = time.monotonic()
            quiet = now - self._last_accept
            if (quiet >= self.linger and not self._serving) or now >= end:
                return
            stop.wait(min(0.05, max(0.0, self.linger - quiet)))

    def close(self, timeout: float = 5.0) -> None:
        """Stop in order (see the module's docstring), within about ``timeout``
        seconds. The first error of any thread stays in :attr:`error`."""
        if self._closed:
            return
        self._closed = True
        self._draining = True
        self._release_gate()
        g = self.group
        g.stop()
        start = time.monotonic()

        def until(share: float) -> float:
            """Seconds left until ``share`` of the budget has passed."""
            return max(0.0, start + timeout * share - time.monotonic())

        for t in self._job_tasks:  # one deadline for all jobs
            t.join(until(0.3))
        for name in ("accept", "others"):
            if name in self._named:
                self._named[name].join(until(0.4))
        if self._listener is not None:
            self._listener.close()  # from now on followers are refused at once
        others = self._others
        if others is not None:
            self.db.remove_commit_hook(others.committed)
        if others is not None and self._named["others"].done.is_set():
            try:
                others.catch_up()  # the last commits of other writers
            finally:
                others.close()
        if self.archive is not None:
            self.archive.finish()  # the jobs have stopped: ship what they committed
        if "streamer" in self._named:
            self._named["streamer"].join(until(0.45))
            self._streamer.finish(min(self.flush_timeout, until(0.8)))
        self._finish_requests(min(self.flush_timeout, until(0.9)))
        g.join(until(1.0))
        if self.archive is not None:
            self.archive.archiver.retire()  # a thread still stuck on the store stores nothing
        if self.background_checkpoint:
            self._checkpointer.final()
        self._hub.close()  # also when feedback is off or run() never ran
        self._waker.close()
        self._node_lock.release()
        self.trace("leader stopped")
        log.info("leader stopped at cid %d", self.db.snapshot())

    def _finish_requests(self, timeout: float) -> None:
        """Let replies in progress end (a follower between its catch-up and
        its final SYNC can then stream to the end), for up to ``timeout``
        seconds; then cut the rest off."""
        with self._served:
            self._served.wait_for(lambda: not self._serving, timeout)
            late = list(self._serving)
        for conn in late:
            conn.abort()

    # --- streams ----------------------------------------------------------------

    def _hook_installer(self, k: int) -> Any:
        others = self._others
        assert others is not None

        def install(conn: Any) -> None:
            subs = self._subs
            streamer = self._streamer

            def hook(cid: int, schema: str, data: bytes, schemacid: int) -> None:
                targets = subs[k]
                if targets:
                    streamer.push(targets, wire.encode_entry(cid, schemacid, schema, data))

            conn.add_commit_hook(hook)
            conn.track_cids(others.jobs)

        return install

    def _forget(self, sub: Subscriber, gone: bool) -> None:
        """A subscriber dropped (or ``gone``): commits are no longer encoded for it."""
        if sub.follower and not gone:
            self.followers.dropped(sub.follower)
        with self._sub_lock:
            self._subs[sub.job] = [s for s in self._subs[sub.job] if s is not sub]

    def _send_others(self, frames: list[bytes]) -> None:
        targets = self._subs[-1]
        for frame in frames:
            self._streamer.push(targets, frame)

    # --- requests ---------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            conn = self._listener.accept(self._waker)
            if conn is None or self.group.stopping.is_set():
                if conn is not None:
                    conn.close()
                return
            self._last_accept = time.monotonic()
            if not self._slots.acquire(blocking=False) and not self._make_room():
                if not self.transport.tls:  # a TLS client would read a plain ERROR as garbage
                    self._refuse(conn, Refuse(BUSY, "busy"))
                conn.close()
                continue
            with self._served:
                self._serving.add(conn)
                self._reading[conn] = time.monotonic()
            self.group.spawn(f"hct-serve-{conn.peer}", self._serve, conn)

    def _make_room(self) -> bool:
        """Every request slot is taken: cut off the connection that has taken
        longest to send its request (a real follower sends it at once), and
        take its slot when it is freed, within a second."""
        with self._served:
            slow = min(self._reading.items(), key=lambda kv: kv[1], default=None)
        if slow is None or time.monotonic() - slow[1] < _MIN_EVICT_AGE:
            return False
        log.info("every request slot is taken: cutting off %s, the slowest", slow[0].peer)
        slow[0].abort()
        return self._slots.acquire(timeout=1.0)

    def _refuse(self, conn: Conn, r: Refuse) -> None:
        self.refused += 1
        self.refused_by[r.reason] = self.refused_by.get(r.reason, 0) + 1
        if r.reason in ("incompatible", "ahead", "protocol", "tls", "auth"):
            log.warning("refused %s: %s", conn.peer, r.detail or r.message)
        else:
            log.info("refused %s: %s", conn.peer, r.detail or r.message)
        if not r.message:
            return
        try:
            conn.send_all(wire.encode_error(r.message), self.request_timeout)
            conn.shutdown_write()
        except ConnectionLostError:
            pass

    def _serve(self, conn: Conn) -> None:
        keep = replying = False
        try:
            action = self._admit(conn) or self._read_request(conn)
            if isinstance(action, Refuse):
                self._refuse(conn, action)
            elif isinstance(action, ServeSync):
                replying = True
                self._serve_sync(conn, action)
            elif isinstance(action, ServeSub):
                keep = True
            elif isinstance(action, ServeSnapshot):
                replying = True
                self.snapshot_server.serve(conn)
            elif isinstance(action, ServeFeedback):
                self._hub.accept(conn, self.request_timeout, self.db.snapshot())
                keep = True
            elif isinstance(action, NoRequest):
                log.info("%s connected and closed without a request", conn.peer)
        except ConnectionLostError as e:
            log.info("connection from %s failed: %s", conn.peer, e)
        except Exception:
            log.exception("error serving %s", conn.peer)
            if replying:  # an ERROR inside a reply would read as garbage: cut it short
                conn.abort()
            else:
                self._refuse(conn, Refuse("internal error in the leader; see its log", "internal"))
        finally:
            if not keep:
                conn.close()
            with self._served:
                self._serving.discard(conn)
                self._reading.pop(conn, None)
                self._served.notify_all()
            self._slots.release()

    def _admit(self, conn: Conn) -> Refuse | None:
        """TLS, then the shared secret, as configured: None once the client
        passed both (it may send its request), else why it is refused."""
        try:
            self.transport.secure(conn, self.request_timeout)
        except PlainClientError:
            why = "a plain client (no TLS handshake)"
            return Refuse(auth.TLS_NEEDED, "tls", why)
        except AuthError as e:  # TLS told the client itself, in an alert
            return Refuse("", "tls", str(e))
        if self._secret is None:
            return None
        try:
            auth.exchange(conn, auth.LeaderAuth(self._secret), b"", self.request_timeout)
        except auth.Refused as e:
            return Refuse(e.reply, "auth", str(e))
        except ProtocolError as e:
            return Refuse(str(e), "protocol")
        return None

    def _read_request(self, conn: Conn) -> Any:
        """Read one request within ``request_timeout`` (for the whole request,
        not per read) and decide it; a SUB is registered here."""
        session = LeaderSession(self)
        deadline = time.monotonic() + self.request_timeout
        buf = bytearray(64)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return session.timed_out(self.request_timeout)
            try:
                n = conn.recv_into(buf, left)
            except TimedOutError:
                return session.timed_out(self.request_timeout)
            if n == 0:
                return session.receive_eof()
            got = session.receive_data(memoryview(buf)[:n])
            if got is None:
                continue
            with self._served:
                self._reading.pop(conn, None)
            if isinstance(got, Refuse):
                return got
            if isinstance(got, wire.SyncRequest):
                return session.decide(got)
            with self._sub_lock:  # the check and the registration are one step
                action = session.decide(got)
                if isinstance(action, ServeSub):
                    fid = action.follower if self.followers.known(action.follower) else 0
                    self._subscribe(conn, action.job, fid)
            return action

    def _subscribe(self, conn: Conn, k: int, follower: int = 0) -> None:
        # Registered before the follower can see SUBREPLY: its final SYNC starts
        # after that, so every commit is in the SYNC reply or on this stream.
        sub = Subscriber(conn, k, wire.encode_subreply_start(), follower)
        self._streamer.add(sub)
        self._subs[k] = [*(s for s in self._subs[k] if not s.dead), sub]
        if k == self.njob - 1 and self._others is not None:
            self._others.wake()  # poll at the streaming rate from now on
        log.info("%s subscribed to stream %d", conn.peer, k)
        self.trace("SUB: job %d subscribed by %s", k, conn.peer)

    def _serve_sync(self, conn: Conn, action: ServeSync) -> None:
        """The journal after ``action.after``, up to the newest cid when the
        request came, read in chunks of short read transactions: a follower
        that reads slowly (or not at all) pins nothing in the WAL, and is
        cut off once one chunk has waited ``send_timeout`` for it."""
        conn.send_all(wire.encode_syncreply_start(action.njob), self.send_timeout)
        after = self.db.sync_start(action.after)
        n = 0
        buf = bytearray()
        reader = JournalReader(self.db)
        pin = self.pins.hold(after, f"SYNC from {conn.peer}")  # retention keeps what we send
        self.pins.settle(after)  # a follower that installed a snapshot at ``after`` is here
        try:
            upto = reader.newest()
            while after < upto:
                # reading and framing take a slot (at most max_syncs at once: the
                # writers keep the interpreter); waiting on a slow reader does not
                if not self._syncs.acquire(timeout=self.send_timeout):
                    raise TimedOutError(f"no SYNC slot for {self.send_timeout:g} s")
                try:
                    while after < upto and len(buf) < _SEND_CHUNK:
                        rows = reader.raw_chunk(after, upto, _SYNC_ROWS)
                        if not rows or rows[0][0] != after + 1:
                            # truncated under the reply (the hard cap): a gap is never
                            # sent; the follower loses this reply and asks again
                            raise ConnectionLostError(
                                f"the journal after cid {after} was truncated during the reply"
                            )
                        k, after = wire.frame_entries(buf, iter(rows), 1 << 62)
                        if not n:
                            self.trace("SYNC: first CID = %d", rows[0][0])
                        n += k
                finally:
                    self._syncs.release()
                if len(buf) >= _SEND_CHUNK:
                    conn.send_all(buf, self.send_timeout)
                    self.sync_bytes += len(buf)
                    buf.clear()
                    self.pins.move(pin, after)
        finally:
            reader.close()
            # the follower's final SYNC comes from where this reply ends: keep that a while
            self.pins.move(pin, after)
            self.pins.release(pin, _PIN_AFTER_SYNC)
        buf += wire.END_OF_ENTRIES
        conn.send_all(buf, self.send_timeout)
        conn.shutdown_write()
        self.sync_bytes += len(buf)
        self.syncs_served += 1
        log.debug("SYNC from %s at cid %d: %d entries", conn.peer, action.after, n)
        self.trace("SYNC: last CID = %d (%d entries to %s)", after, n, conn.peer)
