"""Issue 24's scenario: etcd, three nodes, and an application that talks
only to a follower; the leader is SIGKILLed while it writes, with retries
by transaction id; every acknowledged transaction is there exactly once."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import apsw

from test_cluster import Cluster, _settled
from test_observe import http_url

from etcdserver import etcd_server
from helpers import complete_lines, wait_until
from nodes import assert_identical
from procs import processes

APP = str(Path(__file__).parent / "data" / "client_app.py")


def test_an_application_on_a_follower_survives_a_leader_kill_exactly_once(tmp_path) -> None:
    tmp = str(tmp_path)
    applog = tmp_path / "app.log"
    stopfile = tmp_path / "app.stop"

    def lines() -> list[list[str]]:
        return [ln.split() for ln in complete_lines(applog.read_text())] if applog.exists() else []

    def acked() -> list[list[str]]:
        return [x for x in lines() if x[0] == "ack"]

    with etcd_server(tmp) as srv, processes(tmp) as procs:
        cl = Cluster(procs, tmp, srv.url, sync=True)
        cl.start_all()
        old = cl.leader()
        assert old is not None
        near = next(n for n in cl.names if n != old)
        url = http_url(procs, cl.p[near])
        app = procs.start(sys.executable, APP, url, str(applog), str(stopfile))
        wait_until(lambda: ["ready"] in lines() or app.poll() is not None, 120, "app ready")
        assert app.poll() is None, procs.stderr(app)
        wait_until(lambda: len(acked()) >= 30, 60, "the application writing")
        before = len(acked())
        cl.p[old].send_signal(signal.SIGKILL)
        cl.p[old].wait(30)
        wait_until(lambda: cl.leader() not in (None, old), 60, "a new leader")
        wait_until(lambda: len(acked()) >= before + 30, 120, "writes go on after the failover")
        cl.start(old)  # it rejoins as a follower
        stopfile.touch()
        Path(cl.env["HCT_TEST_STOP"]).touch()  # the nodes' writer jobs too
        app.wait(120)
        assert app.returncode == 0, procs.stderr(app)
        wait_until(_settled(cl), 90, "all three nodes at one position")
        final = cl.leader()
        assert final is not None
        cl.stop_all(final)
        acks = acked()
        retries = [x for x in lines() if x[0] == "retry"]
        unseen = [x for x in lines() if x[0] == "unseen"]
        assert not unseen, f"acknowledged writes not visible on the follower at once: {unseen[:3]}"
        assert retries, "the kill interrupted some transaction (else this tested no retry)"
        with apsw.Connection(cl.db(final)) as c:
            counts = dict(c.execute("SELECT k, count(*) FROM app GROUP BY k").fetchall())
        assert counts["interactive"] == 1 and counts["batch"] == 1
        missing = [x[1] for x in acks if counts.get(x[1]) != 1]
        assert not missing, f"acknowledged transactions not there exactly once: {missing[:5]}"
        extra = [k for k, n in counts.items() if n != 1]
        assert not extra, f"transactions applied twice: {extra[:5]}"
        assert_identical(cl.db(final), *[cl.db(n) for n in cl.names if n != final])
        print(f"{len(acks)} acknowledged, {len(retries)} retried attempts,"
              f" {sum(1 for x in acks if 'dup' in x)} answered as duplicates")  # fmt: skip
