"""Certificates for tests, made by ``trustme``: a CA, a certificate for the
loopback addresses (a leader's, or a node's, for serving and as a client),
an expired one, a client certificate, a CA that signed none of them, and
two shared secrets."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import trustme

from hctserver.net.security import Security


class Pki:
    """Certificate files under ``d``."""

    def __init__(self, d: Path) -> None:
        d.mkdir()
        self.dir = d
        ca, other = trustme.CA(), trustme.CA()
        now = datetime.datetime.now(datetime.timezone.utc)
        self.ca = self._write("ca.pem", ca.cert_pem)
        self.other_ca = self._write("other-ca.pem", other.cert_pem)
        names = ("127.0.0.1", "::1", "localhost")
        self.leader = self._write(
            "leader.pem", ca.issue_cert(*names).private_key_and_cert_chain_pem
        )
        expired = ca.issue_cert(
            *names,
            not_before=now - datetime.timedelta(days=2),
            not_after=now - datetime.timedelta(days=1),
        )
        self.expired = self._write("expired.pem", expired.private_key_and_cert_chain_pem)
        self.client = self._write(
            "client.pem", ca.issue_cert("follower-1").private_key_and_cert_chain_pem
        )
        self.stranger = self._write(
            "stranger.pem", other.issue_cert("follower-2").private_key_and_cert_chain_pem
        )
        self.secret = self._secret("secret", b"the shared secret of this cluster")
        self.wrong = self._secret("wrong", b"not the shared secret of this cluster")

    def _write(self, name: str, blob: Any) -> str:
        path = self.dir / name
        blob.write_to_path(str(path))
        return str(path)

    def _secret(self, name: str, value: bytes) -> str:
        path = self.dir / name
        path.write_bytes(value + b"\n")
        path.chmod(0o600)
        return str(path)

    def leader_tls(self, **more: Any) -> Security:
        return Security(cert=self.leader, key=self.leader, **more)
