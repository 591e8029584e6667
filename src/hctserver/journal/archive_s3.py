"""The archive's S3 backend: ``s3://bucket/prefix`` through boto3 (the
optional extra ``hctserver[s3]``).

:mod:`hctserver.journal.archive_store` registers the scheme with a factory
that imports this module only when an ``s3://`` URL is opened, and boto3 is
imported only then too: without it, opening such a URL is a ConfigError
naming the extra.

Settings come the usual AWS ways (environment, ``AWS_PROFILE``, the shared
config and credentials files, an instance role); the URL adds ``?endpoint=``,
``?region=`` and ``?addressing=`` for S3-compatible servers. Every failure
is a typed one-line error (:func:`_translate`) built from our own words,
the error code and at most the server's message with the credentials
removed: a secret never reaches a message or a log.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from ..errors import AuthError, ConfigError, HctError, TransientError
from ..version import VERSION
from .archive_format import ArchiveError, ObjectMissingError, check_name

INSTALL = "pip install 'hctserver[s3]'"
CONNECT_TIMEOUT = 5.0  # seconds to open a connection
READ_TIMEOUT = 60.0  # seconds without a byte from the server (a put of a snapshot included)
MAX_ATTEMPTS = 3  # tries of one request, the first included, unless AWS_MAX_ATTEMPTS says

_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
_REGION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_CODE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_ADDRESSING = ("path", "virtual", "auto")
_GIVE = "give them as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials"

# error codes, by what to do about them
_MISSING = {"NoSuchKey", "404", "NotFound"}
_REFUSED = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "InvalidClientTokenId", "AuthFailure", "InvalidSecurity",
    "MissingSecurityHeader", "CredentialsNotSupported",
}  # fmt: skip
_DENIED = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403"}
_REGION_CODES = {
    "AuthorizationHeaderMalformed", "PermanentRedirect", "IllegalLocationConstraintException",
    "301", "Redirect", "TemporaryRedirect",
}  # fmt: skip
_BUSY = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable",
    "InternalError", "RequestLimitExceeded", "TooManyRequestsException", "OperationAborted",
    "RequestThrottled", "BandwidthLimitExceeded",
}  # fmt: skip


@dataclass(frozen=True)
class _Boto:
    """boto3 and botocore's parts, imported on first use. They ship no
    types (no stubs are required), so they are Any here, and nothing of
    theirs leaves this module."""

    boto3: Any
    session: Any  # botocore.session
    Config: Any
    exc: Any  # botocore.exceptions


@functools.cache
def _boto() -> _Boto:
    try:
        return _Boto(
            importlib.import_module("boto3"),
            importlib.import_module("botocore.session"),
            importlib.import_module("botocore.config").Config,
            importlib.import_module("botocore.exceptions"),
        )
    except ImportError:
        raise ConfigError(f"s3:// archives need boto3, which is not installed: {INSTALL}") from None


@dataclass(frozen=True)
class S3Location:
    """An ``s3://`` URL taken apart."""

    bucket: str
    prefix: str  # "" or ending in "/"
    endpoint: str | None = None
    region: str | None = None
    addressing: str | None = None


def parse_url(url: str) -> S3Location:
    """``s3://BUCKET[/PREFIX][?endpoint=URL&region=NAME&addressing=path|virtual|auto]``.
    Credentials in the URL are refused (a URL shows in logs and status), and
    an error quotes the URL without its query (whatever was put there)."""
    u = urlsplit(url)
    if "@" in u.netloc:  # the message must not repeat them
        raise ConfigError(f"archive URL: credentials in an s3:// URL are refused: {_GIVE}")
    bad = f"archive URL {urlunsplit((u.scheme, u.netloc, u.path, '', ''))!r}"
    if u.scheme.lower() != "s3":
        raise ConfigError(f"{bad}: not an s3:// URL")
    params: dict[str, str] = {}
    for key, value in parse_qsl(u.query, keep_blank_values=True):
        if key not in ("endpoint", "region", "addressing"):
            raise ConfigError(f"{bad}: unknown parameter {key!r} (endpoint, region, addressing)")
        if key in params:
            raise ConfigError(f"{bad}: {key} is given twice")
        params[key] = value
    endpoint = params.get("endpoint")
    if endpoint is not None:
        _check_endpoint(bad, endpoint)
    if not u.netloc:
        raise ConfigError(f"{bad}: name the bucket: s3://BUCKET/PREFIX")
    if not _BUCKET.fullmatch(u.netloc):
        hint = " (an S3-compatible server's address goes in ?endpoint=)" if ":" in u.netloc else ""
        raise ConfigError(f"{bad}: {u.netloc!r} is not a bucket name{hint}")
    if u.fragment:
        raise ConfigError(f"{bad}: a '#' has no place in it")
    path = unquote(u.path).strip("/")
    if path and any(p in ("", ".", "..") for p in path.split("/")):
        raise ConfigError(f"{bad}: the prefix {path!r} has an empty, '.' or '..' part")
    region = params.get("region")
    if region is not None and not _REGION.fullmatch(region):
        raise ConfigError(f"{bad}: the region is not a region name (letters, digits, -)")
    addressing = params.get("addressing")
    if addressing is not None and addressing not in _ADDRESSING:
        raise ConfigError(f"{bad}: addressing is one of {', '.join(_ADDRESSING)}")
    return S3Location(u.netloc, path + "/" if path else "", endpoint, region, addressing)


def _check_endpoint(bad: str, endpoint: str) -> None:
    e = urlsplit(endpoint)
    if "@" in e.netloc:
        raise ConfigError(f"{bad}: credentials in the endpoint are refused: {_GIVE}")
    if e.scheme not in ("http", "https") or not e.hostname or e.query or e.fragment:
        raise ConfigError(
            f"{bad}: the endpoint must be http(s)://HOST[:PORT] (e.g. endpoint=http://127.0.0.1:9000)"
        )
    try:
        _ = e.port
    except ValueError:
        raise ConfigError(f"{bad}: the endpoint's port is not a number") from None


def _no_userinfo(text: str) -> str:
    return re.sub(r"//[^/@\s]*@", "//***@", text)


class S3Store:
    """Objects under ``prefix`` in an S3 bucket. ``put`` is one PutObject:
    S3 stores an object whole or not at all. Names whose parts start with a
    dot, and "folder" markers, are never listed (as DirStore)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        addressing: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        max_attempts: int | None = None,
        url: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.url = url or f"s3://{bucket}/{prefix}"
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        b = _boto()
        self._exc = b.exc
        self._core: Any = None
        self.attempts = MAX_ATTEMPTS
        try:
            # a botocore session of our own: AWS_PROFILE, the shared files, AWS_MAX_ATTEMPTS
            self._core = b.session.Session()
            attempts = max_attempts or self._core.get_config_variable("max_attempts")
            self.attempts = _attempts(attempts or MAX_ATTEMPTS, self.url)
            mode = self._core.get_config_variable("retry_mode") or "standard"
            # botocore reads AWS_DEFAULT_REGION only; AWS_REGION wins, as in the AWS CLI
            region = region or os.environ.get("AWS_REGION") or None
            session = b.boto3.session.Session(botocore_session=self._core, region_name=region)
            s3: dict[str, str] = {}
            if addressing or endpoint:  # S3-compatible servers rarely serve bucket.host names
                s3["addressing_style"] = addressing or "path"
            config = b.Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"mode": mode, "total_max_attempts": self.attempts},
                user_agent_extra=f"hctserver/{VERSION}",
                s3=s3 or None,
            )
            self._client: Any = session.client("s3", endpoint_url=endpoint, config=config)
        except HctError:
            raise
        except b.exc.BotoCoreError as e:
            raise self._translate(e, "", None) from None
        except ValueError as e:  # an endpoint or setting botocore refuses
            msg = self._scrub(str(e))
            raise ConfigError(f"{self.url}: the S3 settings are refused: {msg}") from None
        self.endpoint = _no_userinfo(str(self._client.meta.endpoint_url))
        self.region = str(self._client.meta.region_name)

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        loc = parse_url(url)
        return cls(
            loc.bucket,
            loc.prefix,
            endpoint=loc.endpoint,
            region=loc.region,
            addressing=loc.addressing,
            url=url,
        )

    # --- the ObjectStore interface ----------------------------------------------

    def put(self, name: str, data: bytes) -> None:
        check_name(name)
        with self._errors("PutObject", name):
            self._client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    def get(self, name: str) -> bytes:
        check_name(name)
        with self._errors("GetObject", name):
            resp = self._client.get_object(Bucket=self.bucket, Key=self.prefix + name)
            body = resp["Body"]
            try:
                data: bytes = body.read()  # botocore checks the length (and a checksum)
            finally:
                body.close()
        return data

    def list(self, prefix: str) -> list[str]:
        names: list[str] = []
        n = len(self.prefix)
        with self._errors("ListObjectsV2", None):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    name = str(obj["Key"])[n:]
                    if _listable(name):
                        names.append(name)
        return sorted(names)

    def delete(self, name: str) -> None:
        check_name(name)
        with self._errors("DeleteObject", name):  # an absent key is no error in S3
            self._client.delete_object(Bucket=self.bucket, Key=self.prefix + name)

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    # --- errors ------------------------------------------------------------------

    @contextmanager
    def _errors(self, op: str, name: str | None) -> Iterator[None]:
        try:
            yield
        except (self._exc.ClientError, self._exc.BotoCoreError) as e:
            raise self._translate(e, op, name) from None

    def _translate(self, e: Any, op: str, name: str | None) -> HctError:
        """One typed error, one line, that says what to do."""
        where = self.url + (f": {op}" if op else "") + (f" {name}" if name else "")

        def isa(*names: str) -> bool:  # by name: older botocores lack some of these
            return any(isinstance(e, t) for t in (getattr(self._exc, n, None) for n in names) if t)

        if isa("ClientError"):
            return self._client_error(e, op, name, where)
        if isa("ConnectTimeoutError"):
            return self._unreachable(where, f"no connection within {self.connect_timeout:g} s")
        if isa("ReadTimeoutError"):
            return self._unreachable(where, f"no answer within {self.read_timeout:g} s")
        if isa("SSLError"):
            return AuthError(
                f"{where}: the TLS connection to {self._endpoint()} failed: check the endpoint"
                " and its certificate (AWS_CA_BUNDLE names the CA to trust)"
            )
        if isa("EndpointConnectionError"):
            return self._unreachable(where, "cannot connect")
        if isa("ConnectionClosedError"):
            return self._unreachable(where, "the server closed the connection")
        if isa("HTTPClientError", "IncompleteReadError"):
            return self._unreachable(where, f"the connection failed ({type(e).__name__})")
        if isa("NoCredentialsError"):
            return ConfigError(
                f"{where}: no AWS credentials found: set AWS_ACCESS_KEY_ID and"
                " AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (the shared config files), or run"
                " with an instance or task role"
            )
        if isa("PartialCredentialsError"):
            kw = getattr(e, "kwargs", {})  # where they were found, what is missing: no value
            return ConfigError(
                f"{where}: incomplete AWS credentials in {kw.get('provider')}: {kw.get('cred_var')}"
                " is missing: set it, or remove the others"
            )
        if isa("ProfileNotFound"):
            return ConfigError(
                f"{where}: the AWS profile {e.kwargs.get('profile')!r} (AWS_PROFILE) is not in"
                " the shared config files: fix AWS_PROFILE or ~/.aws/config"
            )
        if isa("CredentialRetrievalError"):  # its detail may quote a process's output
            return ConfigError(
                f"{where}: the AWS credentials could not be obtained from"
                f" {e.kwargs.get('provider')!r}: check that source (e.g. `aws sso login`)"
            )
        if isa("TokenRetrievalError", "SSOError"):
            return ConfigError(
                f"{where}: the AWS SSO token is missing or expired: run `aws sso login`"
            )
        if isa("InvalidRegionError", "NoRegionError"):
            msg = self._scrub(str(e)).rstrip(".")
            return ConfigError(f"{where}: {msg}: set ?region= or AWS_REGION")
        if isa("FlexibleChecksumError"):  # damaged on the way: another try may do
            return TransientError(f"{where}: the object's checksum did not match on receipt: retry")
        if isa("ConfigParseError", "InvalidConfigError"):
            return ConfigError(f"{where}: the AWS configuration is invalid: {self._scrub(str(e))}")
        return ArchiveError(f"{where}: {type(e).__name__}: {self._scrub(str(e))}")

    def _client_error(self, e: Any, op: str, name: str | None, where: str) -> HctError:
        resp = getattr(e, "response", None) or {}
        err = resp.get("Error") or {}
        meta = resp.get("ResponseMetadata") or {}
        status = int(meta.get("HTTPStatusCode") or 0)
        code = str(err.get("Code") or status)
        code = code if _CODE.fullmatch(code) else "?"
        said = f"{code}, HTTP {status}" if status else code
        if code in _MISSING and op == "GetObject" and name is not None:
            return ObjectMissingError("no such object in the archive", name)
        if code == "NoSuchBucket":
            return ConfigError(
                f"{self.url}: {op}: the bucket {self.bucket!r} does not exist at"
                f" {self._endpoint()}: create it, or fix the bucket in the URL (or the endpoint)"
            )
        if code in _REFUSED:
            return AuthError(
                f"{where}: the server refused the AWS credentials ({said}): check"
                " AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), or AWS_PROFILE"
                " and ~/.aws/credentials"
            )
        if code in _DENIED:
            return AuthError(
                f"{where}: access denied ({said}): give these credentials s3:GetObject,"
                f" s3:PutObject, s3:DeleteObject and s3:ListBucket on {self.bucket!r}"
                " (without s3:ListBucket a missing object reads as AccessDenied)"
            )
        if code in _REGION_CODES:
            return ConfigError(
                f"{where}: the bucket is not in region {self.region!r} ({said}): set its region"
                " (?region=NAME, AWS_REGION or the profile's region)"
            )
        if code == "RequestTimeTooSkewed":
            return ConfigError(
                f"{where}: this machine's clock is too far from the server's ({said}):"
                " synchronize it (NTP)"
            )
        if code == "InvalidBucketName":
            return ConfigError(f"{where}: {self.bucket!r} is not a valid bucket name: fix the URL")
        if code in _BUSY or status >= 500 or status == 429:
            tries = int(meta.get("RetryAttempts") or 0) + 1
            return TransientError(
                f"{where}: the S3 server is busy or failing ({said}, {tries} attempts):"
                " it is retried later"
            )
        msg = self._scrub(str(err.get("Message") or ""))
        return ArchiveError(f"{where}: S3 refused it ({said}){': ' + msg if msg else ''}")

    def _unreachable(self, where: str, why: str) -> TransientError:
        return TransientError(
            f"{where}: cannot reach the S3 endpoint {self._endpoint()} ({why};"
            f" {self.attempts} attempts): check the endpoint (?endpoint=, AWS_ENDPOINT_URL_S3,"
            " AWS_ENDPOINT_URL) and the network; retrying later may succeed"
        )

    def _endpoint(self) -> str:
        return getattr(self, "endpoint", None) or "the S3 endpoint"

    def _scrub(self, text: str) -> str:
        """``text`` as one short line with every credential value removed
        (and anything shaped like a signature or token)."""
        secrets: list[str] = []
        try:
            creds = self._core.get_credentials() if self._core is not None else None
            if creds is not None:
                frozen = creds.get_frozen_credentials()
                secrets = [s for s in (frozen.secret_key, frozen.token, frozen.access_key) if s]
        except Exception:  # credentials that cannot be read: say nothing of the server's
            return "(details withheld)"
        for s in secrets:
            text = text.replace(s, "***")
        text = re.sub(
            r"(?i)(signature|credential|security-?token|secret[_-]?access[_-]?key|"
            r"session[_-]?token|authorization)([\"']?\s*[=:]\s*)\S+",
            r"\1\2***",
            text,
        )
        text = _no_userinfo(" ".join(text.split()))
        return text[:300] + ("..." if len(text) > 300 else "")


def _attempts(value: object, url: str) -> int:
    try:
        n = int(str(value))
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(
            f"{url}: AWS_MAX_ATTEMPTS (or max_attempts in the AWS profile) must be a whole"
            " number of at least 1"
        )
    return n


def _listable(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not any(p == "" or p.startswith(".") for p in parts)
