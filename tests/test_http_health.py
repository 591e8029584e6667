"""The HTTP endpoint under hostile clients: /health is answered while slow
clients hold connections and while every general slot is busy; the reserve
for it, the connections still sending their request and the table of failed
tokens are all bounded; failed tokens are rate-limited per address and
logged once per burst. Real sockets on 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hctserver.net.httpserver import AuthLimiter, HttpEndpoint, Routes

from helpers import wait_until

TOKEN = b"0123456789abcdef-token"


def _routes(
    status: Callable[[], dict[str, Any]] | None = None,
    health: Callable[[], tuple[bool, str]] | None = None,
) -> Routes:
    return Routes(status or (lambda: {"ok": 1}), lambda: b"m 1\n", health or (lambda: (True, "ok")))


@contextlib.contextmanager
def serving(routes: Routes | None = None, **kw: Any) -> Iterator[HttpEndpoint]:
    ep = HttpEndpoint("127.0.0.1", 0, routes or _routes(), **kw)
    t = threading.Thread(target=ep.serve, daemon=True)
    t.start()
    try:
        yield ep
    finally:
        ep.stop()
        t.join(5)
        ep.close()
    assert not t.is_alive()


def request(
    port: int,
    path: str,
    token: bytes | None = None,
    timeout: float = 3.0,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, bytes, float]:
    """GET ``path``: (status, the whole reply, seconds); status 0 when no
    reply came (refused, reset, timed out)."""
    auth = f"Authorization: Bearer {token.decode()}\r\n" if token is not None else ""
    t0 = time.monotonic()
    data = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            s = tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls is not None else raw
            s.sendall(f"GET {path} HTTP/1.0\r\n{auth}\r\n".encode())
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        pass
    elapsed = time.monotonic() - t0
    words = data.split(b" ", 2)
    return (int(words[1]) if len(words) > 1 else 0), data, elapsed


def still_open(s: socket.socket) -> bool:
    """The server has neither closed nor answered ``s``."""
    s.setblocking(False)
    try:
        return not s.recv(1)
    except (BlockingIOError, ssl.SSLWantReadError):
        return True
    except OSError:
        return False
    finally:
        s.setblocking(True)


def closed_by_server(s: socket.socket) -> bool:
    s.settimeout(0.01)
    try:
        return s.recv(65536) == b""
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


def probe_health(port: int, n: int, tls: ssl.SSLContext | None = None) -> None:
    """``n`` probes one after another: every one 200, each within 1 s."""
    results = [request(port, "/health", tls=tls) for _ in range(n)]
    bad = [(code, round(t, 3)) for code, _, t in results if code != 200 or t >= 1.0]
    assert not bad, f"{len(bad)} of {n} probes failed or were slow: {bad[:10]}"
    times = sorted(t for _, _, t in results)
    print(
        f"{n} probes: all 200; median {times[n // 2] * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms"
    )


def slow_clients(stack: contextlib.ExitStack, port: int, n: int) -> list[socket.socket]:
    """``n`` connections: half send nothing, half part of a request line."""
    out = []
    for i in range(n):
        s = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
        if i % 2:
            s.sendall(b"GET /sta")
        out.append(s)
    return out


def test_health_is_answered_while_20_slow_clients_hold_connections() -> None:
    with serving() as ep, contextlib.ExitStack() as stack:
        slow = slow_clients(stack, ep.port, 20)
        # before the reserved path, these 16 slots' worth of silence made it 503
        probe_health(ep.port, 100)
        assert all(still_open(s) for s in slow)  # held all along, not dropped for room
        code, _, _ = request(ep.port, "/status")
        assert code == 200


def test_health_is_answered_while_every_general_slot_is_busy() -> None:
    release = threading.Event()
    inside = threading.Semaphore(0)

    def status() -> dict[str, Any]:
        inside.release()
        release.wait(20)
        return {"ok": 1}

    with serving(_routes(status=status), max_clients=3) as ep:
        busy: list[threading.Thread] = []
        try:
            for _ in range(3):
                t = threading.Thread(target=request, args=(ep.port, "/status", None, 30))
                t.start()
                busy.append(t)
            for _ in range(3):
                assert inside.acquire(timeout=10), "the slow requests did not all start"
            code, _, took = request(ep.port, "/status")
            assert code == 503 and took < 1.0  # every general slot is taken
            probe_health(ep.port, 20)
        finally:
            release.set()
            for t in busy:
                t.join(10)
        wait_until(lambda: request(ep.port, "/status")[0] == 200, 5, "slots free again")


def test_the_health_reserve_is_bounded() -> None:
    """More /health requests stuck at once than the reserve and the general
    slots hold get 503 at once, not a hang; at most that many threads run."""
    release = threading.Event()
    lock = threading.Lock()
    now = [0]
    most = [0]

    def health() -> tuple[bool, str]:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        try:
            release.wait(20)
            return True, "ok"
        finally:
            with lock:
                now[0] -= 1

    with serving(_routes(health=health), max_clients=2, health_reserve=2) as ep:
        stuck: list[threading.Thread] = []
        try:
            for _ in range(4):
                t = threading.Thread(target=request, args=(ep.port, "/health", None, 30))
                t.start()
                stuck.append(t)
            wait_until(lambda: now[0] == 4, 10, "4 stuck /health requests")
            for _ in range(10):
                code, _, took = request(ep.port, "/health")
                assert code == 503 and took < 1.0, (code, took)
            assert most[0] == 4
        finally:
            release.set()
            for t in stuck:
                t.join(10)
        probe_health(ep.port, 5)


def test_connections_still_sending_their_request_are_bounded() -> None:
    """Past ``max_pending`` silent connections the oldest are closed: a
    flood of them costs a bounded number of sockets, and /health still works."""
    with serving(max_pending=8) as ep, contextlib.ExitStack() as stack:
        silent = slow_clients(stack, ep.port, 30)
        wait_until(
            lambda: sum(closed_by_server(s) for s in silent[:22]) == 22,
            10,
            "the 22 oldest closed",
        )
        assert all(still_open(s) for s in silent[22:])
        probe_health(ep.port, 10)


def test_a_trickling_client_is_cut_off_at_the_deadline() -> None:
    with serving(deadline=0.5) as ep, contextlib.ExitStack() as stack:
        s = stack.enter_context(socket.create_connection(("127.0.0.1", ep.port), timeout=5))
        t0 = time.monotonic()
        s.sendall(b"GET /sta")  # and nothing more
        assert s.recv(100) == b""
        assert time.monotonic() - t0 < 4  # the deadline, not the 5 s read timeout


def test_a_huge_request_head_is_refused() -> None:
    with serving() as ep, contextlib.ExitStack() as stack:
        s = stack.enter_context(socket.create_connection(("127.0.0.1", ep.port), timeout=5))
        with contextlib.suppress(OSError):  # it may close before all is sent
            s.sendall(b"GET /health HTTP/1.0\r\nX: " + b"a" * 70000)
        with contextlib.suppress(OSError):
            assert s.recv(100).startswith(b"HTTP/1.0 431")
        probe_health(ep.port, 3)


def test_health_over_tls_while_slow_clients_hold_connections() -> None:
    """Over https the handshake is run without a thread: clients that never
    start it, or stop after it, hold nothing that /health needs."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    with serving(tls=server) as ep, contextlib.ExitStack() as stack:
        slow = slow_clients(stack, ep.port, 10)  # raw bytes or nothing: no handshake
        for _ in range(10):
            raw = socket.create_connection(("127.0.0.1", ep.port), timeout=5)
            slow.append(stack.enter_context(client.wrap_socket(raw, server_hostname="127.0.0.1")))
        probe_health(ep.port, 30, tls=client)
        assert all(still_open(s) for s in slow[10:])
        assert request(ep.port, "/status", tls=client)[0] == 200


def test_failed_tokens_are_rate_limited_and_logged_once_per_burst(caplog) -> None:
    caplog.set_level(logging.INFO, logger="hctserver")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "failed token attempts" in r.getMessage()]

    with serving(token=TOKEN, auth_failures=3, auth_window=2.0) as ep:
        for burst in (1, 2):
            assert [request(ep.port, "/status", b"wrong-token")[0] for _ in range(3)] == [401] * 3
            code, reply, _ = request(ep.port, "/metrics", b"wrong-token")
            assert code == 429 and b"Retry-After: " in reply
            assert request(ep.port, "/status", TOKEN)[0] == 429  # not even checked
            assert request(ep.port, "/health")[0] == 200  # never limited
            wait_until(lambda n=burst: len(lines()) >= n, 10, f"the line for burst {burst}")
            assert lines()[-1] == (
                "HTTP: 3 failed token attempts from 127.0.0.1 in the last 2.0 s;"
                " 2 more requests refused unchecked (429)"
            )
            # the window is over: the right token works again
            assert request(ep.port, "/status", TOKEN)[0] == 200
        assert len(lines()) == 2
        assert not [r for r in caplog.records if "no valid bearer token" in r.getMessage()]


def test_the_failed_token_table_is_bounded() -> None:
    t = [0.0]
    limiter = AuthLimiter(failures=2, window=10.0, size=4, clock=lambda: t[0])
    for i in range(100):  # one client, many addresses
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
        assert len(limiter) <= 4
    # the newest are remembered, the oldest pushed out
    limiter.failed("10.0.0.99")
    assert limiter.refused("10.0.0.99") > 0
    assert limiter.refused("10.0.0.1") == 0
    # an IPv6 client counts as its /64
    limiter.failed("2001:db8::1")
    limiter.failed("2001:db8::2:3")
    assert limiter.refused("2001:db8::ffff") > 0
    assert limiter.refused("2001:db8:0:1::1") == 0
    t[0] = 10.0  # every window has ended
    limiter.sweep()
    assert len(limiter) == 0
    assert limiter.refused("10.0.0.99") == 0
