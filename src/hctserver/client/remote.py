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

import contextlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import apsw

from .. import errors
from ..errors import ConfigError, ConnectError, HctError, ProtocolError
from ..journal.connection import Rows
from ..journal.groupcommit import Committed, Statements
from ..journal.sqltext import Kind, parse
from ..net.httpclient import HttpClient
from ..protocol import hrana
from .backend import Params, Result
from .exceptions import Error, OperationalError, ProgrammingError, from_apsw, from_code, from_hct
from .statements import sets_rowid

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
    num = apsw.mapping_extended_result_codes.get(code)  # kept as apsw keeps it (extendedresult)
    if not isinstance(num, int):
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
        self.answered_cid = 0  # the node's "cid" in its last answer
        self.snapshot = 0  # the node's snapshot after the last pipeline
        self.in_transaction = False
        self.duplicate = False  # the last pipeline's txid had been committed before
        self.used = time.monotonic()  # when the last pipeline was sent

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
            body["timeout_ms"] = min(hrana.MAX_TIMEOUT_MS, int(self.timeout * 1000))
            if self.consistency == "at_least":
                body["min_cid"] = self.min_cid
        self.used = time.monotonic()
        try:
            status, data = self._http.post(hrana.PIPELINE_PATH, json.dumps(body).encode())
        except HctError as e:
            raise self._lost(e, body["requests"]) from e
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
        self.answered_cid = int(d.get("cid") or 0)
        self.cid = max(self.cid, self.answered_cid)
        self.snapshot = int(d.get("snapshot") or 0)
        self.in_transaction = bool(d.get("in_transaction")) and self._baton is not None
        self.duplicate = bool(d.get("duplicate"))
        return results

    def _lost(self, e: HctError, requests: list[dict[str, Any]]) -> HctError:
        """The connection failed: the stream (its baton, its transaction) is
        gone. What the caller is told depends on what may have run."""
        open_tx = self.in_transaction
        self._baton = None
        self.in_transaction = False
        if not self._http.sent:
            return e  # nothing went out: nothing ran
        if _may_write(requests):
            return errors.CommitUnknownError(
                f"{self.url}: the request went out and then {e}: whether it committed is"
                " unknown. Check, or send transactions with a txid and retry"
            )
        if open_tx:
            return errors.StreamLostError(
                f"{self.url}: {e}; the open transaction is lost (it never committed): run it again"
            )
        return e

    def _refused(self, status: int, data: bytes) -> Exception:
        try:
            d = json.loads(data)
            message, code = str(d["message"]), d.get("code")
        except (ValueError, KeyError, TypeError):
            message, code = data.decode("utf-8", "replace").strip()[:300], None
        if status in (404, 405, 501):  # 501: an hctserver from before the client protocol
            return ConnectError(
                f"{self.url} serves no SQL clients (HTTP {status}: {message}): start the node"
                " with --http (and --http-sql on for an address other than loopback), and a"
                " version of hctserver that serves them"
            )
        if status == 401:
            return errors.AuthError(f"{self.url}: {message} (give the node's token)")
        if status == 400 and code == "BATON_USED":
            return errors.CommitUnknownError(f"{self.url}: {message}")
        if status == 400 and code == "STREAM_EXPIRED":
            return errors.StreamLostError(f"{self.url}: {message}")
        if isinstance(code, str) and code.startswith(HCT_PREFIX) and code != "HCT_BUSY":
            return remote_error(f"{self.url}: {message}", code)  # the node's own error class
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
        if len(items) + 3 > hrana.MAX_STEPS:
            raise errors.UnsupportedStatementError(
                f"a transaction sent to a node in one round trip takes at most"
                f" {hrana.MAX_STEPS - 3} statements, not {len(items)}: split it, or run it"
                " in BEGIN … COMMIT"
            )
        steps: list[dict[str, Any]] = [{"stmt": {"sql": "BEGIN IMMEDIATE"}}]
        for i, (sql, b) in enumerate(items):
            steps.append({"stmt": hrana.encode_stmt(sql, b), "condition": _ok(i)})
        n = len(steps)
        steps.append({"stmt": {"sql": "COMMIT"}, "condition": _ok(n - 1)})
        steps.append({"stmt": {"sql": "ROLLBACK"}, "condition": {"type": "not", "cond": _ok(n)}})
        before = self.cid
        (r,) = self.pipeline([{"type": "batch", "batch": {"steps": steps}}], txid=txid)
        if self.duplicate:  # committed before (its rows are not kept)
            return Committed(self.answered_cid, [])
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

    def drop(self) -> None:
        """Forget the stream without a word to the node (which may be gone:
        it forgets an idle stream by itself)."""
        self._baton = None
        self.in_transaction = False
        self._http.close()

    def close(self) -> None:
        if self._baton is not None:
            try:
                self.pipeline([], close=True)
            except (HctError, apsw.Error):
                pass  # the node forgets an idle stream by itself
            self._baton = None
        self.in_transaction = False
        self._http.close()


def _may_write(requests: list[dict[str, Any]]) -> bool:
    """Whether any statement of these requests could change the database
    (anything but a read: a COMMIT too)."""
    texts: list[str] = []
    for r in requests:
        if r.get("type") == "execute":
            texts.append(str(r["stmt"]["sql"]))
        elif r.get("type") == "batch":
            texts += [str(step["stmt"]["sql"]) for step in r["batch"]["steps"]]
        elif r.get("type") == "sequence":
            texts.append(str(r["sql"]))
    return any(st.kind is not Kind.READ for t in texts for st in parse(t))


def _ok(step: int) -> dict[str, Any]:
    return {"type": "ok", "step": step}


class RemoteBackend:
    """The DB-API backend (:class:`hctserver.client.backend.Backend`) over a :class:`Stream`.

    It keeps what :mod:`sqlite3` keeps per connection and a node may not
    say: ``lastrowid`` (the connection's last inserted rowid, 0 before any:
    a follower runs reads on its own connection and sends writes to its
    leader, so the rowid it would report after a read or an UPDATE is not
    this connection's). ``executemany`` sends its statements in batches of
    up to :data:`MANY_STEPS`, each step run only if the one before
    succeeded (one round trip per batch, not per row). A stream the node
    dropped (idle too long) is replaced by a new one when no transaction
    was open on it; with one open, the transaction is lost
    (OperationalError, nothing committed)."""

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
        self._lastrowid = 0

    def execute(self, sql: str, params: Params) -> Result:
        req = {"type": "execute", "stmt": hrana.encode_stmt(sql, params)}
        before = self.stream.cid
        (r,) = self._pipeline([req])
        if r.get("type") == "error":
            e = r.get("error") or {}
            raise _error(str(e.get("message")), e.get("code"))
        cols, rows, affected, last = hrana.decode_result(r.get("response", {}).get("result"))
        changes = _changes(sql)
        if changes and affected > 0 and last is not None and _inserts(sql):
            self._lastrowid = last
        return Result(
            cols, rows, affected if changes else -1, self._lastrowid, self._committed(before)
        )

    def executemany(self, sql: str, seq: Iterable[Params]) -> Result:
        """Outside a transaction, the statements run in one of their own
        (all or nothing), as on a file (:class:`~hctserver.client.local.LocalBackend`)."""
        changes = _changes(sql)
        inserts = changes and _inserts(sql)
        before = self.stream.cid
        own = not self.stream.in_transaction
        opened = False
        total = 0
        it = iter(seq)
        batch = _steps(sql, it)
        try:
            while batch:
                after = _steps(sql, it)  # the next batch: is this one the last?
                steps: list[dict[str, Any]] = []
                if own and not opened:
                    steps.append({"stmt": {"sql": "BEGIN IMMEDIATE"}})
                first = len(steps)
                for i, step in enumerate(batch):
                    if first + i:
                        step["condition"] = _ok(first + i - 1)
                    steps.append(step)
                last = len(steps) - 1
                if own:
                    if not after:
                        steps.append({"stmt": {"sql": "COMMIT"}, "condition": _ok(last)})
                    undo = {"type": "not", "cond": _ok(len(steps) - 1)}
                    steps.append({"stmt": {"sql": "ROLLBACK"}, "condition": undo})
                opened = True
                (r,) = self._pipeline([{"type": "batch", "batch": {"steps": steps}}])
                if r.get("type") == "error":
                    e = r.get("error") or {}
                    raise _error(str(e.get("message")), e.get("code"))
                res = r.get("response", {}).get("result") or {}
                outs = res.get("step_results") or []
                for i in range(first, min(last + 1, len(outs))):
                    if outs[i] is not None:
                        _, _, affected, rowid = hrana.decode_result(outs[i])
                        total += affected
                        if inserts and affected > 0 and rowid is not None:
                            self._lastrowid = rowid
                for err in res.get("step_errors") or []:
                    if err is not None:
                        raise _error(str(err.get("message")), err.get("code"))
                batch = after
        except BaseException:
            if own and opened and self.stream.in_transaction:
                with contextlib.suppress(Error):  # a batch sent, its answer lost
                    self._pipeline([{"type": "execute", "stmt": {"sql": "ROLLBACK"}}])
            raise
        return Result(
            rowcount=total if changes else -1,
            lastrowid=self._lastrowid,
            cid=self._committed(before),
        )

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

    def _committed(self, before: int) -> int:
        """The cid the last pipeline committed, 0 if none."""
        return self.stream.cid if self.stream.cid != before else 0

    def _pipeline(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The requests on this backend's stream; on a new one if the node had
        dropped it while no transaction was open (the node refused the baton
        before running anything: sending again is safe)."""
        was_open = self.stream.in_transaction
        try:
            try:
                return self.stream.pipeline(requests)
            except errors.StreamLostError:
                if was_open:
                    raise
                return self.stream.pipeline(requests)
        except apsw.Error as e:
            raise from_apsw(e) from e
        except errors.StreamLostError as e:
            if not was_open:
                raise from_hct(e) from e
            raise OperationalError(f"{e} (nothing of it was committed: run it again)") from e
        except HctError as e:
            raise from_hct(e) from e


MANY_STEPS = 500  # statements of one executemany batch
MANY_BYTES = 4 << 20  # about the most bytes of one executemany batch (hrana.MAX_BODY: 8 MiB)


def _steps(sql: str, params: Iterator[Params]) -> list[dict[str, Any]]:
    """The next batch of ``executemany``'s statements (without conditions)."""
    steps: list[dict[str, Any]] = []
    size = 0
    for p in params:
        stmt = hrana.encode_stmt(sql, p)
        stmt["want_rows"] = False
        steps.append({"stmt": stmt})
        size += len(json.dumps(stmt))
        if len(steps) >= MANY_STEPS or size >= MANY_BYTES:
            break
    return steps


def _error(message: str, code: str | None) -> Error:
    """The DB-API error for a statement's error result."""
    if code is None or code == "ARGS_INVALID":
        # the node names no code for what the driver's caller got wrong (the
        # number or names of parameters): sqlite3's ProgrammingError
        return ProgrammingError(message)
    if code.startswith("SQLITE_"):
        return from_code(code, message)
    e = remote_error(message, code)
    if isinstance(e, apsw.Error):
        out = from_apsw(e)
    elif isinstance(e, HctError):
        out = from_hct(e)
    else:
        out = OperationalError(message)
    out.__cause__ = e
    return out


def _changes(sql: str) -> bool:
    stmts = parse(sql)
    return bool(stmts) and stmts[-1].kind is Kind.WRITE


def _inserts(sql: str) -> bool:
    from ..journal.sqltext import parse

    stmts = parse(sql)
    return bool(stmts) and sets_rowid(stmts[-1])


__all__ = [
    "RemoteBackend",
    "Stream",
    "http_url",
    "read_token",
    "remote_error",
]
