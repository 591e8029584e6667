"""Observing a running cluster: /status, /metrics and /health over HTTP,
follower feedback (and its absence with the original leader), status URL
and top."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hctserver import Database, speedups
from hctserver.node.followers import CommitClock, FollowerTable
from hctserver.protocol import bootstrap, feedback, wire
from hctserver.protocol.session import LeaderSession, ServeFeedback, ServeSub

from helpers import wait_until
from nodes import FakeLeader, assert_identical, follower_node, init_db, snapshot_of
from procs import HCT, free_port, processes


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def http_url(procs: Any, p: subprocess.Popen[str]) -> str:
    found: list[str] = []

    def seen() -> bool:
        m = re.search(r"HTTP on (http://\S+)", procs.stderr(p))
        if m:
            found.append(m.group(1))
        return bool(m) or p.poll() is not None

    wait_until(seen, timeout=60, what="the node's HTTP address")
    assert found, procs.stderr(p)
    return found[0]


def scrape(url: str) -> dict[str, list[Any]]:
    code, body = get(url + "/metrics")
    assert code == 200
    out: dict[str, list[Any]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(m: dict[str, list[Any]], name: str) -> float:
    (s,) = m[name]
    return float(s.value)


def status(url: str) -> dict[str, Any]:
    code, body = get(url + "/status")
    assert code == 200
    doc: dict[str, Any] = json.loads(body)
    return doc


def test_a_cluster_seen_through_http(tmp_path) -> None:
    """A leader with writers and two followers, each with --http: metrics
    grow between two scrapes, the leader reports both followers' lag, and
    a follower's /health follows its leader's life."""
    lp = str(tmp_path / "l.db")
    init_db(lp)
    port = free_port()
    with processes(str(tmp_path)) as procs:
        leader_args = ("--job", "writer", "--http", "0")
        lproc, _ = procs.leader(lp, *leader_args, port=port)
        lurl = http_url(procs, lproc)
        fprocs = [
            procs.follower(
                str(tmp_path / f"f{i}.db"), port, "--http", "127.0.0.1:0", "--retry-max", "0.2"
            )
            for i in range(2)
        ]
        furls = [http_url(procs, p) for p in fprocs]

        def reporting() -> bool:
            fs = status(lurl)["followers"]
            return len(fs) == 2 and all(f["feedback"] and f["applied_cid"] > 0 for f in fs)

        wait_until(reporting, timeout=30, what="both followers reporting")
        first = [scrape(u) for u in (lurl, *furls)]

        def grown() -> bool:
            now = [scrape(u) for u in (lurl, *furls)]
            return value(now[0], "hctserver_commits_total") > value(
                first[0], "hctserver_commits_total"
            ) and all(
                value(n, "hctserver_applied_entries_total")
                > value(f, "hctserver_applied_entries_total")
                for n, f in zip(now[1:], first[1:], strict=True)
            )

        wait_until(grown, timeout=10, what="commit and apply counters to grow")
        m = scrape(lurl)
        lags = m["hctserver_follower_lag_cids"]
        assert len({s.labels["follower"] for s in lags}) == 2
        assert len(m["hctserver_follower_lag_seconds"]) == 2
        assert value(m, "hctserver_followers_reporting") == 2
        wait_until(  # the histogram is sampled four times a second while streaming
            lambda: scrape(furls[0])["hctserver_lag_seconds_count"][0].value > 0,
            timeout=10,
            what="lag samples",
        )
        fm = scrape(furls[0])
        assert fm["hctserver_state"] and any(
            s.labels["state"] == "streaming" and s.value == 1 for s in fm["hctserver_state"]
        )

        doc = status(lurl)
        names = sorted(f["name"] for f in doc["followers"])
        assert names == sorted(str(tmp_path / f"f{i}.db") for i in range(2))
        for f in doc["followers"]:
            assert f["applied_cid"] > 0 and f["lag_cids"] is not None and f["lag_ms"] is not None
            assert f["streams"] == [0, 1]  # the writer's stream and the other writers'
        fdoc = status(furls[0])
        assert fdoc["state"] == "streaming" and fdoc["lag_source"] == "leader"
        assert fdoc["catchup"]["total"] is not None

        assert get(furls[0] + "/health")[0] == 200
        assert get(lurl + "/health")[0] == 200
        lproc.send_signal(signal.SIGKILL)
        lproc.wait(30)
        wait_until(lambda: get(furls[0] + "/health")[0] == 503, timeout=5, what="503")
        _, body = get(furls[0] + "/health")
        assert b"backing off" in body or b"connecting" in body or b"catching up" in body

        lproc2, _ = procs.leader(lp, "--job", "writer", port=port)
        wait_until(lambda: get(furls[0] + "/health")[0] == 200, timeout=30, what="200 again")
        assert status(furls[0])["reconnects"] >= 1
        for p in (lproc2, *fprocs):
            p.send_signal(signal.SIGTERM)
        for p in (lproc2, *fprocs):
            assert p.wait(30) == 0, procs.stderr(p)


def test_feedback_follower_with_a_leader_that_does_not_speak_it(tmp_path) -> None:
    """The follower probes, the leader answers as the original does (an
    incompatible-version ERROR), and the follower replicates as before,
    sending nothing the original does not know."""
    lp = str(tmp_path / "l.db")
    init_db(lp, 8)
    es = list(Database(lp, init=False).iter_entries())
    reply = wire.encode_syncreply(1, es[:5])
    sub = wire.encode_subreply_start() + b"".join(wire.encode_entry(*e) for e in es[5:])
    fake = FakeLeader([reply, wire.encode_syncreply(1, [])], sub)
    fp = str(tmp_path / "f.db")
    f = follower_node(fp, fake.port, once=False)
    try:
        wait_until(lambda: f.runner.stats.snapshot == len(es), what="all entries applied")
        assert fake.probes >= 1  # it asked
        assert fake.unknown == 0  # and sent nothing the original does not know
        assert not f.runner.reporter.active
        doc = f.status()
        assert doc["feedback"]["active"] is False and doc["lag_source"] == "local"
    finally:
        f.close()
        fake.close()
    assert_identical(lp, fp)


def test_the_probe_and_subx_in_memory() -> None:
    """The leader's rules: the probe is served only by a leader that takes
    feedback (else it is an ordinary SYNC from a cid it does not have), and
    SUBX carries the follower's id."""

    class View:
        njob, max_subscribers, draining, feedback = 2, 16, False, True

        def position(self):  # type: ignore[no-untyped-def]
            from hctserver.position import ZERO_HASH, Position

            return Position(0, ZERO_HASH)

        def hash_at(self, cid: int) -> bytes | None:
            return None

        def live_subscribers(self, job: int) -> int:
            return 0

    probe = wire.encode_sync(feedback.PROBE_CID, feedback.PROBE_HASH)
    v = View()
    s = LeaderSession(v)
    assert s.decide(s.receive_data(probe)) == ServeFeedback()  # type: ignore[arg-type]
    v.feedback = False
    s = LeaderSession(v)
    refused = s.decide(s.receive_data(probe))  # type: ignore[arg-type]
    assert getattr(refused, "message", "") == wire.INCOMPATIBLE
    s = LeaderSession(v)
    assert s.decide(s.receive_data(wire.encode_subx(1, 42))) == ServeSub(1, 42)  # type: ignore[arg-type]


def test_feedback_messages_split_anywhere_and_bounded() -> None:
    dec = feedback.Decoder(frozenset({feedback.REPORT}))
    raw = feedback.encode_report(10, 9, 12, "f1") + feedback.encode_report(11, 10, 12, "")
    got = []
    for i in range(len(raw)):
        got += dec.feed(raw[i : i + 1])
    assert got == [feedback.Report(10, 9, 12, "f1"), feedback.Report(11, 10, 12, "")]
    from hctserver.errors import SizeLimitError, UnknownMessageTypeError

    with pytest.raises(SizeLimitError):
        feedback.Decoder(frozenset({feedback.REPORT})).feed(
            feedback.REPORT.to_bytes(4, "little") + (1 << 20).to_bytes(4, "little")
        )
    with pytest.raises(UnknownMessageTypeError):
        feedback.Decoder(frozenset({feedback.REPORT})).feed(feedback.encode_state(1, 2))


def test_lag_in_time_from_the_commit_clock() -> None:
    clock = CommitClock()
    for cid, t in ((10, 100.0), (20, 101.0), (30, 102.0)):
        clock.note(cid, t)
    assert clock.lag(30, 103.0) == 0.0  # has everything
    assert clock.lag(15, 103.0) == pytest.approx(2.0)  # lacks cid 16, committed by t=101
    assert clock.lag(5, 103.0) == pytest.approx(3.0)  # older than the clock: its span
    table = FollowerTable(clock)
    f = table.add("127.0.0.1:1")
    assert table.report(f.id, feedback.Report(25, 20, 30, "x"), 102.5) == pytest.approx(0.5)
    (row,) = table.rows(30, 102.6)
    assert row["lag_cids"] == 5 and row["lag_ms"] == pytest.approx(500.0)
    (row,) = table.rows(30, 110.0)  # silent since: its lag grows
    assert row["lag_ms"] == pytest.approx(8000.0)


def test_status_url_and_top(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 3)
    with processes(str(tmp_path)) as procs:
        lproc, port = procs.leader(lp, "--http", "0")
        lurl = http_url(procs, lproc)
        fproc = procs.follower(str(tmp_path / "f.db"), port, "--http", "0")
        furl = http_url(procs, fproc)
        wait_until(lambda: status(furl)["state"] == "streaming", what="streaming")
        out = subprocess.run(
            [*HCT, "status", lurl, "--json"], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["role"] == "leader" and doc["snapshot"] == snapshot_of(lp)
        # the node (a child process, with this environment) reports its hot loops
        assert doc["implementation"] == speedups.implementation()
        out = subprocess.run([*HCT, "status", furl], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and re.search(r"state\s+streaming", out.stdout), out.stdout
        out = subprocess.run(
            [*HCT, "top", lurl, furl, "--count", "2", "--interval", "0.2"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "leader" in out.stdout and "streaming" in out.stdout
        assert (
            str(tmp_path / "f.db")[-20:] in out.stdout.replace("\n", "")
            or "reporting" in out.stdout
        )
        dead = f"http://127.0.0.1:{free_port()}"
        out = subprocess.run([*HCT, "status", dead], capture_output=True, text=True, timeout=60)
        assert out.returncode == 6 and out.stderr.count("\n") == 1, out.stderr
        for p in (lproc, fproc):
            p.send_signal(signal.SIGTERM)
            assert p.wait(30) == 0


def test_log_lines_have_time_and_level_and_json(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 2)
    with processes(str(tmp_path)) as procs:
        lproc, port = procs.leader(lp, "--log-format", "json")
        fproc = procs.follower(str(tmp_path / "f.db"), port)
        wait_until(lambda: "caught up" in procs.stderr(fproc), what="caught up")
        for p in (lproc, fproc):
            p.send_signal(signal.SIGTERM)
            assert p.wait(30) == 0
        lines = [json.loads(x) for x in procs.stderr(lproc).splitlines() if x.strip()]
        assert all({"ts", "level", "msg"} <= set(x) for x in lines)
        assert any("subscribed to stream" in x["msg"] for x in lines)
        text = procs.stderr(fproc)
        assert re.search(
            r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO +catching up from cid 0 to cid "
            + str(snapshot_of(lp)),
            text,
            re.M,
        ), text
        assert re.search(r"INFO +caught up: streaming", text), text


def test_the_probe_against_the_original_c_leader(tmp_path) -> None:
    """The real C leader answers the feedback probe, and the bootstrap
    extension's request, as any SYNC it cannot match, and goes on serving:
    the extensions cost it nothing."""
    port = free_port()
    with processes(str(tmp_path)) as procs:
        c = procs.c_leader(str(tmp_path / "c.db"), port, 20, 1)

        def answer(request: bytes) -> bytes:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(request)
                    out = b""
                    while chunk := s.recv(65536):
                        out += chunk
                    return out
            except OSError:
                return b""

        probe = wire.encode_sync(feedback.PROBE_CID, feedback.PROBE_HASH)
        got: list[bytes] = []
        wait_until(lambda: got.append(answer(probe)) or bool(got[-1]), timeout=30, what="C up")
        assert got[-1] == wire.encode_error(wire.INCOMPATIBLE)
        assert answer(probe) == wire.encode_error(wire.INCOMPATIBLE)  # still serving
        assert answer(bootstrap.encode_request()) == wire.encode_error(wire.INCOMPATIBLE)
        assert c.poll() is None, procs.stdout(c) + procs.stderr(c)
        c.kill()


def _endpoint(**kw: Any) -> Any:
    from hctserver.net.httpserver import HttpEndpoint, Routes

    ep = HttpEndpoint(
        "127.0.0.1", 0, Routes(lambda: {"ok": 1}, lambda: b"m 1\n", lambda: (True, "ok")), **kw
    )
    t = threading.Thread(target=ep.serve, daemon=True)
    t.start()
    return ep, t


def test_http_clients_are_bounded(tmp_path) -> None:
    """A client that trickles its request is cut off at the deadline; past
    the limit of clients at once, the next one gets 503 at once; the
    endpoint then serves normally."""
    ep, t = _endpoint(max_clients=2, deadline=0.5)
    try:
        slow = [socket.create_connection(("127.0.0.1", ep.port)) for _ in range(2)]
        for s in slow:
            s.sendall(b"G")  # and nothing more
        assert get(ep.url + "/health")[0] == 200  # a slow client holds no slot
        for s in slow:
            s.settimeout(5)
            assert s.recv(100) == b""  # cut off by the deadline, not by its 5 s read timeout
            s.close()
        wait_until(lambda: get(ep.url + "/health")[0] == 200, timeout=5, what="served again")
        assert json.loads(get(ep.url + "/status")[1]) == {"ok": 1}
        assert get(ep.url + "/nope")[0] == 404
    finally:
        ep.stop()
        t.join(5)
        ep.close()
