"""The archive's S3 backend against a real S3-compatible server (moto's, a
separate process on loopback: tests/s3server.py): a round trip (archive,
ls, verify, restore to a middle and the newest cid), and every failure as a
typed one-line error that never holds a credential."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from hctserver import Database
from hctserver.errors import AuthError, ConfigError, TransientError, is_transient
from hctserver.journal.archive import (
    Archiver,
    ObjectMissingError,
    ls,
    open_store,
    restore,
    verify,
)
from hctserver.journal.archive_s3 import S3Store, parse_url
from hctserver.journal.verify import compare

from archived import Leader
from helpers import wait_until
from nodes import assert_identical, init_db
from procs import HCT, free_port
from s3server import REGION, S3Server, aws_env, s3_server

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server(str(tmp_path_factory.mktemp("s3"))) as srv:
        yield srv


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    aws_env(monkeypatch, str(tmp_path))


_buckets = iter(range(1_000_000))


def new_bucket(s3: S3Server) -> str:
    name = f"hct-test-{next(_buckets)}"
    s3.make_bucket(name)
    return name


# --- the round trip -------------------------------------------------------------------


def test_archive_ls_verify_and_restore_through_s3(s3: S3Server, env: None, tmp_path: Any) -> None:
    url = s3.url(new_bucket(s3), "prod/orders")
    store = open_store(url)
    assert isinstance(store, S3Store) and store.url == url and store.prefix == "prod/orders/"
    lead = Leader(tmp_path, store=store)
    try:
        lead.write(20)
        assert lead.archiver.ship_once() > 0
        lead.write(15)
        middle = lead.copy()
        lead.archiver.ship_once()
        lead.conn.execute("CREATE TABLE t2(x PRIMARY KEY, y)")
        lead.conn.execute("INSERT INTO t2 VALUES(1, 'one')")
        snap = lead.archiver.snapshot_now()
        lead.write(12)
        lead.archiver.ship_once()
        lead.conn.execute("ALTER TABLE t2 ADD COLUMN z")
        lead.write(7)
        lead.archiver.ship_once()
        newest = lead.copy()
        assert lead.archiver.status().archived_cid == newest[0]
    finally:
        lead.close()

    listing = ls(url)
    assert [s.name for s in listing.snapshots] == [snap.name]
    assert listing.ranges == [(1, newest[0])] and listing.segments >= 4
    checked = verify(url)
    assert checked.snapshots == 1 and checked.entries == newest[0]
    # the objects live under the prefix, nowhere else in the bucket
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=store.bucket)["Contents"]]
    assert keys and all(k.startswith("prod/orders/v1/") for k in keys)

    for what, (cid, copy) in {"middle": middle, "newest": newest}.items():
        out = str(tmp_path / f"r-{what}.db")
        got = restore(url, out, cid=None if what == "newest" else cid)
        assert got.cid == cid
        assert compare(copy, out) is None
        assert_identical(copy, out)
    assert restore(url, str(tmp_path / "r-m2.db"), cid=middle[0]).anchor == (
        "the start of the history"
    )
    # the same through the command line (credentials from the environment)
    cli = [sys.executable, "-m", "hctserver"]
    out = subprocess.run([*cli, "archive", "ls", url, "--json"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ranges"] == [[1, newest[0]]]
    r = str(tmp_path / "r-cli.db")
    out = subprocess.run([*cli, "restore", url, r, "--cid", str(middle[0])], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert_identical(middle[1], r)


def test_the_store_interface(s3: S3Server, env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = new_bucket(s3)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")  # wins over AWS_DEFAULT_REGION, as in the CLI
    assert S3Store(bucket, endpoint=s3.endpoint).region == "eu-west-3"
    assert S3Store.from_url(s3.url(bucket)).region == REGION  # and ?region= over both
    a = S3Store.from_url(s3.url(bucket, "a"))
    b = S3Store.from_url(s3.url(bucket, "a/b"))  # a prefix inside another one's
    a.put("v1/x/2", b"two")
    a.put("v1/x/1", b"one")
    a.put("v1/x/1", b"uno")  # replaced whole
    a.put("v1/z", b"")
    b.put("v1/y", b"why")
    assert a.get("v1/x/1") == b"uno" and a.get("v1/z") == b""
    assert a.list("v1/x") == ["v1/x/1", "v1/x/2"]
    assert b.list("") == ["v1/y"]
    s3.client().put_object(Bucket=bucket, Key="a/v1/.hidden", Body=b"")
    s3.client().put_object(Bucket=bucket, Key="a/v1/folder/", Body=b"")
    assert a.list("v1/") == ["v1/x/1", "v1/x/2", "v1/z"]  # and a/b's, not: b is a/b/
    with pytest.raises(ObjectMissingError, match=r"v1/nothing: no such object"):
        a.get("v1/nothing")
    a.delete("v1/z")
    a.delete("v1/z")  # absent: no error
    assert a.list("v1/z") == []
    many = [f"v1/m/{i:05d}" for i in range(1001)]  # past one page of ListObjectsV2
    with ThreadPoolExecutor(8) as pool:  # one client, many threads: as the node's two
        list(pool.map(lambda n: b.put(n, b""), many))
    assert b.list("v1/m/") == many


def test_the_endpoint_from_the_environment_and_the_scheme_without_an_import(
    s3: S3Server, env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open_store knows s3:// by itself and imports boto3 only then;
    AWS_ENDPOINT_URL_S3 names an S3-compatible server."""
    bucket = new_bucket(s3)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    code = (
        "import sys\n"
        "from hctserver.journal.archive import open_store\n"
        "assert 'boto3' not in sys.modules, 'imported too early'\n"
        f"st = open_store('s3://{bucket}/env')\n"
        "st.put('v1/k', b'v')\n"
        "print(type(st).__name__, st.list(''), st.get('v1/k'), 'boto3' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["S3Store", "['v1/k']", "b'v'", "True"]


def test_without_boto3_the_error_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['boto3'] = None  # as if not installed\n"
        "from hctserver.errors import ConfigError\n"
        "from hctserver.journal.archive import open_store\n"
        "try:\n"
        "    open_store('s3://bucket/prefix')\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "pip install 'hctserver[s3]'" in p.stdout and "boto3" in p.stdout


def test_urls() -> None:
    loc = parse_url("s3://bkt/a/b/?endpoint=http://127.0.0.1:9000&region=eu-west-3")
    assert (loc.bucket, loc.prefix, loc.endpoint, loc.region) == (
        "bkt", "a/b/", "http://127.0.0.1:9000", "eu-west-3",
    )  # fmt: skip
    assert parse_url("s3://bkt").prefix == parse_url("s3://bkt/").prefix == ""
    assert parse_url("s3://bkt/x?addressing=virtual").addressing == "virtual"
    bad = {
        "s3:///prefix": "name the bucket",
        "s3://b/p": "not a bucket name",
        "s3://host:9000/p": r"address goes in \?endpoint=",
        "s3://bkt/a//b": "empty, '.' or '..' part",
        "s3://bkt/a/../b": "empty, '.' or '..' part",
        "s3://bkt/p?endpoint=ftp://h": "http",
        "s3://bkt/p?endpoint=http://h:port": "not a number",
        "s3://bkt/p?addressing=sideways": "addressing is one of",
        "s3://bkt/p?region=a/b": "not a region name",
        "s3://bkt/p?region=a&region=b": "given twice",
    }
    for url, words in bad.items():
        with pytest.raises(ConfigError, match=words):
            parse_url(url)
    # credentials in a URL are refused, and never repeated
    for url in (
        "s3://AKIAX:topsecret@bkt/p",
        "s3://bkt/p?endpoint=http://AKIAX:topsecret@127.0.0.1:9000",
        "s3://bkt/p?endpoint=http%3A%2F%2FAKIAX%3Atopsecret%40127.0.0.1",
        "s3://bkt/p?secret_key=topsecret",
    ):
        with pytest.raises(ConfigError) as e:
            parse_url(url)
        assert "topsecret" not in str(e.value) and "AKIAX" not in str(e.value)


# --- failures ---------------------------------------------------------------------------


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and len(text) < 500
    return text


def test_a_missing_bucket_is_a_configuration_error(s3: S3Server, env: None, tmp_path: Any) -> None:
    url = s3.url("no-such-bucket-here")
    store = open_store(url)
    for call in (lambda: store.list("v1/"), lambda: store.put("v1/x", b"1"),
                 lambda: store.get("v1/x")):  # fmt: skip
        with pytest.raises(ConfigError, match="the bucket 'no-such-bucket-here' does not exist"):
            call()
    with pytest.raises(ConfigError, match="create it") as e:
        restore(url, str(tmp_path / "r.db"))  # not "holds no archive"
    assert s3.endpoint in one_line(e.value)
    assert not os.path.exists(tmp_path / "r.db")


@pytest.fixture
def s3_auth(tmp_path: Any) -> Iterator[tuple[S3Server, dict[str, tuple[str, str]]]]:
    """A server of its own that checks signatures: keys of a user allowed
    s3:*, and of one allowed nothing."""
    with s3_server(str(tmp_path / "s3auth")) as srv:
        srv.make_bucket("guarded")
        keys = {"ok": srv.user("archivist"), "nobody": srv.user("nobody", s3_allowed=False)}
        srv.enforce_auth()
        yield srv, keys


def test_bad_credentials_are_a_clear_error_without_the_secret(
    s3_auth: tuple[S3Server, dict[str, tuple[str, str]]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    srv, keys = s3_auth
    caplog.set_level(logging.DEBUG)  # every logger, botocore's included
    url = srv.url("guarded")
    key_id, secret = keys["ok"]
    aws_env(monkeypatch, str(tmp_path), key_id, secret)
    good = open_store(url)
    good.put("v1/probe", b"1")
    assert good.list("v1/") == ["v1/probe"]

    wrong = "Wr0ngS3cretValue+For/TheTest0123456789abcd"
    token = "FQoGZXIvYXdzEXAMPLETOKENVALUE0123456789"
    cases = {
        "a wrong secret": (key_id, wrong, "SignatureDoesNotMatch"),
        "an unknown key": ("AKIAUNKNOWNKEY000000", wrong, "InvalidAccessKeyId"),
        "a key allowed nothing": (*keys["nobody"], "access denied"),
    }
    seen: list[str] = []
    for what, (kid, sec, words) in cases.items():
        aws_env(monkeypatch, str(tmp_path), kid, sec)
        if what == "an unknown key":
            monkeypatch.setenv("AWS_SESSION_TOKEN", token)
        store = open_store(url)
        for call in (lambda s=store: s.list("v1/"), lambda s=store: s.put("v1/x", b"1"),
                     lambda s=store: s.get("v1/probe")):  # fmt: skip
            with pytest.raises(AuthError, match=words) as e:
                call()
            text = one_line(e.value)
            assert not is_transient(e.value), what
            seen.append(f"{text} {e.value!r}")
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    assert any("check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in s for s in seen)
    assert any("s3:ListBucket on 'guarded'" in s for s in seen)

    # an archiver that keeps failing logs the failure, without the secret either
    aws_env(monkeypatch, str(tmp_path), key_id, wrong)
    init_db(str(tmp_path / "l.db"), 3)
    db = Database(str(tmp_path / "l.db"), init=False)
    arch = Archiver(db, open_store(url), max_delay=0.0, interval=0.01)
    stop = threading.Event()
    t = threading.Thread(target=arch.run, args=(stop,))
    t.start()
    try:
        wait_until(lambda: "archiving to" in caplog.text, 30, "the archiver's warning")
    finally:
        stop.set()
        t.join(30)
        db.close()
    assert "refused the AWS credentials" in caplog.text
    for secret_value in (wrong, keys["nobody"][1], secret):
        assert secret_value not in caplog.text
        assert all(secret_value not in s for s in seen)
    assert all(token not in s for s in seen)
    assert token not in "\n".join(
        r.getMessage() for r in caplog.records if r.name.startswith("hctserver")
    )

    # the command line: one line, the authentication exit code, no secret
    p = subprocess.run([*HCT, "archive", "ls", url], capture_output=True, text=True, timeout=60)
    assert p.returncode == 11, p.stderr
    assert "refused the AWS credentials" in p.stderr and wrong not in p.stderr + p.stdout
    assert len(p.stderr.strip().splitlines()) == 1


def test_an_unreachable_endpoint_is_a_retryable_error_in_bounded_time(
    env: None, tmp_path: Any
) -> None:
    port = free_port()  # nothing listens there
    url = f"s3://bkt/p?endpoint=http://127.0.0.1:{port}&region={REGION}"
    store = open_store(url)
    t0 = time.monotonic()
    with pytest.raises(TransientError, match="cannot reach the S3 endpoint") as e:
        store.list("v1/")
    assert time.monotonic() - t0 < 30
    assert is_transient(e.value) and f"127.0.0.1:{port}" in one_line(e.value)
    assert "3 attempts" in str(e.value) and "retrying later may succeed" in str(e.value)

    # through the archiver too: the node's loop retries it with backoff
    init_db(str(tmp_path / "l.db"), 2)
    db = Database(str(tmp_path / "l.db"), init=False)
    try:
        with pytest.raises(TransientError):
            Archiver(db, store, max_delay=0.0).ship_once()
    finally:
        db.close()


def test_a_silent_endpoint_times_out_in_bounded_time(env: None) -> None:
    # a listener that never answers: connections are accepted by the kernel, then nothing
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        store = S3Store(
            "bkt",
            "p/",
            endpoint=f"http://127.0.0.1:{port}",
            region=REGION,
            read_timeout=0.5,
            max_attempts=2,
        )
        t0 = time.monotonic()
        with pytest.raises(TransientError, match=r"no answer within 0\.5 s; 2 attempts") as e:
            store.get("v1/x")
        assert time.monotonic() - t0 < 20
        assert is_transient(e.value)
