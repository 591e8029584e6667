"""A node's HTTP endpoint: ``/status`` (JSON), ``/metrics`` (Prometheus) and
``/health`` (200 or 503), never on the replication port.

The standard library's ``http.server``: three read-only GET routes need no
framework, and it adds no dependency. Bounded like the replication port:
at most ``max_clients`` requests at once (the next is answered 503 at
once), a deadline of :data:`REQUEST_DEADLINE` seconds for each whole
request and its reply (and 5 s for any one read), request lines and
headers as ``http.server`` limits them (64 KiB, 100 headers).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .errors import ConfigError, ConnectError

log = logging.getLogger("hctserver")

CONTENT_METRICS = "text/plain; version=0.0.4; charset=utf-8"
REQUEST_DEADLINE = 10.0  # seconds for a whole request and its reply


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
    """What the endpoint serves: callables of the node."""

    def __init__(
        self,
        status: Callable[[], dict[str, Any]],
        metrics: Callable[[], bytes],
        health: Callable[[], tuple[bool, str]],
    ) -> None:
        self.status = status
        self.metrics = metrics
        self.health = health


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 5.0  # per read; the server cuts off a request past its deadline
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        routes = self.server.routes
        path = self.path.split("?", 1)[0]
        if path in ("/status", "/metrics") and not self._authorized():
            log.info("HTTP %s from %s: no valid bearer token", path, self.address_string())
            self._reply(
                401,
                "text/plain",
                b"unauthorized: send Authorization: Bearer <the --http-token-file token>\n",
                {"WWW-Authenticate": 'Bearer realm="hctserver"'},
            )
            return
        try:
            if path == "/status":
                body = json.dumps(routes.status(), indent=2).encode() + b"\n"
                self._reply(200, "application/json", body)
            elif path == "/metrics":
                self._reply(200, CONTENT_METRICS, routes.metrics())
            elif path == "/health":
                ok, why = routes.health()
                self._reply(200 if ok else 503, "text/plain; charset=utf-8", why.encode() + b"\n")
            else:
                self._reply(404, "text/plain", b"not found: try /status, /metrics or /health\n")
        except Exception as e:
            log.exception("HTTP %s failed", path)
            self._reply(500, "text/plain", f"internal error: {e}\n".encode())

    def _authorized(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)

    def _reply(
        self, code: int, ctype: str, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        addr: tuple[str, int],
        routes: Routes,
        max_clients: int,
        deadline: float,
        tls: ssl.SSLContext | None,
        token: bytes | None,
    ) -> None:
        self.routes = routes
        self.tls = tls
        self.token = token
        self.deadline = deadline
        self.slots = threading.BoundedSemaphore(max_clients)
        self.active: dict[Any, float] = {}  # request socket -> its deadline
        self.active_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def service_actions(self) -> None:
        """Between polls of the listener: cut off requests past their
        deadline (a client that trickles its request or reads slowly)."""
        now = time.monotonic()
        with self.active_lock:
            late = [r for r, t in self.active.items() if t < now]
        for r in late:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(r, 2)  # the handler's read or write fails

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        if self.tls is not None:  # the handshake runs in the request's thread
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            if self.tls is None:  # over TLS it would mean a handshake here: just close
                with contextlib.suppress(OSError):
                    request.sendall(
                        b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
                    )
            self.shutdown_request(request)
            return
        with self.active_lock:
            self.active[request] = time.monotonic() + self.deadline
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that failed its TLS handshake, or vanished: one line."""
        e = sys.exc_info()[1]
        if isinstance(e, OSError):
            log.info("HTTP client %s: %s", client_address[0], e)
        else:
            log.exception("HTTP request from %s failed", client_address[0])

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.active_lock:
                self.active.pop(request, None)
            self.slots.release()


class HttpEndpoint:
    """Listens at once (so the port is known); :meth:`serve` answers until
    :meth:`stop` (from another thread)."""

    def __init__(
        self,
        host: str,
        port: int,
        routes: Routes,
        max_clients: int = 16,
        deadline: float = REQUEST_DEADLINE,
        tls: ssl.SSLContext | None = None,
        token: bytes | None = None,
    ) -> None:
        try:
            self._server = _Server((host, port), routes, max_clients, deadline, tls, token)
        except OSError as e:
            raise ConfigError(
                f"cannot listen for HTTP on {host}:{port}: {e.strerror or e}"
            ) from None
        self.host = host
        self.scheme = "https" if tls is not None else "http"
        self.port = int(self._server.server_address[1])
        self._lock = threading.Lock()
        self._started = self._stopping = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def serve(self) -> None:
        log.info("HTTP status on %s (/status, /metrics, /health)", self.url)
        with self._lock:
            if self._stopping:
                return
            self._started = True
        self._server.serve_forever(poll_interval=0.2)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            started = self._started
        if started:  # shutdown() waits for serve_forever, which must have run
            self._server.shutdown()

    def close(self) -> None:
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
