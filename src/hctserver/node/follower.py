"""The follower node (SPEC section 3, run as a service).

The rules are :class:`hctserver.protocol.session.FollowerSession`'s: catch up with
SYNC, subscribe to every stream the leader announces, SYNC once more, then
apply the streams. This module carries them out with the threads of one
:class:`~hctserver.net.tasks.TaskGroup`:

* the *driver* runs the session's plan: blocking SYNC exchanges (their
  entries go to the sink as they arrive, hashed along the chain here),
  SUB requests, back-off waits;
* the *stream reader* reads every SUB connection (one poller) into the sink
  and reports streams that end;
* the *apply* thread (:mod:`hctserver.node.sink`), the WAL checkpointer, the
  guard's watchdog and the local jobs.

By default the follower runs until stopped: when it loses its leader it
logs why, waits (capped exponential backoff) and starts over from its own
position. ``once=True`` is the original's run, which ends when the leader
closes its streams. Final errors (an incompatible history, a protocol
violation, an entry that cannot be applied) stop it in both modes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

from .. import faults
from ..errors import (
    ConfigError,
    ConnectionLostError,
    GapError,
    HctError,
    ProtocolError,
    TimedOutError,
    TruncatedMessageError,
)
from ..journal import snapshot
from ..journal.checkpoint import Checkpointer
from ..journal.database import Database
from ..journal.retention import Pins, Retainer, RetentionPolicy
from ..journal.watchdog import watch
from ..net.security import Security, describe
from ..net.tasks import Task, TaskGroup
from ..net.transport import TCP, Conn, Poller, TcpTransport, Transport, Waker
from ..position import Entry, chain
from ..protocol import auth, bootstrap, feedback, wire
from ..protocol.session import (
    Backoff,
    BackoffOver,
    Bootstrap,
    Bootstrapped,
    CloseStreams,
    Fail,
    Finish,
    Flush,
    FollowerEvent,
    FollowerSession,
    HoleSeen,
    RequestFailed,
    RetryPolicy,
    StartJobs,
    StartStreaming,
    StopRequested,
    StreamEnded,
    Streaming,
    Subscribe,
    Subscribed,
    Sync,
    SyncDone,
    leader_error,
)
from . import bootclient
from .jobs import Job, Timeout, run_job
from .nodelock import NodeLock
from .reporter import Reporter
from .sink import FollowerStats, Sink
from .trace import Trace

log = logging.getLogger("hctserver")

_RECV = 1 << 20
MAX_ENTRY_BYTES = 32 << 20  # largest entry accepted from a leader (memory: about 3x)
MAX_STREAMS = 256  # most streams a leader may announce (one connection each)

__all__ = ["Follower", "FollowerStats"]


class _Stopped(Exception):
    """The follower is stopping: unwind the driver quietly."""


class StreamReader:
    """Reads every SUB connection into the sink; reports ended streams to
    the driver as session events. Streams belong to a *generation*:
    :meth:`retire_all` starts a new one; retired streams report nothing but
    are still read to their end (what a leader flushed before it went away
    is applied) for up to ``grace`` seconds, then closed."""

    def __init__(
        self,
        sink: Sink,
        events: queue.Queue[tuple[int | None, FollowerEvent]],
        stats: FollowerStats,
        grace: float = 1.0,
        io_timeout: float = 30.0,
    ) -> None:
        self.sink = sink
        self.events = events
        self.stats = stats
        self.grace = grace
        self.io_timeout = io_timeout  # how long an entry may stay half received
        self.generation = 0
        self._poller = Poller()
        self._lock = threading.Lock()
        self._retired: dict[Conn, float] = {}  # connection -> when to close it
        self._partial: dict[Conn, float] = {}  # connection -> since when half an entry waits
        self._stopped = False
        self._buf = bytearray(_RECV)

    def add(self, job: int, conn: Conn, dec: wire.ReplyDecoder) -> bool:
        """Read ``conn`` from now on; False (and the connection closed) if the
        reader has stopped."""
        with self._lock:
            if self._stopped:
                conn.close()
                return False
            self._poller.add(conn, (job, dec, self.generation))
        self._poller.wake()
        return True

    def retire_all(self) -> None:
        with self._lock:
            self.generation += 1
            end = time.monotonic() + self.grace
            for conn in self._poller.conns():
                self._retired.setdefault(conn, end)
        self._poller.wake()

    def close_all(self) -> None:
        with self._lock:
            self.generation += 1
            for conn in self._poller.conns():
                self._forget(conn)

    def _forget(self, conn: Conn) -> None:
        """Stop reading ``conn`` and close it (the caller holds the lock)."""
        self._poller.remove(conn)
        self._retired.pop(conn, None)
        self._partial.pop(conn, None)
        conn.close()

    def wake(self) -> None:
        self._poller.wake()

    def run(self, stop: threading.Event) -> None:
        mv = memoryview(self._buf)
        try:
            while not stop.is_set():
                with self._lock:
                    due = min(
                        (
                            *self._retired.values(),
                            *(t + self.io_timeout for t in self._partial.values()),
                        ),
                        default=None,
                    )
                wait = None if due is None else max(0.0, due - time.monotonic())
                for conn, (job, dec, gen), _, _ in self._poller.poll(wait):
                    self._read(conn, job, dec, gen, mv)
                if due is not None:
                    self._expire(time.monotonic())
        finally:
            with self._lock:
                self._stopped = True
            self.close_all()
            self._poller.close()

    def _expire(self, now: float) -> None:
        """Close retired streams past their grace, and streams where half an
        entry has waited longer than ``io_timeout`` (a trickling leader)."""
        with self._lock:
            for conn in [c for c, t in self._retired.items() if t <= now]:
                self._forget(conn)
            for conn in [c for c, t in self._partial.items() if t + self.io_timeout <= now]:
                job, _, gen = self._poller.data(conn)
                self._forget(conn)
                if gen == self.generation:
                    err = TimedOutError(
                        f"stream {job}: half an entry waited {self.io_timeout:g} s for the rest"
                    )
                    self.events.put((gen, StreamEnded(job, err)))

    def _read(self, conn: Conn, job: int, dec: wire.ReplyDecoder, gen: int, mv: memoryview) -> None:
        err: HctError | None = None
        try:
            n = conn.try_recv_into(mv)
        except ConnectionLostError as e:
            n, err = 0, e
        if n is None:
            return
        try:
            if n == 0:
                if err is None:
                    dec.eof()
            else:
                dec.feed(mv[:n])
                evs = dec.next_events()
                with self._lock:
                    if not dec.buffered:
                        self._partial.pop(conn, None)
                    elif evs or conn not in self._partial:
                        self._partial[conn] = time.monotonic()
                entries = [e for e in evs if type(e) is Entry]
                self.stats.sub_entries += len(entries)
                self.sink.put(entries, n)
                return
        except ProtocolError as e:
            err = e
        with self._lock:
            if conn not in self._poller:
                return
            self._forget(conn)
            if gen == self.generation:
                self.events.put((gen, StreamEnded(job, err)))


class Follower:
    """Replicate a leader into ``db`` until stopped (or, with ``once``,
    until the leader ends its run)."""

    def __init__(
        self,
        db: Database,
        *,
        host: str = "127.0.0.1",
        port: int = 21212,
        syncthreads: int = 1,
        syncbytes: int = 0,
        jobs: Sequence[Job] = (),
        seconds: float = 0,
        once: bool = False,
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
        connect_timeout: float = 10.0,
        io_timeout: float = 30.0,
        max_size: int = MAX_ENTRY_BYTES,
        max_streams: int = MAX_STREAMS,
        queue_bytes: int = 16 << 20,
        max_resubscribes: int = 20,
        commit_interval: float = 0.01,
        background_checkpoint: bool = True,
        watch_interval: float = 0.25,
        hole_timeout: float = 1.0,
        silence_probe: float = 2.0,
        applier_options: dict[str, Any] | None = None,
        feedback: bool = True,
        bootstrap: bool = True,
        bootstrap_min: int = 10_000,
        reseed: bool = False,
        max_snapshot_bytes: int = bootclient.MAX_SNAPSHOT_BYTES,
        retention: RetentionPolicy | None = None,
        retain_interval: float = 1.0,
        name: str | None = None,
        trace: Trace | None = None,
        transport: Transport | None = None,
        security: Security | None = None,
    ) -> None:
        # the keywords as given (after defaults): what reached this role, for /status and tests
        self.settings = {k: v for k, v in locals().items() if k not in ("self", "db", "jobs")}
        if not 1 <= syncthreads <= 16:
            raise ConfigError(f"syncthreads must be between 1 and 16, not {syncthreads}")
        if syncbytes < 0:
            raise ConfigError(f"syncbytes must be >= 0, not {syncbytes}")
        if not 0 < port <= 65535:
            raise ConfigError(f"the leader's port must be between 1 and 65535, not {port}")
        if not 0 < retry_initial <= retry_max:
            raise ConfigError("retry delays must be > 0, the first no larger than the cap")
        self.db = db
        self.host = host
        self.port = port
        self.syncthreads = syncthreads
        self.syncbytes = syncbytes
        self.jobs = list(jobs)
        self.timeout = Timeout(seconds)
        self.seconds = seconds
        self.once = once
        self.retry = RetryPolicy(retry_initial, retry_max)
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self.max_size = max_size
        self.max_streams = max_streams
        self.queue_bytes = queue_bytes
        self.max_resubscribes = max_resubscribes
        self.commit_interval = commit_interval
        self.background_checkpoint = background_checkpoint
        self.watch_interval = watch_interval
        self.hole_timeout = hole_timeout
        # against a leader without feedback (the original): SYNC when the
        # streams have been silent this long (0: never), see _silent()
        self.silence_probe = silence_probe
        self._stream_seen = (0, 0.0)  # stream entries received, and when that last changed
        self._probing = False
        self._starved_said = False
        self._hole_at = -1
        self.applier_options = applier_options or {}
        self.trace = trace or Trace()
        self.security = security or Security()
        tls = self.security.client_tls()
        self.transport = transport or (
            TcpTransport(client_tls=tls, server_name=self.security.server_name) if tls else TCP
        )
        self._secret = self.security.secret()
        self.stats = FollowerStats()
        self.group = TaskGroup("follower")
        if bootstrap_min < 0:
            raise ConfigError(f"bootstrap_min must be >= 0, not {bootstrap_min}")
        self.reseed = reseed
        self.max_snapshot_bytes = max_snapshot_bytes
        # the same journal retention as a leader's; no one SYNCs from a follower
        self.retainer = Retainer(
            db,
            retention if retention is not None else RetentionPolicy(),
            Pins(),
            list,
            retain_interval,
        )
        self.bootstraps = 0
        self.session = FollowerSession(
            once=once,
            syncbytes=syncbytes,
            retry=self.retry,
            max_resubscribes=max_resubscribes,
            bootstrap=bootstrap,
            bootstrap_min=bootstrap_min,
        )
        self.njob = 0
        # (the streams' generation for a StreamEnded, else None; the event)
        self._events: queue.Queue[tuple[int | None, FollowerEvent]] = queue.Queue()
        self._cancel = Waker()  # wakes a connect in progress when stopping
        self._sink: Sink | None = None
        self._streams: StreamReader | None = None
        self.reporter = Reporter(name or db.path, self._positions, reopen=self._open_feedback)
        # report as soon as the position moves (a leader with synchronous
        # commit waits for it), not only every interval
        self._checkpointer = Checkpointer(
            db, position=lambda: self.stats.snapshot, on_durable=self.reporter.wake
        )
        self._moved_listener = self._moved  # one bound method: removed by identity
        db.add_snapshot_listener(self._moved_listener)
        self._node_lock = NodeLock(db.path)
        self.feedback = feedback
        self._hello_done = False
        self._published = False  # the gate says this node follows
        self.started_at = time.monotonic()
        self._driver: Task | None = None
        self._job_tasks: list[Task] = []
        self._active: Conn | None = None  # the connection the driver is blocked on
        self._active_lock = threading.Lock()
        self._closed = False

    @property
    def error(self) -> BaseException | None:
        return self.group.error

    @property
    def _bootstrap_path(self) -> str:
        return self.db.path + ".hct-bootstrap"

    # --- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the threads; the driver does the rest (see :meth:`wait`)."""
        db = self.db
        self.trace.restart()
        self._node_lock.acquire("follower")
        try:
            db.check_unjournaled()
            snapshot.remove_files(self._bootstrap_path)  # a crash left it half received
            if db.role is None and db.max_cid() == 0:
                db.set_role("follower")  # a new replica: no application may write it
            n = db.rollback()
        except BaseException:
            self._node_lock.release()
            raise
        self.trace("rollback discarded %d entries", n)
        db.publisher.follow(f"{self.host}:{self.port}")  # writers here are refused
        self._published = True
        if self.background_checkpoint:
            self._checkpointer.take_over()  # before the applier's connection opens
        ap = db.applier(**self.applier_options)
        sink = self._sink = Sink(
            ap, self.syncthreads > 1, self.queue_bytes, self.stats, wanted=db.publisher.wanted
        )
        # a leader whose commits wait for acknowledgements: apply what arrives at once
        self.reporter.on_waits = sink.hurry
        self.stats.snapshot = self.stats.start_snapshot = ap.snapshot
        streams = self._streams = StreamReader(
            sink, self._events, self.stats, io_timeout=self.io_timeout
        )
        g = self.group
        stop = g.stopping
        g.spawn("hct-watchdog", watch, db, stop, self.watch_interval)
        if self.background_checkpoint:
            g.spawn("hct-checkpoint", self._checkpointer.run, stop)
        if self.retainer.policy.active:
            g.spawn("hct-retention", self.retainer.run, stop)
        g.spawn("hct-apply", sink.work, on_stop=sink.close)
        g.spawn("hct-sub-reader", streams.run, stop, on_stop=streams.wake)
        if self.feedback:
            g.spawn("hct-report", self.reporter.run, stop, on_stop=self.reporter.wake)
        self._driver = g.spawn(
            "hct-follower", self._drive, on_stop=self._interrupt, ends_group=True
        )

    def run(self) -> None:
        self.start()
        self.wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the follower ends (stopped, ``once`` and the leader
        ended, or a final error); then close and raise the first error.
        Returns False if ``timeout`` passed first."""
        assert self._driver is not None, "start() first"
        if not self.group.wait([self._driver], timeout):
            return False
        self.close()
        self.group.raise_error()
        return True

    def stop(self) -> None:
        """Ask the follower to stop (safe from any thread). The database stays
        consistent: a batch being applied is rolled back whole."""
        self.group.stop()

    def close(self, timeout: float = 5.0) -> None:
        """Stop and join every thread (the database stays consistent)."""
        if self._closed:
            return
        self._closed = True
        self.db.remove_snapshot_listener(self._moved_listener)
        self.group.stop()
        late = self.group.join(timeout)
        if self._sink is not None and "hct-apply" not in late and "hct-follower" not in late:
            self._sink.applier.close()
        if self.background_checkpoint and "hct-checkpoint" not in late:
            self._checkpointer.final()
        if "hct-report" not in late:
            self.reporter.close()
        if not late:
            self._cancel.close()
        if self._published and not self.db.closed:
            self.db.publisher.stop()
        self._node_lock.release()
        self.trace("follower stopped at cid %d", self.stats.snapshot)

    @property
    def queued_events(self) -> int:
        """Events waiting for the driver (for status displays and tests)."""
        return self._events.qsize()

    def local_lag(self) -> float:
        """Seconds the oldest entry received and not yet applied has waited
        (the follower's own view of its lag, without the leader's)."""
        sink = self._sink
        return 0.0 if sink is None else sink.arrivals.lag(self.stats.snapshot)

    def _moved(self, cid: int) -> None:
        """The snapshot reached ``cid`` (in the applying thread, before the
        sink records it): report it now."""
        if cid > self.stats.snapshot:
            self.stats.snapshot = cid
        self.reporter.wake()

    def _positions(self) -> tuple[int, int, int]:
        """(applied, durable, received) cids, for the leader."""
        st = self.stats
        applied = st.snapshot
        if self.db.synchronous in ("FULL", "EXTRA"):
            durable = applied
        else:  # synchronous=NORMAL: on disk once a checkpoint synced the WAL
            durable = min(applied, self._checkpointer.durable)
        return applied, durable, max(applied, st.received_cid)

    def _interrupt(self) -> None:
        """Wake the driver wherever it waits."""
        self._events.put((None, StopRequested()))
        self._cancel.wake()
        with self._active_lock:
            if self._active is not None:
                self._active.abort()

    # --- the driver -----------------------------------------------------------------

    def _drive(self) -> None:
        session = self.session
        session.start()
        try:
            while True:
                act = session.next_action()
                if act is None:
                    ev = self._next_event()
                    if ev is not None:
                        session.handle(ev)
                    continue
                if isinstance(act, Finish):
                    self._finish()
                    return
                if isinstance(act, Fail):
                    raise act.error
                reply = self._do(act)
                if reply is not None:
                    session.handle(reply)
        except _Stopped:
            return
        except BaseException:
            if self.group.stopping.is_set():
                return  # the stop caused it
            raise

    def _next_event(self) -> FollowerEvent | None:
        """The next event for the session; while streaming, a hole that has
        not filled for ``hole_timeout`` seconds becomes one too."""
        try:
            gen, ev = self._events.get(timeout=self.hole_timeout)
        except queue.Empty:
            return self._hole()
        assert self._streams is not None
        if gen is not None and gen != self._streams.generation:
            return None  # from streams retired since: already dealt with
        if isinstance(ev, StreamEnded):
            log.info("stream %d from the leader ended%s", ev.job, _why(ev.error))
            if self._starved_said and ev.error is None:
                # starved streams end with the leader's run: what they did not
                # carry since the last probe may still be had
                self._sync(final=True)
        return ev

    def _hole(self) -> FollowerEvent | None:
        sink = self._sink
        assert sink is not None
        cid = sink.position.cid
        stuck = sink.applier.pending and cid == self._hole_at and not self.stats.disk_full
        self._hole_at = cid
        if not stuck:
            return self._silent()
        log.warning("entries after cid %d are missing from the streams; asking again", cid)
        return HoleSeen()

    def _silent(self) -> FollowerEvent | None:
        """A leader without feedback (the original C leader) stops feeding a
        stream's later subscribers once one of them leaves (its defect), and
        says nothing: when the streams have been silent for ``silence_probe``
        seconds, ask with a SYNC (an empty reply from an idle leader costs
        little). If the SYNC brings entries, the streams are starved: the
        follower goes on like this, one SYNC per ``hole_timeout`` seconds."""
        if self.reporter.view.follower_id or self.stats.phase != "stream":
            return None
        now = time.monotonic()
        n = self.stats.sub_entries
        if n != self._stream_seen[0] or not self._stream_seen[1]:
            self._stream_seen = (n, now)
            return None
        wait = self.hole_timeout if self._starved_said else self.silence_probe
        if not self.silence_probe or now - self._stream_seen[1] < wait:
            return None
        self._stream_seen = (n, now)
        self._probing = True
        return HoleSeen()

    def _starved(self, nbytes: int) -> None:
        """After a probe's SYNC: say once if it found what the streams did not."""
        self._probing = False
        if nbytes and not self._starved_said:
            self._starved_said = True
            log.warning(
                "the leader's streams are silent but its journal grew: following it by SYNC"
                " every %g s from now on (the original C leader stops feeding a stream's"
                " later subscribers once one of them leaves)",
                self.hole_timeout,
            )

    def _do(self, act: Any) -> FollowerEvent | None:
        sink = self._sink
        assert sink is not None and self._streams is not None
        stop = self.group.stopping
        if stop.is_set():
            raise _Stopped
        if isinstance(act, Sync):
            if not act.final and not self._hello_done:
                self._begin_session()
                if self._snapshot_first():
                    return self._bootstrap()
            return self._sync(act.final)
        if isinstance(act, Bootstrap):
            return self._bootstrap()
        if isinstance(act, Subscribe):
            return self._subscribe(act.job, act.again)
        if isinstance(act, Flush):
            sink.flush()
        elif isinstance(act, StartStreaming):
            self.stats.phase = "subscribe"
            sink.stream(self.commit_interval)  # waits for the catch-up to be applied
            self.trace("syncreply 0 applied (snapshot %d)", sink.position.cid)
        elif isinstance(act, StartJobs):
            self._start_jobs()
        elif isinstance(act, Streaming):
            st = self.stats
            st.phase = "stream"
            st.catchup_seconds = time.monotonic() - st.catchup_t0
            log.info(
                "caught up: streaming from %s:%d at cid %d (%d streams; catch-up of %d"
                " entries took %.1f s)",
                self.host,
                self.port,
                sink.position.cid,
                self.njob,
                sink.position.cid - st.catchup_from,
                st.catchup_seconds,
            )
        elif isinstance(act, CloseStreams):
            self._streams.retire_all()
        elif isinstance(act, Backoff):
            self._hello_done = False
            self.reporter.detach()
            self.stats.phase = "backoff"
            self.stats.reconnects = self.session.reconnects
            log.warning(
                "lost the leader at %s:%d (%s); reconnecting in %.1f s from cid %d",
                self.host,
                self.port,
                act.reason,
                act.seconds,
                sink.position.cid,
            )
            if stop.wait(act.seconds):
                raise _Stopped
            return BackoffOver()
        return None

    def _finish(self) -> None:
        """The run ends (stopped, or once and the leader ended)."""
        sink = self._sink
        assert sink is not None
        stopped = self.group.stopping.is_set()
        if not stopped:
            sink.flush()
        self.stats.phase = "done"
        ap = sink.applier
        if self.once and not stopped:
            if ap.pending:
                raise ConnectionLostError(
                    f"the leader closed its streams but entries after cid {ap.snapshot} never"
                    f" arrived ({ap.pending} later ones are waiting); the database is consistent"
                    f" at cid {ap.snapshot}; run the follower again against a live leader"
                )
            self.trace("all streams closed; snapshot %d", ap.snapshot)
            if not self.seconds:
                self.timeout.expire()
            self.group.wait(self._job_tasks)  # step 7: the local jobs end
        else:
            self.trace("stopped on request")

    def _start_jobs(self) -> None:
        for i, job in enumerate(self.jobs):
            self._job_tasks.append(
                self.group.spawn(
                    f"hct-job-{i}-{job.name}",
                    run_job,
                    i,
                    job,
                    self.db.connect,
                    self.timeout,
                    on_stop=self.timeout.expire,
                )
            )

    def protection(self) -> str:
        """How this follower and its leader authenticate each other, in words."""
        tls = None
        if self.security.ca is not None:
            client = self.security.cert is not None
            tls = "TLS with a client certificate" if client else "TLS"
        return describe(tls, self._secret is not None)

    # --- talking to the leader ------------------------------------------------

    def _open(self) -> Conn:
        try:
            conn = self.transport.connect(self.host, self.port, self.connect_timeout, self._cancel)
        except HctError:
            if self.group.stopping.is_set():
                raise _Stopped from None
            raise
        with self._active_lock:
            if self.group.stopping.is_set():
                conn.close()
                raise _Stopped
            self._active = conn
        try:
            self._prove(conn)
        except HctError:
            self._release(conn)
            if self.group.stopping.is_set():
                raise _Stopped from None
            raise
        return conn

    def _prove(self, conn: Conn) -> None:
        """With a shared secret: prove ourselves, and make the leader prove itself."""
        if self._secret is not None:
            side = auth.FollowerAuth(self._secret)
            auth.exchange(conn, side, side.start(), self.io_timeout)

    def _open_feedback(self) -> Conn:
        """A connection for the reporter's own reconnects (not the driver's:
        a stop closes the reporter, which closes it)."""
        conn = self.transport.connect(self.host, self.port, self.connect_timeout, self._cancel)
        try:
            self._prove(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _release(self, conn: Conn, keep: bool = False) -> None:
        with self._active_lock:
            if self._active is conn:
                self._active = None
        if not keep:
            conn.close()

    def _begin_session(self) -> None:
        """A new session with the leader: offer feedback (the extension's
        probe; a leader without it refuses and is sent nothing more), then
        say where the catch-up starts and, if the leader told us, where it ends."""
        self._hello_done = True
        st = self.stats
        st.catchup_from, st.catchup_t0, st.catchup_seconds = st.snapshot, time.monotonic(), None
        st.phase = "sync"
        if self.feedback:
            try:
                conn = self._open()  # the active connection: a stop aborts it
            except HctError:
                conn = None  # the SYNC will fail the same way and say why
            if conn is not None:
                try:
                    self.reporter.hello(conn)
                finally:
                    self._release(conn, keep=True)  # the reporter owns it (or closed it)
                client = self.reporter.view.client
                if client:  # writers on this file forward there
                    self.db.publisher.leader_client(feedback.client_url(client, self.host))
        newest = self.reporter.view.newest
        if newest >= 0:
            log.info(
                "catching up from cid %d to cid %d (%d entries)",
                st.snapshot,
                newest,
                max(0, newest - st.snapshot),
            )
        else:
            log.info("catching up from cid %d", st.snapshot)

    def _snapshot_first(self) -> bool:
        """An empty follower far behind a leader that said how far: bootstrap
        at once rather than replay (FollowerSession.should_bootstrap)."""
        sink = self._sink
        assert sink is not None
        newest = self.reporter.view.newest
        empty = sink.position.cid == 0 and not sink.applier.pending
        behind = newest - sink.position.cid if newest >= 0 else -1
        if not self.session.bootstrap_first(empty, behind):
            return False
        log.info("empty, and %d entries behind the leader: asking for a snapshot", behind)
        return True

    def _bootstrap(self) -> FollowerEvent:
        """Fetch a snapshot into a file beside the database, check it, and
        install it in place of this database's contents."""
        sink, streams = self._sink, self._streams
        assert sink is not None and streams is not None
        streams.close_all()  # nothing for the old position may arrive now
        sink.flush()
        pos = sink.position
        path = self._bootstrap_path
        self.stats.phase = "bootstrap"
        try:
            conn = self._open()
        except HctError as e:
            return RequestFailed(None, e)
        t0 = time.monotonic()
        try:
            head = bootclient.fetch(
                conn,
                pos,
                self.reseed,
                path,
                io_timeout=self.io_timeout,
                max_bytes=self.max_snapshot_bytes,
            )
        except HctError as e:
            snapshot.remove_files(path)
            if self.group.stopping.is_set():
                raise _Stopped from None
            return RequestFailed(None, e)
        finally:
            self._release(conn)
        received = time.monotonic() - t0
        try:
            snapshot.check(path, head.cid, head.hash)
            aside = None
            if head.verdict == bootstrap.BELOW and pos.cid > 0:
                # the leader cannot tell "behind" from "another history" below its
                # baseline (an old leader's lone commits, say): keep what was here
                aside = f"{self.db.path}.before-bootstrap"
                log.warning(
                    "this database (at cid %d) is below the leader's baseline; its old"
                    " contents are kept in %s (replacing an older copy) before the snapshot"
                    " is installed",
                    pos.cid,
                    aside,
                )
            elif head.verdict == bootstrap.DIVERGED:
                aside = f"{self.db.path}.reseed-{time.strftime('%Y%m%dT%H%M%S')}"
                log.warning(
                    "--reseed: this database's history differs from the leader's; its old"
                    " contents (at cid %d) are kept in %s",
                    pos.cid,
                    aside,
                )
            sink.replace_applier(
                lambda: self._install(path, aside), lambda: self.db.applier(**self.applier_options)
            )
        except HctError as e:
            return RequestFailed(None, e)
        finally:
            snapshot.remove_files(path)
        self.bootstraps += 1
        st = self.stats
        st.snapshot = st.received_cid = head.cid
        self.db.notify_snapshot(head.cid)
        log.info(
            "installed a snapshot of the leader at cid %d (%d bytes; was at cid %d, %s;"
            " received in %.2f s, installed in %.2f s)",
            head.cid,
            head.size,
            pos.cid,
            bootstrap.VERDICTS[head.verdict],
            received,
            time.monotonic() - t0 - received,
        )
        self.trace("bootstrapped at cid %d", head.cid)
        return Bootstrapped(head.cid)

    def _install(self, path: str, aside: str | None) -> None:
        snapshot.install(self.db, path, aside=aside)
        faults.kill_point("installed")

    def _sync(self, final: bool) -> FollowerEvent:
        """One SYNC exchange; entries go to the sink as they arrive."""
        sink = self._sink
        assert sink is not None
        pos = sink.position
        what = "the final SYNC" if final else "SYNC"
        self.trace("SYNC %s from cid %d", "final" if final else "start", pos.cid)
        if not final:
            self.stats.phase = "sync"
        try:
            conn = self._open()
        except HctError as e:
            return RequestFailed(None, e)
        try:
            njob, nbytes = self._exchange(conn, pos.cid, pos.hash, what)
        except HctError as e:
            if self.group.stopping.is_set():
                raise _Stopped from None
            return RequestFailed(None, e)
        finally:
            self._release(conn)
        self.trace("syncreply %d received (%d bytes)", int(final), nbytes)
        self.db.set_role("follower")  # the leader accepted our history: we follow it
        if not final:
            self.trace("recv %d bytes of SYNCREPLY data", nbytes)
            self.njob = njob
        if self._probing:
            self._starved(nbytes)
        return SyncDone(final, njob, nbytes)

    def _exchange(self, conn: Conn, cid: int, h: bytes, what: str) -> tuple[int, int]:
        sink = self._sink
        assert sink is not None
        conn.send_all(wire.encode_sync(cid, h), self.io_timeout)
        dec = wire.ReplyDecoder(wire.SYNC, self.max_size)
        mv = memoryview(bytearray(_RECV))
        njob = -1
        st = self.stats
        # The reply runs in cid order from our position: hash it here, along
        # the chain, while the apply thread is inside SQLite (GIL released).
        tag = object()
        last, vh = cid, h
        progress = time.monotonic()  # a whole message or entry arrived
        try:
            while True:
                left = progress + self.io_timeout - time.monotonic()
                try:
                    if left <= 0:
                        raise TimedOutError("deadline passed")
                    n = conn.recv_into(mv, left)
                except TimedOutError:
                    raise TimedOutError(
                        f"no whole entry from the leader for {self.io_timeout:g} s during {what}"
                    ) from None
                if n == 0:
                    dec.eof()
                    break
                dec.feed(mv[:n])
                events = dec.next_events()
                if events:
                    progress = time.monotonic()
                entries = [ev for ev in events if type(ev) is Entry]
                if len(entries) != len(events):
                    for ev in events:
                        if isinstance(ev, wire.SyncReplyStart):
                            njob = ev.njob
                            self._check_streams(njob)
                        elif isinstance(ev, wire.ErrorReply):
                            raise leader_error(ev.message)
                if entries and entries[0].cid > last + 1:
                    last = self._gap(entries[0], last, what)
                hashes, last, vh = chain(entries, last, vh, tag)
                st.sync_entries += len(entries)
                st.sync_bytes += n
                sink.put(entries, n, hashes)
                if dec.done:
                    break
        except TruncatedMessageError as e:
            raise ConnectionLostError(f"the leader went away during {what}: {e}") from None
        except ProtocolError as e:
            raise ProtocolError(f"bad reply from the leader to {what}: {e}") from e
        return njob, dec.entry_bytes

    def _gap(self, first: Entry, last: int, what: str) -> int:
        """The reply starts above our position. An empty follower of an
        hctree leader takes (first - 1, zero hash) as its baseline, as the
        original does (FORMAT.md, section 2); otherwise the entries between
        are gone and no one will send them: stop at once, saying so."""
        sink = self._sink
        assert sink is not None
        if last == 0 and first.schemacid == 0 and not sink.applier.pending:
            base = first.cid - 1
            sink.replace_applier(
                lambda: self.db.adopt_baseline(base),
                lambda: self.db.applier(**self.applier_options),
            )
            log.info("the leader's journal starts after cid %d: taking that as our baseline", base)
            return base
        raise GapError(
            f"the leader's reply to {what} starts at cid {first.cid}, and this follower is at"
            f" cid {last}: cids {last + 1} to {first.cid - 1} are gone from its journal and it"
            " sends no snapshot (the original C leader); re-seed this follower from an empty"
            " file"
        )

    def _check_streams(self, njob: int) -> None:
        if njob > self.max_streams:
            raise ProtocolError(
                f"the leader announces {njob} streams; this follower opens at most"
                f" {self.max_streams} (max_streams)"
            )

    def _subscribe(self, job: int, again: bool) -> FollowerEvent:
        sink, streams = self._sink, self._streams
        assert sink is not None and streams is not None
        try:
            conn = self._open()
        except HctError as e:
            return RequestFailed(job, e)
        keep = False
        try:
            # SUBX only in the session that got ACCEPT: a resubscribe may meet a
            # new leader (the original asserts on a type it does not know)
            fid = 0 if again else self.reporter.view.follower_id
            request = wire.encode_subx(job, fid) if fid else wire.encode_sub(job)
            conn.send_all(request, self.io_timeout)
            dec = wire.ReplyDecoder(wire.SUB, self.max_size)
            buf = bytearray(4096)
            while True:
                n = conn.recv_into(buf, self.io_timeout)
                if n == 0:
                    dec.eof()
                dec.feed(memoryview(buf)[:n])
                started = False
                early: list[Entry] = []
                for ev in dec.next_events():
                    if isinstance(ev, wire.ErrorReply):
                        raise leader_error(ev.message)
                    if isinstance(ev, wire.SubReplyStart):
                        started = True
                    elif type(ev) is Entry:
                        early.append(ev)  # entries that came with the header
                if started:
                    self.stats.sub_entries += len(early)
                    sink.put(early, n)
                    break
            keep = True
        except TruncatedMessageError as e:
            return self._sub_failed(job, ConnectionLostError(f"SUB {job}: {e}"))
        except ProtocolError as e:
            return self._sub_failed(
                job, ProtocolError(f"bad reply from the leader to SUB {job}: {e}")
            )
        except HctError as e:
            return self._sub_failed(job, e)
        finally:
            self._release(conn, keep)
        if not streams.add(job, conn, dec):
            raise _Stopped
        if again:
            self.stats.resubscribes += 1
            log.info("subscribed to stream %d again", job)
        self.trace("subscribed to job %d", job)
        return Subscribed(job)

    def _sub_failed(self, job: int, e: HctError) -> FollowerEvent:
        if self.group.stopping.is_set():
            raise _Stopped
        return RequestFailed(job, e)


def _why(err: BaseException | None) -> str:
    return f" ({err})" if err is not None else ""
