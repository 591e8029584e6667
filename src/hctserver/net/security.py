"""A node's TLS and shared-secret settings: files loaded and checked once,
at start, into ``ssl`` contexts and a secret (docs/SECURITY.md).

A leader uses ``cert``/``key`` (its certificate) and ``client_ca`` (mutual
TLS: every follower must show a certificate signed by it). A follower uses
``ca`` (verify the leader, with its host name: ``server_name``, or the
address it connects to) and ``cert``/``key`` (its client certificate).
``auth_file`` is the shared secret of :mod:`hctserver.protocol.auth`, on both sides.
"""

from __future__ import annotations

import os
import ssl
import stat
from dataclasses import dataclass, field

from ..errors import ConfigError

MIN_SECRET = 16  # bytes: an online guess must be hopeless
SYSTEM_CA = "system"  # --tls-ca system: the platform's trusted certificates


@dataclass(frozen=True)
class Security:
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    client_ca: str | None = None
    server_name: str | None = None
    auth_file: str | None = None
    prefix: str = field(default="--tls", repr=False)  # of the flags named in errors

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("--tls-cert and --tls-key go together: give both or neither")

    @property
    def enabled(self) -> bool:
        return any((self.cert, self.ca, self.client_ca, self.auth_file))

    def server_tls(self) -> ssl.SSLContext | None:
        """The leader's context; None without a certificate."""
        if self.cert is None:
            if self.client_ca is not None:
                raise ConfigError("--tls-client-ca needs the leader's own --tls-cert and --tls-key")
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _common(ctx)
        self._load_chain(ctx)
        if self.client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            _load_ca(ctx, self.client_ca, f"{self.prefix}-client-ca")
        return ctx

    def client_tls(self) -> ssl.SSLContext | None:
        """A follower's context; None without ``ca``."""
        if self.ca is None:
            if self.cert is not None:
                raise ConfigError(
                    "a follower's --tls-cert is its client certificate for mutual TLS:"
                    " give --tls-ca too, to verify the leader"
                )
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and name
        _common(ctx)
        if self.ca == SYSTEM_CA:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            _load_ca(ctx, self.ca, "--tls-ca")
        if self.cert is not None:
            self._load_chain(ctx)
        return ctx

    def _load_chain(self, ctx: ssl.SSLContext) -> None:
        assert self.cert is not None and self.key is not None
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                f"cannot load {self.prefix}-cert {self.cert} with {self.prefix}-key"
                f" {self.key}: {_why(e)}"
            ) from None

    def secret(self) -> bytes | None:
        """The shared secret, or None without ``auth_file``."""
        return None if self.auth_file is None else read_secret(self.auth_file, "--auth-file")


def describe(tls: str | None, secret: bool) -> str:
    """How a node and its peers authenticate each other, in words (for the
    log and ``/status``): ``tls`` names the kind of TLS, if any."""
    parts = [p for p in (tls, "a shared secret" if secret else None) if p]
    return " and ".join(parts) or "no TLS, no authentication"


def read_secret(path: str, flag: str) -> bytes:
    """A secret from a file that only its owner may read (as ssh and
    PostgreSQL insist), trailing white space removed."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read(1 << 16).rstrip()
    except OSError as e:
        raise ConfigError(f"cannot read {flag} {path}: {_why(e)}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{flag} {path} can be read by other users: make it private (chmod 600 {path})"
        )
    if len(data) < MIN_SECRET:
        raise ConfigError(
            f"{flag} {path} holds {len(data)} bytes; use at least {MIN_SECRET} random ones"
            f" (for example: openssl rand -hex 32 > {path})"
        )
    return data


def _common(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # a peer that closes without close_notify has just closed: the original's
    # protocol half-closes (a client sends its request and may shut its side),
    # and every message has its own length or end marker, so a cut is still seen
    ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)


def _load_ca(ctx: ssl.SSLContext, path: str, flag: str) -> None:
    try:
        ctx.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load {flag} {path}: {_why(e)}") from None


def _why(e: OSError | ssl.SSLError) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return str(e.reason).lower().replace("_", " ")
    return (e.strerror or str(e)).lower() if isinstance(e, OSError) else str(e)


@dataclass(frozen=True)
class HttpSecurity:
    """The HTTP endpoint's: TLS (``cert``/``key``) and a bearer token that
    ``/status`` and ``/metrics`` require (``/health`` stays open, for load
    balancers' probes)."""

    cert: str | None = None
    key: str | None = None
    token_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError(
                "--http-tls-cert and --http-tls-key go together: give both or neither"
            )

    def tls(self) -> ssl.SSLContext | None:
        if self.cert is None:
            return None
        ctx = Security(cert=self.cert, key=self.key, prefix="--http-tls").server_tls()
        assert ctx is not None
        return ctx

    def token(self) -> bytes | None:
        return (
            None if self.token_file is None else read_secret(self.token_file, "--http-token-file")
        )
