"""A TCP proxy on 127.0.0.1 that a test can cut: a network partition.

While cut, nothing is forwarded either way and nothing is closed: bytes
sent are held back, new connections are accepted and left hanging, as a
peer behind a dead link looks. ``heal()`` closes what was held (a real
link coming back finds the old connections timed out) and forwards again.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Proxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._ls = socket.create_server(("127.0.0.1", 0))
        self._ls.settimeout(0.1)
        self.port = self._ls.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def cut(self) -> None:
        self._cut.set()

    def heal(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, set()
        for s in socks:
            s.close()
        self._cut.clear()

    def close(self) -> None:
        self._stop.set()
        self.heal()
        self._ls.close()
        for t in self._threads:
            t.join(5)

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._socks.update(socks)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self._ls.accept()
            except (TimeoutError, OSError):
                continue
            self._track(c)
            if self._cut.is_set():
                continue  # left hanging until heal()
            try:
                u = socket.create_connection(self.target, timeout=2)
            except OSError:
                c.close()
                continue
            self._track(u)
            t = threading.Thread(target=self._pump, args=(c, u), daemon=True)
            t.start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        try:
            while not self._stop.is_set():
                if self._cut.is_set():
                    self._stop.wait(0.05)  # hold everything back
                    continue
                r, _, _ = select.select([a, b], [], [], 0.05)
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    if not self._cut.is_set():  # cut while reading: dropped, as a dead link
                        peer[s].sendall(data)
        except OSError:
            return
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass


@contextmanager
def proxy(target_port: int) -> Iterator[Proxy]:
    p = Proxy(target_port)
    try:
        yield p
    finally:
        p.close()
