"""A cluster of equal nodes coordinated by a real etcd: election, failover
after SIGKILL, synchronous commit that loses nothing, rejoining."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import apsw
import pytest

from hctserver.cluster.etcd import EtcdClient
from hctserver.cluster.member import cluster_status
from hctserver.journal import patchset

from etcdserver import etcd_server
from helpers import complete_lines, wait_until
from nodes import assert_identical
from procs import HCT, free_port, processes, stop

WRITER = str(Path(__file__).parent / "data" / "cluster_writer.py")
APP_WRITER = str(Path(__file__).parent / "data" / "app_writer.py")
TTL = 2


class Cluster:
    def __init__(
        self,
        procs: Any,
        tmp: str,
        etcd_url: str,
        sync: bool,
        etcd_urls: dict[str, str] | None = None,
        archive: str | None = None,
    ) -> None:
        self.procs, self.tmp, self.etcd_url = procs, tmp, etcd_url
        self.etcd_urls = etcd_urls or {}  # a node's own way to etcd (a proxy)
        self.etcd = EtcdClient(etcd_url)
        self.names = ["n1", "n2", "n3"]
        self.ports = {n: free_port() for n in self.names}
        self.p: dict[str, subprocess.Popen[str]] = {}
        self.apps: dict[str, subprocess.Popen[str]] = {}
        self.history: dict[str, list[subprocess.Popen[str]]] = {}  # every process of a node
        self.sync = sync
        self.archive = archive  # every node's --archive URL (the leader ships)
        self.env = {
            **os.environ,
            "HCT_TEST_ACKLOG": os.path.join(tmp, "acks.log"),
            "HCT_TEST_STOP": os.path.join(tmp, "stop"),
        }

    def db(self, name: str) -> str:
        return os.path.join(self.tmp, f"{name}.db")

    def start(self, name: str) -> None:
        url = self.etcd_urls.get(name, self.etcd_url)
        args = ["--etcd", url, "--name", name, "--port", str(self.ports[name])]
        args += ["--ttl", str(TTL), "--job", WRITER, "--synchronous", "FULL", "--http", "0"]
        if self.sync:
            args += ["--sync-followers", "1"]
        if self.archive:
            args += ["--archive", self.archive, "--archive-max-delay", "0.2"]
        self.p[name] = self.procs.start(*HCT, "node", self.db(name), *args, env=self.env)
        self.history.setdefault(name, []).append(self.p[name])

    def start_all(self) -> None:
        """Start every node; return once one leads and its writer commits."""
        for n in self.names:
            self.start(n)
        wait_until(lambda: self.leader() is not None and self.writes() > 20, 60, "a leader")

    def stop_all(self, final: str) -> None:
        """SIGTERM every node, each a clean exit; the followers first: a leader
        stopped first would let another be elected and write meanwhile."""
        for n in sorted(self.names, key=lambda n: n == final):
            assert stop(self.p[n]) < 30 and self.p[n].returncode == 0, self.procs.stderr(self.p[n])

    def status(self) -> list[dict[str, Any]]:
        return cluster_status(self.etcd)

    def leader(self) -> str | None:
        leaders = [r["name"] for r in self.status() if r["role"] == "leader"]
        assert len(leaders) <= 1, leaders
        return leaders[0] if leaders else None

    def acks(self) -> list[str]:
        """Acknowledged commits so far, "key cid time" (the writer job's log)."""
        p = Path(self.env["HCT_TEST_ACKLOG"])
        return complete_lines(p.read_text()) if p.exists() else []

    def writes(self) -> int:
        return len(self.acks())

    def start_app(self, name: str) -> None:
        """An application process writing through hctserver.connect() on the
        node's file (tests/data/app_writer.py), for the whole test."""
        args = [
            self.db(name),
            name,
            self.env["HCT_TEST_ACKLOG"] + ".apps",
            self.env["HCT_TEST_STOP"],
        ]
        self.apps[name] = self.procs.start(sys.executable, APP_WRITER, *args, env=self.env)

    def app_acks(self) -> list[tuple[str, str, float, str]]:
        """The applications' log: (kind, key, time, node) with kind "ack" or "unknown"."""
        p = Path(self.env["HCT_TEST_ACKLOG"] + ".apps")
        rows = [line.split() for line in complete_lines(p.read_text())] if p.exists() else []
        return [(r[0], r[1], float(r[3]), r[4]) for r in rows if len(r) == 5]

    def acks_by_node(self) -> list[tuple[float, str, str]]:
        """Every acknowledged commit, jobs' and applications': (time, node, key)."""
        pids = {str(p.pid): n for n, ps in self.history.items() for p in ps}
        out = [
            (float(t), pids.get(k.split("-")[0], "?"), k) for k, _, t in map(str.split, self.acks())
        ]
        out += [(t, node, key) for kind, key, t, node in self.app_acks() if kind == "ack"]
        return sorted(out)

    def status_doc(self, name: str) -> dict[str, Any]:
        """The node's /status (its URL is in its log)."""
        import re

        from hctserver.net.httpserver import fetch

        m = re.search(r"HTTP on (http://\S+)", self.procs.stderr(self.p[name]))
        assert m is not None, self.procs.stderr(self.p[name])
        code, body = fetch(m.group(1) + "/status")
        assert code == 200
        doc: dict[str, Any] = json.loads(body)
        return doc


def _settled(cl: Cluster) -> Any:
    """A condition: one leader, three nodes at one position, and the same
    seen again after the member records were all refreshed (every 0.25 s)."""
    seen: dict[str, Any] = {}

    def check() -> bool:
        rows = cl.status()
        leaders = [r["name"] for r in rows if r["role"] == "leader"]
        now = (len(rows), tuple(sorted({r["snapshot"] for r in rows})), tuple(leaders))
        ok = now[0] == 3 and len(now[1]) == 1 and len(leaders) == 1
        if not ok or seen.get("state") != now:
            seen.update(state=now, since=time.monotonic())
            return False
        return bool(time.monotonic() - seen["since"] > 0.6)

    return check


def _keys(path: str) -> set[str]:
    c = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return {r[0] for r in c.execute("SELECT k FROM kv")}
    finally:
        c.close()


def _kill_and_fail_over(cl: Cluster, kills: int, rng: random.Random) -> list[float]:
    """SIGKILL the leader ``kills`` times at random moments, restarting it
    each time; returns how long each failover took."""
    took = []
    for _ in range(kills):
        old = cl.leader()
        assert old is not None
        before = cl.writes()
        wait_until(lambda b=before: cl.writes() > b + rng.randint(5, 50), 60, "writes")
        cl.p[old].send_signal(signal.SIGKILL)
        cl.p[old].wait(30)
        t0 = time.monotonic()
        n0 = cl.writes()

        def new_leader_writes(o: str = old, n: int = n0) -> bool:
            lead = cl.leader()
            return lead is not None and lead != o and cl.writes() > n

        wait_until(new_leader_writes, TTL + 30, "a new leader taking writes")
        took.append(time.monotonic() - t0)
        cl.start(old)  # it comes back and rejoins as a follower
    return took


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_failover_after_sigkill_loses_no_acknowledged_commit(tmp_path, sync: bool) -> None:
    _cluster_run(str(tmp_path), sync, kills=1)


@pytest.mark.slow
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_ten_kills(tmp_path, sync: bool) -> None:
    _cluster_run(str(tmp_path), sync, kills=10)


def test_one_archive_through_two_failovers(tmp_path) -> None:
    """Each leader in turn ships to one archive: one chain, no gap, no
    duplicate; the newest restore is the final leader's database."""
    url = f"file://{tmp_path}/archive"
    _cluster_run(str(tmp_path), True, kills=2, archive=url)
    v = subprocess.run([*HCT, "archive", "verify", url], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert v.returncode == 0 and "archive intact" in v.stdout, v.stdout + v.stderr
    ls = json.loads(subprocess.run([*HCT, "archive", "ls", url, "--json"], capture_output=True,
                                   text=True, timeout=120, check=True).stdout)  # fmt: skip
    ranges = ls["ranges"]
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(ranges)), ranges  # one chain
    final = tmp_path / "n1.db"  # the three end identical (_cluster_run checks it)
    out = str(tmp_path / "restored.db")
    r = subprocess.run([*HCT, "restore", url, out], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    same = subprocess.run([*HCT, "verify", out, str(final)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert same.returncode == 0 and "identical" in same.stdout, same.stdout + same.stderr


def _cluster_run(tmp: str, sync: bool, kills: int, archive: str | None = None) -> None:
    rng = random.Random(kills)
    with etcd_server(tmp) as srv, processes(tmp) as procs:
        cl = Cluster(procs, tmp, srv.url, sync, archive=archive)
        cl.start_all()
        took = _kill_and_fail_over(cl, kills, rng)
        # stop writing; every node reaches the same position; stop them all
        Path(cl.env["HCT_TEST_STOP"]).touch()

        wait_until(_settled(cl), 60, "all three nodes at one position")
        final = cl.leader()
        assert final is not None
        out = subprocess.run(
            [*HCT, "cluster", "status", "--etcd", srv.url, "--json"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        rows = json.loads(out.stdout)
        assert sorted(r["name"] for r in rows) == cl.names
        assert [r["name"] for r in rows if r["role"] == "leader"] == [final]
        assert {r["role"] for r in rows} == {"leader", "follower"}
        assert len({r["snapshot"] for r in rows}) == 1 and all(r["lag_cids"] == 0 for r in rows)
        text = subprocess.run(
            [*HCT, "cluster", "status", "--etcd", srv.url],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        assert f"{final} " in text and text.count("healthy") == 3 and "unhealthy" not in text
        for n in cl.names:  # each node's /status shows its role and the lease
            doc = cl.status_doc(n)
            assert doc["role"] == ("leader" if n == final else "follower")
            assert doc["cluster"]["role"] == doc["role"] and doc["cluster"]["name"] == n
            lease = doc["cluster"]["lease_s"]
            assert (lease is not None and 0 < lease <= TTL) if n == final else lease is None
        cl.stop_all(final)
        # after each kill, a new leader took writes within TTL + 2 s
        assert max(took) <= TTL + 2, took
        acked = {line.split()[0] for line in cl.acks()}
        kept = _keys(cl.db(final))
        lost = acked - kept
        if sync:
            assert not lost, f"{len(lost)} acknowledged commits lost: {sorted(lost)[:5]}"
        else:
            # what an old leader had and no follower got is in its side file, counted in its log
            entries = [
                json.loads(line)
                for p in Path(tmp).glob("*.discarded-*.jsonl")
                for line in p.read_text().splitlines()
            ]
            logged = sum(int(m) for p in procs.procs for m in _discard_counts(procs, p))
            assert len(entries) == logged
            in_side = {
                str((ch[3] or ch[2])[0])
                for e in entries
                for t in patchset.decode(bytes.fromhex(e["data"]))
                for ch in t.changes
            }
            assert lost <= in_side, sorted(lost - in_side)[:5]
        assert_identical(cl.db(final), *[cl.db(n) for n in cl.names if n != final])
        rows = json.loads(
            subprocess.run(
                [*HCT, "cluster", "status", "--etcd", srv.url, "--json"],
                capture_output=True, text=True, timeout=60, check=True,
            ).stdout
        )  # fmt: skip
        assert rows == []  # every node stopped: no member records left


def _discard_counts(procs: Any, p: subprocess.Popen[str]) -> list[str]:
    import re

    return re.findall(r"this node has (\d+) commits .* never got", procs.stderr(p))


def test_without_etcd_the_leader_stops_taking_writes_and_the_cluster_recovers(tmp_path) -> None:
    tmp = str(tmp_path)
    with etcd_server(tmp) as srv, processes(tmp) as procs:
        cl = Cluster(procs, tmp, srv.url, sync=False)
        cl.start_all()
        srv.stop()
        t0 = time.time()
        n0 = cl.writes()

        def last_ack() -> float:
            return max(float(line.split()[2]) for line in cl.acks())

        # etcd stays away for 10 s; no acknowledgement later than the lease's TTL after
        # it went (no split brain: nobody else can lead meanwhile either)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert last_ack() <= t0 + TTL, last_ack() - t0
            time.sleep(0.2)  # (watching for a violation over a fixed span)
        assert last_ack() <= t0 + TTL
        stopped_at = cl.writes()
        srv.start()
        wait_until(lambda: cl.writes() > stopped_at + 10, 60, "writes after etcd returned")
        assert stopped_at >= n0
        Path(cl.env["HCT_TEST_STOP"]).touch()
        wait_until(_settled(cl), 60, "all three nodes at one position")
        final = cl.leader()
        assert final is not None
        cl.stop_all(final)
        assert_identical(cl.db(final), *[cl.db(n) for n in cl.names if n != final])


def _leader_runs(acks: list[tuple[float, str, str]]) -> list[str]:
    """The nodes that acknowledged commits, in time order, one entry per run
    of consecutive acknowledgements by one node."""
    runs: list[str] = []
    for _, node, _ in acks:
        if not runs or runs[-1] != node:
            runs.append(node)
    return runs


def _check_no_split_brain(cl: Cluster, final: str, events: int) -> None:
    """Nobody acknowledged while another node led (the acknowledgements of
    each leader form one run in time, at most one run per leadership), and
    every acknowledged commit is on the final leader exactly once."""
    acks = cl.acks_by_node()
    assert acks and "?" not in {n for _, n, _ in acks}
    runs = _leader_runs(acks)
    assert len(runs) <= events + 1, runs
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(acks) if a[1] != b[1]]
    assert all(g > 0 for g in gaps), gaps
    print(f"leaders in turn: {runs}; gaps between them (s): {[round(g, 2) for g in gaps]}")
    keys = [k for _, _, k in acks]
    assert len(keys) == len(set(keys))
    lost = set(keys) - _keys(cl.db(final))
    assert not lost, f"{len(lost)} acknowledged commits lost: {sorted(lost)[:5]}"
    assert_identical(cl.db(final), *[cl.db(n) for n in cl.names if n != final])


def _finish(cl: Cluster, procs: Any) -> str:
    Path(cl.env["HCT_TEST_STOP"]).touch()
    for a in cl.apps.values():
        a.wait(60)
        assert a.returncode == 0, procs.stderr(a)
    wait_until(_settled(cl), 90, "all three nodes at one position")
    final = cl.leader()
    assert final is not None
    cl.stop_all(final)
    return final


def _all_healthy(cl: Cluster) -> bool:
    rows = cl.status()
    return len(rows) == 3 and all(r["healthy"] for r in rows)


def _new_leader_acks(cl: Cluster, old: str) -> bool:
    lead = cl.leader()
    if lead is None or lead == old:
        return False
    acks = cl.acks_by_node()
    return bool(acks) and acks[-1][1] == lead


@pytest.mark.parametrize("how", ["sigstop", "sigkill"])
def test_no_split_brain_with_application_writers_on_every_node(tmp_path, how: str) -> None:
    """Issue 23's scenario: three nodes, sync mode, a writer job and an
    application writing through hctserver.connect() beside every node; the
    leader is paused for 4 x TTL and resumed (or killed and restarted)."""
    tmp = str(tmp_path)
    with etcd_server(tmp) as srv, processes(tmp) as procs:
        cl = Cluster(procs, tmp, srv.url, sync=True)
        cl.start_all()
        for n in cl.names:
            cl.start_app(n)
        old = cl.leader()
        assert old is not None
        wait_until(lambda: any(nd == old for _, nd, k in cl.acks_by_node() if k.startswith("app")),
                   60, "the application beside the leader writing")  # fmt: skip
        if how == "sigstop":
            cl.p[old].send_signal(signal.SIGSTOP)
            t_end = time.monotonic() + 4 * TTL
            try:
                wait_until(lambda: _new_leader_acks(cl, old), 60, "a new leader taking writes")
                wait_until(lambda: time.monotonic() > t_end, 60, "4 x TTL")
            finally:
                cl.p[old].send_signal(signal.SIGCONT)
        else:
            cl.p[old].send_signal(signal.SIGKILL)
            cl.p[old].wait(30)
            wait_until(lambda: _new_leader_acks(cl, old), 60, "a new leader taking writes")
            cl.start(old)
        n = cl.writes()
        wait_until(lambda: cl.writes() > n + 20, 60, "writes go on")
        final = _finish(cl, procs)
        _check_no_split_brain(cl, final, events=1)
        unknown = [r for r in cl.app_acks() if r[0] == "unknown"]
        print(f"{len(cl.acks_by_node())} acknowledged, {len(unknown)} unknown outcomes")


def _partition_run(tmp: str, cuts: int) -> None:
    """The leader alone cut from etcd (its own proxy black-holes its calls),
    the others still reach etcd; sync mode; writers in the nodes and beside them."""
    from netproxy import proxy

    with etcd_server(tmp) as srv, processes(tmp) as procs:
        port = int(srv.url.rsplit(":", 1)[1])
        with proxy(port) as p1, proxy(port) as p2, proxy(port) as p3:
            proxies = {"n1": p1, "n2": p2, "n3": p3}
            urls = {n: p.url for n, p in proxies.items()}
            cl = Cluster(procs, tmp, srv.url, sync=True, etcd_urls=urls)
            cl.start_all()
            for n in cl.names:
                cl.start_app(n)
            for _ in range(cuts):
                old = cl.leader()
                assert old is not None
                n0 = cl.writes()
                wait_until(lambda n0=n0: cl.writes() > n0 + 10, 60, "writes")
                proxies[old].cut()
                try:
                    wait_until(lambda o=old: _new_leader_acks(cl, o), 60, "a new leader's writes")
                finally:
                    proxies[old].heal()
                wait_until(lambda: _all_healthy(cl), 90, "the old leader back as a follower")
            final = _finish(cl, procs)
            _check_no_split_brain(cl, final, events=cuts)


def test_partition_from_etcd_loses_nothing_and_never_overlaps(tmp_path) -> None:
    _partition_run(str(tmp_path), cuts=2)


@pytest.mark.slow
def test_eight_partitions(tmp_path) -> None:
    _partition_run(str(tmp_path), cuts=8)
