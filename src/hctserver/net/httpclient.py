"""An HTTP client for a node's endpoint: JSON POSTs over one kept-alive
connection (reopened when the server closes it), with the node's TLS and
bearer token. The client protocol (:mod:`hctserver.client.remote`) and a
follower forwarding writes to its leader use it.

HTTP/1.1 by hand rather than :mod:`http.client`: a request is one send of
head and body (no Nagle stall between them), and a reply is read with two
or three ``recv`` calls, without the standard library's header parser; on
a forwarded write it is on the path twice. Replies with a Content-Length,
chunked, or ended by the close are understood; each is bounded.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
import urllib.parse

from ..errors import ConfigError, ConnectError, TimedOutError

IDLE_REUSE = 2.0  # seconds a kept-alive connection may idle and be used again (servers wait 5)
MAX_HEAD = 65536  # bytes of a reply's status line and headers
MAX_REPLY = 256 << 20  # bytes of a reply's body


class _Closed(Exception):
    """The server closed the connection before a whole reply."""


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether an idle kept-alive connection has news (the server closed it,
    or dropped it to make room): it must not carry a request."""
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class HttpClient:
    """One server (``base_url``: ``http[s]://host:port``); not thread-safe."""

    def __init__(
        self,
        base_url: str,
        *,
        token: bytes | None = None,
        ca: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        u = urllib.parse.urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError(f"not an http(s)://HOST:PORT URL: {base_url!r}")
        self.url = base_url.rstrip("/")
        self.timeout = timeout
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self._tls = ssl.create_default_context(cafile=ca) if u.scheme == "https" else None
        auth = b""
        if token is not None:
            auth = b"Authorization: Bearer " + token.strip() + b"\r\n"
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._headers = (
            f"Host: {host}:{self.port}\r\n".encode()
            + b"Content-Type: application/json\r\nConnection: keep-alive\r\n"
            + auth
        )
        self._sock: socket.socket | None = None
        self.sent = False  # the last post's request (perhaps part of it) went out
        self._buf = bytearray()
        self._used = 0.0

    def post(self, path: str, body: bytes, timeout: float | None = None) -> tuple[int, bytes]:
        """(status, body). Never sent twice: a connection that fails after the
        request went out may have been answered (a write made), so the caller
        decides (a transaction id makes a retry safe)."""
        self.sent = False
        try:
            sock = self._connected(timeout or self.timeout)
            head = b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n" % (
                path.encode(),
                self._headers,
                len(body),
            )
            self.sent = True  # from here on the server may have run it
            sock.sendall(head + body)
            status, reply, keep = self._reply(sock)
        except TimeoutError:
            self.close()
            raise TimedOutError(f"{self.url} did not answer within the timeout") from None
        except ssl.SSLError as e:
            self.close()
            raise ConnectError(f"TLS with {self.url} failed: {e}") from None
        except (OSError, _Closed, ValueError) as e:
            self.close()
            raise ConnectError(
                f"cannot reach {self.url}: {e or type(e).__name__} (is a node running there,"
                " with --http?)"
            ) from None
        self._used = time.monotonic()
        if not keep:
            self.close()
        return status, reply

    def _connected(self, timeout: float) -> socket.socket:
        sock = self._sock
        now = time.monotonic()
        if sock is not None and (
            now - self._used > IDLE_REUSE or self._buf or _closed_by_peer(sock)
        ):
            self.close()  # the server closed it, or may be closing it: never send on such a one
            sock = None
        if sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                try:
                    sock = self._tls.wrap_socket(sock, server_hostname=self.host)
                except BaseException:
                    sock.close()
                    raise
            self._sock = sock
        sock.settimeout(timeout)
        return sock

    def _reply(self, sock: socket.socket) -> tuple[int, bytes, bool]:
        """Status, body, and whether the connection may carry another request."""
        buf = self._buf
        while (end := buf.find(b"\r\n\r\n")) < 0 and len(buf) <= MAX_HEAD:
            self._more(sock)
        if not 0 <= end <= MAX_HEAD:
            raise ValueError("a reply head over 64 KiB")
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        del buf[: end + 4]
        version, _, rest = lines[0].partition(" ")
        status = int(rest.split(" ", 1)[0])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        conn = headers.get("connection", "")
        keep = "keep-alive" in conn if version == "HTTP/1.0" else "close" not in conn
        if "chunked" in headers.get("transfer-encoding", ""):
            return status, self._chunked(sock), keep
        if "content-length" in headers:
            n = int(headers["content-length"])
            if not 0 <= n <= MAX_REPLY:
                raise ValueError(f"a reply of {n} bytes")
            while len(buf) < n:
                self._more(sock)
            body = bytes(buf[:n])
            del buf[:n]
            return status, body, keep
        while True:  # the body ends with the connection
            try:
                self._more(sock)
            except _Closed:
                body = bytes(buf)
                buf.clear()
                return status, body, False
            if len(buf) > MAX_REPLY:
                raise ValueError("a reply over the limit")

    def _chunked(self, sock: socket.socket) -> bytes:
        buf, out = self._buf, bytearray()
        while True:
            while (end := buf.find(b"\r\n")) < 0:
                self._more(sock)
            size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
            del buf[: end + 2]
            while len(buf) < size + 2:
                self._more(sock)
            out += buf[:size]
            del buf[: size + 2]
            if len(out) > MAX_REPLY:
                raise ValueError("a reply over the limit")
            if size == 0:
                return bytes(out)

    def _more(self, sock: socket.socket) -> None:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise _Closed("the server closed the connection before a whole reply")
        self._buf += chunk

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self._buf.clear()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
