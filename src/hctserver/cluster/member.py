"""A cluster of equal nodes coordinated by etcd (docs/FAILOVER.md).

Every node runs the same :class:`ClusterNode`. Exactly one holds the leader
key (``/hctserver/CLUSTER/leader``, on a lease of ``ttl`` seconds) and runs
a :class:`~hctserver.node.leader.Leader` with the jobs; the others run a
:class:`~hctserver.node.follower.Follower` of whoever holds it, and re-point it
when it changes. Each node also keeps a member record
(``/hctserver/CLUSTER/members/NAME``, on a lease of its own) with its
address, role and applied cid.

When the leader key is gone (its lease expired: the leader died, or lost
etcd), the followers stop, and the most advanced one (highest applied cid;
ties to the smallest name) takes the key and leads. The key records where
its history starts (the cid and version hash it took over at), so that a
former leader coming back with commits the new leader never got writes
those to a side file, says how many in its log, and bootstraps.

Fencing: the leader renews its lease every ``ttl/3`` seconds and stops
taking writes (the database leaves LEADER mode) once less than ``ttl/4``
seconds of certain validity are left (:class:`~hctserver.cluster.etcd.Lease`): a
renewal sent at ``t`` keeps the lease alive in etcd until at least
``t + ttl``, so the old leader has stopped before etcd can let anyone else
take the key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from ..journal.database import Database
from ..journal.store import Mode
from ..net.httpserver import HttpEndpoint
from ..net.tasks import TaskGroup
from ..node.assemble import follower_role, leader_role, role_health, serve_http, streaming_lag
from ..node.config import NodeConfig
from ..node.follower import Follower
from ..node.jobs import Job
from ..node.leader import Leader
from ..node.status import node_status
from .coordination import Coordination, CoordinationError, KeyValue
from .etcd import EtcdClient, Lease

log = logging.getLogger("hctserver")

__all__ = ["ClusterNode", "cluster_status"]


def _prefix(cluster: str) -> str:
    return f"/hctserver/{cluster}/"


class ClusterNode:
    """See the module's docstring. ``config`` (role ``node``) gives both
    roles' options, its ``cluster`` section the place in the cluster."""

    def __init__(self, db: Database, etcd: Coordination, config: NodeConfig) -> None:
        c = config.cluster
        name = c.name or ""
        if not name or "/" in name:
            raise ConfigError(f"a node's name must be non-empty, without '/': {name!r}")
        if not 0 < config.port <= 65535:
            raise ConfigError(f"a cluster node needs a fixed port (1-65535), not {config.port}")
        if c.ttl < 2:
            raise ConfigError(f"the lease TTL must be at least 2 s, not {c.ttl}")
        self.db = db
        self.etcd = etcd
        self.config = dataclasses.replace(
            config, follower=dataclasses.replace(config.follower, once=False, reseed=True)
        )
        self.name = name
        self.host = config.host
        self.port = config.port
        self.address = c.advertise or f"{config.host}:{config.port}"
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ConfigError(f"--advertise takes HOST:PORT, not {self.address!r}")
        self.cluster = c.cluster
        self.ttl = c.ttl
        self.jobs = [Job(j) for j in config.jobs]
        if isinstance(etcd, EtcdClient):  # a call that hangs must not delay fencing
            etcd.timeout = min(etcd.timeout, max(0.5, c.ttl / 4))
        self.role = "starting"
        self.upstream: str | None = None  # the leader this node follows
        self.runner: Leader | Follower | None = None
        self.discarded: list[tuple[str, int]] = []  # side files written, entries in each
        self.group = TaskGroup("node")
        self._stop = self.group.stopping
        self._member: Lease | None = None
        self._lease: Lease | None = None  # the leader lease, while leading
        self._etcd_down_since: float | None = None
        self._candidate_since = 0.0
        self._http: HttpEndpoint | None = None

    @property
    def leader_key(self) -> str:
        return _prefix(self.cluster) + "leader"

    @property
    def member_key(self) -> str:
        return _prefix(self.cluster) + "members/" + self.name

    # --- life cycle -------------------------------------------------------------

    def start(self) -> None:
        """Run the node (and its HTTP endpoint, if configured) in its task group."""
        http = self.config.http
        if http.address is not None:  # first: a leader tells followers its client URL
            try:
                self._http = serve_http(
                    self.group,
                    http,
                    self.http_status,
                    lambda: role_health(self.runner, http, self.role),
                    lambda: streaming_lag(self.runner),
                    self.db,
                )
            except BaseException:
                self.close()
                raise
        self.group.spawn("hct-cluster", self._run, ends_group=True)

    @property
    def http_url(self) -> str | None:
        return None if self._http is None else self._http.url

    @property
    def error(self) -> BaseException | None:
        return self.group.error

    def stop(self) -> None:
        self.group.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the node to stop; raises its first error. False if
        ``timeout`` passed first."""
        if not self.group.stopping.wait(timeout):
            return False
        self.group.raise_error()
        return True

    def __enter__(self) -> ClusterNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 30.0) -> None:
        """Stop, wait for every thread (the role first), close the endpoint."""
        self.group.join(timeout)
        if self._http is not None:
            self._http.close()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._tick()
                    if self._etcd_down_since is not None:
                        log.warning("etcd answers again")
                        self._etcd_down_since = None
                except CoordinationError as e:
                    if self._etcd_down_since is None:
                        self._etcd_down_since = time.monotonic()
                        log.warning("etcd unreachable (%s); retrying", e)
                    self._fence_if_due()
                self._stop.wait(self._period())
        finally:
            self._shutdown()

    def _period(self) -> float:
        return min(0.25, self.ttl / 6)

    def _shutdown(self) -> None:
        self._stop_runner()
        for lease in (self._lease, self._member):
            if lease is not None:
                try:
                    lease.revoke()
                except CoordinationError:
                    pass  # it expires by itself
        self._lease = self._member = None
        self.role = "stopped"

    # --- one round --------------------------------------------------------------

    def _tick(self) -> None:
        self._keep_member()
        if self.role == "leader":
            self._lead()
            return
        kv = self.etcd.get(self.leader_key)
        if kv is None:
            self._campaign()
            return
        info = _load(kv.value)
        if info.get("name") == self.name:
            return  # our own key from before a restart: it expires by itself
        self._follow(info)

    def _keep_member(self) -> None:
        m = self._member
        if m is not None and m.remaining() < self.ttl * 2 / 3 and not m.renew():
            m = None  # expired (etcd was away): a new one
        if m is None:
            m = self._member = Lease(self.etcd, self.ttl)
        record = {
            "name": self.name,
            "address": self.address,
            "role": self.role,
            "cid": self.db.snapshot(),
            "upstream": self.upstream,
        }
        self.etcd.put(self.member_key, json.dumps(record), m.id)

    def _lead(self) -> None:
        lease = self._lease
        assert lease is not None
        if lease.remaining() < self.ttl * 2 / 3 and not lease.renew():
            self._fence("etcd says the leader lease has expired")
            return
        runner = self.runner
        if runner is not None and runner.error is not None:
            raise runner.error

    def _fence_if_due(self) -> None:
        """etcd cannot be reached: stop taking writes before the lease can
        have expired there."""
        lease = self._lease
        if self.role == "leader" and lease is not None and lease.remaining() < self.ttl / 4:
            self._fence(f"no renewal of the leader lease for {self.ttl - lease.remaining():.1f} s")

    def _fence(self, why: str) -> None:
        self.db.set_mode(Mode.FOLLOWER)  # first: every write is refused from now on
        log.warning("stopped taking writes: %s; following whoever leads next", why)
        self._stop_runner()
        self._lease = None
        self.role = "follower"

    def _campaign(self) -> None:
        """No leader: the most advanced live member takes the key, once every
        other live member has stopped following (its position is final) or
        a TTL has passed."""
        if self.role != "candidate":
            self._stop_runner()  # our position is final while no one leads
            self.role = "candidate"
            self._candidate_since = time.monotonic()
            return  # publish it first; decide in a later round
        records = self.etcd.get_prefix(_prefix(self.cluster) + "members/")
        others = [m for m in map(_load, (kv.value for kv in records)) if m.get("name") != self.name]
        others = [m for m in others if m.get("role") != "leader"]  # the old leader's, expiring
        settled = all(m.get("role") == "candidate" for m in others)
        if not settled and time.monotonic() - self._candidate_since < self.ttl:
            return
        me = {"name": self.name, "cid": self.db.snapshot()}
        best = min([*others, me], key=lambda m: (-int(m.get("cid", -1)), str(m.get("name"))))
        if best.get("name") != self.name:
            return
        lease = Lease(self.etcd, self.ttl)
        pos = self.db.position()
        value = {
            "name": self.name,
            "address": self.address,
            "since_cid": pos.cid,
            "since_hash": pos.hash.hex(),
            "at": time.time(),
        }
        held = self.etcd.create(self.leader_key, json.dumps(value), lease.id)
        if held is not None:
            lease.revoke()
            return
        self._lease = lease
        self._become_leader()

    def _become_leader(self) -> None:
        self._stop_runner()
        lease, margin = self._lease, self.ttl / 4
        assert lease is not None
        leader = self.make_leader(lambda: lease.valid_until - margin)  # FAILOVER.md
        leader.start()
        self.runner = leader
        self.role = "leader"
        self.upstream = None
        log.info("leading cluster %s as %s at cid %d", self.cluster, self.name, self.db.snapshot())

    def make_leader(self, lease: Callable[[], float]) -> Leader:
        """The leader role, as every node builds it; ``lease``: the gate's deadline."""
        leader = leader_role(self.db, self.config, self.jobs, lease=lease)
        if self._http is not None and self._http.client_url is not None:
            leader.serve_clients_at(self._http.client_url)
        return leader

    def make_follower(self, host: str, port: int) -> Follower:
        """The follower role of ``host:port`` (it never runs the jobs)."""
        return follower_role(self.db, self.config, (), host=host, port=port, name=self.name)

    def _follow(self, info: dict[str, Any]) -> None:
        address = str(info.get("address", ""))
        runner = self.runner
        if isinstance(runner, Follower) and self.upstream == address:
            if runner.error is not None:
                log.warning("following %s failed (%s); starting again", address, runner.error)
                self._stop_runner()
            else:
                return
        self._stop_runner()
        self._rewind_if_ahead(info)
        host, _, port = address.rpartition(":")
        f = self.make_follower(host.strip("[]"), int(port))
        f.start()
        self.runner = f
        self.upstream = address
        self.role = "follower"
        log.info("following %s (%s) from cid %d", info.get("name"), address, self.db.snapshot())

    def _rewind_if_ahead(self, info: dict[str, Any]) -> None:
        """Commits past where the new leader's history starts were never
        replicated to it: keep them in a side file; the follower then
        bootstraps (its history differs)."""
        since = int(info.get("since_cid", -1))
        mine = self.db.snapshot()
        if since < 0 or mine <= since:
            return
        path = f"{self.db.path}.discarded-{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
        n = 0
        with open(path, "w") as out:
            for e in self.db.iter_entries(after=since):
                row = {"cid": e.cid, "schemacid": e.schemacid, "schema": e.schema}
                out.write(json.dumps({**row, "data": e.data.hex(), "hash": e.hash().hex()}) + "\n")
                n += 1
        self.discarded.append((path, n))
        log.warning(
            "this node has %d commits (cids %d to %d) that the new leader %s never got (its"
            " history starts at cid %d): they are in %s; bootstrapping from it",
            n,
            since + 1,
            mine,
            info.get("name"),
            since,
            path,
        )

    def _stop_runner(self) -> None:
        runner, self.runner = self.runner, None
        if runner is None:
            return
        if isinstance(runner, Leader):
            self.db.set_mode(Mode.FOLLOWER)  # first: no write gets in while it closes
        runner.stop()
        runner.close()
        self.upstream = None

    def http_status(self) -> dict[str, Any]:
        runner = self.runner
        doc: dict[str, Any] = node_status(runner) if runner is not None else {"role": self.role}
        doc["cluster"] = self.status()
        return doc

    def status(self) -> dict[str, Any]:
        lease = self._lease
        return {
            "cluster": self.cluster,
            "name": self.name,
            "role": self.role,
            "address": self.address,
            "upstream": self.upstream,
            "snapshot": self.db.snapshot(),
            "lease_s": None if lease is None else round(lease.remaining(), 3),
            "etcd": self.etcd.url,
            "etcd_reachable": self._etcd_down_since is None,
            "discarded": [{"file": p, "entries": n} for p, n in self.discarded],
        }


def _load(value: str) -> dict[str, Any]:
    try:
        doc = json.loads(value)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def cluster_status(etcd: Coordination, cluster: str = "default") -> list[dict[str, Any]]:
    """Every live member of ``cluster``, from etcd: its name, role, address,
    position (``snapshot``), lag behind the leader in cids, and health."""
    prefix = _prefix(cluster)
    leader_kv: KeyValue | None = etcd.get(prefix + "leader")
    leader = _load(leader_kv.value) if leader_kv is not None else {}
    members = [_load(kv.value) for kv in etcd.get_prefix(prefix + "members/")]
    top = max((int(m.get("cid", 0)) for m in members), default=0)
    out = []
    for m in sorted(members, key=lambda m: str(m.get("name"))):
        is_leader = m.get("name") == leader.get("name") and m.get("role") == "leader"
        cid = int(m.get("cid", 0))
        out.append(
            {
                "name": m.get("name"),
                "role": "leader" if is_leader else "follower",
                "state": m.get("role"),
                "address": m.get("address"),
                "snapshot": cid,
                "lag_cids": max(0, top - cid),
                "healthy": is_leader or m.get("upstream") is not None,
            }
        )
    return out
