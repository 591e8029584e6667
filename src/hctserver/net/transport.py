"""Every socket hctserver makes, reads and writes lives in this module.

The node layer sees three things: a :class:`Listener` (accept), a
:class:`Conn` (blocking calls with a deadline, or non-blocking tries) and a
:class:`Poller` (wait until connections are ready). Failures arrive as
:class:`~hctserver.errors.ConnectionLostError` (a peer that reset, closed or
went silent) or :class:`~hctserver.errors.ConnectError`; a non-blocking try
that would block returns 0 or None instead of raising. So a layer such as
TLS, which buffers bytes a selector cannot see (:meth:`Conn.pending`) and
reports "want read" as an ``OSError``, is a change here alone.

Two transports: :data:`TCP` (the default) and :class:`MemoryNetwork`
(socket pairs inside one process, no TCP stack or ports: for tests).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import itertools
import os
import queue
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

from ..errors import (
    AddressInUseError,
    AuthError,
    ConnectError,
    ConnectionLostError,
    PlainClientError,
    TimedOutError,
)

TLS_HANDSHAKE = 0x16  # the first byte a TLS client sends (protocol.wire knows it too)

# "Nothing now, try later": a TLS layer says it with its own OSError subclasses.
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Conn:
    """One connection. Blocking calls take a timeout in seconds (None: wait
    for ever); ``try_*`` calls need :meth:`set_blocking` (False) first.
    ``client``: a follower's; a TLS alert from the leader (it refused our
    certificate) is then an :class:`~hctserver.errors.AuthError`."""

    def __init__(self, sock: socket.socket, peer: str, client: bool = False) -> None:
        self._sock = sock
        self.peer = peer
        self.closed = False
        self._client = client
        # TLS records are at most 16 KiB: a write that would block is retried
        # with the same bytes, as OpenSSL requires, when sends stay this small
        self._piece = _TLS_PIECE if isinstance(sock, ssl.SSLSocket) else 0

    def peek(self, timeout: float) -> bytes:
        """The first byte waiting, left there (b"" if the peer closed)."""
        try:
            self._sock.settimeout(timeout)
            return self._sock.recv(1, socket.MSG_PEEK)
        except TimeoutError:
            raise TimedOutError(f"{self.peer} sent nothing for {timeout:g} s") from None
        except OSError as e:
            raise ConnectionLostError(f"reading from {self.peer} failed: {_why(e)}") from None

    def start_tls(self, ctx: ssl.SSLContext, deadline: float) -> None:
        """The server's side of the TLS handshake, then speak TLS. The same
        Conn goes on: whoever holds it (to abort it) still does."""
        tls = ctx.wrap_socket(self._sock, server_side=True, do_handshake_on_connect=False)
        self._sock = tls
        self._piece = _TLS_PIECE
        _handshake(tls, deadline, self.peer, server=True)

    def fileno(self) -> int:
        return self._sock.fileno()

    def set_blocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def send_all(self, data: bytes | bytearray | memoryview, timeout: float | None) -> None:
        try:
            self._sock.settimeout(timeout)
            self._sock.sendall(data)
        except TimeoutError:
            raise TimedOutError(f"{self.peer} took nothing for {timeout:g} s") from None
        except OSError as e:
            raise self._lost("sending to", e) from None

    def recv_into(self, buf: bytearray | memoryview, timeout: float | None) -> int:
        """Bytes read into ``buf``; 0 when the peer closed its side."""
        try:
            self._sock.settimeout(timeout)
            return self._sock.recv_into(buf)
        except TimeoutError:
            raise TimedOutError(f"{self.peer} sent nothing for {timeout:g} s") from None
        except OSError as e:
            if self.closed:
                return 0
            raise self._lost("reading from", e) from None

    def try_send(self, data: bytes | memoryview) -> int:
        """Send what fits now; 0 if nothing does."""
        if not self._piece:
            try:
                return self._sock.send(data)
            except _WOULD_BLOCK:
                return 0
            except OSError as e:
                raise self._lost("sending to", e) from None
        sent = 0
        view = memoryview(data)
        while sent < len(view):
            try:
                sent += self._sock.send(view[sent : sent + self._piece])
            except _WOULD_BLOCK:
                break
            except OSError as e:
                raise self._lost("sending to", e) from None
        return sent

    def try_recv_into(self, buf: bytearray | memoryview) -> int | None:
        """Bytes read; 0 when the peer closed; None if none are ready."""
        try:
            return self._sock.recv_into(buf)
        except _WOULD_BLOCK:
            return None
        except OSError as e:
            raise self._lost("reading from", e) from None

    def _lost(self, doing: str, e: OSError) -> Exception:
        if self._client and self._piece:
            alert = e if isinstance(e, ssl.SSLError) and _is_alert(e) else self._pending_alert()
            if alert is not None:
                return AuthError(
                    f"the leader at {self.peer} refused this follower: {_tls_why(alert)}"
                )
        return ConnectionLostError(f"{doing} {self.peer} failed: {_why(e)}")

    def _pending_alert(self) -> ssl.SSLError | None:
        """The TLS alert the leader sent before it closed, if one is waiting
        (under TLS 1.3 a refused client certificate is told after the
        client's handshake ended, so our first send may fail before it)."""
        try:
            self._sock.setblocking(False)
            self._sock.recv(1)
        except ssl.SSLError as e:
            return e if _is_alert(e) else None
        except OSError:
            return None
        return None

    def pending(self) -> int:
        """Bytes received and buffered above the socket (by TLS; none for plain
        TCP), which a selector cannot see."""
        sock = self._sock
        return sock.pending() if isinstance(sock, ssl.SSLSocket) else 0

    def shutdown_write(self) -> None:
        # socket.socket's own: SSLSocket.shutdown would drop its TLS state (the
        # peer sees end of file without a close_notify; every reply of ours has
        # its own end marker, so a cut-short one is still seen as cut short)
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._sock, socket.SHUT_WR)

    def abort(self) -> None:
        """Wake any thread blocked on this connection (it sees end of file)."""
        self.closed = True
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self._sock.close()


def _why(e: OSError) -> str:
    if isinstance(e, ssl.SSLError):
        return f"TLS: {_tls_why(e)}"
    if e.errno is not None and e.strerror:
        return e.strerror.lower()
    return str(e) or type(e).__name__


_TLS_PIECE = 16 << 10


def _is_alert(e: OSError) -> bool:
    return isinstance(e, ssl.SSLError) and "ALERT" in str(e.reason)


def _tls_why(e: ssl.SSLError) -> str:
    if isinstance(e, ssl.SSLCertVerificationError) and e.verify_message:
        return str(e.verify_message).rstrip(".")
    reason = str(e.reason or "").lower().replace("_", " ")
    return reason or str(e)


class Waker:
    """A file descriptor that a :class:`Poller` or :meth:`Listener.accept`
    watches, so that another thread can wake them at once."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def fileno(self) -> int:
        return self._r

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._w, b"x")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._r, 4096):
                pass

    def close(self) -> None:
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


class Listener:
    """A listening endpoint; :meth:`accept` waits for a connection or a wake-up."""

    def __init__(self, sock: socket.socket, host: str) -> None:
        self._sock = sock
        self._sock.setblocking(False)
        self.host = host
        self.port: int = sock.getsockname()[1]

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self, waker: Waker) -> Conn | None:
        """The next connection, or None once ``waker`` was woken."""
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            sel.register(waker, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in sel.select()}
                if waker in ready:
                    waker.drain()
                    return None
                try:
                    sock, addr = self._sock.accept()
                except _WOULD_BLOCK:
                    continue
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        raise ConnectionLostError(f"cannot accept: {_why(e)}") from None
                    continue  # the client gave up before we accepted
                sock.setblocking(True)
                _nodelay(sock)
                return Conn(sock, _peer(addr))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


def _peer(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr) or "local"


KEEPALIVE = (10, 5, 3)  # idle seconds, seconds between probes, probes


def _nodelay(sock: socket.socket) -> None:
    """No Nagle delay; TCP keepalive, so that a peer whose host died or whose
    network broke is noticed in about 25 s instead of never."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle, interval, count = KEEPALIVE
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", count),
    ):
        opt = getattr(socket, name, None)
        if opt is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, opt, value)


class Transport(Protocol):
    @property
    def tls(self) -> bool: ...

    def listen(self, host: str, port: int) -> Listener: ...

    def secure(self, conn: Conn, timeout: float) -> Conn: ...

    def connect(
        self, host: str, port: int, timeout: float, cancel: Waker | None = None
    ) -> Conn: ...


class TcpTransport:
    """TCP over IPv4 or IPv6 (a host with ':' is IPv6), with TLS when given
    contexts: ``server_tls`` for what :meth:`listen` accepts (the handshake
    is :meth:`secure`, run by the thread serving the connection),
    ``client_tls`` for :meth:`connect`, which verifies the leader's
    certificate for ``server_name`` (default: the host connected to)."""

    def __init__(
        self,
        server_tls: ssl.SSLContext | None = None,
        client_tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> None:
        self.server_tls = server_tls
        self.client_tls = client_tls
        self.server_name = server_name

    @property
    def tls(self) -> bool:
        """Do accepted connections speak TLS (once :meth:`secure`)?"""
        return self.server_tls is not None

    def secure(self, conn: Conn, timeout: float) -> Conn:
        """The server's side of the TLS handshake, within ``timeout``; the
        same ``conn`` without TLS. A client that does not start with a TLS
        handshake is refused at its first byte (:class:`PlainClientError`:
        answer it in the plain protocol); a failed handshake is an
        :class:`AuthError` (the client got TLS's own alert)."""
        ctx = self.server_tls
        if ctx is None:
            return conn
        deadline = time.monotonic() + timeout
        first = conn.peek(timeout)
        if not first:
            raise ConnectionLostError(f"{conn.peer} closed before the TLS handshake")
        if first[0] != TLS_HANDSHAKE:
            raise PlainClientError("a plain client: this leader requires TLS")
        conn.start_tls(ctx, deadline)
        return conn

    def listen(self, host: str, port: int) -> Listener:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, port), family=family, backlog=128)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise AddressInUseError(
                    f"cannot listen on {host}:{port}: address already in use"
                    " (is another leader running? choose another --port)"
                ) from None
            raise AddressInUseError(f"cannot listen on {host}:{port}: {_why(e)}") from None
        return Listener(sock, host)

    def connect(self, host: str, port: int, timeout: float, cancel: Waker | None = None) -> Conn:
        """Connect within ``timeout`` seconds; waking ``cancel`` gives up at once."""
        where = f"{host}:{port}"
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise ConnectError(f"cannot connect to the leader at {where}: {_why(e)}") from None
        why = "no address"
        for family, kind, proto, _, addr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                why = _connect(sock, addr, timeout, cancel)
            except BaseException:
                sock.close()
                raise
            if not why:
                _nodelay(sock)
                return self._client(sock, host, where, timeout, cancel)
            sock.close()
        if why == "connection refused":
            why += " (is the leader running?)"
        raise ConnectError(f"cannot connect to the leader at {where}: {why}")

    def _client(
        self, sock: socket.socket, host: str, where: str, timeout: float, cancel: Waker | None
    ) -> Conn:
        ctx = self.client_tls
        if ctx is None:
            return Conn(sock, where, client=True)
        name = self.server_name or host.strip("[]")
        try:
            tls = ctx.wrap_socket(sock, server_hostname=name, do_handshake_on_connect=False)
            _handshake(tls, time.monotonic() + timeout, where, server=False, cancel=cancel)
        except BaseException:
            sock.close()
            raise
        return Conn(tls, where, client=True)


def _handshake(
    tls: ssl.SSLSocket, deadline: float, peer: str, server: bool, cancel: Waker | None = None
) -> None:
    """The TLS handshake with a deadline for the whole of it (a client that
    trickles it byte by byte gains nothing); waking ``cancel`` gives up."""
    tls.setblocking(False)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            events = selectors.EVENT_READ
        except ssl.SSLWantWriteError:
            events = selectors.EVENT_WRITE
        except ssl.SSLError as e:
            raise _handshake_error(e, peer, server) from None
        except OSError as e:
            raise ConnectionLostError(f"TLS handshake with {peer} failed: {_why(e)}") from None
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimedOutError(f"TLS handshake with {peer} took more than its deadline")
        with selectors.DefaultSelector() as sel:
            sel.register(tls, events)
            if cancel is not None:
                sel.register(cancel, selectors.EVENT_READ)
            ready = {key.fileobj for key, _ in sel.select(left)}
        if cancel is not None and cancel in ready:
            raise ConnectError("connecting was cancelled: the node is stopping")
    tls.setblocking(True)


def _handshake_error(e: ssl.SSLError, peer: str, server: bool) -> Exception:
    why = _tls_why(e)
    if isinstance(e, ssl.SSLEOFError) or "EOF" in str(e.reason or ""):
        return ConnectionLostError(f"{peer} closed the connection during the TLS handshake")
    if server:
        return AuthError(f"TLS handshake failed: {why}")
    if isinstance(e, ssl.SSLCertVerificationError):
        return AuthError(
            f"the leader at {peer} has a certificate this follower refuses: {why}"
            " (check --tls-ca, and --tls-server-name against the names in its certificate)"
        )
    if e.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
        return AuthError(
            f"the leader at {peer} does not speak TLS ({why}): is it started without --tls-cert?"
        )
    return AuthError(f"TLS handshake with the leader at {peer} failed: {why}")


def _connect(sock: socket.socket, addr: Any, timeout: float, cancel: Waker | None) -> str:
    """Connect ``sock`` without blocking past ``timeout`` or a wake-up of
    ``cancel``; returns "" or why it failed."""
    sock.setblocking(False)
    err = sock.connect_ex(addr)
    if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
        return os.strerror(err).lower()
    if err:
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_WRITE)
            if cancel is not None:
                sel.register(cancel, selectors.EVENT_READ)
            ready = {key.fileobj for key, _ in sel.select(timeout)}
        if cancel is not None and cancel in ready:
            raise ConnectError("connecting was cancelled: the node is stopping")
        if sock not in ready:
            return f"timed out after {timeout:g} s"
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            return os.strerror(err).lower()
    sock.setblocking(True)
    return ""


TCP = TcpTransport()


def is_loopback(host: str) -> bool:
    """Is ``host`` reachable from this machine only (a name counts if every
    address it resolves to is)?"""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


class _MemoryListener(Listener):
    def __init__(self, network: MemoryNetwork, host: str, port: int) -> None:
        self._network = network
        self._queue: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        self._signal = Waker()
        self.host = host
        self.port = port
        self.closed = False

    def fileno(self) -> int:
        return self._signal.fileno()

    def offer(self, sock: socket.socket) -> None:
        self._queue.put(sock)
        self._signal.wake()

    def accept(self, waker: Waker) -> Conn | None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._signal, selectors.EVENT_READ)
            sel.register(waker, selectors.EVENT_READ)
            while True:
                with contextlib.suppress(queue.Empty):
                    return Conn(self._queue.get_nowait(), f"memory:{self.port}")
                ready = {key.fileobj for key, _ in sel.select()}
                if waker in ready:
                    waker.drain()
                    return None
                self._signal.drain()

    def close(self) -> None:
        self.closed = True
        self._network.forget(self.port)
        self._signal.close()


class MemoryNetwork:
    """Connections between threads of one process over socket pairs: the
    same code paths as TCP, without a network stack or ports (for tests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: dict[int, _MemoryListener] = {}
        self._ports: Iterator[int] = itertools.count(1)

    def listen(self, host: str, port: int) -> Listener:
        with self._lock:
            if port == 0:
                port = next(p for p in self._ports if p not in self._listeners)
            if port in self._listeners:
                raise AddressInUseError(f"cannot listen on memory port {port}: in use")
            lst = self._listeners[port] = _MemoryListener(self, host, port)
        return lst

    tls = False

    def secure(self, conn: Conn, timeout: float) -> Conn:
        return conn

    def forget(self, port: int) -> None:
        with self._lock:
            self._listeners.pop(port, None)

    def connect(self, host: str, port: int, timeout: float, cancel: Waker | None = None) -> Conn:
        with self._lock:
            lst = self._listeners.get(port)
        if lst is None:
            raise ConnectError(
                f"cannot connect to the leader at memory port {port}: connection refused"
                " (is the leader running?)"
            )
        a, b = socket.socketpair()
        lst.offer(b)
        return Conn(a, f"memory:{port}", client=True)


class Poller:
    """Waits until registered connections can be read (or written). A
    connection with bytes buffered above its socket counts as readable even
    though the selector cannot see them."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self.waker = Waker()
        self._sel.register(self.waker, selectors.EVENT_READ, None)
        self._conns: dict[Conn, Any] = {}

    def add(self, conn: Conn, data: Any, *, write: bool = False) -> None:
        conn.set_blocking(False)
        self._conns[conn] = data
        self._sel.register(conn, _events(write), data)

    def watch(self, conn: Conn, *, write: bool) -> None:
        """Change whether ``conn`` is waited on for writing too."""
        if conn in self._conns:
            self._sel.modify(conn, _events(write), self._conns[conn])

    def remove(self, conn: Conn) -> None:
        if conn in self._conns:
            del self._conns[conn]
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(conn)

    def data(self, conn: Conn) -> Any:
        return self._conns[conn]

    def __contains__(self, conn: Conn) -> bool:
        return conn in self._conns

    def conns(self) -> list[Conn]:
        return list(self._conns)

    def poll(self, timeout: float | None) -> list[tuple[Conn, Any, bool, bool]]:
        """(conn, data, readable, writable) for each ready connection; an
        empty list after a wake-up or the timeout."""
        buffered = [c for c in list(self._conns) if c.pending()]  # others may add
        ready = self._sel.select(0 if buffered else timeout)
        out: dict[Conn, tuple[Conn, Any, bool, bool]] = {}
        for key, ev in ready:
            if key.data is None and key.fileobj is self.waker:
                self.waker.drain()
                continue
            conn: Conn = key.fileobj  # type: ignore[assignment]
            out[conn] = (
                conn,
                key.data,
                bool(ev & selectors.EVENT_READ),
                bool(ev & selectors.EVENT_WRITE),
            )
        for c in buffered:
            data = self._conns.get(c)
            if c not in out and data is not None:
                out[c] = (c, data, True, False)
        return list(out.values())

    def wake(self) -> None:
        self.waker.wake()

    def close(self) -> None:
        self._sel.close()
        self.waker.close()


def _events(write: bool) -> int:
    return selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
