"""A small client of etcd's v3 JSON gateway (``/v3/...``), as Patroni uses.

Only what coordination needs: leases (grant, keep alive, revoke), keys
(put, get a prefix, delete) and one transaction, "create this key if it
does not exist" (a leader election). Keys and values are text; the gateway
wants them base64-encoded, and int64 fields as strings.

Over ``https://`` it verifies etcd's certificate (``ca``, or the system's
trusted certificates) and can show a client certificate (``cert``/``key``,
for etcd's ``--client-cert-auth``). With ``user`` and a password it
authenticates (``/v3/auth/authenticate``) and sends the token with every
call; a token etcd no longer knows (it expired, or etcd restarted) is
replaced once and the call retried.

Every call has a deadline. An etcd that cannot be reached, answers an
error or garbage raises :class:`EtcdError` (transient: a node retries).
A certificate, a TLS setting or credentials that etcd and this client do
not agree on raise :class:`EtcdAuthError`, an :class:`EtcdError` and an
:class:`~hctserver.errors.AuthError` (docs/SECURITY.md).
:class:`Lease` works with any :class:`~hctserver.cluster.coordination.Coordination`.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Any

from ..errors import AuthError, ConfigError
from ..net.security import SYSTEM_CA, read_secret
from .coordination import Coordination, CoordinationError, KeyValue

__all__ = ["EtcdAuthError", "EtcdClient", "EtcdError", "KeyValue", "Lease", "prefix_end"]

MAX_REPLY = 16 << 20  # bytes read from one reply at most

# etcd's answers (gRPC status text) that concern authentication
_TOKEN_GONE = ("invalid auth token", "revision of auth store is old")
_NO_USER = "user name is empty"
_BAD_LOGIN = "authentication failed"
_AUTH_OFF = "authentication is not enabled"
_DENIED = "permission denied"


class EtcdError(CoordinationError):
    """etcd could not be reached, or refused or garbled a request."""


class EtcdAuthError(EtcdError, AuthError):
    """etcd and this client disagree about TLS or authentication: a
    certificate refused on either side, TLS on one side only, credentials
    wrong or missing, or a user without the permission. Retrying will not
    cure it (the configuration must change), but it is an
    :class:`EtcdError` too, so a running node treats it as etcd being away
    (it fences and retries); a command checks at start
    (:meth:`EtcdClient.check`) and stops (``AuthError``: exit 11)."""


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _text(b: str) -> str:
    return base64.b64decode(b).decode()


def prefix_end(prefix: str) -> str:
    """The end of the key range that holds every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return "\x00"
    raw[-1] += 1
    return raw.decode("utf-8", "surrogateescape")


class _Refused(EtcdError):
    """etcd answered with an error document; ``error`` is its text."""

    def __init__(self, message: str, error: str) -> None:
        super().__init__(message)
        self.error = error


class _TLSConnection(http.client.HTTPSConnection):
    # checks the certificate against server_name, which may differ from the
    # address connected to (etcd reached by IP, its certificate naming a host)
    def __init__(
        self, host: str, port: int, timeout: float, context: ssl.SSLContext, server_name: str
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._tls = context
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self._server_name)


def _why(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError) and e.verify_message:
        return f"certificate verify failed: {str(e.verify_message).rstrip('.')}"
    if isinstance(e, ssl.SSLError) and e.reason:
        return str(e.reason).lower().replace("_", " ")
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return str(e) or type(e).__name__


def _tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    if (cert is None) != (key is None):
        raise ConfigError("--etcd-cert and --etcd-key go together: give both or neither")
    try:
        ctx = ssl.create_default_context(cafile=None if ca in (None, SYSTEM_CA) else ca)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load --etcd-ca {ca}: {_why(e)}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(
                f"cannot load --etcd-cert {cert} with --etcd-key {key}: {_why(e)}"
            ) from None
    return ctx


def _speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether a TLS handshake gets a TLS answer there (certificates unchecked:
    only to explain a refusal)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout) as s, ctx.wrap_socket(s):
            return True
    except ssl.SSLError as e:
        return "ALERT" in str(e.reason)  # it refused us in TLS: it speaks it
    except OSError:
        return False


class EtcdClient:
    """One etcd endpoint (``http://host:port`` or ``https://host:port``);
    thread-safe. Implements :class:`~hctserver.cluster.coordination.Coordination`.

    ``timeout``: seconds for each call, authenticating anew included.
    Over https: ``ca``, the CA file that signed etcd's certificate (None or
    ``"system"``: the platform's trusted certificates); ``cert`` and ``key``,
    a client certificate for etcd's ``--client-cert-auth``; ``server_name``,
    the name etcd's certificate must hold (default: the URL's host).
    ``user`` with ``password``, or ``password_file`` (private, at least 16
    bytes: :func:`~hctserver.net.security.read_secret`): etcd's authentication.
    Files are read here: a wrong one raises :class:`ConfigError` at once."""

    def __init__(
        self,
        url: str,
        timeout: float = 2.0,
        *,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        server_name: str | None = None,
        user: str | None = None,
        password: str | None = None,
        password_file: str | None = None,
    ) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError(
                f"etcd URL must look like http://HOST:PORT or https://HOST:PORT, not {url!r}"
            )
        if u.username is not None or u.password is not None:
            raise ConfigError(
                "no user or password in the etcd URL: give --etcd-user and --etcd-password-file"
            )
        try:
            port = u.port
        except ValueError:
            raise ConfigError(f"etcd URL {url!r} has a bad port") from None
        self.url = f"{u.scheme}://{u.netloc}"
        self.timeout = timeout
        self._host = u.hostname
        self._port = port or (443 if u.scheme == "https" else 80)
        self._server_name = server_name or u.hostname
        self._tls: ssl.SSLContext | None = None
        if u.scheme == "https":
            self._tls = _tls_context(ca, cert, key)
        elif any(x is not None for x in (ca, cert, key, server_name)):
            raise ConfigError(
                f"--etcd-ca, --etcd-cert and --etcd-key are for TLS: give etcd's https:// URL,"
                f" not {self.url}"
            )
        self._has_cert = cert is not None
        if password is not None and password_file is not None:
            raise ConfigError("give etcd's password or the file that holds it, not both")
        if password_file is not None:
            try:
                password = read_secret(password_file, "--etcd-password-file").decode()
            except UnicodeDecodeError:
                raise ConfigError(
                    f"--etcd-password-file {password_file} is not UTF-8 text"
                ) from None
        if not user and password is not None:
            raise ConfigError("an etcd password needs its user: give --etcd-user too")
        if user and password is None:
            raise ConfigError(f"etcd user {user!r} needs a password: give --etcd-password-file")
        self.user = user or None
        self._password = password
        self._token: str | None = None
        self._auth_off = False  # etcd said authentication is not enabled
        self._auth_lock = threading.Lock()

    def __repr__(self) -> str:  # never the password or the token
        user = f" user={self.user!r}" if self.user else ""
        return f"EtcdClient({self.url!r}{user})"

    def check(self, key: str = "/hctserver/") -> None:
        """Read ``key`` now: proves that TLS, the credentials and the user's
        permission work, for a command to stop at start on a wrong setting
        (:class:`EtcdAuthError`) rather than retry it as a node does."""
        self.get(key)

    def call(self, path: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        """POST ``body`` to ``/v3{path}``; the decoded reply."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        for retry in (False, True):
            token = self._current_token(deadline)
            try:
                return self._post(path, body, deadline, token)
            except _Refused as e:
                # a token etcd forgot (expired, etcd restarted, auth store
                # changed), or auth enabled since (no token: etcd says no user,
                # or over TLS denies the call): authenticate again, once; etcd
                # refused before doing anything, so it is safe
                gone = any(s in e.error for s in _TOKEN_GONE) or (
                    token is None and (_NO_USER in e.error or _DENIED in e.error)
                )
                if retry or not gone or self.user is None:
                    raise self._explain(path, e) from None
                with self._auth_lock:
                    if self._token == token:
                        self._token = None
                    self._auth_off = False
        raise AssertionError("unreachable")

    def _current_token(self, deadline: float) -> str | None:
        if self.user is None:
            return None
        with self._auth_lock:
            if self._token is None and not self._auth_off:
                self._token = self._authenticate(deadline)
            return self._token

    def _authenticate(self, deadline: float) -> str | None:
        body = {"name": self.user, "password": self._password}
        try:
            doc = self._post("/auth/authenticate", body, deadline, None)
        except _Refused as e:
            if _AUTH_OFF in e.error:
                self._auth_off = True  # calls need no token until etcd says otherwise
                return None
            if _BAD_LOGIN in e.error:
                raise EtcdAuthError(
                    f"etcd at {self.url} refused user {self.user!r}: wrong password or no such"
                    " user (check --etcd-user and --etcd-password-file)"
                ) from None
            raise self._explain("/auth/authenticate", e) from None
        token = doc.get("token")
        if not isinstance(token, str) or not token:
            raise EtcdError(f"etcd at {self.url} sent no token for user {self.user!r}")
        return token

    def _explain(self, path: str, e: _Refused) -> EtcdError:
        if _NO_USER in e.error and self.user is None:
            return EtcdAuthError(
                f"etcd at {self.url} requires authentication: give --etcd-user and"
                " --etcd-password-file"
            )
        if _DENIED in e.error and self.user is None:
            # over TLS, etcd's gateway forwards a call without a token under
            # its own certificate's name: denied, not "no user"
            return EtcdAuthError(
                f"etcd at {self.url} denied {path}: it requires authentication: give --etcd-user"
                " and --etcd-password-file"
            )
        if _DENIED in e.error:
            return EtcdAuthError(
                f"etcd at {self.url} denied {path} to user {self.user!r}: grant it read and"
                " write on /hctserver/ (or give a user with the root role)"
            )
        return e

    def _post(
        self, path: str, body: dict[str, Any], deadline: float, token: str | None
    ) -> dict[str, Any]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise EtcdError(f"cannot reach etcd at {self.url}: timed out")
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = token
        conn = (
            http.client.HTTPConnection(self._host, self._port, timeout=left)
            if self._tls is None
            else _TLSConnection(self._host, self._port, left, self._tls, self._server_name)
        )
        try:
            conn.request("POST", f"/v3{path}", body=json.dumps(body).encode(), headers=headers)
            reply = conn.getresponse()
            raw = reply.read(MAX_REPLY + 1)
            status = reply.status
        except ssl.SSLError as e:
            raise self._tls_error(e) from None
        except (http.client.RemoteDisconnected, ConnectionResetError):
            # a TLS server drops a plain request: with a close or, as often, a reset
            if self._tls is None and _speaks_tls(self._host, self._port, min(1.0, left)):
                raise EtcdAuthError(
                    f"etcd at {self.url} speaks TLS: give its https:// URL (and --etcd-ca;"
                    " --etcd-cert and --etcd-key if it requires client certificates)"
                ) from None
            raise EtcdError(f"etcd at {self.url} closed the connection without a reply") from None
        except (OSError, http.client.HTTPException) as e:
            raise EtcdError(f"cannot reach etcd at {self.url}: {_why(e)}") from None
        finally:
            conn.close()
        if len(raw) > MAX_REPLY:
            raise EtcdError(f"etcd at {self.url} sent a reply over {MAX_REPLY} bytes to {path}")
        try:
            doc = json.loads(raw.splitlines()[0] if raw else b"{}")
        except (ValueError, IndexError):
            doc = None
        if isinstance(doc, dict) and "error" in doc:
            err = doc["error"]  # text, or an object in a streamed reply
            text = str(err.get("message", err) if isinstance(err, dict) else err)
            raise _Refused(f"etcd at {self.url} refused {path}: {text} (HTTP {status})", text)
        if status != 200:
            detail = raw[:4096].decode("utf-8", "replace").strip()
            raise EtcdError(f"etcd at {self.url} refused {path}: HTTP {status} {detail}")
        if not isinstance(doc, dict):
            raise EtcdError(f"etcd at {self.url} sent garbage to {path}: {raw[:80]!r}")
        return doc

    def _tls_error(self, e: ssl.SSLError) -> EtcdError:
        why = _why(e)
        if isinstance(e, ssl.SSLCertVerificationError):
            hint = (
                "give a URL with a name it holds"
                if "mismatch" in why.lower()
                else "give --etcd-ca the CA that signed it"
            )
            return EtcdAuthError(
                f"etcd at {self.url} has a certificate this client refuses ({why}): {hint}"
            )
        reason = str(e.reason)
        if "ALERT" in reason and any(w in reason for w in ("CERTIFICATE", "UNKNOWN_CA")):
            if not self._has_cert:
                return EtcdAuthError(
                    f"etcd at {self.url} refused the TLS connection ({why}): it requires a"
                    " client certificate: give --etcd-cert and --etcd-key"
                )
            return EtcdAuthError(
                f"etcd at {self.url} refused this client certificate ({why}): it must be"
                " valid and signed by a CA in etcd's --trusted-ca-file"
            )
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "RECORD_LAYER_FAILURE"):
            return EtcdAuthError(
                f"etcd at {self.url} does not speak TLS ({why}): give its http:// URL, or"
                " start it with --cert-file and --key-file"
            )
        return EtcdError(f"TLS with etcd at {self.url} failed: {why}")

    # --- leases ---------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id."""
        doc = self.call("/lease/grant", {"TTL": ttl})
        return int(doc["ID"])

    def keepalive(self, lease: int) -> int:
        """Renew a lease; its TTL now, 0 if it has expired (or never was)."""
        doc = self.call("/lease/keepalive", {"ID": str(lease)})
        return int(doc.get("result", {}).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        """End a lease now (its keys go with it); no error if it is gone."""
        try:
            self.call("/lease/revoke", {"ID": str(lease)})
        except EtcdError as e:
            if "not found" not in str(e):
                raise

    # --- keys -------------------------------------------------------------------

    def put(self, key: str, value: str, lease: int = 0) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        self.call("/kv/put", body)

    def get(self, key: str) -> KeyValue | None:
        kvs = self._range({"key": _b64(key)})
        return kvs[0] if kvs else None

    def get_prefix(self, prefix: str) -> list[KeyValue]:
        return self._range({"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})

    def _range(self, body: dict[str, Any]) -> list[KeyValue]:
        doc = self.call("/kv/range", body)
        return [
            KeyValue(
                _text(kv["key"]),
                _text(kv.get("value", "")),
                int(kv.get("lease", 0)),
                int(kv.get("mod_revision", 0)),
            )
            for kv in doc.get("kvs", [])
        ]

    def delete(self, key: str) -> None:
        self.call("/kv/deleterange", {"key": _b64(key)})

    def create(self, key: str, value: str, lease: int = 0) -> KeyValue | None:
        """Put ``key`` only if it does not exist (an election). None if it was
        created; else what holds it."""
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        doc = self.call(
            "/kv/txn",
            {
                "compare": [{"key": _b64(key), "target": "CREATE", "create_revision": "0"}],
                "success": [{"request_put": put}],
                "failure": [{"request_range": {"key": _b64(key)}}],
            },
        )
        if doc.get("succeeded"):
            return None
        for r in doc.get("responses", []):
            kvs = r.get("response_range", {}).get("kvs", [])
            if kvs:
                kv = kvs[0]
                return KeyValue(
                    _text(kv["key"]),
                    _text(kv.get("value", "")),
                    int(kv.get("lease", 0)),
                    int(kv.get("mod_revision", 0)),
                )
        return self.get(key) or KeyValue(key, "", 0, 0)  # gone meanwhile: say who held it


class Lease:
    """A lease kept alive by its owner, with the time until which it is
    certainly valid in etcd: a renewal sent at ``t`` that etcd answered with
    TTL ``n`` makes the lease live until at least ``t + n`` (etcd restarted
    its countdown after ``t``). A leader stops writing before that time
    passes (docs/FAILOVER.md, "Fencing")."""

    def __init__(self, client: Coordination, ttl: int) -> None:
        self.client = client
        self.ttl = ttl
        t = time.monotonic()
        self.id = client.grant(ttl)
        self.valid_until = t + ttl

    def renew(self) -> bool:
        """Keep it alive; False if etcd says it has expired (EtcdError if etcd
        cannot be reached: it is then valid until :attr:`valid_until`)."""
        t = time.monotonic()
        ttl = self.client.keepalive(self.id)
        if ttl <= 0:
            self.valid_until = min(self.valid_until, t)
            return False
        self.valid_until = max(self.valid_until, t + ttl)
        return True

    def remaining(self) -> float:
        return self.valid_until - time.monotonic()

    def revoke(self) -> None:
        self.valid_until = time.monotonic()
        self.client.revoke(self.id)
