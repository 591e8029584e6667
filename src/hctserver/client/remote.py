"""A node over the network: Hrana-over-HTTP streams (:mod:`hctserver.protocol.hrana`).

:class:`Stream` is one SQL session on a node (a baton kept between
pipelines); a connection on a follower's file forwards its writes to the
leader through one (it implements :class:`hctserver.journal.connection.RemoteStream`).
:class:`RemoteBackend` is the DB-API driver's network backend on top of it.

Errors come back as the classes the node raised: SQLite's as apsw's
(``SQLITE_CONSTRAINT_UNIQUE`` becomes ``apsw.ConstraintError``),
hctserver's as :mod:`hctserver.errors` classes (``HCT_NotLeaderError``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import apsw

from .. import errors
from ..errors import ConfigError, ConnectError, HctError, ProtocolError
from ..journal.connection import Rows
from ..journal.groupcommit import Committed, Statements
from ..net.httpclient import HttpClient
from ..protocol import hrana
from .backend import Params, Result
from .exceptions import from_apsw, from_hct

HCT_PREFIX = "HCT_"


def remote_error(message: str, code: str | None) -> Exception:
    """The exception a node's error answer stands for."""
    code = code or ""
    if code.startswith(HCT_PREFIX):
        cls = getattr(errors, code[len(HCT_PREFIX) :], None)
        if isinstance(cls, type) and issubclass(cls, HctError):
            return cls(message)
        return HctError(message)
    primary = code.split("_", 2)[:2]
    num = apsw.mapping_result_codes.get("_".join(primary)) if len(primary) == 2 else None
    if isinstance(num, int):
        exc: Exception = apsw.exception_for(num)
        exc.args = (message,)
        return exc
    return apsw.SQLError(message)


def http_url(url: str) -> str:
    """``hct://`` and ``hcts://`` are ``http://`` and ``https://``."""
    for ours, theirs in (("hcts://", "https://"), ("hct://", "http://")):
        if url.startswith(ours):
            return theirs + url[len(ours) :]
    return url


def read_token(token: bytes | str | None, token_file: str | None) -> bytes | None:
    if token is not None:
        return token.encode() if isinstance(token, str) else token
    if token_file is not None:
        try:
            with open(os.path.expanduser(token_file), "rb") as f:
                return f.read().strip()
        except OSError as e:
            raise ConfigError(f"cannot read the token file {token_file}: {e.strerror}") from None
    return None


class Stream:
    """One SQL session on a node. ``consistency``: "local", "leader" or
    "at_least" (with ``min_cid``) for every pipeline it sends."""

    def __init__(
        self,
        url: str,
        *,
        token: bytes | None = None,
        ca: str | None = None,
        timeout: float = 10.0,
        consistency: str = "local",
    ) -> None:
        self.url = http_url(url)
        self._http = HttpClient(self.url, token=token, ca=ca, timeout=timeout)
        self.timeout = timeout
        self.consistency = consistency
        self.min_cid = 0
        self._baton: str | None = None
        self.cid = 0  # the newest cid committed through this stream
        self.snapshot = 0  # the node's snapshot after the last pipeline
        self.in_transaction = False
        self.duplicate = False  # the last pipeline's txid had been committed before

    # --- pipelines ---------------------------------------------------------------

    def pipeline(
        self, requests: list[dict[str, Any]], *, txid: str | None = None, close: bool = False
    ) -> list[dict[str, Any]]:
        """Send requests; return their results (each ok or error)."""
        body: dict[str, Any] = {"baton": self._baton, "requests": list(requests)}
        if close:
            body["requests"].append({"type": "close"})
        if txid is not None:
            body["txid"] = txid
        if self.consistency != "local":
            body["consistency"] = self.consistency
            body["timeout_ms"] = int(self.timeout * 1000)
            if self.consistency == "at_least":
                body["min_cid"] = self.min_cid
        status, data = self._http.post(hrana.PIPELINE_PATH, json.dumps(body).encode())
        if status != 200:
            self._baton = None
            self.in_transaction = False
            raise self._refused(status, data)
        try:
            d = json.loads(data)
            results = d["results"]
            if not isinstance(results, list) or len(results) != len(body["requests"]):
                raise ValueError("one result per request")
        except (ValueError, KeyError, TypeError) as e:
            raise ProtocolError(f"{self.url} answered a pipeline with garbage: {e}") from None
        self._baton = d.get("baton")
        self.cid = max(self.cid, int(d.get("cid") or 0))
        self.snapshot = int(d.get("snapshot") or 0)
        self.in_transaction = bool(d.get("in_transaction")) and self._baton is not None
        self.duplicate = bool(d.get("duplicate"))
        return results

    def _refused(self, status: int, data: bytes) -> Exception:
        try:
            d = json.loads(data)
            message, code = str(d["message"]), d.get("code")
        except (ValueError, KeyError, TypeError):
            message, code = data.decode("utf-8", "replace").strip()[:300], None
        if status == 404:
            return ConnectError(
                f"{self.url} serves no SQL clients ({message}): start the node with --http"
                " (and --http-sql on for an address other than loopback)"
            )
        if status == 401:
            return errors.AuthError(f"{self.url}: {message} (give the node's token)")
        if status in (429, 503):
            return errors.BusyError(f"{self.url} is busy ({message}): retry later")
        return remote_error(f"{self.url}: {message}", code)

    @staticmethod
    def check(result: dict[str, Any]) -> dict[str, Any]:
        """The response of an ok result; raise the error of a failed one."""
        if result.get("type") == "error":
            e = result.get("error") or {}
            raise remote_error(str(e.get("message")), e.get("code"))
        return dict(result["response"])

    # --- journal.connection.RemoteStream ------------------------------------------

    def execute(self, sql: str, bindings: Any) -> Rows:
        (r,) = self.pipeline([{"type": "execute", "stmt": hrana.encode_stmt(sql, bindings)}])
        cols, rows, affected, last = hrana.decode_result(self.check(r)["result"])
        return Rows(rows, tuple(cols), affected, last or 0)

    def transact(self, statements: Statements, txid: str | None = None) -> Committed:
        """The statements as one transaction, in one round trip."""
        items = [(s, None) if isinstance(s, str) else (s[0], s[1]) for s in statements]
        steps: list[dict[str, Any]] = [{"stmt": {"sql": "BEGIN IMMEDIATE"}}]
        for i, (sql, b) in enumerate(items):
            steps.append({"stmt": hrana.encode_stmt(sql, b), "condition": _ok(i)})
        n = len(steps)
        steps.append({"stmt": {"sql": "COMMIT"}, "condition": _ok(n - 1)})
        steps.append({"stmt": {"sql": "ROLLBACK"}, "condition": {"type": "not", "cond": _ok(n)}})
        before = self.cid
        (r,) = self.pipeline([{"type": "batch", "batch": {"steps": steps}}], txid=txid)
        res = self.check(r)["result"]
        for err in res.get("step_errors") or []:
            if err is not None:
                raise remote_error(str(err.get("message")), err.get("code"))
        out = [hrana.decode_result(x)[1] for x in res["step_results"][1:n]]
        return Committed(self.cid if self.cid != before or self.duplicate else 0, out)

    def leader_snapshot(self) -> int:
        """The node's snapshot, asked with consistency "leader" (a leader
        answers only while its lease holds)."""
        saved, self.consistency = self.consistency, "leader"
        try:
            self.pipeline([])
        finally:
            self.consistency = saved
        return self.snapshot

    def close(self) -> None:
        if self._baton is not None:
            try:
                self.pipeline([], close=True)
            except (HctError, apsw.Error):
                pass  # the node forgets an idle stream by itself
            self._baton = None
        self.in_transaction = False
        self._http.close()


def _ok(step: int) -> dict[str, Any]:
    return {"type": "ok", "step": step}


class RemoteBackend:
    """The DB-API backend (:class:`hctserver.client.backend.Backend`) over a :class:`Stream`."""

    def __init__(
        self,
        url: str,
        *,
        token: bytes | str | None = None,
        token_file: str | None = None,
        ca: str | None = None,
        timeout: float = 10.0,
        consistency: str | None = None,
    ) -> None:
        self.stream = Stream(
            url,
            token=read_token(token, token_file),
            ca=ca,
            timeout=timeout,
            consistency=consistency or "local",
        )

    def execute(self, sql: str, params: Params) -> Result:
        try:
            rows = self.stream.execute(sql, params)
        except apsw.Error as e:
            raise from_apsw(e) from e
        except HctError as e:
            raise from_hct(e) from e
        return Result(
            list(rows.description),
            list(rows),
            rows.changes if rows.description == () and _changes(sql) else -1,
            rows.lastrowid,
            self.stream.cid,
        )

    def executemany(self, sql: str, seq: Iterable[Params]) -> Result:
        total = 0
        last: Result | None = None
        for p in seq:
            last = self.execute(sql, p)
            total += max(0, last.rowcount)
        if last is None:
            return Result()
        last.rowcount = total if _changes(sql) else -1
        return last

    def transact(self, statements: Statements, txid: str | None = None) -> Committed:
        try:
            return self.stream.transact(statements, txid)
        except apsw.Error as e:
            raise from_apsw(e) from e
        except HctError as e:
            raise from_hct(e) from e

    @property
    def in_transaction(self) -> bool:
        return self.stream.in_transaction

    @property
    def last_cid(self) -> int:
        return self.stream.cid

    def close(self) -> None:
        self.stream.close()


def _changes(sql: str) -> bool:
    from ..journal.sqltext import Kind, parse

    stmts = parse(sql)
    return bool(stmts) and stmts[-1].kind is Kind.WRITE


__all__ = ["RemoteBackend", "Stream", "http_url", "read_token", "remote_error"]
