"""The follower node (SPEC section 3).

1. roll back entries above the first hole; read the position (cid, H);
2. SYNC and apply the reply; with ``syncbytes`` > 0 repeat while replies
   shrink and stay above ``syncbytes`` bytes;
3. start the local (read-only) jobs;
4. open one SUB connection per leader job (ours does this as soon as the
   last reply of step 2 has arrived, and finishes applying it meanwhile;
   step 3 still waits for it);
5. SYNC once more, for commits made while subscribing;
6. apply everything arriving on the SUB streams (interleaved, out of cid
   order, repeating entries of step 5) until the leader closes them;
7. wait for the local jobs.

Entries from every connection go into one *sink* that owns the applier. With
``syncthreads=1`` the thread that received entries applies them itself;
with 2 or more, receiving and decoding overlap with applying (a second
thread applies while the first is in ``recv``).

A SUB stream that ends while the leader still accepts connections was
dropped (the follower read too slowly); the follower subscribes again and
SYNCs to fill the gap. Streams end for good when the leader stops listening.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import wire
from .apply import Applier
from .errors import (
    ConfigError,
    ConnectError,
    IncompatibleError,
    JobError,
    PeerError,
    ProtocolError,
)
from .jobs import Job, JobThread, Timeout
from .journal import Database
from .position import Entry, Position, chain
from .trace import Trace

log = logging.getLogger("hctserver")

_RECV = 1 << 20


@dataclass
class FollowerStats:
    """Counters for progress displays; read them from any thread."""

    phase: str = "starting"
    sync_entries: int = 0
    sync_bytes: int = 0
    sub_entries: int = 0
    snapshot: int = 0
    start_snapshot: int = 0
    resubscribes: int = 0


class _Sink:
    """Owns the applier. ``put`` hands entries over; they are applied inline
    (``pipelined=False``: by the thread that received them) or by an apply
    thread fed through a queue bounded in bytes.

    Group commit: while catching up, entries are applied once ``min_batch``
    of them have gathered (or at :meth:`flush`), so that one transaction
    writes each page of the tables once for many entries. While streaming,
    the apply thread waits ``commit_interval`` seconds after the first entry
    of a group arrives, trading that much lag for a low cost per entry."""

    def __init__(
        self,
        applier: Applier,
        pipelined: bool,
        queue_bytes: int,
        stats: FollowerStats,
        min_batch: int = 40_000,
    ) -> None:
        self.applier = applier
        self.pipelined = pipelined
        self.limit = max(1, queue_bytes)
        self.stats = stats
        self.min_batch = min_batch
        self.commit_interval = 0.0
        self.streaming = False
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._items: list[tuple[list[Entry], list[Any] | None]] = []
        self._count = 0  # entries in _items
        self._bytes = 0
        self._flushing = False
        self._busy = False
        self._closed = False
        self.error: BaseException | None = None
        self._worker: threading.Thread | None = None
        if pipelined:
            self._start_worker()

    def _start_worker(self) -> None:
        self.pipelined = True
        self._worker = threading.Thread(target=self._work, name="hct-apply", daemon=True)
        self._worker.start()

    def stream(self, commit_interval: float) -> None:
        """From now on apply in the apply thread, in groups over time."""
        self.flush()
        with self._lock:
            self.commit_interval = commit_interval
            self.streaming = True
            if self._worker is None:
                self._start_worker()

    @property
    def position(self) -> Position:
        return self.applier.position

    def put(self, entries: list[Entry], nbytes: int, hashes: list[Any] | None = None) -> None:
        """Entries to apply; ``hashes`` as for :meth:`Applier.add_many`."""
        if not entries:
            return
        item = (entries, hashes)
        if not self.pipelined:
            with self._lock:
                self._raise()
                self._items.append(item)
                self._count += len(entries)
                if self._count >= self.min_batch:
                    self._apply_held()
            return
        with self._cond:
            while self._bytes >= self.limit and self.error is None and not self._closed:
                self._cond.wait()
            self._raise()
            self._items.append(item)
            self._count += len(entries)
            self._bytes += nbytes
            self._cond.notify_all()

    def _apply_held(self) -> None:
        chunks, self._items = self._items, []
        self._count = self._bytes = 0
        try:
            self._apply(chunks)
        except BaseException as e:
            self.error = e
            raise

    def _apply(self, chunks: list[tuple[list[Entry], list[Any] | None]]) -> None:
        ap = self.applier
        for entries, hashes in chunks:
            ap.add_many(entries, hashes)
        self.stats.snapshot = ap.apply()

    def _ready(self) -> bool:
        if self._closed or self._flushing or self.streaming:
            return bool(self._items)
        return self._count >= self.min_batch or self._bytes >= self.limit // 2

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._ready() and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                self._busy = True
                delay = self.commit_interval if self.streaming else 0.0
            if delay > 0 and self._bytes < self.limit // 2:
                time.sleep(delay)  # gather more of the stream into this transaction
            with self._cond:
                chunks, self._items = self._items, []
                self._count = self._bytes = 0
                self._cond.notify_all()
            try:
                self._apply(chunks)
            except BaseException as e:
                with self._cond:
                    self.error = e
                    self._busy = False
                    self._cond.notify_all()
                return
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def flush(self) -> None:
        """Apply everything put so far; raise the apply error if any."""
        if not self.pipelined:
            with self._lock:
                self._raise()
                if self._items:
                    self._apply_held()
            return
        with self._cond:
            self._flushing = True
            self._cond.notify_all()
            try:
                while (self._items or self._busy) and self.error is None:
                    self._cond.wait()
            finally:
                self._flushing = False
            self._raise()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join()


class _Streams(threading.Thread):
    """Reads every SUB socket (one thread, a selector) into the sink; reports
    ended streams and errors to the follower's main thread."""

    def __init__(
        self, sink: _Sink, events: queue.Queue[tuple[str, int, Any]], stats: FollowerStats
    ) -> None:
        super().__init__(name="hct-sub-reader", daemon=True)
        self.sink = sink
        self.events = events
        self.stats = stats
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._halt = False
        self._buf = bytearray(_RECV)

    def add(self, job: int, sock: socket.socket, dec: wire.ReplyDecoder) -> None:
        sock.setblocking(False)
        with self._lock:
            self._sel.register(sock, selectors.EVENT_READ, (job, dec))

    def stop(self) -> None:
        with self._lock:
            self._halt = True
            for key in list(self._sel.get_map().values()):
                with contextlib.suppress(OSError):
                    key.fileobj.close()  # type: ignore[union-attr]
            self._sel.close()

    def run(self) -> None:
        mv = memoryview(self._buf)
        while True:
            with self._lock:
                if self._halt:
                    return
            try:
                ready = self._sel.select(0.2)
            except (OSError, ValueError):
                with self._lock:
                    if self._halt:
                        return
                raise
            for key, _ in ready:
                job, dec = key.data
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    n = sock.recv_into(mv)
                except BlockingIOError:
                    continue
                except OSError as e:
                    n = 0
                    log.info("job %d stream: %s", job, e)
                try:
                    if n == 0:
                        self._close(sock)
                        dec.eof()
                        self.events.put(("ended", job, None))
                        continue
                    dec.feed(mv[:n])
                    evs = dec.next_events()
                except ProtocolError as e:
                    self._close(sock)
                    self.events.put(("error", job, e))
                    continue
                if evs:
                    entries = [e for e in evs if isinstance(e, Entry)]
                    self.stats.sub_entries += len(entries)
                    try:
                        self.sink.put(entries, n)
                    except BaseException as e:
                        self.events.put(("error", job, e))
                        return

    def _close(self, sock: socket.socket) -> None:
        with self._lock:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            sock.close()


class Follower:
    """Replicate a leader into ``db``. :meth:`run` returns when the leader
    has closed its streams and everything received is applied."""

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
        connect_timeout: float = 10.0,
        io_timeout: float = 60.0,
        max_size: int = wire.DEFAULT_MAX_SIZE,
        queue_bytes: int = 16 << 20,
        max_resubscribes: int = 20,
        commit_interval: float = 0.01,
        background_checkpoint: bool = True,
        applier_options: dict[str, Any] | None = None,
        trace: Trace | None = None,
    ) -> None:
        if not 1 <= syncthreads <= 16:
            raise ConfigError(f"syncthreads must be between 1 and 16, not {syncthreads}")
        if syncbytes < 0:
            raise ConfigError(f"syncbytes must be >= 0, not {syncbytes}")
        if not 0 < port <= 65535:
            raise ConfigError(f"the leader's port must be between 1 and 65535, not {port}")
        self.db = db
        self.host = host
        self.port = port
        self.syncthreads = syncthreads
        self.syncbytes = syncbytes
        self.jobs = list(jobs)
        self.timeout = Timeout(seconds)
        self.seconds = seconds
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self.max_size = max_size
        self.queue_bytes = queue_bytes
        self.max_resubscribes = max_resubscribes
        self.commit_interval = commit_interval
        self.background_checkpoint = background_checkpoint
        self.applier_options = applier_options or {}
        self.trace = trace or Trace()
        self.stats = FollowerStats()
        self.njob = 0
        self._sink: _Sink | None = None
        self._streams: _Streams | None = None
        self._events: queue.Queue[tuple[str, int, Any]] = queue.Queue()
        self._threads: list[JobThread] = []
        self._stopped = threading.Event()
        self._runner: threading.Thread | None = None
        self._error: BaseException | None = None

    # --- running ------------------------------------------------------------------

    def run(self) -> None:
        """Run steps 1 to 7; raises on any failure, leaving the database at a
        consistent snapshot."""
        self.trace.restart()
        try:
            self._run()
        finally:
            self._shutdown()

    def start(self) -> None:
        """Run in a background thread; see :meth:`wait`."""
        self._runner = threading.Thread(target=self._run_bg, name="hct-follower", daemon=True)
        self._runner.start()

    def _run_bg(self) -> None:
        try:
            self.run()
        except BaseException as e:
            self._error = e

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a :meth:`start`-ed follower; re-raises its error."""
        assert self._runner is not None
        self._runner.join(timeout)
        if self._runner.is_alive():
            return False
        if self._error is not None:
            raise self._error
        return True

    def stop(self) -> None:
        """Ask a running follower to stop (its database stays consistent)."""
        self._stopped.set()
        self._events.put(("stop", -1, None))

    def _run(self) -> None:
        db = self.db
        st = self.stats
        n = db.rollback()
        self.trace("rollback discarded %d entries", n)
        if self.background_checkpoint:
            db.start_checkpointer()  # checkpoints overlap with applying
        ap = db.applier(**self.applier_options)
        self._sink = _Sink(ap, self.syncthreads > 1, self.queue_bytes, st)
        st.snapshot = st.start_snapshot = ap.snapshot
        # 2. catch up
        st.phase = "sync"
        prev = 1 << 60
        while True:
            njob, nbytes = self._sync(final=False)
            self.trace("recv %d bytes of SYNCREPLY data", nbytes)
            if not self.syncbytes or nbytes < self.syncbytes or nbytes > prev:
                break
            self._sink.flush()
            prev = nbytes
        self.njob = njob
        # 4. subscribe while the last reply is still being applied: the sooner
        # the streams exist, the less the final SYNC has to cover
        st.phase = "subscribe"
        self._streams = _Streams(self._sink, self._events, st)
        for k in range(njob):
            self._streams.add(k, *self._subscribe(k))
        self._streams.start()
        self._sink.stream(self.commit_interval)  # waits for the catch-up to be applied
        self.trace("syncreply 0 applied (snapshot %d)", self._sink.position.cid)
        # 3. local jobs, on the caught-up database
        for i, job in enumerate(self.jobs):
            t = JobThread(i, job, db.connect, self.timeout)
            self._threads.append(t)
            t.start()
        # 5. final sync
        try:
            self._sync(final=True)
        except ConnectError as e:
            raise PeerError(
                f"the leader stopped before this follower finished subscribing ({e}); the"
                f" database is consistent at cid {self._sink.position.cid} but may lack the"
                " leader's last commits: run the follower again against a live leader"
            ) from None
        # 6. stream until the leader closes
        st.phase = "stream"
        self._follow(njob)
        self._sink.flush()
        st.phase = "done"
        if ap.pending and not self._stopped.is_set():  # stopped on request: holes are expected
            raise PeerError(
                f"the leader closed its streams but entries after cid {ap.snapshot} never"
                f" arrived ({ap.pending} later ones are waiting); the database is consistent"
                f" at cid {ap.snapshot}; run the follower again against a live leader"
            )
        self.trace("all streams closed; snapshot %d", ap.snapshot)
        # 7. local jobs
        if not self.seconds:
            self.timeout.expire()
        for t in self._threads:
            t.join()
        errors = [t.error for t in self._threads if t.error]
        if errors:
            raise JobError("; ".join(errors))

    def _follow(self, njob: int) -> None:
        live = set(range(njob))
        retries = dict.fromkeys(range(njob), 0)
        while live:
            kind, job, detail = self._events.get()
            if kind == "stop":
                self.trace("stopped on request")
                return
            if kind == "error":
                if isinstance(detail, ProtocolError):
                    raise PeerError(f"job {job}'s stream from the leader: {detail}") from detail
                raise detail
            # the stream ended: dropped by a live leader, or the leader is finishing
            try:
                sock, dec = self._subscribe(job)
            except (ConnectError, PeerError) as e:
                self.trace("stream of job %d ended (%s)", job, e)
                live.discard(job)
                continue
            retries[job] += 1
            self.stats.resubscribes += 1
            if retries[job] > self.max_resubscribes:
                sock.close()
                raise PeerError(
                    f"the leader dropped job {job}'s stream {retries[job]} times; this follower"
                    " cannot keep up with it"
                )
            log.warning("the leader dropped job %d's stream; subscribed again", job)
            assert self._streams is not None
            self._streams.add(job, sock, dec)
            self._sync(final=True)

    def _shutdown(self) -> None:
        if self._streams is not None:
            self._streams.stop()
            if self._streams.is_alive():
                self._streams.join()
        if self._sink is not None:
            self._sink.close()
            self._sink.applier.close()
        self.db.stop_checkpointer()
        self.timeout.expire()
        for t in self._threads:
            t.join()

    # --- talking to the leader ------------------------------------------------

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except ConnectionRefusedError:
            raise ConnectError(
                f"cannot connect to the leader at {self.host}:{self.port}: connection refused"
                " (is the leader running?)"
            ) from None
        except OSError as e:
            raise ConnectError(
                f"cannot connect to the leader at {self.host}:{self.port}: {e}"
            ) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.io_timeout)
        return sock

    def _recv(self, sock: socket.socket, mv: memoryview, what: str) -> int:
        try:
            return sock.recv_into(mv)
        except TimeoutError:
            raise PeerError(
                f"the leader sent nothing for {self.io_timeout:g} s during {what}"
            ) from None
        except OSError as e:
            raise PeerError(f"connection to the leader failed during {what}: {e}") from None

    @staticmethod
    def _leader_error(msg: str) -> PeerError:
        if msg == wire.INCOMPATIBLE:
            return IncompatibleError(
                "error from leader: incompatible database version (this database's history"
                " differs from the leader's, is ahead of it, or predates its truncated"
                " journal; re-seed it from an empty file)"
            )
        return PeerError(f"error from leader: {msg}")

    def _sync(self, *, final: bool) -> tuple[int, int]:
        """One SYNC exchange; entries go to the sink as they arrive. Returns
        (nJob, bytes of entries received)."""
        assert self._sink is not None
        pos = self._sink.position
        what = "the final SYNC" if final else "SYNC"
        self.trace("SYNC %s from cid %d", "final" if final else "start", pos.cid)
        sock = self._connect()
        try:
            try:
                sock.sendall(wire.encode_sync(pos.cid, pos.hash))
            except OSError as e:
                raise PeerError(f"cannot send SYNC to the leader: {e}") from None
            dec = wire.ReplyDecoder(wire.SYNC, self.max_size)
            buf = bytearray(_RECV)
            mv = memoryview(buf)
            njob = -1
            st = self.stats
            # The reply runs in cid order from our position: hash it here, along
            # the chain, while the apply thread is inside SQLite (GIL released).
            tag = object()
            last, vh = pos.cid, pos.hash
            while True:
                n = self._recv(sock, mv, what)
                if n == 0:
                    dec.eof()
                    break
                dec.feed(mv[:n])
                events = dec.next_events()
                entries = [ev for ev in events if type(ev) is Entry]
                if len(entries) != len(events):
                    for ev in events:
                        if isinstance(ev, wire.SyncReplyStart):
                            njob = ev.njob
                        elif isinstance(ev, wire.ErrorReply):
                            raise self._leader_error(ev.message)
                hashes, last, vh = chain(entries, last, vh, tag)
                st.sync_entries += len(entries)
                st.sync_bytes += n
                self._sink.put(entries, n, hashes)
                if dec.done:
                    break
        except ProtocolError as e:
            raise PeerError(f"bad reply from the leader to {what}: {e}") from e
        finally:
            sock.close()
        self.trace("syncreply %d received (%d bytes)", int(final), dec.entry_bytes)
        return njob, dec.entry_bytes

    def _subscribe(self, job: int) -> tuple[socket.socket, wire.ReplyDecoder]:
        sock = self._connect()
        try:
            sock.sendall(wire.encode_sub(job))
            dec = wire.ReplyDecoder(wire.SUB, self.max_size)
            while True:
                data = sock.recv(4096)
                if not data:
                    dec.eof()
                dec.feed(data)
                started = False
                early: list[Entry] = []
                for ev in dec.next_events():
                    if isinstance(ev, wire.ErrorReply):
                        raise self._leader_error(ev.message)
                    if isinstance(ev, wire.SubReplyStart):
                        started = True
                    elif type(ev) is Entry:
                        early.append(ev)  # entries that came with the header
                if started:
                    assert self._sink is not None
                    self.stats.sub_entries += len(early)
                    self._sink.put(early, len(data))
                    self.trace("subscribed to job %d", job)
                    return sock, dec
        except ProtocolError as e:
            sock.close()
            raise PeerError(f"bad reply from the leader to SUB {job}: {e}") from e
        except TimeoutError:
            sock.close()
            raise PeerError(f"no reply from the leader to SUB {job}") from None
        except OSError as e:
            sock.close()
            raise PeerError(f"SUB {job} failed: {e}") from None
        except BaseException:
            sock.close()
            raise
