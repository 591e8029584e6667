"""``/metrics``: a node's state in Prometheus's text format.

One collector reads the node's ``/status`` document at each scrape (so a
scrape costs the node one status read and nothing between scrapes); the
lag histogram is observed by :class:`LagSampler` a few times a second
while the endpoint runs. Every name starts with ``hctserver_`` and carries
its unit; docs/OPERATIONS.md lists them with their meaning.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
log = logging.getLogger("hctserver")

STATES = ("connecting", "catching up", "bootstrapping", "streaming", "backing off", "stopped")

Status = Callable[[], dict[str, Any]]


def _gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Metric:
    g = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    g.add_metric(list((labels or {}).values()), value)
    return g


def _counter(name: str, doc: str, value: float) -> Metric:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c


class NodeCollector(Collector):
    """Metrics from the status document of one node."""

    def __init__(self, status: Status) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        doc = self.status()
        if "cluster" in doc:
            yield from self._cluster(doc["cluster"], "version" not in doc)
        if "version" not in doc:
            return  # a cluster node between roles: nothing runs
        role = doc["role"]
        info = GaugeMetricFamily(
            "hctserver_info", "Always 1; the node's role and version", labels=["role", "version"]
        )
        info.add_metric([role, doc["version"]], 1)
        yield info
        yield _gauge(
            "hctserver_snapshot_cid",
            "Newest cid applied, with every cid before it",
            doc["snapshot"],
        )
        yield _gauge(
            "hctserver_max_cid", "Newest cid stored (above a hole on a follower)", doc["max_cid"]
        )
        yield _gauge("hctserver_journal_entries", "Rows in the journal", doc["journal"]["entries"])
        yield _gauge(
            "hctserver_journal_bytes",
            "Bytes of schema and data in the journal",
            doc["journal"]["bytes"],
        )
        yield _gauge("hctserver_wal_bytes", "Size of the database's WAL file", doc["wal_bytes"])
        yield _gauge("hctserver_uptime_seconds", "Seconds since the node started", doc["uptime_s"])
        if role == "leader":
            yield from self._leader(doc)
        else:
            yield from self._follower(doc)

    def _cluster(self, c: dict[str, Any], idle: bool) -> Iterator[Metric]:
        yield _gauge(
            "hctserver_cluster_leader",
            "1 while this node leads its cluster",
            int(c["role"] == "leader"),
        )
        yield _gauge("hctserver_etcd_reachable", "1 while etcd answers", int(c["etcd_reachable"]))
        if idle:
            yield _gauge(
                "hctserver_snapshot_cid",
                "Newest cid applied, with every cid before it",
                c["snapshot"],
            )

    def _leader(self, doc: dict[str, Any]) -> Iterator[Metric]:
        yield _counter("hctserver_commits", "Commits since the leader started", doc["commits"])
        yield _counter(
            "hctserver_sent_bytes",
            "Bytes sent to followers (streams and SYNC replies)",
            doc["sent_bytes"],
        )
        yield _counter("hctserver_syncs_served", "SYNC requests answered", doc["syncs_served"])
        archive = doc.get("archive")
        if archive is not None:
            yield _gauge(
                "hctserver_archive_lag_cids",
                "Commits not yet stored in the archive",
                archive["lag_cids"],
            )
            yield _gauge(
                "hctserver_archive_lag_seconds",
                "Age of the oldest commit not yet stored in the archive",
                archive["lag_s"],
            )
            yield _counter(
                "hctserver_archive_segments", "Segments stored by this leader", archive["segments"]
            )
        sync = doc["sync_commit"]
        yield _gauge(
            "hctserver_sync_commit_degraded",
            "1 while synchronous commit has fallen back to asynchronous (too few followers)",
            int(sync["state"] == "degraded"),
        )
        yield _counter(
            "hctserver_sync_commit_degradations",
            "Times synchronous commit fell back to asynchronous",
            sync["degradations"],
        )
        yield _gauge(
            "hctserver_sync_commit_acked_cid",
            "The newest cid the synchronous followers have acknowledged",
            sync["acked_cid"],
        )
        yield _counter(
            "hctserver_snapshots_sent", "Snapshots sent to followers", doc["snapshots"]["served"]
        )
        yield _counter(
            "hctserver_journal_truncated_entries",
            "Journal entries removed by retention",
            doc["retention"]["truncated_entries"],
        )
        yield _counter(
            "hctserver_journal_forced_cuts",
            "Retention cuts past what a connected follower needed (the hard cap)",
            doc["retention"]["forced_cuts"],
        )
        yield _counter(
            "hctserver_dropped_subscribers",
            "Subscribers dropped (too slow, stalled, gone)",
            doc["dropped_subscribers"],
        )
        refused = CounterMetricFamily(
            "hctserver_refused_requests", "Requests refused, by reason", labels=["reason"]
        )
        for reason, n in sorted(doc["refused"].items()):
            refused.add_metric([reason], n)
        yield refused
        subs = GaugeMetricFamily(
            "hctserver_subscribers", "Live subscribers, per stream", labels=["stream"]
        )
        for s in doc["streams"]:
            subs.add_metric([str(s["stream"])], s["subscribers"])
        yield subs
        reporting = [f for f in doc["followers"] if f["feedback"]]
        yield _gauge(
            "hctserver_followers_reporting", "Followers with a feedback channel", len(reporting)
        )
        labels = ["follower", "address", "name"]
        lag_c = GaugeMetricFamily(
            "hctserver_follower_lag_cids",
            "A follower's lag in cids (from its reports)",
            labels=labels,
        )
        lag_s = GaugeMetricFamily(
            "hctserver_follower_lag_seconds",
            "A follower's lag in seconds (from its reports)",
            labels=labels,
        )
        applied = GaugeMetricFamily(
            "hctserver_follower_applied_cid", "The cid a follower reports as applied", labels=labels
        )
        durable = GaugeMetricFamily(
            "hctserver_follower_durable_cid",
            "The cid a follower reports as applied and on disk",
            labels=labels,
        )
        queued = GaugeMetricFamily(
            "hctserver_follower_queued_bytes",
            "Bytes queued for a follower's streams",
            labels=labels,
        )
        for f in reporting:
            key = [str(f["id"]), f["address"], f["name"]]
            if f["lag_cids"] is not None:
                lag_c.add_metric(key, f["lag_cids"])
                applied.add_metric(key, f["applied_cid"])
                durable.add_metric(key, f["durable_cid"])
            if f["lag_ms"] is not None:
                lag_s.add_metric(key, f["lag_ms"] / 1000)
            queued.add_metric(key, f["queued_bytes"])
        yield from (lag_c, lag_s, applied, durable, queued)

    def _follower(self, doc: dict[str, Any]) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "hctserver_state", "1 for the follower's current state", labels=["state"]
        )
        for s in STATES:
            state.add_metric([s], 1 if doc["state"] == s else 0)
        yield state
        yield _counter(
            "hctserver_bootstraps", "Snapshots from the leader installed", doc["bootstraps"]
        )
        yield _counter(
            "hctserver_applied_entries",
            "Entries applied since the follower started",
            doc["applied_entries"],
        )
        yield _counter(
            "hctserver_received_entries",
            "Entries received (SYNC replies and streams)",
            doc["received_entries"],
        )
        yield _counter(
            "hctserver_reconnects",
            "Times the follower lost its leader and reconnected",
            doc["reconnects"],
        )
        yield _counter(
            "hctserver_resubscribes",
            "Streams subscribed to again after a drop",
            doc["resubscribes"],
        )
        yield _gauge(
            "hctserver_lag_cids",
            "Cids the leader has that this follower has not applied",
            doc["lag_cids"],
        )
        if doc["lag_ms"] is not None:
            yield _gauge(
                "hctserver_lag_seconds_now",
                "The follower's lag now, in seconds",
                doc["lag_ms"] / 1000,
            )
        remaining = doc["catchup"]["remaining"]
        yield _gauge(
            "hctserver_catchup_remaining_entries",
            "Entries left to catch up (0 once streaming; -1 if the leader did not say)",
            0 if doc["state"] == "streaming" else (-1 if remaining is None else remaining),
        )
        yield _gauge("hctserver_disk_full", "1 while the disk is full", int(doc["disk_full"]))


class LagSampler:
    """Observes a follower's lag into the histogram every ``interval``
    seconds. ``lag()`` is cheap (no file access); a failure is logged once
    and never stops the node."""

    def __init__(
        self, lag: Callable[[], float | None], histogram: Histogram, interval: float = 0.25
    ) -> None:
        self.lag = lag
        self.histogram = histogram
        self.interval = interval

    def run(self, stop: threading.Event) -> None:
        failed = False
        while not stop.wait(self.interval):
            try:
                seconds = self.lag()
            except Exception as e:
                if not failed:
                    log.warning("sampling the lag failed (%s); the histogram skips it", e)
                failed = True
                continue
            if seconds is not None:
                self.histogram.observe(seconds)


class Metrics:
    """A registry of its own per node (several nodes may share a process)."""

    def __init__(self, status: Status, lag: Callable[[], float | None] | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(status))
        self.sampler: LagSampler | None = None
        if lag is not None:
            hist = Histogram(
                "hctserver_lag_seconds",
                "The follower's lag, sampled four times a second while streaming",
                buckets=LAG_BUCKETS,
                registry=self.registry,
            )
            self.sampler = LagSampler(lag, hist)

    def render(self) -> bytes:
        return generate_latest(self.registry)
