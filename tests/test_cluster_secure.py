"""A secured cluster, as an operator would run one: three ``hctserver node``
processes, each started from its own TOML file, with etcd over TLS with a
client certificate and a password, replication over mutual TLS with a
shared secret, and HTTPS with a bearer token. Whoever lacks one of them is
refused; the node's /metrics carries every family a plain leader's does."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hctserver.cluster.member import cluster_status
from hctserver.net.httpserver import fetch
from hctserver.node import config

from etcdserver import etcd_server
from helpers import complete_lines, wait_until
from nodes import assert_identical, init_db
from procs import HCT, free_port, processes, stop

pytest.importorskip("trustme")
from pki import Pki

WRITER = str(Path(__file__).parent / "data" / "cluster_writer.py")
NAMES = ("n1", "n2", "n3")


def _toml(values: dict[str, Any]) -> str:
    top = {k: v for k, v in values.items() if not isinstance(v, dict)}
    lines = [f"{k} = {json.dumps(v)}" for k, v in top.items()]
    for section, kv in values.items():
        if isinstance(kv, dict):
            lines += ["", f"[{section}]", *(f"{k} = {json.dumps(v)}" for k, v in kv.items())]
    return "\n".join(lines) + "\n"


def _families(metrics: bytes) -> set[str]:
    return set(re.findall(r"^# TYPE (\S+)", metrics.decode(), re.M))


def _http_url(procs: Any, p: subprocess.Popen[str]) -> str | None:
    m = re.search(r"HTTP on (https://\S+)", procs.stderr(p))
    return m.group(1) if m else None


def test_a_cluster_secured_everywhere_started_from_toml_files(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    token_file = str(tmp_path / "pki" / "http-token")
    Path(token_file).write_text("the bearer token of this cluster's HTTP\n")
    os.chmod(token_file, 0o600)
    token = Path(token_file).read_bytes().strip()
    env = {**os.environ, "HCT_TEST_ACKLOG": str(tmp_path / "acks"),
           "HCT_TEST_STOP": str(tmp_path / "stop")}  # fmt: skip
    with (
        etcd_server(str(tmp_path), tls=True, password="the etcd root user's password") as etcd,
        processes(str(tmp_path)) as procs,
    ):
        files = {}
        for name in NAMES:
            files[name] = tmp_path / f"{name}.toml"
            files[name].write_text(_toml({
                "role": "node", "db": str(tmp_path / f"{name}.db"), "port": free_port(),
                "jobs": [WRITER], "synchronous": "FULL",
                "cluster": {"etcd": etcd.url, "etcd_ca": etcd.ca, "etcd_cert": etcd.cert,
                            "etcd_key": etcd.key, "etcd_user": etcd.USER,
                            "etcd_password_file": etcd.password_file, "name": name, "ttl": 2},
                "security": {"auth_file": pki.secret, "tls_cert": pki.leader,
                             "tls_key": pki.leader, "tls_client_ca": pki.ca, "tls_ca": pki.ca},
                "http": {"address": "127.0.0.1:0", "tls_cert": pki.leader,
                         "tls_key": pki.leader, "token_file": token_file},
                "leader": {"sync_followers": 1},
                "log": {"level": "info"},
            }))  # fmt: skip
        shown = subprocess.run(
            [*HCT, "config", "show", "--config", str(files["n1"])],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        again = tmp_path / "shown.toml"
        again.write_text(shown.stdout)
        assert config.load("node", {}, str(again), {}) == config.load(
            "node", {}, str(files["n1"]), {}
        )
        nodes = {n: procs.start(*HCT, "node", "--config", str(files[n]), env=env) for n in NAMES}
        client = etcd.client()

        def leader() -> str | None:
            rows = [r["name"] for r in cluster_status(client) if r["role"] == "leader"]
            return rows[0] if rows else None

        wait_until(lambda: leader() is not None, 60, "a leader")
        wait_until(lambda: all(_http_url(procs, p) for p in nodes.values()), 60, "HTTPS up")
        lead = leader()
        assert lead is not None
        url = _http_url(procs, nodes[lead])
        assert url is not None

        def acks() -> int:
            p = Path(env["HCT_TEST_ACKLOG"])
            return len(complete_lines(p.read_text())) if p.exists() else 0

        wait_until(lambda: acks() > 50, 60, "synchronous commits over TLS")

        # HTTPS: no token, 401; the token, 200; the node's metrics are a leader's and more
        assert fetch(url + "/status", ca=pki.ca)[0] == 401
        assert fetch(url + "/health", ca=pki.ca)[0] == 200  # open, for load balancers
        code, body = fetch(url + "/metrics", token=token, ca=pki.ca)
        assert code == 200
        node_families = _families(body)
        assert {"hctserver_cluster_leader", "hctserver_etcd_reachable"} <= node_families

        # a plain leader's families, for comparison
        lp = str(tmp_path / "plain.db")
        init_db(lp)
        plain = procs.start(*HCT, "leader", lp, "--port", "0", "--http", "0", env=env)
        wait_until(lambda: "HTTP on" in procs.stderr(plain), 60, "the plain leader")
        m = re.search(r"HTTP on (http://\S+)", procs.stderr(plain))
        assert m is not None
        leader_families = _families(fetch(m.group(1) + "/metrics")[1])
        assert "hctserver_sync_commit_acked_cid" in leader_families
        assert leader_families <= node_families, leader_families - node_families
        stop(plain)

        # replication port: a plain client, and a TLS client without the secret, refused
        port = str(config.load("node", {}, str(files[lead]), {}).port)
        for name, extra in (
            ("plain", []),
            ("nosecret", ["--tls-ca", pki.ca, "--tls-cert", pki.client, "--tls-key", pki.client]),
        ):
            p = procs.start(*HCT, "follower", str(tmp_path / f"{name}.db"), "--port", port,
                            "--once", *extra)  # fmt: skip
            assert p.wait(60) == 11, procs.stderr(p)
            assert "Traceback" not in procs.stderr(p)

        # etcd: a node without its etcd password is refused at start, one line
        bad = tmp_path / "bad.toml"
        bad.write_text(files["n1"].read_text().replace(
            f"etcd_password_file = {json.dumps(etcd.password_file)}\n", ""
        ).replace(f"etcd_user = {json.dumps(etcd.USER)}\n", ""))  # fmt: skip
        p = procs.start(*HCT, "node", "--config", str(bad), env=env)
        assert p.wait(60) == 11, procs.stderr(p)
        lines = procs.stderr(p).strip().splitlines()
        assert len(lines) == 1 and "etcd" in lines[0], lines

        # every node at one position, then a clean stop (followers first)
        Path(env["HCT_TEST_STOP"]).touch()

        def settled() -> bool:
            rows = cluster_status(client)
            return len(rows) == 3 and len({r["snapshot"] for r in rows}) == 1

        wait_until(settled, 60, "three nodes at one position")
        for n in sorted(NAMES, key=lambda n: n == lead):
            assert stop(nodes[n]) < 30 and nodes[n].returncode == 0, procs.stderr(nodes[n])
        for n in NAMES:
            if n != lead:
                assert_identical(str(tmp_path / f"{lead}.db"), str(tmp_path / f"{n}.db"))
