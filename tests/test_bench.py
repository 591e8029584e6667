"""`hctserver bench --quick` runs and writes complete, consistent JSON (not timed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

KEYS = [
    "leader_plain_commits_per_s",
    "leader_journaled_commits_per_s",
    "leader_commit_ratio",
    "leader_followers_ratio",
    "catchup_entries_per_s",
    "catchup_mb_per_s",
    "catchup_limit_ratio",
    "catchup_peak_rss_mb",
    "lag_p50_ms",
    "lag_p99_ms",
    "lag_final_cids",
    "app_lag_p50_ms",
    "app_lag_p99_ms",
    "app_commits_per_s",
    "handshake_small_ms",
    "handshake_large_ms",
    "tls_catchup_ratio",
    "tls_leader_commit_ratio",
    "leader_jobs_4_ratio",
    "leader_journaled_pure_commits_per_s",
    "catchup_pure_entries_per_s",
    "leader_full_sync_jobs_8_ratio",
    "failover_seconds_p50",
    "failover_seconds_max",
]
# the pipeline section (issue 26): its own test, slow
PIPELINE_KEYS = ["sync_commit_ratio", "sync_commit_p99_ms", "async_commit_p99_ms", "fsync_p50_ms"]
FIGURES = ("commits_per_s", "p50_ms", "p99_ms")
PIPELINE_KEYS += [
    f"{m}_k{k}_w{w}_{f}" for m in ("sync", "async") for k in (1, 2) for w in (1, 4, 16, 64)
    for f in FIGURES
]  # fmt: skip
QUICK_SECTIONS = "leader,followers,failover,metrics,catchup,lag,clients"
KEYS += [f"catchup_entries_per_s_syncthreads_{n}" for n in (1, 2, 4, 8)]
KEYS += [f"{w}_write_{n}_{m}" for w in ("local", "forwarded") for n in (1, 16)
         for m in ("commits_per_s", "p50_ms", "p99_ms")]  # fmt: skip
KEYS += ["forwarded_write_extra_p50_ms"]
KEYS += [f"leader_jobs_{n}_commits_per_s" for n in (1, 2, 4, 8)]


def test_bench_quick_writes_sane_json(tmp_path) -> None:
    out = tmp_path / "bench.json"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "hctserver",
            "bench",
            "--quick",
            "--json",
            str(out),
            "--sections",
            QUICK_SECTIONS,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    for k in KEYS:
        assert isinstance(r[k], (int, float)) and not isinstance(r[k], bool), k
        assert r[k] >= 0, k
    assert r["quick"] is True and r["catchup_n"] == 30_000
    assert (
        r["leader_commit_ratio"]
        == r["leader_journaled_commits_per_s"] / r["leader_plain_commits_per_s"]
    )
    assert 0 < r["leader_commit_ratio"] < 3 and 0 < r["leader_followers_ratio"] < 3
    assert r["catchup_entries_per_s"] == max(
        r[f"catchup_entries_per_s_syncthreads_{n}"] for n in (1, 2, 4, 8)
    )
    assert r["leader_jobs_4_ratio"] == (
        r["leader_jobs_4_commits_per_s"] / r["leader_journaled_commits_per_s"]
    )
    assert r["failover_kills"] == 3 and 0 < r["failover_seconds_p50"] <= r["failover_seconds_max"]
    from hctserver import speedups

    assert r["implementation"] == speedups.implementation()  # which hot loops ran
    assert f"hot loops: {r['implementation']}" in p.stdout
    assert 0 < r["catchup_limit_ratio"] < 3
    assert 0 < r["tls_catchup_ratio"] < 3 and 0 < r["tls_leader_commit_ratio"] < 3
    assert r["tls_leader_commit_ratio"] == (
        r["leader_with_2_tls_followers_commits_per_s"] / r["leader_with_2_followers_commits_per_s"]
    )
    assert r["lag_p50_ms"] <= r["lag_p99_ms"]
    assert 0 < r["app_lag_p50_ms"] <= r["app_lag_p99_ms"]
    assert 10 < r["catchup_peak_rss_mb"] < 4096
    assert r["forwarded_write_extra_p50_ms"] == pytest.approx(
        r["forwarded_write_1_p50_ms"] - r["local_write_1_p50_ms"]
    )
    for k in ("leader_commit_ratio", "catchup_entries_per_s", "lag_p99_ms", "app_lag_p99_ms"):
        assert k in p.stdout  # the printed table


@pytest.mark.slow
def test_bench_pipeline_section_writes_sane_json(tmp_path) -> None:
    out = tmp_path / "pipe.json"
    p = subprocess.run(
        [sys.executable, "-m", "hctserver", "bench", "--quick", "--json", str(out),
         "--sections", "pipeline"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    for k in PIPELINE_KEYS:
        assert isinstance(r[k], (int, float)) and r[k] >= 0, k
    assert r["sync_commit_ratio"] == (
        r["sync_commit_commits_per_s"] / r["async_commit_commits_per_s"]
    )
    assert 0 < r["sync_commit_ratio"] < 3
    assert r["sync_k1_w1_p50_ms"] <= r["sync_k1_w1_p99_ms"]
