"""A node's HTTP endpoint: ``/status`` (JSON), ``/metrics`` (Prometheus) and
``/health`` (200 or 503), never on the replication port.

The standard library's ``http.server`` handler: three read-only GET routes
need no framework, and it adds no dependency. Bounded like the replication
port, with the request head read before any thread or slot is spent on it:

* One thread (:meth:`HttpEndpoint.serve`) accepts connections and reads
  their request line and headers (and runs their TLS handshakes) without
  blocking: at most ``max_pending`` such connections at once (a new one
  pushes out the oldest), :data:`HEAD_LIMIT` bytes each, cut off after
  :data:`READ_TIMEOUT` seconds without data or at the request's deadline.
  A client that sends nothing, or dribbles, costs a socket and its bytes
  read so far, not a thread.
* A complete request gets a thread and a slot: at most ``max_clients`` at
  once, plus ``health_reserve`` kept for ``GET /health`` so a load
  balancer's probe is answered while the other slots are busy; without a
  free slot, 503 at once.
* Each request has :data:`REQUEST_DEADLINE` seconds from its connection to
  the end of its reply.
* Failed bearer tokens are counted per client address (:class:`AuthLimiter`):
  past ``auth_failures`` in ``auth_window`` seconds the address gets 429
  until the window ends, and the log one line per window.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import ipaddress
import json
import logging
import math
import select
import selectors
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

from ..errors import ConfigError, ConnectError

log = logging.getLogger("hctserver")

CONTENT_METRICS = "text/plain; version=0.0.4; charset=utf-8"
REQUEST_DEADLINE = 10.0  # seconds for a whole request and its reply
READ_TIMEOUT = 5.0  # seconds for any one read (and write)
HEAD_LIMIT = 65536  # bytes of request line and headers
MAX_PENDING = 64  # connections whose request head is still arriving
HEALTH_RESERVE = 4  # slots only GET /health may take
AUTH_FAILURES = 5  # failed tokens from one address per window before 429
AUTH_WINDOW = 60.0  # seconds
AUTH_TABLE = 1024  # addresses with failures remembered at most
_TICK = 0.2  # seconds between checks of deadlines

SQL_PATH = "/v2/pipeline"
SQL_BODY_LIMIT = 8 << 20  # bytes of a SQL pipeline request
SQL_DEADLINE = 90.0  # seconds for a SQL request: its SQL may run 60 s, forwarded 75 s
LINGER = 0.05  # seconds a request's thread waits for the next on a kept-alive connection

_BUSY = b"503 Service Unavailable\r\nRetry-After: 1"
_TOO_LARGE = b"431 Request Header Fields Too Large"


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (loopback) into (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        n = int(port)
    except ValueError:
        raise ConfigError(f"--http takes HOST:PORT or PORT, not {text!r}") from None
    if not 0 <= n <= 65535:
        raise ConfigError(f"--http port must be between 0 and 65535, not {n}")
    return host, n


class Routes:
    """What the endpoint serves: callables of the node. ``sql``, if given,
    answers ``POST /v2/pipeline`` bodies with (status, JSON body)."""

    def __init__(
        self,
        status: Callable[[], dict[str, Any]],
        metrics: Callable[[], bytes],
        health: Callable[[], tuple[bool, str]],
        sql: Callable[[bytes], tuple[int, bytes]] | None = None,
    ) -> None:
        self.status = status
        self.metrics = metrics
        self.health = health
        self.sql = sql


def client_key(address: str) -> str:
    """What failed tokens are counted under: the address, or for IPv6 its
    /64 (one host commonly owns a whole /64)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _Burst:
    __slots__ = ("failures", "refused", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.failures = 0
        self.refused = 0


class AuthLimiter:
    """Failed bearer tokens per client (:func:`client_key`), in fixed windows
    of ``window`` seconds from a client's first failure: past ``failures``
    in one, its requests are refused unchecked until the window ends. Each
    window is logged once, when it ends (or is pushed out of the table of
    at most ``size`` clients, oldest first, or the endpoint closes)."""

    def __init__(
        self,
        failures: int = AUTH_FAILURES,
        window: float = AUTH_WINDOW,
        size: int = AUTH_TABLE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1 or window <= 0 or size < 1:
            raise ConfigError("the token limiter needs failures >= 1, window > 0, size >= 1")
        self.failures = failures
        self.window = window
        self.size = size
        self._clock = clock
        self._lock = threading.Lock()
        # client -> its window; in order of the windows' starts, so the
        # ended ones come first
        self._table: dict[str, _Burst] = {}

    def __len__(self) -> int:
        return len(self._table)

    def refused(self, address: str) -> float:
        """Seconds until ``address`` may try a token again (0: now); a
        refused request is counted."""
        key = client_key(address)
        ended: list[tuple[str, _Burst, float]] = []
        wait = 0.0
        with self._lock:
            now = self._clock()
            b = self._table.get(key)
            if b is not None and now >= b.start + self.window:
                ended.append((key, self._table.pop(key), now))
            elif b is not None and b.failures >= self.failures:
                b.refused += 1
                wait = b.start + self.window - now
        self._log(ended)
        return wait

    def failed(self, address: str) -> None:
        """``address`` sent no valid token."""
        key = client_key(address)
        ended: list[tuple[str, _Burst, float]] = []
        with self._lock:
            now = self._clock()
            b = self._table.get(key)
            if b is not None and now >= b.start + self.window:
                ended.append((key, self._table.pop(key), now))
                b = None
            if b is None:
                ended += self._ended(now)
                while len(self._table) >= self.size:  # a client of many addresses
                    oldest = next(iter(self._table))
                    ended.append((oldest, self._table.pop(oldest), now))
                b = self._table[key] = _Burst(now)
            b.failures += 1
        self._log(ended)

    def sweep(self) -> None:
        """Log and forget the windows that have ended."""
        with self._lock:
            ended = self._ended(self._clock())
        self._log(ended)

    def flush(self) -> None:
        """Log and forget every window (the endpoint closes)."""
        with self._lock:
            now = self._clock()
            ended = [(k, b, now) for k, b in self._table.items()]
            self._table.clear()
        self._log(ended)

    def _ended(self, now: float) -> list[tuple[str, _Burst, float]]:
        out = []
        for key, b in self._table.items():
            if now < b.start + self.window:
                break
            out.append((key, b, now))
        for key, _, _ in out:
            del self._table[key]
        return out

    def _log(self, ended: list[tuple[str, _Burst, float]]) -> None:
        for key, b, now in ended:
            seconds = min(now - b.start, self.window)
            more = f"; {b.refused} more requests refused unchecked (429)" if b.refused else ""
            log.warning(
                "HTTP: %d failed token attempts from %s in the last %.1f s%s",
                b.failures,
                key,
                seconds,
                more,
            )


class _Handler(BaseHTTPRequestHandler):
    """One request whose head was read already (``head``); HTTP/1.0, so
    one request per connection."""

    server: _Server
    timeout = READ_TIMEOUT  # per write; the server cuts off a request past its deadline
    protocol_version = "HTTP/1.0"
    wbufsize = 1 << 16  # head and body leave in one send (Nagle would hold the second)

    def __init__(
        self, request: Any, client_address: Any, server: _Server, head: bytes = b""
    ) -> None:
        self.head = head
        self.keep = False  # a SQL client asked to keep the connection: it goes back to the loop
        self.rest = b""  # bytes after this request's body (the next request's start)
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.rfile = io.BytesIO(self.head)

    def do_POST(self) -> None:
        routes = self.server.routes
        path = self.path.split("?", 1)[0]
        if path != SQL_PATH or routes.sql is None:
            self._reply(404, "text/plain", b"not found: POST /v2/pipeline serves SQL clients\n")
            return
        if not self._admitted(path):
            return
        body = self._body()
        if body is None:
            return
        self.keep = (self.headers.get("Connection") or "").lower() == "keep-alive"
        try:
            code, out = routes.sql(body)
        except Exception as e:
            log.exception("HTTP %s failed", path)
            code, out = 500, json.dumps({"message": f"internal error: {e}", "code": None}).encode()
        self._reply(code, "application/json", out)

    def _body(self) -> bytes | None:
        """The request body (Content-Length bytes, at most SQL_BODY_LIMIT)."""
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._reply(411, "text/plain", b"a POST needs a Content-Length\n")
            return None
        if not 0 <= n <= SQL_BODY_LIMIT:
            self._reply(413, "text/plain", f"at most {SQL_BODY_LIMIT} bytes\n".encode())
            return None
        got = bytearray(self.rfile.read(n))  # what came with the head
        self.rest = self.rfile.read()
        while len(got) < n:
            chunk = self.connection.recv(min(1 << 20, n - len(got)))
            if not chunk:
                raise ConnectionResetError("the client closed before sending its body")
            got += chunk
        return bytes(got)

    def do_GET(self) -> None:
        routes = self.server.routes
        path = self.path.split("?", 1)[0]
        if path in ("/status", "/metrics") and not self._admitted(path):
            return
        try:
            if path == "/status":
                body = json.dumps(routes.status(), indent=2).encode() + b"\n"
                self._reply(200, "application/json", body)
            elif path == "/metrics":
                self._reply(200, CONTENT_METRICS, routes.metrics())
            elif path == "/v2" and routes.sql is not None:  # Hrana clients probe it
                self._reply(200, "text/plain", b"hrana v2 over HTTP\n")
            elif path == "/health":
                ok, why = routes.health()
                self._reply(200 if ok else 503, "text/plain; charset=utf-8", why.encode() + b"\n")
            else:
                self._reply(404, "text/plain", b"not found: try /status, /metrics or /health\n")
        except Exception as e:
            log.exception("HTTP %s failed", path)
            self._reply(500, "text/plain", f"internal error: {e}\n".encode())

    def _admitted(self, path: str) -> bool:
        """The bearer token, if one is configured; else 401, or 429 (not
        checked) for a client past its failures."""
        token = self.server.token
        if token is None:
            return True
        limiter = self.server.limiter
        wait = limiter.refused(self.client_address[0])
        if wait > 0:
            self._reply(
                429,
                "text/plain",
                b"too many failed tokens from this address: try again later\n",
                {"Retry-After": str(math.ceil(wait))},
            )
            return False
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token):
            return True
        limiter.failed(self.client_address[0])
        log.debug("HTTP %s from %s: no valid bearer token", path, self.address_string())
        self._reply(
            401,
            "text/plain",
            b"unauthorized: send Authorization: Bearer <the --http-token-file token>\n",
            {"WWW-Authenticate": 'Bearer realm="hctserver"'},
        )
        return False

    def _reply(
        self, code: int, ctype: str, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if self.keep:
            self.send_header("Connection", "keep-alive")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.address_string(), *args)


class _Pending:
    """A connection whose request head is still arriving: no thread, no slot."""

    __slots__ = ("addr", "buf", "deadline", "handshake", "idle", "sock")

    def __init__(self, sock: socket.socket, addr: Any, now: float, deadline: float) -> None:
        self.sock = sock
        self.addr = addr
        self.buf = bytearray()
        self.deadline = now + deadline
        self.idle = now + READ_TIMEOUT
        self.handshake = isinstance(sock, ssl.SSLSocket)


def _head_end(buf: bytearray, start: int) -> bool:
    """Whether the blank line that ends the headers is in ``buf`` (searched
    from ``start``, so a client sending a byte at a time costs linear time)."""
    return buf.find(b"\n\r\n", start) >= 0 or buf.find(b"\n\n", start) >= 0


def _is_health(head: bytes) -> bool:
    words = head.split(b"\n", 1)[0].split()
    return len(words) >= 2 and words[0] == b"GET" and words[1].split(b"?", 1)[0] == b"/health"


class _Server(socketserver.TCPServer):
    """The listener, the loop that reads request heads, and the slots."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        addr: tuple[str, int],
        routes: Routes,
        max_clients: int,
        deadline: float,
        tls: ssl.SSLContext | None,
        token: bytes | None,
        health_reserve: int,
        max_pending: int,
        limiter: AuthLimiter,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.routes = routes
        self.tls = tls
        self.token = token
        self.deadline = deadline
        self.limiter = limiter
        self.max_pending = max_pending
        self.slots = threading.BoundedSemaphore(max_clients)
        self.reserve = threading.BoundedSemaphore(health_reserve) if health_reserve else None
        self.active: dict[Any, float] = {}  # request socket -> its deadline
        self.active_lock = threading.Lock()
        self.stopped = threading.Event()
        self._pending: dict[socket.socket, _Pending] = {}  # oldest first
        self._stop = threading.Event()
        self._accept_logged = -math.inf
        self._wake_r, self._wake_w = socket.socketpair()  # stop_loop wakes the loop
        self._returned: list[tuple[socket.socket, Any, bytes]] = []  # kept-alive, back from threads
        self._returned_lock = threading.Lock()
        self._wake_w.setblocking(False)
        super().__init__(addr, _Handler)  # on failure it calls server_close
        self.socket.setblocking(False)

    def run(self) -> None:
        """Accept, read request heads, hand complete ones to threads, and
        cut off the late, until :meth:`stop_loop`."""
        try:
            self._loop()
        finally:
            self.stopped.set()

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(self.socket, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            next_check = 0.0
            while not self._stop.is_set():
                for key, _ in sel.select(_TICK):
                    if key.fileobj is self.socket:
                        self._accept(sel)
                    elif key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                        self._resume(sel)
                    elif key.data.sock in self._pending:  # not dropped meanwhile
                        self._read(sel, key.data)
                now = time.monotonic()
                if now >= next_check:
                    self._expire(sel, now)
                    next_check = now + _TICK / 2
        finally:
            for p in list(self._pending.values()):
                self._drop(sel, p)
            with self._returned_lock:
                back, self._returned = self._returned, []
            for sock, _, _ in back:
                self.shutdown_request(sock)
            sel.close()
            self.limiter.flush()

    def stop_loop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(self.max_pending):  # then let the others' reads run
            try:
                sock, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors, say
                now = time.monotonic()
                if now >= self._accept_logged + 10:
                    self._accept_logged = now
                    log.warning("HTTP: cannot accept a connection: %s", e)
                if self._pending:  # free one (the oldest), or the listener spins
                    self._drop(sel, next(iter(self._pending.values())))
                else:
                    time.sleep(_TICK / 4)
                return
            sock.setblocking(False)
            if len(self._pending) >= self.max_pending:
                # the one that has been sending its head the longest
                self._drop(sel, next(iter(self._pending.values())))
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(
                        sock, server_side=True, do_handshake_on_connect=False
                    )
                except OSError as e:
                    log.info("HTTP client %s: %s", addr[0], e)
                    sock.close()
                    continue
            p = _Pending(sock, addr, time.monotonic(), self.deadline)
            self._pending[sock] = p
            sel.register(sock, selectors.EVENT_READ, p)
            self._read(sel, p)  # its request often came with it

    def _read(self, sel: selectors.BaseSelector, p: _Pending) -> None:
        try:
            if p.handshake:
                p.sock.do_handshake()  # type: ignore[attr-defined]
                p.handshake = False
            while True:
                chunk = p.sock.recv(HEAD_LIMIT + 1 - len(p.buf))
                if not chunk:
                    self._drop(sel, p)
                    return
                start = max(0, len(p.buf) - 3)
                p.buf += chunk
                p.idle = time.monotonic() + READ_TIMEOUT
                if _head_end(p.buf, start):
                    self._dispatch(sel, p)
                    return
                if len(p.buf) > HEAD_LIMIT:
                    self._drop(sel, p, _TOO_LARGE)
                    return
        except ssl.SSLWantReadError:
            sel.modify(p.sock, selectors.EVENT_READ, p)
        except ssl.SSLWantWriteError:
            sel.modify(p.sock, selectors.EVENT_WRITE, p)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:  # a failed TLS handshake, or a client gone
            log.info("HTTP client %s: %s", p.addr[0], e)
            self._drop(sel, p)

    def _dispatch(self, sel: selectors.BaseSelector, p: _Pending) -> None:
        """A complete head: a thread with a slot, or 503 at once."""
        sel.unregister(p.sock)
        del self._pending[p.sock]
        head = bytes(p.buf)
        slot = None
        if _is_health(head) and self.reserve is not None and self.reserve.acquire(False):
            slot = self.reserve
        elif self.slots.acquire(blocking=False):
            slot = self.slots
        if slot is None:
            self._answer(p.sock, _BUSY)
            return
        deadline = p.deadline
        if head.startswith(b"POST "):
            deadline = max(deadline, p.deadline - self.deadline + SQL_DEADLINE)
        with self.active_lock:
            self.active[p.sock] = deadline
        t = threading.Thread(
            target=self._serve_one,
            args=(p.sock, p.addr, head, slot),
            name="hct-http-request",
            daemon=True,
        )
        try:
            t.start()
        except RuntimeError:  # no thread to be had
            self._done(p.sock, slot)

    def _serve_one(
        self, sock: socket.socket, addr: Any, head: bytes, slot: threading.BoundedSemaphore
    ) -> None:
        again: bytes | None = None
        try:
            while True:
                h = _Handler(sock, addr, self, head)
                if not h.keep or self._stop.is_set():
                    break
                nxt = self._next_head(sock, h.rest)  # a client's next request, often at once
                if nxt is None:
                    again = h.rest  # nothing more yet: the loop waits for the rest
                    break
                head = nxt
                limit = SQL_DEADLINE if head.startswith(b"POST ") else self.deadline
                with self.active_lock:
                    self.active[sock] = time.monotonic() + limit
        except OSError as e:  # the client vanished, or was cut off
            log.info("HTTP client %s: %s", addr[0], e)
        except Exception:
            log.exception("HTTP request from %s failed", addr[0])
        finally:
            self._done(sock, slot, again, addr)

    def _next_head(self, sock: socket.socket, buf: bytes) -> bytes | None:
        """The next request's head on a kept-alive connection, if it starts
        within :data:`LINGER` seconds (this thread then serves it: no new
        thread, no trip through the loop); else None (the loop waits for it)."""
        data = bytearray(buf)
        if not _head_end(data, 0):
            buffered = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0  # select cannot see
            if not buffered and not select.select([sock], [], [], LINGER)[0]:
                return None
            sock.settimeout(READ_TIMEOUT)
            start = 0
            while not _head_end(data, start):
                if len(data) > HEAD_LIMIT:
                    raise ConnectionResetError("a request head over the limit")
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionResetError("the client closed its kept-alive connection")
                start = max(0, len(data) - 3)
                data += chunk
        return bytes(data)

    def _done(
        self,
        sock: socket.socket,
        slot: threading.BoundedSemaphore,
        again: bytes | None = None,
        addr: Any = None,
    ) -> None:
        """The request is over: close its connection, or (``again``: the bytes
        of the next request read so far) give it back to the loop, which
        waits for the next request on it without a thread."""
        with self.active_lock:
            self.active.pop(sock, None)
        if again is None:
            self.shutdown_request(sock)
        else:
            with self._returned_lock:
                self._returned.append((sock, addr, again))
            with contextlib.suppress(OSError):
                self._wake_w.send(b"r")
        slot.release()

    def _resume(self, sel: selectors.BaseSelector) -> None:
        """Kept-alive connections back from their threads: wait for their next request."""
        with self._returned_lock:
            back, self._returned = self._returned, []
        now = time.monotonic()
        for sock, addr, rest in back:
            try:
                sock.setblocking(False)
            except OSError:
                self.shutdown_request(sock)
                continue
            if len(self._pending) >= self.max_pending:
                self._drop(sel, next(iter(self._pending.values())))
            p = _Pending(sock, addr, now, self.deadline)
            p.handshake = False
            p.buf += rest
            self._pending[sock] = p
            sel.register(sock, selectors.EVENT_READ, p)
            if _head_end(p.buf, 0):
                self._dispatch(sel, p)

    def _expire(self, sel: selectors.BaseSelector, now: float) -> None:
        """Cut off heads past their deadline or silent too long, and
        requests past their deadline (a client that reads its reply slowly)."""
        for p in [p for p in self._pending.values() if now > min(p.deadline, p.idle)]:
            self._drop(sel, p)
        with self.active_lock:
            late = [r for r, t in self.active.items() if t < now]
        for r in late:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(r, socket.SHUT_RDWR)  # the handler's write fails
        self.limiter.sweep()

    def _drop(self, sel: selectors.BaseSelector, p: _Pending, status: bytes = b"") -> None:
        self._pending.pop(p.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(p.sock)
        if status and not p.handshake:
            self._answer(p.sock, status)
        else:
            with contextlib.suppress(OSError):
                p.sock.close()

    def _answer(self, sock: socket.socket, status: bytes) -> None:
        """A reply without a body, without blocking (it fits the socket's
        buffer), then close."""
        with contextlib.suppress(OSError):
            sock.send(b"HTTP/1.0 " + status + b"\r\nContent-Length: 0\r\n\r\n")
        self.shutdown_request(sock)

    def server_close(self) -> None:
        super().server_close()
        for s in (self._wake_r, self._wake_w):
            s.close()
        with self.active_lock:
            active = list(self.active)
        for r in active:  # the node is going away: cut replies still in progress
            with contextlib.suppress(OSError):
                socket.socket.shutdown(r, socket.SHUT_RDWR)


class HttpEndpoint:
    """Listens at once (so the port is known); :meth:`serve` answers until
    :meth:`stop` (from another thread).

    ``max_clients`` requests are served at once, and ``health_reserve`` more
    that only ``GET /health`` may take; ``max_pending`` connections may be
    sending their request head meanwhile. ``auth_failures`` failed tokens
    from one address in ``auth_window`` seconds and it gets 429 until the
    window ends."""

    def __init__(
        self,
        host: str,
        port: int,
        routes: Routes,
        max_clients: int = 16,
        deadline: float = REQUEST_DEADLINE,
        tls: ssl.SSLContext | None = None,
        token: bytes | None = None,
        health_reserve: int = HEALTH_RESERVE,
        max_pending: int = MAX_PENDING,
        auth_failures: int = AUTH_FAILURES,
        auth_window: float = AUTH_WINDOW,
    ) -> None:
        if max_clients < 1 or health_reserve < 0 or max_pending < 1:
            raise ConfigError("the HTTP endpoint needs max_clients >= 1 and max_pending >= 1")
        limiter = AuthLimiter(auth_failures, auth_window)
        try:
            self._server = _Server(
                (host, port),
                routes,
                max_clients,
                deadline,
                tls,
                token,
                health_reserve,
                max_pending,
                limiter,
            )
        except OSError as e:
            raise ConfigError(
                f"cannot listen for HTTP on {host}:{port}: {e.strerror or e}"
            ) from None
        self.host = host
        self.client_url: str | None = None  # set where SQL clients are served
        self.scheme = "https" if tls is not None else "http"
        self.port = int(self._server.server_address[1])
        self._lock = threading.Lock()
        self._started = self._stopping = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def serve(self) -> None:
        sql = ", SQL clients at /v2/pipeline" if self.client_url else ""
        log.info("HTTP status on %s (/status, /metrics, /health%s)", self.url, sql)
        with self._lock:
            if self._stopping:
                return
            self._started = True
        self._server.run()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            started = self._started
        self._server.stop_loop()
        if started:  # the loop ends within a tick
            self._server.stopped.wait()

    def close(self) -> None:
        self.stop()  # the loop must not outlive its sockets
        self._server.server_close()


def fetch(
    url: str, timeout: float = 5.0, token: bytes | None = None, ca: str | None = None
) -> tuple[int, bytes]:
    """GET ``url`` (for ``hctserver status URL`` and ``top``): (status, body).
    ``token``: sent as a bearer token; ``ca``: verify an https server with it."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", "Bearer " + token.decode())
    ctx = ssl.create_default_context(cafile=ca) if ca is not None else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())
    except (TimeoutError, urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectError(f"cannot reach {url}: {reason}") from None
