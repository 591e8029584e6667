"""The one path that builds a node's parts from its :class:`NodeConfig`.

``hctserver leader``, ``follower`` and ``node`` (and :class:`Node` and
:class:`ClusterNode` in the API) build their leader role, follower role
and HTTP endpoint here, so that every option reaches the role the same
way whichever command started it, and a cluster node switching roles
builds each one as a plain leader or follower would.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from ..journal import archive
from ..journal.database import Database
from ..net.httpserver import HttpEndpoint, Routes, parse_address
from ..net.tasks import TaskGroup
from .config import HttpOptions, NodeConfig
from .follower import Follower
from .jobs import Job
from .leader import Leader
from .metrics import Metrics
from .sqlservice import SqlService
from .status import follower_lag, health, node_status

Runner = Leader | Follower
log = logging.getLogger("hctserver")


def leader_role(
    db: Database,
    cfg: NodeConfig,
    jobs: Sequence[Job],
    *,
    lease: Callable[[], float] | None = None,
    **hooks: Any,
) -> Leader:
    """The leader role. ``hooks``: constructor keywords that are not
    configuration (a transport, poll intervals: tests and tools)."""
    given = {"host": cfg.host, "port": cfg.port, "seconds": cfg.seconds, "lease": lease}
    return Leader(db, jobs, **_common(cfg) | given | dataclasses.asdict(cfg.leader) | hooks)


def follower_role(
    db: Database,
    cfg: NodeConfig,
    jobs: Sequence[Job],
    *,
    host: str | None = None,
    port: int | None = None,
    **hooks: Any,
) -> Follower:
    """The follower role, of ``host:port`` (default: the configured ones)."""
    given = {
        "host": cfg.host if host is None else host,
        "port": cfg.port if port is None else port,
        "jobs": jobs,
        "seconds": cfg.seconds,
    }
    return Follower(db, **_common(cfg) | given | dataclasses.asdict(cfg.follower) | hooks)


def _common(cfg: NodeConfig) -> dict[str, Any]:
    """What both roles take from the shared sections (``hooks`` may override it)."""
    return {"security": cfg.security.security(), "retention": cfg.retention.policy()}


def seed_from_archive(path: str, url: str | None) -> int | None:
    """A new follower's file, restored from the archive ``url`` at its newest
    cid (the follower then catches up from there); None if ``url`` is None
    or the file exists (a follower that has a history keeps it)."""
    if url is None or os.path.exists(path):
        return None
    listing = archive.ls(url)
    if not listing.segments and not listing.snapshots:  # a new cluster's empty archive
        log.info("%s: the archive %s is empty; starting from the leader alone", path, url)
        return None
    r = archive.restore(url, path)
    log.info(
        "%s: bootstrapped from the archive %s at cid %d (%s and %d entries)",
        path, url, r.cid, r.anchor, r.entries,
    )  # fmt: skip
    return r.cid


def streaming_lag(runner: Runner | None) -> float | None:
    """A follower's lag in seconds while it streams (for the histogram)."""
    if not isinstance(runner, Follower):
        return None
    state, _, lag_ms, _ = follower_lag(runner)
    return lag_ms / 1000 if state == "streaming" and lag_ms is not None else None


def role_health(runner: Runner | None, http: HttpOptions, what: str) -> tuple[bool, str]:
    if runner is None:
        return False, f"{what}: neither leading nor following"
    return health(runner, http.health_max_lag)


def serve_http(
    group: TaskGroup,
    http: HttpOptions,
    status: Callable[[], dict[str, Any]],
    healthy: Callable[[], tuple[bool, str]],
    lag: Callable[[], float | None] | None,
    db: Database | None = None,
) -> HttpEndpoint:
    """``/status``, ``/metrics`` (the full registry) and ``/health`` on
    ``http.address``, with its TLS and token, in threads of ``group``
    (they stop with it); and SQL clients on ``db`` (``POST /v2/pipeline``)
    where ``http.sql`` allows. Close the endpoint after the group."""
    assert http.address is not None
    host, port = parse_address(http.address)
    metrics = Metrics(status, lag)
    sec = http.security()
    token = sec.token()
    sql = None
    if db is not None and http.serves_sql(host):
        sql = SqlService(db, token=token, ca=http.tls_ca)
    elif db is not None and http.sql == "auto":
        log.info("not serving SQL clients on %s: give it a token, or --http-sql on", host)
    routes = Routes(status, metrics.render, healthy, None if sql is None else sql.handle)
    ep = HttpEndpoint(host, port, routes, tls=sec.tls(), token=token, max_clients=64 if sql else 16)
    if sql is not None:
        ep.client_url = ep.url

    def stop() -> None:
        ep.stop()
        if sql is not None:
            sql.close()

    group.spawn("hct-http", ep.serve, on_stop=stop)
    if sql is not None:
        group.spawn("hct-sql-reaper", sql.run, group.stopping)
    if metrics.sampler is not None:
        group.spawn("hct-lag-sampler", metrics.sampler.run, group.stopping)
    return ep


def serve_runner_http(runner: Runner, http: HttpOptions) -> HttpEndpoint:
    """The endpoint of a plain leader or follower (in the runner's group)."""
    lag = (lambda: streaming_lag(runner)) if isinstance(runner, Follower) else None
    ep = serve_http(
        runner.group,
        http,
        lambda: node_status(runner),
        lambda: role_health(runner, http, "node"),
        lag,
        runner.db,
    )
    if isinstance(runner, Leader) and ep.client_url is not None:
        runner.serve_clients_at(ep.client_url)
    return ep
