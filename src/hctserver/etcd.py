"""A small client of etcd's v3 JSON gateway (``/v3/...``), as Patroni uses.

Only what coordination needs: leases (grant, keep alive, revoke), keys
(put, get a prefix, delete) and one transaction, "create this key if it
does not exist" (a leader election). Keys and values are text; the gateway
wants them base64-encoded, and int64 fields as strings.

Every call has a deadline. An etcd that cannot be reached, answers an
error or garbage raises :class:`EtcdError` (transient: a node retries).
:class:`Lease` works with any :class:`~hctserver.coordination.Coordination`.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .coordination import Coordination, CoordinationError, KeyValue
from .errors import ConfigError

__all__ = ["EtcdClient", "EtcdError", "KeyValue", "Lease", "prefix_end"]

MAX_REPLY = 16 << 20  # bytes read from one reply at most


class EtcdError(CoordinationError):
    """etcd could not be reached, or refused or garbled a request."""


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


class EtcdClient:
    """One etcd endpoint (``http://host:port``); thread-safe (no state but
    the URL). Implements :class:`~hctserver.coordination.Coordination`."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ConfigError(f"etcd URL must look like http://HOST:PORT, not {url!r}")
        self.url = f"{u.scheme}://{u.netloc}"
        self.timeout = timeout

    def call(self, path: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        """POST ``body`` to ``/v3{path}``; the decoded reply."""
        req = urllib.request.Request(
            f"{self.url}/v3{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        t = self.timeout if timeout is None else timeout
        try:
            with urllib.request.urlopen(req, timeout=t) as r:
                raw = r.read(MAX_REPLY + 1)
        except urllib.error.HTTPError as e:
            detail = e.read(4096).decode("utf-8", "replace").strip()
            raise EtcdError(f"etcd at {self.url} refused {path}: HTTP {e.code} {detail}") from None
        except (OSError, urllib.error.URLError) as e:
            reason = getattr(e, "reason", e)
            raise EtcdError(f"cannot reach etcd at {self.url}: {reason}") from None
        if len(raw) > MAX_REPLY:
            raise EtcdError(f"etcd at {self.url} sent a reply over {MAX_REPLY} bytes to {path}")
        try:
            doc = json.loads(raw.splitlines()[0] if raw else b"{}")
        except (ValueError, IndexError):
            raise EtcdError(f"etcd at {self.url} sent garbage to {path}: {raw[:80]!r}") from None
        if not isinstance(doc, dict):
            raise EtcdError(f"etcd at {self.url} sent garbage to {path}: {raw[:80]!r}")
        if "error" in doc:
            raise EtcdError(f"etcd at {self.url}: {path}: {doc['error']}")
        return doc

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
