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
import json
import logging
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

    def _reply(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
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
        self, addr: tuple[str, int], routes: Routes, max_clients: int, deadline: float
    ) -> None:
        self.routes = routes
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
                r.shutdown(2)  # SHUT_RDWR: the handler's read or write fails

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self.active_lock:
            self.active[request] = time.monotonic() + self.deadline
        super().process_request(request, client_address)

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
    ) -> None:
        try:
            self._server = _Server((host, port), routes, max_clients, deadline)
        except OSError as e:
            raise ConfigError(
                f"cannot listen for HTTP on {host}:{port}: {e.strerror or e}"
            ) from None
        self.host = host
        self.port = int(self._server.server_address[1])
        self._lock = threading.Lock()
        self._started = self._stopping = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

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


def fetch(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``url`` (for ``hctserver status URL`` and ``top``): (status, body)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())
    except (TimeoutError, urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectError(f"cannot reach {url}: {reason}") from None
