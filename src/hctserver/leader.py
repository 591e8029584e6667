"""The leader node (SPEC section 3): LEADER mode, listen, run the jobs, answer
SYNC and SUB requests until every job has finished.

Threads: one per job (each with its own connection), one accepting
connections, one per request being served (bounded), and one *streamer*
that owns every subscriber socket. A job's commit hook encodes the entry
once and appends it to each subscriber's queue without blocking; the
streamer writes the queues out with non-blocking sends. A subscriber whose
queue exceeds ``sub_buffer_bytes`` is dropped (its follower can resync), so
the commit rate never depends on the slowest follower.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from . import wire
from .errors import AddressInUseError, ConfigError, JobError, ProtocolError
from .jobs import Job, JobThread, Timeout
from .journal import Database, Mode
from .trace import Trace

log = logging.getLogger("hctserver")

_iqq = struct.Struct("<iqq")
_SEND_CHUNK = 1 << 20


class _Subscriber:
    __slots__ = ("addr", "dead", "job", "pending", "pending_bytes", "sock")

    def __init__(self, sock: socket.socket, job: int, addr: str) -> None:
        self.sock = sock
        self.job = job
        self.addr = addr
        self.pending: deque[bytes | memoryview] = deque()
        self.pending_bytes = 0
        self.dead = False


class _Streamer(threading.Thread):
    """Writes every subscriber's queue to its socket; drops the slow and the gone."""

    def __init__(self, limit: int, coalesce: float = 0.003) -> None:
        super().__init__(name="hct-streamer", daemon=True)
        self.limit = limit
        self.coalesce = coalesce
        self.lock = threading.Lock()
        self.subs: list[_Subscriber] = []
        self._dirty: set[_Subscriber] = set()
        self._sel = selectors.DefaultSelector()
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._sel.register(self._r, selectors.EVENT_READ, None)
        self._woken = False
        self._stopping = False
        self.dropped = 0

    def add(self, sub: _Subscriber) -> None:
        sub.sock.setblocking(False)
        with self.lock:
            self.subs.append(sub)
            self._sel.register(sub.sock, selectors.EVENT_READ, sub)

    def push(self, subs: Sequence[_Subscriber], frame: bytes) -> None:
        """Queue ``frame`` for each subscriber; never blocks on a socket."""
        n = len(frame)
        wake = False
        with self.lock:
            for s in subs:
                if s.dead:
                    continue
                s.pending.append(frame)
                s.pending_bytes += n
                self._dirty.add(s)
            if not self._woken:
                self._woken = wake = True
        if wake:
            with contextlib.suppress(BlockingIOError):
                os.write(self._w, b"x")

    def run(self) -> None:
        while True:
            with self.lock:
                if self._stopping:
                    return
                self._woken = False
                pending = bool(self._dirty)
            for key, ev in self._sel.select(0 if pending else 0.5):
                sub = key.data
                if sub is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._r, 4096)
                    continue
                if ev & selectors.EVENT_READ:
                    # followers send nothing after SUB: readable means closed (or misbehaving)
                    try:
                        gone = not sub.sock.recv(4096)
                    except BlockingIOError:
                        gone = False
                    except OSError:
                        gone = True
                    if gone:
                        self._drop(sub, "the follower closed the connection")
                        continue
                if ev & selectors.EVENT_WRITE:
                    with self.lock:
                        self._dirty.add(sub)
            with self.lock:
                self._woken = True  # pushes during the pause need no wake-up
                dirty, self._dirty = self._dirty, set()
            for sub in dirty:
                self._flush(sub)
            if dirty and self.coalesce:
                time.sleep(self.coalesce)  # let commits gather: fewer, larger sends

    def _flush(self, sub: _Subscriber) -> None:
        if sub.dead:
            return
        if sub.pending_bytes > self.limit:
            self._drop(
                sub,
                f"more than {self.limit} bytes queued (it reads too slowly); it can resync",
            )
            return
        while True:
            with self.lock:
                if not sub.pending:
                    break
                chunk = sub.pending.popleft()
                if len(chunk) < _SEND_CHUNK:
                    parts = [chunk]
                    size = len(chunk)
                    while sub.pending and size < _SEND_CHUNK:
                        nxt = sub.pending.popleft()
                        parts.append(nxt)
                        size += len(nxt)
                    if len(parts) > 1:
                        chunk = b"".join(parts)
            try:
                sent = sub.sock.send(chunk)
            except BlockingIOError:
                sent = 0
            except OSError as e:
                self._drop(sub, f"send failed: {e}")
                return
            with self.lock:
                sub.pending_bytes -= sent
                if sent < len(chunk):
                    sub.pending.appendleft(memoryview(chunk)[sent:])
                    self._watch(sub, selectors.EVENT_READ | selectors.EVENT_WRITE)
                    return
        with self.lock:
            self._watch(sub, selectors.EVENT_READ)

    def _watch(self, sub: _Subscriber, events: int) -> None:
        """Set the events the streamer waits for on ``sub`` (caller holds the lock)."""
        if sub.dead:
            return
        try:
            self._sel.modify(sub.sock, events, sub)
        except KeyError:
            self._sel.register(sub.sock, events, sub)

    def _drop(self, sub: _Subscriber, why: str) -> None:
        with self.lock:
            if sub.dead:
                return
            sub.dead = True
            sub.pending.clear()
            sub.pending_bytes = 0
            if sub in self.subs:
                self.subs.remove(sub)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sub.sock)
        self.dropped += 1
        log.warning("dropped subscriber %s of job %d: %s", sub.addr, sub.job, why)
        with contextlib.suppress(OSError):
            sub.sock.close()

    def stop(self, flush_timeout: float) -> None:
        """Stop the thread, then send what is queued (up to the deadline) and close."""
        with self.lock:
            self._stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._w, b"x")
        if self.is_alive():
            self.join()
        deadline = time.monotonic() + flush_timeout
        for sub in list(self.subs):
            if sub.dead:
                continue
            try:
                sub.sock.setblocking(True)
                while sub.pending:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("flush deadline passed")
                    sub.sock.settimeout(left)
                    sub.sock.sendall(sub.pending.popleft())
                with contextlib.suppress(OSError):
                    sub.sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                log.warning("subscriber %s of job %d: final flush failed: %s", sub.addr, sub.job, e)
            finally:
                sub.dead = True
                sub.sock.close()
        self._sel.close()
        os.close(self._r)
        os.close(self._w)


class Leader:
    """Serve a database as the leader while ``jobs`` run.

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
        request_timeout: float = 10.0,
        send_timeout: float = 60.0,
        max_connections: int = 64,
        background_checkpoint: bool = True,
        linger: float = 1.0,
        linger_max: float = 30.0,
        trace: Trace | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"port must be between 0 and 65535, not {port}")
        self.db = db
        self.jobs = list(jobs)
        self.host = host
        self.port = port
        self.timeout = Timeout(seconds)
        self.max_subscribers = max_subscribers
        self.request_timeout = request_timeout
        self.send_timeout = send_timeout
        self.trace = trace or Trace()
        self.background_checkpoint = background_checkpoint
        self.linger = linger
        self.linger_max = linger_max
        self._last_accept = 0.0
        self._streamer = _Streamer(sub_buffer_bytes)
        self._subs: list[list[_Subscriber]] = [[] for _ in self.jobs]
        self._sub_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._handlers: set[threading.Thread] = set()
        self._handlers_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._threads: list[JobThread] = []
        self._closing = threading.Event()
        self.syncs_served = 0

    @property
    def njob(self) -> int:
        return len(self.jobs)

    def subscriber_counts(self) -> list[int]:
        """Live subscribers per job."""
        with self._sub_lock:
            return [sum(1 for s in subs if not s.dead) for subs in self._subs]

    @property
    def dropped(self) -> int:
        """Subscribers dropped so far (slow, or gone)."""
        return self._streamer.dropped

    # --- life cycle ------------------------------------------------------------

    def start(self) -> None:
        self.db.set_mode(Mode.LEADER)
        self._listener = self._listen()
        if self.background_checkpoint:
            self.db.start_checkpointer()
        self.port = self._listener.getsockname()[1]
        self.trace("listening on %s:%d with %d jobs", self.host, self.port, self.njob)
        self._streamer.start()
        self._acceptor = threading.Thread(target=self._accept_loop, name="hct-accept", daemon=True)
        self._acceptor.start()
        for i, job in enumerate(self.jobs):
            t = JobThread(i, job, self.db.connect, self.timeout, on_connect=self._hook_installer(i))
            self._threads.append(t)
            t.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the jobs, then stop serving. Raises JobError if a job failed.
        Returns False if ``timeout`` passed first (the leader keeps running)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                return False
        self._linger()
        self.stop()
        errors = [t.error for t in self._threads if t.error]
        if errors:
            raise JobError("; ".join(errors))
        return True

    def run(self) -> None:
        self.start()
        self.wait()

    def _linger(self) -> None:
        """The jobs have ended: keep answering while followers are still
        arriving (a follower between its catch-up SYNC and its final SYNC
        needs a few more requests), until ``linger`` seconds pass without a
        new connection or ``linger_max`` seconds in all."""
        if self.linger <= 0:
            return
        end = time.monotonic() + self.linger_max
        while not self._closing.is_set():
            now = time.monotonic()
            quiet = now - self._last_accept
            if (quiet >= self.linger and not self._busy()) or now >= end:
                return
            self._closing.wait(min(0.05, max(0.0, self.linger - quiet)))

    def _busy(self) -> bool:
        with self._handlers_lock:
            return bool(self._handlers)

    def stop(self, flush_timeout: float = 30.0) -> None:
        """Stop accepting, flush and close the subscriber streams, finish
        requests being served. Jobs are asked to stop via their timeout."""
        if self._closing.is_set():
            return
        self._closing.set()
        self.timeout.expire()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        if self._acceptor is not None:
            self._acceptor.join()
        if self._streamer.is_alive():
            self._streamer.stop(flush_timeout)
        self.db.stop_checkpointer()
        with self._handlers_lock:
            handlers = list(self._handlers)
        for h in handlers:
            h.join(self.send_timeout)
        self.trace("leader stopped")

    def _listen(self) -> socket.socket:
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            raise AddressInUseError(f"cannot create a socket: {e}") from None
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((self.host, self.port))
            s.listen(128)
        except OSError as e:
            s.close()
            if e.errno == errno.EADDRINUSE:
                raise AddressInUseError(
                    f"cannot listen on {self.host}:{self.port}: address already in use"
                    " (is another leader running? choose another --port)"
                ) from None
            raise AddressInUseError(f"cannot listen on {self.host}:{self.port}: {e}") from None
        s.settimeout(0.2)
        return s

    def _hook_installer(self, k: int) -> Any:
        def install(conn: Any) -> None:
            subs = self._subs
            streamer = self._streamer

            def hook(cid: int, schema: str, data: bytes, schemacid: int) -> None:
                targets = subs[k]
                if targets:
                    streamer.push(targets, wire.encode_entry(cid, schemacid, schema, data))

            conn.add_commit_hook(hook)

        return install

    # --- requests ---------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closing.is_set():
                    return
                continue
            peer = f"{addr[0]}:{addr[1]}"
            self._last_accept = time.monotonic()
            if not self._slots.acquire(blocking=False):
                self._refuse(sock, "too many connections to the leader; retry later")
                continue
            t = threading.Thread(
                target=self._serve, args=(sock, peer), name=f"hct-serve-{peer}", daemon=True
            )
            with self._handlers_lock:
                self._handlers.add(t)
            t.start()

    def _refuse(self, sock: socket.socket, message: str) -> None:
        try:
            sock.settimeout(self.request_timeout)
            sock.sendall(wire.encode_error(message))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            sock.close()

    def _serve(self, sock: socket.socket, peer: str) -> None:
        keep = False
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.request_timeout)
            req = self._read_request(sock, peer)
            if isinstance(req, wire.SyncRequest):
                self._serve_sync(sock, peer, req)
            elif isinstance(req, wire.SubRequest):
                keep = self._serve_sub(sock, peer, req)
        except ProtocolError as e:
            log.warning("bad request from %s: %s", peer, e)
            self._refuse(sock, str(e))
        except TimeoutError:
            log.warning("no complete request from %s within %gs", peer, self.request_timeout)
            self._refuse(sock, f"no complete request within {self.request_timeout:g} s")
        except OSError as e:
            log.info("connection from %s failed: %s", peer, e)
        except Exception:
            log.exception("error serving %s", peer)
            self._refuse(sock, "internal error in the leader; see its log")
        finally:
            if not keep:
                with contextlib.suppress(OSError):
                    sock.close()
            self._slots.release()
            with self._handlers_lock:
                self._handlers.discard(threading.current_thread())

    def _read_request(self, sock: socket.socket, peer: str) -> wire.Event | None:
        dec = wire.RequestDecoder()
        while True:
            data = sock.recv(64)
            if not data:
                dec.eof()  # raises if it stopped mid-message
                log.info("%s connected and closed without a request", peer)
                return None
            dec.feed(data)
            events = dec.next_events()
            if events:
                return events[0]

    def _serve_sync(self, sock: socket.socket, peer: str, req: wire.SyncRequest) -> None:
        snap = self.db.position()
        if req.cid > snap.cid:
            log.warning(
                "%s: follower at cid %d is ahead of the leader (snapshot %d); refused",
                peer,
                req.cid,
                snap.cid,
            )
            self._refuse(sock, wire.INCOMPATIBLE)
            return
        h = self.db.hash_at(req.cid)
        if h != req.hash:
            why = "below the leader's baseline" if h is None else "a different history"
            log.warning("%s: follower at cid %d has %s; refused", peer, req.cid, why)
            self._refuse(sock, wire.INCOMPATIBLE)
            return
        sock.settimeout(self.send_timeout)
        sock.sendall(wire.encode_syncreply_start(self.njob))
        first = last = 0
        n = 0
        buf = bytearray()
        for cid, schemacid, schema, data in self._journal_rows(req.cid):
            buf += _iqq.pack(17 + len(schema) + len(data), cid, schemacid)
            buf += schema
            buf += b"\x00"
            buf += data
            if not first:
                first = cid
                self.trace("SYNC: first CID = %d", cid)
            last = cid
            n += 1
            if len(buf) >= _SEND_CHUNK:
                sock.sendall(buf)
                buf.clear()
        buf += wire.END_OF_ENTRIES
        sock.sendall(buf)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        self.syncs_served += 1
        self.trace("SYNC: last CID = %d (%d entries to %s)", last, n, peer)

    def _journal_rows(self, after: int) -> Any:
        """(cid, schemacid, schema bytes, data) after ``after``, streamed from a
        read transaction of its own."""
        conn = self.db.open_connection()
        try:
            yield from conn.execute(
                "SELECT cid, schemacid, CAST(schema AS BLOB), data FROM hct_journal"
                " WHERE cid>? AND vhash IS NOT NULL ORDER BY cid",
                (after,),
            )
        finally:
            conn.close()

    def _serve_sub(self, sock: socket.socket, peer: str, req: wire.SubRequest) -> bool:
        k = req.job
        if not 0 <= k < self.njob:
            log.warning("%s asked for job %d; there are %d", peer, k, self.njob)
            self._refuse(
                sock,
                f"no such job: {k} (this leader runs {self.njob} jobs, numbered 0 to"
                f" {self.njob - 1})"
                if self.njob
                else f"no such job: {k} (this leader runs no jobs)",
            )
            return False
        with self._sub_lock:
            live = [s for s in self._subs[k] if not s.dead]
            if len(live) >= self.max_subscribers:
                log.warning("%s: job %d already has %d subscribers", peer, k, len(live))
                self._refuse(
                    sock, f"too many subscribers for job {k} (the limit is {self.max_subscribers})"
                )
                return False
            sock.sendall(wire.encode_subreply_start())
            sub = _Subscriber(sock, k, peer)
            self._streamer.add(sub)  # registered before any commit can queue for it
            self._subs[k] = [*live, sub]
        self.trace("SUB: job %d subscribed by %s", k, peer)
        return True
