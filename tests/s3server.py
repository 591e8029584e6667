"""A real S3-compatible server for tests: moto's standalone server
(``moto[server]``, a test dependency) as a separate process, spoken to over
HTTP on 127.0.0.1, on a port from :func:`procs.free_port`.

``with s3_server(workdir) as s3:`` starts it, waits until it answers and
stops it whatever happens. It accepts any credentials until
:meth:`S3Server.enforce_auth`; :meth:`S3Server.user` makes an IAM user
(a key that exists) before that. :func:`aws_env` gives a test an AWS
environment of its own (no profile, file or instance role of the machine's)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import wait_until
from procs import free_port, terminate

# what the server is told by the test's own client; any value works before enforce_auth
KEY_ID = "AKIAHCTSERVERTEST01"
SECRET = "hctserver-test-secret-0123456789abcdef"
REGION = "us-east-1"


def require_boto3() -> None:
    """Skip the test, saying why, unless boto3 (the extra ``s3``) is here."""
    if importlib.util.find_spec("boto3") is None:
        pytest.skip("boto3 is not installed (pip install -e '.[test,s3]')")


def require_moto() -> None:
    """Skip the test, saying why, unless moto's server and boto3 are here."""
    require_boto3()
    for mod in ("moto", "flask", "flask_cors"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip("moto[server] is not installed (pip install -e '.[test,s3]')")


def aws_env(
    monkeypatch: pytest.MonkeyPatch, tmp: str, key_id: str = KEY_ID, secret: str = SECRET
) -> None:
    """Only these credentials and this region: the machine's own AWS setup
    (a profile, ~/.aws, an instance role, an endpoint) is out of reach."""
    require_boto3()
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    missing = os.path.join(tmp, "no-such-aws-file")
    monkeypatch.setenv("AWS_CONFIG_FILE", missing)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", missing)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)


class S3Server:
    def __init__(self, workdir: str) -> None:
        require_moto()
        self.dir = workdir
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = os.path.join(workdir, "moto.log")
        os.makedirs(workdir, exist_ok=True)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "inf"  # until enforce_auth
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.tail()
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1),
            ):
                return True
            return False

        wait_until(up, 60, "the S3 server (moto) to answer")

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None

    def tail(self) -> str:
        p = Path(self.log)
        return p.read_text(errors="replace")[-2000:] if p.exists() else ""

    def url(self, bucket: str, prefix: str = "archive") -> str:
        return f"s3://{bucket}/{prefix}?endpoint={self.endpoint}&region={REGION}"

    def client(self, service: str = "s3", key_id: str = KEY_ID, secret: str = SECRET) -> Any:
        """A boto3 client of this server, with explicit credentials."""
        import boto3

        return boto3.session.Session(
            aws_access_key_id=key_id, aws_secret_access_key=secret, region_name=REGION
        ).client(service, endpoint_url=self.endpoint)

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def user(self, name: str, *, s3_allowed: bool = True) -> tuple[str, str]:
        """An IAM user's access key (id, secret), allowed s3:* or nothing.
        Call it before :meth:`enforce_auth`."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        if s3_allowed:
            policy = {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
            }
            iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return str(key["AccessKeyId"]), str(key["SecretAccessKey"])

    def enforce_auth(self) -> None:
        """From now on every request must be signed by an IAM user's key."""
        req = urllib.request.Request(
            self.endpoint + "/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200


@contextlib.contextmanager
def s3_server(workdir: str) -> Iterator[S3Server]:
    srv = S3Server(workdir)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
