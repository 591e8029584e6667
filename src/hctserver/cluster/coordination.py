"""What a cluster node needs of a coordination service (etcd today).

:class:`Coordination` is the whole interface :mod:`hctserver.cluster.member` uses:
keys with values, leases that keep keys alive, and one atomic "create if
absent". :class:`hctserver.cluster.etcd.EtcdClient` implements it over etcd's v3
JSON gateway; a Consul (sessions, KV with ``acquire``) or ZooKeeper
(ephemeral nodes) client would implement the same few calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..errors import TransientError


class CoordinationError(TransientError):
    """The coordination service could not be reached, or refused or garbled
    a request (a node retries)."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str
    lease: int  # 0: none
    mod_revision: int


class Coordination(Protocol):
    url: str

    def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id."""
        ...

    def keepalive(self, lease: int) -> int:
        """Renew a lease; its TTL now, 0 if it has expired."""
        ...

    def revoke(self, lease: int) -> None: ...

    def get(self, key: str) -> KeyValue | None: ...

    def get_prefix(self, prefix: str) -> list[KeyValue]: ...

    def put(self, key: str, value: str, lease: int = 0) -> None: ...

    def create(self, key: str, value: str, lease: int = 0) -> KeyValue | None:
        """Put ``key`` only if it does not exist: None if created, else what
        holds it."""
        ...
