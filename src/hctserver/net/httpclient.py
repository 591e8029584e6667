"""An HTTP client for a node's endpoint: JSON POSTs over one kept-alive
connection (reopened when the server closes it), with the node's TLS and
bearer token. The client protocol (:mod:`hctserver.client.remote`) and a
follower forwarding writes to its leader use it."""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import time
import urllib.parse

from ..errors import ConfigError, ConnectError, TimedOutError

IDLE_REUSE = 2.0  # seconds a kept-alive connection may idle and be used again (servers wait 5)


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
        self._used = 0.0
        self._headers = {"Content-Type": "application/json", "Connection": "keep-alive"}
        if token is not None:
            self._headers["Authorization"] = "Bearer " + token.decode().strip()
        port = u.port or (443 if u.scheme == "https" else 80)
        self._conn: http.client.HTTPConnection
        if u.scheme == "https":
            ctx = ssl.create_default_context(cafile=ca)
            self._conn = http.client.HTTPSConnection(u.hostname, port, timeout=timeout, context=ctx)
        else:
            self._conn = http.client.HTTPConnection(u.hostname, port, timeout=timeout)

    def post(self, path: str, body: bytes, timeout: float | None = None) -> tuple[int, bytes]:
        """(status, body). Never sent twice: a connection that fails after the
        request went out may have been answered (a write made), so the caller
        decides (a transaction id makes a retry safe)."""
        try:
            return self._post(path, body, timeout)
        except TimeoutError:
            self._conn.close()
            raise TimedOutError(f"{self.url} did not answer within the timeout") from None
        except ssl.SSLError as e:
            self._conn.close()
            raise ConnectError(f"TLS with {self.url} failed: {e}") from None
        except (OSError, http.client.HTTPException) as e:
            self._conn.close()
            raise ConnectError(
                f"cannot reach {self.url}: {e or type(e).__name__} (is a node running there,"
                " with --http?)"
            ) from None

    def _post(self, path: str, body: bytes, timeout: float | None) -> tuple[int, bytes]:
        c = self._conn
        now = time.monotonic()
        if c.sock is not None and (now - self._used > IDLE_REUSE or _closed_by_peer(c.sock)):
            c.close()  # the server closed it, or may be closing it: never send on such a one
        self._used = now
        if c.sock is None:
            c.timeout = timeout or self.timeout
            c.connect()
            sock = c.sock
            assert sock is not None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif timeout is not None:
            c.sock.settimeout(timeout)
        c.request("POST", path, body, self._headers)
        r = c.getresponse()
        data = r.read()
        if r.will_close:
            c.close()
        self._used = time.monotonic()
        return r.status, data

    def close(self) -> None:
        self._conn.close()
