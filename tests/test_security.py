"""TLS and the shared secret on the replication port, and on the HTTP endpoint.

Certificates are made in the test by ``trustme``: a CA, a leader certificate
for the loopback addresses, an expired one, a client certificate, and a CA
that signed none of them.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hctserver.errors import AuthError, ConfigError, ProtocolError
from hctserver.net.security import HttpSecurity, Security
from hctserver.node.testserver import Node
from hctserver.protocol import wire

from helpers import wait_until
from nodes import assert_identical, end_identical, follower_node, gated_writer, init_db, leader_node
from procs import HCT, free_port, processes, require_reference, stop

pytest.importorskip("trustme")
from pki import Pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki") / "certs")


def _replicates(tmp_path, leader_sec: Security, follower_sec: Security) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 100)
    gate = threading.Event()
    leader = leader_node(lp, [gated_writer(gate)] * 2, security=leader_sec)
    f = follower_node(fp, leader.port, security=follower_sec)
    try:
        wait_until(lambda: f.runner.stats.phase == "stream", 20, "the follower streaming")
        gate.set()
        wait_until(lambda: leader.db.max_cid() > 2000, 30, "live commits")
    finally:
        end_identical(leader, f, lp, fp)
    assert f.error is None


@pytest.mark.parametrize("setting", ["tls", "mutual-tls", "secret", "tls-and-secret"])
def test_a_follower_with_the_right_credentials_replicates(tmp_path, pki: Pki, setting) -> None:
    leader_sec, follower_sec = {
        "tls": (pki.leader_tls(), Security(ca=pki.ca)),
        "mutual-tls": (
            pki.leader_tls(client_ca=pki.ca),
            Security(ca=pki.ca, cert=pki.client, key=pki.client),
        ),
        "secret": (Security(auth_file=pki.secret), Security(auth_file=pki.secret)),
        "tls-and-secret": (
            pki.leader_tls(auth_file=pki.secret),
            Security(ca=pki.ca, auth_file=pki.secret),
        ),
    }[setting]
    _replicates(tmp_path, leader_sec, follower_sec)


def _refused(fp: str, port: int, sec: Security | None, match: str) -> float:
    """A follower is refused with a message naming ``match``; the seconds it took."""
    t0 = time.monotonic()
    f = follower_node(fp, port, security=sec)
    try:
        with pytest.raises(AuthError, match=match):
            f.wait(10)
    finally:
        f.close()
    return time.monotonic() - t0


def test_wrong_credentials_are_refused_within_a_second_and_others_are_served(
    tmp_path, pki: Pki, caplog
) -> None:
    caplog.set_level(logging.INFO, "hctserver")
    lp, good = str(tmp_path / "l.db"), str(tmp_path / "good.db")
    init_db(lp, 100)
    gate = threading.Event()
    gate.set()
    sec = pki.leader_tls(client_ca=pki.ca, auth_file=pki.secret)
    leader = leader_node(lp, [gated_writer(gate)], security=sec)
    client = {"cert": pki.client, "key": pki.client, "auth_file": pki.secret}
    f = follower_node(good, leader.port, security=Security(ca=pki.ca, **client))
    cases: list[tuple[str, Security | None, str, str]] = [
        (
            "wrong-ca",
            Security(ca=pki.other_ca, **client),
            "certificate this follower refuses: (unable to get local issuer certificate"
            "|self-signed certificate in certificate chain)",
            "unknown ca",
        ),
        (
            "wrong-name",
            Security(ca=pki.ca, server_name="leader.example", **client),
            "Hostname mismatch, certificate is not valid for 'leader[.]example'",
            "bad certificate",
        ),
        (
            "no-client-cert",
            Security(ca=pki.ca, auth_file=pki.secret),
            "refused this follower: tlsv13 alert certificate required",
            "peer did not return a certificate",
        ),
        (
            "client-cert-of-another-ca",
            Security(ca=pki.ca, cert=pki.stranger, key=pki.stranger, auth_file=pki.secret),
            "refused this follower: tlsv1 alert unknown ca",
            "TLS handshake failed: unable to get local issuer certificate",
        ),
        (
            "wrong-secret",
            Security(ca=pki.ca, cert=pki.client, key=pki.client, auth_file=pki.wrong),
            "authentication failed: wrong shared secret",
            "wrong shared secret",
        ),
        (
            "no-secret",
            Security(ca=pki.ca, cert=pki.client, key=pki.client),
            "this leader requires authentication: start the follower with --auth-file",
            "no authentication (it sent SYNC",
        ),
        (
            "plain",
            None,
            "this leader requires TLS: start the follower with --tls-ca",
            "a plain client (no TLS handshake)",
        ),
    ]
    try:
        wait_until(lambda: f.runner.stats.phase == "stream", 20, "the good follower streaming")
        for name, bad, match, logged in cases:
            caplog.clear()
            took = _refused(str(tmp_path / f"{name}.db"), leader.port, bad, match)
            assert took < 1.0, (name, took)
            wait_until(
                lambda logged=logged: any(  # type: ignore[misc]
                    "refused 127.0.0.1:" in r.getMessage() and logged in r.getMessage()
                    for r in caplog.records
                ),
                5,
                f"the leader logging why it refused {name}",
            )
            assert f.runner.stats.phase == "stream" and f.error is None, name
        before = leader.db.max_cid()
        wait_until(lambda: leader.db.max_cid() > before + 500, 30, "the leader writing on")
    finally:
        end_identical(leader, f, lp, good)
    assert leader.runner.refused_by["tls"] >= 5 and leader.runner.refused_by["auth"] >= 2


def test_an_expired_leader_certificate_is_refused(tmp_path, pki: Pki) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 10)
    leader = leader_node(lp, [], security=Security(cert=pki.expired, key=pki.expired))
    try:
        took = _refused(
            str(tmp_path / "f.db"), leader.port, Security(ca=pki.ca), "certificate has expired"
        )
        assert took < 1.0
        assert leader.runner.error is None
    finally:
        leader.close()


def test_a_follower_with_a_secret_refuses_a_leader_without_one(tmp_path, pki: Pki) -> None:
    """A follower never takes data from a leader that cannot prove the secret."""
    lp = str(tmp_path / "l.db")
    init_db(lp, 10)
    leader = leader_node(lp, [])
    try:
        _refused(
            str(tmp_path / "f.db"),
            leader.port,
            Security(auth_file=pki.secret),
            "this leader has no shared secret",
        )
        _refused(
            str(tmp_path / "g.db"),
            leader.port,
            Security(ca=pki.ca),
            "does not speak TLS",
        )
    finally:
        leader.close()


def test_bad_settings_are_config_errors(tmp_path, pki: Pki) -> None:
    loose = tmp_path / "loose"
    loose.write_bytes(b"x" * 40)
    loose.chmod(0o644)
    short = tmp_path / "short"
    short.write_bytes(b"x" * 8)
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="can be read by other users"):
        Security(auth_file=str(loose)).secret()
    with pytest.raises(ConfigError, match="use at least 16 random ones"):
        Security(auth_file=str(short)).secret()
    with pytest.raises(ConfigError, match="give both or neither"):
        Security(cert=pki.leader)
    with pytest.raises(ConfigError, match="cannot load --tls-ca"):
        Security(ca=str(short)).client_tls()
    with pytest.raises(ConfigError, match="cannot load --tls-cert"):
        Security(cert=pki.ca, key=pki.ca).server_tls()
    with pytest.raises(ConfigError, match="give --tls-ca too"):
        Security(cert=pki.client, key=pki.client).client_tls()


# --- the same hostile clients as tests/test_nodes.py, over TLS ------------------


def _tls_exchange(port: int, ca: str, data: bytes, *, shut: bool = True, timeout=10.0) -> bytes:
    import socket

    ctx = ssl.create_default_context(cafile=ca)
    ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        s.settimeout(timeout)
        s.sendall(data)
        if shut:
            socket.socket.shutdown(s, socket.SHUT_WR)
        out = b""
        while True:
            try:
                chunk = s.recv(4096)
            except (ConnectionResetError, ssl.SSLEOFError):
                break
            if not chunk:
                break
            out += chunk
    return out


def _error_text(reply: bytes) -> str:
    import struct

    assert len(reply) >= 8, reply
    (t, n) = struct.unpack_from("<ii", reply)
    assert t == wire.ERROR, reply[:16]
    return reply[8 : 8 + n - 1].decode()


def test_malformed_requests_over_tls_get_the_same_answers(tmp_path, pki: Pki) -> None:
    import struct

    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 50)
    gate = threading.Event()
    gate.set()
    leader = leader_node(
        lp,
        [gated_writer(gate)] * 2,
        security=pki.leader_tls(),
        request_timeout=0.5,
        max_subscribers=1,
    )
    port, ca = leader.port, pki.ca
    try:
        assert "unknown message type 7" in _error_text(
            _tls_exchange(port, ca, struct.pack("<i", 7))
        )
        assert "no such job: 3" in _error_text(_tls_exchange(port, ca, struct.pack("<ii", 2, 3)))
        truncated = _tls_exchange(port, ca, struct.pack("<iq", 1, 0)[:10])
        assert "middle of a message" in _error_text(truncated)
        silent = _tls_exchange(port, ca, struct.pack("<iq", 1, 0)[:10], shut=False)
        assert "no complete request within 0.5 s" in _error_text(silent)
        bad_hash = struct.pack("<iq", 1, 10) + b"\x01" * 16
        assert _error_text(_tls_exchange(port, ca, bad_hash)) == wire.INCOMPATIBLE
        garbage = _tls_exchange(port, ca, b"hello world, this is not the protocol")
        assert "unknown message type" in _error_text(garbage)
        # a client that never reads: a subscriber over TLS is dropped, the leader goes on
        import socket

        ctx = ssl.create_default_context(cafile=ca)
        lazy = ctx.wrap_socket(socket.socket(), server_hostname="127.0.0.1")
        lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        lazy.connect(("127.0.0.1", port))
        lazy.sendall(struct.pack("<ii", 2, 0))
        assert lazy.recv(4) == struct.pack("<i", 5)
        too_many = _tls_exchange(port, ca, struct.pack("<ii", 2, 0))
        assert "too many subscribers for job 0" in _error_text(too_many)
        wait_until(lambda: leader.runner.dropped >= 1, 60, "the lazy TLS subscriber dropped")
        lazy.close()
        # a TLS client that starts its handshake and goes silent: cut at the deadline
        silent_tls = socket.create_connection(("127.0.0.1", port))
        silent_tls.sendall(b"\x16\x03\x01")
        silent_tls.settimeout(5)
        t0 = time.monotonic()
        assert silent_tls.recv(100) == b""
        assert time.monotonic() - t0 < 3
        silent_tls.close()
        f = follower_node(fp, port, security=Security(ca=ca))
        wait_until(lambda: f.runner.stats.phase == "stream", 20, "a real follower streaming")
        leader.runner.timeout.expire()
        leader.wait(60)
        f.wait(60)
        f.close()
    finally:
        leader.close()
    assert_identical(lp, fp)


def test_a_leader_over_tls_makes_a_follower_stop_on_garbage(tmp_path, pki: Pki) -> None:
    """The follower's side: a TLS leader that sends garbage is a protocol error."""
    import socket

    ctx = pki.leader_tls().server_tls()
    assert ctx is not None
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        raw, _ = srv.accept()
        with ctx.wrap_socket(raw, server_side=True) as s:
            s.recv(28)
            s.sendall(b"hello world, this is not the protocol")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    f = follower_node(
        str(tmp_path / "f.db"), port, security=Security(ca=pki.ca), extra={"feedback": False}
    )
    try:
        with pytest.raises(ProtocolError, match="unexpected reply type to SYNC"):
            f.wait(10)
    finally:
        f.close()
        srv.close()


# --- the command line ----------------------------------------------------------------


def test_cli_nodes_over_tls_with_a_secret_and_a_wrong_secret_exits_11(tmp_path, pki: Pki) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 50)
    tls = ["--tls-cert", pki.leader, "--tls-key", pki.leader]
    with processes(str(tmp_path)) as procs:
        leader = procs.start(
            *HCT, "leader", lp, "--port", "0", "--job", "writer", "--auth-file", pki.secret, *tls
        )
        wait_until(lambda: "leader on" in procs.stderr(leader), 60, "the leader's start")
        err = procs.stderr(leader)
        assert "TLS and a shared secret" in err
        port = re.search(r"leader on \S+:(\d+)", err).group(1)  # type: ignore[union-attr]
        bad = procs.start(
            *HCT, "follower", str(tmp_path / "bad.db"), "--port", port, "--tls-ca", pki.ca,
            "--auth-file", pki.wrong,
        )  # fmt: skip
        assert bad.wait(30) == 11
        lines = procs.stderr(bad).strip().splitlines()
        assert "wrong shared secret" in lines[-1], lines
        f = procs.start(
            *HCT, "follower", fp, "--port", port, "--tls-ca", pki.ca, "--auth-file", pki.secret
        )
        wait_until(lambda: "caught up: streaming" in procs.stderr(f), 60, "streaming over TLS")
        stop(leader)
        wait_until(lambda: f.poll() is not None or "leader" in procs.stderr(f), 60, "the end")
        stop(f)
    assert_identical(lp, fp)


def test_the_http_endpoint_over_tls_with_a_bearer_token(tmp_path, pki: Pki) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 10)
    from hctserver.tools.top import read_status

    token = (Path(pki.secret).read_bytes()).strip()
    node = Node(
        lp,
        port=0,
        http="0",
        http_security=HttpSecurity(pki.leader, pki.leader, pki.secret),
    )
    node.start()
    try:
        url = node.http_url
        assert url is not None and url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=pki.ca)
        with urllib.request.urlopen(url + "/health", context=ctx, timeout=5) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/metrics", context=ctx, timeout=5)
        assert e.value.code == 401
        assert e.value.headers["WWW-Authenticate"].startswith("Bearer")
        req = urllib.request.Request(url + "/metrics", headers={"Authorization": "Bearer nope"})
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(req, context=ctx, timeout=5)
        good = urllib.request.Request(
            url + "/metrics", headers={"Authorization": "Bearer " + token.decode()}
        )
        with urllib.request.urlopen(good, context=ctx, timeout=5) as r:
            assert b"hctserver_" in r.read()
        assert read_status(url, 5, token, pki.ca)["role"] == "leader"
        with pytest.raises(AuthError, match="HTTP 401"):
            read_status(url, 5, None, pki.ca)
        for _ in range(2):  # five wrong tries in all: the address is refused for a while
            with pytest.raises(AuthError, match="HTTP 401"):
                read_status(url, 5, b"a wrong token of sixteen bytes", pki.ca)
        with pytest.raises(AuthError, match="HTTP 429: too many wrong tokens"):
            read_status(url, 5, token, pki.ca)
        with pytest.raises(urllib.error.URLError):  # a client without the CA refuses it
            urllib.request.urlopen(url + "/health", timeout=5)
    finally:
        node.close()
    assert os.path.exists(lp)


# --- the original C nodes ------------------------------------------------------------


@pytest.mark.parametrize("setting", ["tls", "secret"])
def test_the_c_follower_prints_why_a_secured_leader_refuses_it(tmp_path, pki: Pki, setting) -> None:
    import subprocess

    fixture = require_reference()
    lp = str(tmp_path / "l.db")
    init_db(lp, 10)
    sec = pki.leader_tls() if setting == "tls" else Security(auth_file=pki.secret)
    leader = leader_node(lp, [], security=sec)
    try:
        p = subprocess.run(
            [
                str(fixture),
                str(fixture.parent / "follower.tcl"),
                str(tmp_path / "c.db"),
                str(leader.port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        want = {
            "tls": "this leader requires TLS",
            "secret": "this leader requires authentication",
        }[setting]
        assert f"error from leader: {want}" in p.stdout, p.stdout + p.stderr
        assert leader.runner.refused_by == {("tls" if setting == "tls" else "auth"): 1}
    finally:
        leader.close()


def test_our_follower_with_a_secret_refuses_the_c_leader(tmp_path, pki: Pki) -> None:

    port = free_port()
    with processes(str(tmp_path)) as procs:
        c = procs.c_leader(str(tmp_path / "c.db"), port, 30, 1)
        wait_until(lambda: "listening" in procs.stdout(c) or _accepts(port), 30, "the C leader")
        t0 = time.monotonic()
        f = follower_node(str(tmp_path / "f.db"), port, security=Security(auth_file=pki.secret))
        try:
            with pytest.raises(AuthError, match="does not know authentication"):
                f.wait(10)
        finally:
            f.close()
        assert time.monotonic() - t0 < 1.0
        assert c.poll() is None  # the C leader goes on
        c.kill()


def _accepts(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
