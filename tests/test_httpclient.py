"""The HTTP client a node's SQL clients and forwarding use, against replies
written by hand: how a reply ends, kept-alive connections, what it refuses."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from hctserver.errors import ConnectError, TimedOutError
from hctserver.net.httpclient import HttpClient


class Server:
    """Answers each request on a connection with the next scripted reply
    (None: close without one); counts connections."""

    def __init__(self, replies: list[bytes | None]) -> None:
        self.replies = list(replies)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.replies:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                while self.replies:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    if not data:
                        break
                    head, _, body = data.partition(b"\r\n\r\n")
                    n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    while len(body) < n:
                        body += conn.recv(65536)
                    self.requests.append(head + b"\r\n\r\n" + body)
                    reply = self.replies.pop(0)
                    if reply is None:
                        break
                    conn.sendall(reply)
                    if b"connection: close" in reply.lower() or b"HTTP/1.0" in reply[:8]:
                        break

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    s = Server(request.param)
    yield s
    s.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize("server", [[OK, OK, OK]], indirect=True)
def test_one_kept_alive_connection_carries_every_request(server: Server) -> None:
    c = HttpClient(f"http://127.0.0.1:{server.port}", token=b"t0k")
    assert [c.post("/x", b"{}") for _ in range(3)] == [(200, b"ok")] * 3
    assert server.connections == 1
    assert b"Authorization: Bearer t0k" in server.requests[0]
    assert server.requests[0].endswith(b"\r\n\r\n{}")
    c.close()


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
)
TO_CLOSE = b"HTTP/1.1 503 Busy\r\nConnection: close\r\n\r\nbusy, bye"
OLD = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold"


@pytest.mark.parametrize("server", [[CHUNKED, TO_CLOSE, OLD, OK]], indirect=True)
def test_each_way_a_reply_may_end(server: Server) -> None:
    c = HttpClient(f"http://127.0.0.1:{server.port}")
    assert c.post("/x", b"1") == (200, b"abcde")
    assert c.post("/x", b"2") == (503, b"busy, bye")  # ended by the close
    assert c.post("/x", b"3") == (200, b"old")  # HTTP/1.0 without keep-alive: closed after
    assert c.post("/x", b"4") == (200, b"ok")
    assert server.connections == 3


@pytest.mark.parametrize("server", [[None]], indirect=True)
def test_a_server_that_closes_without_a_reply_is_an_error_not_a_resend(server: Server) -> None:
    c = HttpClient(f"http://127.0.0.1:{server.port}")
    with pytest.raises(ConnectError, match="closed the connection before a whole reply"):
        c.post("/x", b"{}")
    assert len(server.requests) == 1  # sent once, never again


@pytest.mark.parametrize(
    "server", [[b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n"]], indirect=True
)
def test_a_reply_head_is_bounded(server: Server) -> None:
    c = HttpClient(f"http://127.0.0.1:{server.port}")
    with pytest.raises(ConnectError, match="64 KiB"):
        c.post("/x", b"{}")


def test_a_silent_server_times_out() -> None:
    quiet = socket.create_server(("127.0.0.1", 0))
    try:
        c = HttpClient(f"http://127.0.0.1:{quiet.getsockname()[1]}", timeout=0.3)
        with pytest.raises(TimedOutError):
            c.post("/x", b"{}")
    finally:
        quiet.close()
