"""The etcd client over TLS (mutual) with etcd's user/password
authentication, against a real etcd (docs/SECURITY.md, "etcd")."""

from __future__ import annotations

import http.server
import os
import ssl
import threading
from collections.abc import Iterator

import pytest
import trustme

from hctserver.cluster.etcd import EtcdAuthError, EtcdClient, EtcdError, Lease
from hctserver.errors import AuthError, ConfigError

from etcdserver import EtcdServer, etcd_server
from procs import free_port

PASSWORD = "correct horse battery staple"


def secret_file(tmp_path, name: str, text: str, mode: int = 0o600) -> str:
    path = os.path.join(tmp_path, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.chmod(path, mode)
    return path


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd for the module: TLS, client certificates required, auth on."""
    with etcd_server(str(tmp_path_factory.mktemp("etcd")), tls=True, password=PASSWORD) as srv:
        yield srv


def test_tls_with_a_client_certificate_and_a_password(secured: EtcdServer) -> None:
    a, b = secured.client(), secured.client()
    assert a.url.startswith("https://") and PASSWORD not in repr(a)
    a.check()
    a.put("/t/members/a", "1")
    a.put("/t/members/b", "2")
    assert a.get("/t/members/b").value == "2"  # type: ignore[union-attr]
    assert [kv.key for kv in b.get_prefix("/t/members/")] == ["/t/members/a", "/t/members/b"]
    la, lb = Lease(a, 30), Lease(b, 30)
    assert la.renew() and la.remaining() > 20
    assert a.create("/t/leader", "a", la.id) is None
    held = b.create("/t/leader", "b", lb.id)
    assert held is not None and held.value == "a" and held.lease == la.id
    la.revoke()
    assert a.get("/t/leader") is None
    assert b.create("/t/leader", "b", lb.id) is None
    lb.revoke()
    a.delete("/t/members/a")
    assert [kv.key for kv in b.get_prefix("/t/")] == ["/t/members/b"]
    # etcd's certificate names localhost too: a name other than the URL's host
    c = secured.client(server_name="localhost")
    assert c.get("/t/members/b").value == "2"  # type: ignore[union-attr]


def test_what_etcd_refuses_says_why(secured: EtcdServer, tmp_path) -> None:
    def refused(c: EtcdClient, match: str) -> None:
        with pytest.raises(EtcdAuthError, match=match) as e:
            c.get("/t/x")
        # a command exits 11 on it (AuthError); a running node retries it (EtcdError)
        assert isinstance(e.value, AuthError) and isinstance(e.value, EtcdError)

    other = trustme.CA()
    other_ca = os.path.join(tmp_path, "other-ca.pem")
    other.cert_pem.write_to_path(other_ca)
    stranger = other.issue_cert("stranger")
    stranger_cert, stranger_key = (os.path.join(tmp_path, n) for n in ("s.pem", "s.key"))
    stranger.cert_chain_pems[0].write_to_path(stranger_cert)
    stranger.private_key_pem.write_to_path(stranger_key)

    # etcd's certificate: not signed by a CA the client trusts, or not for this name
    verify = r"certificate this client refuses \(certificate verify failed: unable to get"
    refused(secured.client(ca=None), verify + ".*give --etcd-ca")
    refused(secured.client(ca=other_ca), verify + ".*give --etcd-ca")
    refused(secured.client(server_name="etcd.example"), "Hostname mismatch.*a name it holds")
    # the client's certificate: none, or one of a CA etcd does not trust
    refused(secured.client(cert=None, key=None), "requires a client certificate: give --etcd-cert")
    refused(secured.client(cert=stranger_cert, key=stranger_key), "refused this client certificate")
    # the credentials: wrong, or none though etcd requires them
    wrong = secret_file(tmp_path, "wrong", "not the password at all")
    refused(secured.client(password_file=wrong), "refused user 'root': wrong password")
    refused(secured.client(user="nobody"), "refused user 'nobody': wrong password or no such user")
    refused(
        secured.client(user=None, password_file=None), "requires authentication: give --etcd-user"
    )
    # a user without permission on the keys
    secured.client().call("/auth/user/add", {"name": "idle", "password": PASSWORD})
    idle = secret_file(tmp_path, "idle", PASSWORD)
    refused(secured.client(user="idle", password_file=idle), "denied /kv/range to user 'idle'")
    # plain http to the TLS port
    plain = EtcdClient(f"http://127.0.0.1:{secured.client_port}", timeout=2)
    refused(plain, r"speaks TLS: give its https:// URL")
    with pytest.raises(EtcdAuthError, match="requires authentication"):
        secured.client(user=None, password_file=None).check()


def test_a_forgotten_token_is_replaced_once(secured: EtcdServer, monkeypatch) -> None:
    c = secured.client()
    c.put("/t/token", "1")
    first = c._token
    assert first
    # a token etcd does not know (as after it expires): authenticated anew, retried
    c._token = first + "garbled"
    c.put("/t/token", "2")
    assert c._token not in (None, first, first + "garbled")
    # etcd restarted: its simple tokens are gone
    before = c._token
    secured.stop()
    secured.start()
    assert c.get("/t/token").value == "2"  # type: ignore[union-attr]
    assert c._token not in (None, before)
    # once: a token refused right after authenticating is etcd's trouble (retried later)
    logins: list[float] = []

    def bogus(deadline: float) -> str:
        logins.append(deadline)
        return "bogus"

    monkeypatch.setattr(c, "_authenticate", bogus)
    c._token = None
    with pytest.raises(EtcdError, match="invalid auth token") as e:
        c.get("/t/token")
    assert len(logins) == 2 and not isinstance(e.value, AuthError)


@pytest.mark.parametrize("tls", [False, True])
def test_credentials_before_auth_is_enabled_and_after(tmp_path, tls: bool) -> None:
    """A client with credentials works with an etcd without auth, and goes
    on working when auth is enabled: etcd then says the user name is empty,
    or, over TLS, denies the call (its gateway forwards it under its own
    certificate's name)."""
    pw = secret_file(tmp_path, "pw", PASSWORD)
    with etcd_server(str(tmp_path), tls=tls) as srv:
        c = srv.client(user="root", password_file=pw)
        c.put("/t/a", "1")
        assert c._token is None  # auth is off: no token
        admin = srv.client()
        admin.call("/auth/user/add", {"name": "root", "password": PASSWORD})
        admin.call("/auth/user/grant", {"user": "root", "role": "root"})
        admin.call("/auth/enable", {})
        with pytest.raises(EtcdAuthError, match="requires authentication"):
            admin.get("/t/a")
        assert c.get("/t/a").value == "1"  # type: ignore[union-attr]
        assert c._token


def test_https_to_a_plain_server(tmp_path) -> None:
    class Plain(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Plain)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        c = EtcdClient(f"https://127.0.0.1:{srv.server_address[1]}", timeout=2)
        with pytest.raises(EtcdAuthError, match=r"does not speak TLS.*give its http:// URL"):
            c.get("/x")
    finally:
        srv.shutdown()
        srv.server_close()
    with pytest.raises(EtcdError, match="cannot reach etcd") as e:
        EtcdClient(f"https://127.0.0.1:{free_port()}", timeout=1).get("/x")
    assert not isinstance(e.value, AuthError)  # down, not misconfigured: retried


def test_settings_that_cannot_work_are_config_errors(tmp_path) -> None:
    ca = trustme.CA()
    ca_pem = os.path.join(tmp_path, "ca.pem")
    ca.cert_pem.write_to_path(ca_pem)
    leaf = ca.issue_cert("client")
    cert, key = os.path.join(tmp_path, "c.pem"), os.path.join(tmp_path, "c.key")
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    pw = secret_file(tmp_path, "pw", PASSWORD)
    url = "https://127.0.0.1:2379"
    cases: list[tuple[str, dict[str, str | None], str]] = [
        (url, {"cert": cert}, "--etcd-cert and --etcd-key go together"),
        (url, {"ca": os.path.join(tmp_path, "none.pem")}, "cannot load --etcd-ca .*no such file"),
        (url, {"ca": pw}, "cannot load --etcd-ca"),
        (url, {"cert": key, "key": cert}, "cannot load --etcd-cert"),
        ("http://127.0.0.1:2379", {"ca": ca_pem}, "are for TLS: give etcd's https:// URL"),
        (url, {"user": "root"}, "needs a password: give --etcd-password-file"),
        (url, {"password_file": pw}, "needs its user: give --etcd-user"),
        (url, {"user": "root", "password": "x" * 20, "password_file": pw}, "not both"),
        (url, {"user": "root", "password_file": secret_file(tmp_path, "open", PASSWORD, 0o644)},
         "can be read by other users"),
        (url, {"user": "root", "password_file": secret_file(tmp_path, "short", "pw")},
         "use at least 16"),
        ("https://root:pw@127.0.0.1:2379", {}, "no user or password in the etcd URL"),
    ]  # fmt: skip
    for u, kw, match in cases:
        with pytest.raises(ConfigError, match=match):
            EtcdClient(u, 2.0, **kw)  # type: ignore[arg-type]
    # all of it, right: nothing is contacted until a call
    c = EtcdClient(url, 1.5, ca=ca_pem, cert=cert, key=key, user="root", password_file=pw)
    assert (c.url, c.timeout, c.user) == (url, 1.5, "root")
    assert isinstance(c._tls, ssl.SSLContext)
