"""The etcd client (etcd's v3 JSON gateway) against a real etcd server."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from hctserver.cluster.etcd import EtcdClient, EtcdError, Lease, prefix_end
from hctserver.errors import ConfigError

from etcdserver import etcd_server
from helpers import wait_until
from procs import free_port


def test_keys_leases_and_an_election(tmp_path) -> None:
    with etcd_server(str(tmp_path)) as srv:
        a, b = EtcdClient(srv.url), EtcdClient(srv.url)
        a.put("/c/members/a", '{"cid": 1}')
        a.put("/c/members/b", '{"cid": 2}')
        a.put("/d/other", "x")
        assert [kv.key for kv in a.get_prefix("/c/members/")] == ["/c/members/a", "/c/members/b"]
        assert a.get("/c/members/b").value == '{"cid": 2}'  # type: ignore[union-attr]
        # the election: one create wins, the other is told who holds the key
        la, lb = Lease(a, 2), Lease(b, 30)
        assert a.create("/c/leader", "a", la.id) is None
        held = b.create("/c/leader", "b", lb.id)
        assert held is not None and held.value == "a" and held.lease == la.id
        # kept alive, it stays; no longer kept alive, it goes with its lease
        for _ in range(3):
            assert la.renew() and la.remaining() > 1.0
            time.sleep(0.8)  # (the lease's clock is what is tested: no condition to wait on)
        assert a.get("/c/leader").value == "a"  # type: ignore[union-attr]
        wait_until(lambda: a.get("/c/leader") is None, 10, "the lease to expire")
        assert not la.renew() and la.remaining() <= 0
        assert b.create("/c/leader", "b", lb.id) is None
        lb.revoke()
        assert a.get("/c/leader") is None and lb.remaining() <= 0
        a.delete("/c/members/a")
        assert [kv.key for kv in a.get_prefix("/c/")] == ["/c/members/b"]


def test_unreachable_garbage_and_bad_urls_are_typed_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="http://HOST:PORT"):
        EtcdClient("127.0.0.1:2379")
    with pytest.raises(EtcdError, match="cannot reach etcd"):
        EtcdClient(f"http://127.0.0.1:{free_port()}", timeout=1).get("/x")

    class Garbage(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = b"<html>not etcd</html>" if self.path.endswith("range") else b"{}"
            code = 404 if self.path.endswith("put") else 200
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        c = EtcdClient(f"http://127.0.0.1:{srv.server_address[1]}")
        with pytest.raises(EtcdError, match="garbage"):
            c.get("/x")
        with pytest.raises(EtcdError, match="HTTP 404"):
            c.put("/x", "y")
        assert c.keepalive(7) == 0  # no result: not alive
    finally:
        srv.shutdown()
        srv.server_close()


def test_prefix_end() -> None:
    assert prefix_end("/c/") == "/c0"
    assert prefix_end("a") == "b"


def test_cluster_status_without_etcd_or_nodes(tmp_path) -> None:
    import subprocess

    from procs import HCT

    down = subprocess.run(
        [*HCT, "cluster", "status", "--etcd", f"http://127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert down.returncode == 6 and "cannot reach etcd" in down.stderr
    assert down.stderr.count("\n") == 1  # one line, no traceback
    with etcd_server(str(tmp_path)) as srv:
        empty = subprocess.run(
            [*HCT, "cluster", "status", "--etcd", srv.url], capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert empty.returncode == 1 and "no node of cluster default" in empty.stdout
