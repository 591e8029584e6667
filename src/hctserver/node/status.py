"""What a running node says about itself: the documents behind ``/status``
and ``/health`` (and, through :mod:`hctserver.node.metrics`, ``/metrics``).

Each is built on demand from the node's counters and one read transaction
on its file, so a leader's snapshot, max cid and journal totals come from
the same moment. docs/OPERATIONS.md describes every field.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Any

from .. import speedups
from ..version import VERSION
from .follower import Follower
from .leader import Leader
from .reporter import HeardFromLeader

HEALTH_MAX_LAG = 10.0  # seconds a streaming follower may lag and still be healthy


def _file(runner: Leader | Follower) -> dict[str, Any]:
    db = runner.db
    st = db.status()
    wal = db.path + "-wal"
    return {
        "database": db.path,
        "version": VERSION,
        "implementation": speedups.implementation(),
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - runner.started_at, 3),
        "position": {"cid": st["snapshot"], "hash": st["hash"]},
        "snapshot": st["snapshot"],
        "max_cid": st["max_cid"],
        "first_hole": st["first_hole"],
        "baseline": {"cid": st["baseline_cid"], "schemacid": st["baseline_schemacid"]},
        "journal": {"entries": st["journal_entries"], "bytes": st["journal_bytes"]},
        "wal_bytes": os.path.getsize(wal) if os.path.exists(wal) else 0,
    }


def leader_status(leader: Leader) -> dict[str, Any]:
    doc = {"role": "leader", **_file(leader)}
    now = time.monotonic()
    newest = doc["snapshot"]
    subs = leader.subscriptions()
    reporting = leader.followers.rows(newest, now)
    by_id: dict[int, list[dict[str, Any]]] = defaultdict(list)
    anonymous: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in subs:
        if s["follower"] and any(f["id"] == s["follower"] for f in reporting):
            by_id[s["follower"]].append(s)
        else:
            anonymous[s["peer"].rsplit(":", 1)[0]].append(s)
    followers = []
    for f in reporting:
        mine = by_id.get(f["id"], [])
        followers.append(
            {
                **f,
                "feedback": True,
                "streams": sorted(s["stream"] for s in mine),
                "queued_bytes": sum(s["queued_bytes"] for s in mine),
                "sent_bytes": sum(s["sent_bytes"] for s in mine),
            }
        )
    for host, mine in sorted(anonymous.items()):
        # no feedback (the original follower, or feedback off): grouped by host
        followers.append(
            {
                "id": None,
                "address": host,
                "name": "",
                "feedback": False,
                "streams": sorted(s["stream"] for s in mine),
                "queued_bytes": sum(s["queued_bytes"] for s in mine),
                "sent_bytes": sum(s["sent_bytes"] for s in mine),
                "applied_cid": None,
                "lag_cids": None,
                "lag_ms": None,
                "drops": None,
            }
        )
    counts = leader.subscriber_counts()
    doc.update(
        {
            "listen": f"{leader.host}:{leader.port}",
            "state": "draining" if leader.draining else "serving",
            "jobs": [j.name for j in leader.jobs],
            "streams": [
                {
                    "stream": k,
                    "kind": "job" if k < len(leader.jobs) else "other writers",
                    "subscribers": n,
                }
                for k, n in enumerate(counts)
            ],
            "commits": newest - leader.start_cid,
            "syncs_served": leader.syncs_served,
            "sent_bytes": leader.sent_bytes,
            "dropped_subscribers": leader.dropped,
            "refused": dict(leader.refused_by),
            "followers": followers,
            "snapshots": leader.snapshot_server.stats(),
            "retention": retention_status(leader),
            "sync_commit": leader.sync.status(),
            "archive": None if leader.archive is None else leader.archive.status(),
        }
    )
    return doc


def retention_status(leader: Leader) -> dict[str, Any]:
    r = leader.retainer
    p = r.policy
    return {
        "retain_cids": p.cids,
        "retain_bytes": p.bytes,
        "retain_seconds": p.seconds,
        "retain_max_bytes": p.max_bytes,
        "truncated_entries": r.truncated,
        "forced_cuts": r.forced,
        "pins": [{"cid": cid, "for": who} for cid, who in sorted(leader.pins.held())],
    }


_STATES = {
    "starting": "connecting",
    "sync": "catching up",
    "subscribe": "catching up",
    "stream": "streaming",
    "backoff": "backing off",
    "bootstrap": "bootstrapping",
    "done": "stopped",
}


def follower_lag(
    follower: Follower, view: HeardFromLeader | None = None
) -> tuple[str, int, float | None, str]:
    """(state, the leader's newest cid as far as known, lag in ms or None,
    its source) without touching the file: the leader's view while the
    feedback channel is fresh, else the follower's own (entries received
    and not yet applied). ``view``: the reporter's, if already read."""
    st = follower.stats
    snap = st.snapshot
    state = _STATES.get(st.phase, st.phase)
    view = follower.reporter.view if view is None else view
    newest = max(view.newest, st.received_cid, snap)
    fresh = view.heard_at is not None and time.monotonic() - view.heard_at < 2.0
    if fresh and view.lag_ms is not None:
        return state, newest, view.lag_ms, "leader"
    lag_ms = round(follower.local_lag() * 1000, 1) if state == "streaming" else None
    return state, newest, lag_ms, "local"


def follower_status(follower: Follower) -> dict[str, Any]:
    doc = {"role": "follower", **_file(follower)}
    st = follower.stats
    now = time.monotonic()
    snap = doc["snapshot"]
    view = follower.reporter.view  # read once: one moment for every field below
    state, newest, lag_ms, source = follower_lag(follower, view)
    done = max(0, snap - st.catchup_from)
    total = max(0, view.newest - st.catchup_from) if view.newest >= 0 else None
    elapsed = (st.catchup_seconds if st.catchup_seconds is not None else now - st.catchup_t0) or 0
    rate = done / elapsed if elapsed > 0 else 0.0
    remaining = None if total is None else max(0, total - done)
    doc.update(
        {
            "leader": f"{follower.host}:{follower.port}",
            "state": state,
            "catchup": {
                "from_cid": st.catchup_from,
                "done": done,
                "total": total,
                "remaining": remaining,
                "rate_per_s": round(rate, 1),
                "eta_s": (
                    round(remaining / rate, 1) if remaining is not None and rate > 0 else None
                ),
                "seconds": None if st.catchup_seconds is None else round(st.catchup_seconds, 3),
            },
            "received_cid": st.received_cid,
            "leader_cid": max(newest, snap),
            "lag_cids": max(0, newest - snap),
            "lag_ms": lag_ms,
            "lag_source": source,
            "applied_entries": max(0, snap - st.start_snapshot),
            "received_entries": st.sync_entries + st.sub_entries,
            "reconnects": st.reconnects,
            "resubscribes": st.resubscribes,
            "disk_full": st.disk_full,
            "bootstraps": follower.bootstraps,
            "feedback": {"active": view.follower_id > 0, "follower_id": view.follower_id or None},
        }
    )
    return doc


def node_status(runner: Leader | Follower) -> dict[str, Any]:
    """The ``/status`` document of a running leader or follower."""
    doc = leader_status(runner) if isinstance(runner, Leader) else follower_status(runner)
    doc["security"] = runner.protection()
    return doc


def health(runner: Leader | Follower, max_lag: float = HEALTH_MAX_LAG) -> tuple[bool, str]:
    """(healthy, why): a leader while it serves; a follower while it streams
    with a lag under ``max_lag`` seconds."""
    if runner.error is not None:
        return False, f"failed: {runner.error}"
    if isinstance(runner, Leader):
        if runner.draining:
            return False, "the leader is shutting down"
        return True, f"leader serving on {runner.host}:{runner.port}"
    state, _, lag, _ = follower_lag(runner)
    if state != "streaming":
        return False, f"follower is {state} (leader {runner.host}:{runner.port})"
    if lag is not None and lag > max_lag * 1000:
        return False, f"follower lags {lag / 1000:.1f} s (more than {max_lag:g} s)"
    return True, f"follower streaming at cid {runner.stats.snapshot}, lag {lag} ms"
