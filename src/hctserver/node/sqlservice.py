"""The node's SQL endpoint: Hrana-over-HTTP pipelines (``POST /v2/pipeline``).

Each stream (:mod:`hctserver.node.sqlstreams`) owns a connection to the
node's database. Where the node leads, a pipeline runs here, through the
same gate as every writer. Where it follows, a pipeline that only reads
runs here; any other (a write, a transaction, a transaction id) goes whole
to the leader (:mod:`hctserver.node.sqlforward`), and the answer comes back
once this node has applied what it committed (read your writes). A
transaction begun through a follower stays on the leader until it ends.

A pipeline refused as a whole (a freshness wait that timed out, a leader
that cannot be reached) ends its stream: what it left open is rolled back.
Answers are bounded (:data:`MAX_ANSWER`); a transaction id's record keeps
an answer up to :data:`KEPT_MAX` bytes.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import apsw

from ..client.backend import Result
from ..client.exceptions import Error as DbError
from ..client.exceptions import ProgrammingError
from ..client.local import row_bytes
from ..errors import DuplicateTransactionError, HctError
from ..journal.database import Database
from ..journal.gate import FOLLOWER
from ..journal.sqltext import Kind, parse
from ..protocol import hrana
from ..protocol.hrana import Consistency, Pipeline, Request, RequestError
from .sqlforward import Forwarding, failure_code
from .sqlstreams import IDLE, MAX_RUN, MAX_STREAMS, TX_IDLE, ClientStream, Refused, StreamTable

log = logging.getLogger("hctserver")

FORWARD_MARGIN = 15.0  # seconds beyond max_run: the leader's write-lock wait, the hops
KEPT_MAX = 65536  # bytes of an answer kept with its transaction id
MAX_ANSWER = 16 << 20  # bytes of one pipeline's rows
_CONTROL = frozenset({Kind.BEGIN, Kind.COMMIT, Kind.ROLLBACK, Kind.SAVEPOINT, Kind.RELEASE})
_SAVEPOINTS = frozenset({Kind.SAVEPOINT, Kind.RELEASE, Kind.ROLLBACK_TO})


def kept(results: list[dict[str, Any]]) -> str:
    """What a transaction id's record keeps of the answer: all of it up to
    :data:`KEPT_MAX` bytes, else nothing (a retry then gets empty results)."""
    text = json.dumps(results, separators=(",", ":"))
    return text if len(text) <= KEPT_MAX else "[]"


def error_body(message: str, code: str | None = None) -> bytes:
    return json.dumps(hrana.error(message, code)).encode()


def error_code(e: BaseException) -> str | None:
    """What a client is told an error was: SQLite's extended code name, or
    ``HCT_`` and the hctserver class (:func:`hctserver.client.remote.remote_error`)."""
    if isinstance(e, DbError):
        if e.sqlite_errorname and not isinstance(e.__cause__, HctError):
            return e.sqlite_errorname
        if isinstance(e, ProgrammingError) and not isinstance(e.__cause__, HctError):
            return "ARGS_INVALID"  # libSQL's code for bad parameters
        e = e.__cause__ or e
    if isinstance(e, HctError):
        return failure_code(e)
    if isinstance(e, apsw.Error):
        ext = getattr(e, "extendedresult", None)
        name = apsw.mapping_extended_result_codes.get(ext) if isinstance(ext, int) else None
        name = name or apsw.mapping_result_codes.get(getattr(e, "result", -1))
        return name if isinstance(name, str) else None
    return None


class SqlService:
    """See the module's docstring. ``token``/``ca``: what this node shows
    and trusts when it forwards to its leader (the cluster's HTTP token and CA)."""

    def __init__(
        self,
        db: Database,
        *,
        token: bytes | None = None,
        ca: str | None = None,
        max_streams: int = MAX_STREAMS,
        idle: float = IDLE,
        timeout: float = 10.0,
        tx_idle: float = TX_IDLE,
        max_run: float = MAX_RUN,
        max_answer: int = MAX_ANSWER,
    ) -> None:
        self.db = db
        self.timeout = timeout
        self.max_answer = max_answer
        self.streams = StreamTable(db, max_streams, idle, tx_idle, max_run, max_answer)
        # a forwarded pipeline may run on the leader as long as its own bounds allow
        self.forwarding = Forwarding(db, token, ca, max(timeout, max_run + FORWARD_MARGIN), idle)

    def run(self, stop: threading.Event) -> None:
        """The reaper thread (``hct-sql-reaper``): see :class:`StreamTable`."""
        self.streams.run(stop)

    def handle(self, body: bytes) -> tuple[int, bytes]:
        """One ``POST /v2/pipeline``: (status, JSON body)."""
        try:
            p = hrana.parse_pipeline(body)
            if p.txid is not None:
                _check_txid_shape(p)
            s = self.streams.take(p.baton)
        except RequestError as e:
            return 400, error_body(str(e), "HRANA_PROTO_ERROR")
        except Refused as e:
            return e.status, error_body(str(e), e.code)
        keep = False
        try:
            results, cid, duplicate = self._run(s, p)
            keep = not any(r.kind == "close" for r in p.requests)
            return 200, hrana.response(
                s.baton if keep else None,
                results,
                cid=cid,
                snapshot=self.db.snapshot(),
                in_transaction=keep and s.in_transaction,
                duplicate=duplicate,
            )
        except Refused as e:
            return e.status, error_body(str(e), e.code)
        except (HctError, DbError, apsw.Error) as e:
            return 500, error_body(f"the pipeline failed: {e}", error_code(e))
        finally:
            self.streams.done(s, keep)  # a refused pipeline ends its stream

    def close(self) -> None:
        self.streams.close()
        self.forwarding.close()

    def _follows(self) -> bool:
        st = self.db.gate.state()
        return st is not None and st.state == FOLLOWER

    def _run(self, s: ClientStream, p: Pipeline) -> tuple[list[dict[str, Any]], int, bool]:
        forward = s.remote is not None  # a transaction begun on the leader ends there
        if not forward and not s.local.in_transaction and self._follows():
            forward = p.txid is not None or not _has(p, frozenset({Kind.READ, Kind.OTHER}), all)
        if forward:
            reqs = [_raw(r) for r in p.requests if r.kind != "close"]
            s.tainted = s.tainted or _has(p, {Kind.OTHER})  # state that would outlive it
            results, cid, dup = self.forwarding.forward(s, p, reqs, not s.tainted)
            if s.remote is None:
                s.tainted = False
            if len(results) < len(p.requests):
                results.append(hrana.ok("close"))
            return results, cid, dup
        self._fresh_enough(p.consistency)
        return self._here(s, p)

    def _here(self, s: ClientStream, p: Pipeline) -> tuple[list[dict[str, Any]], int, bool]:
        local = s.local
        if p.txid is not None and local.in_transaction and not _has(p, {Kind.COMMIT}):
            raise Refused(
                400,
                "a txid goes with the pipeline that commits: this stream's transaction is"
                " open and this pipeline has no COMMIT",
                "HRANA_PROTO_ERROR",
            )
        if p.txid is not None:
            found = local.connection.recall(p.txid)
            if found is not None:
                return _padded(json.loads(found[1]), p), found[0], True
        before = local.last_cid
        wrap = p.txid is not None and not local.in_transaction and not _has(p, _CONTROL)
        run = _Run(s, p.txid, wrap, self.max_answer)
        try:
            if wrap:
                local.execute("BEGIN IMMEDIATE", None)
                found = local.connection.recall(p.txid or "")  # again, with the lock held
                if found is not None:
                    local.execute("ROLLBACK", None)
                    return _padded(json.loads(found[1]), p), found[0], True
            for req in p.requests:
                if run.failed and wrap:
                    run.results.append(hrana.failed("not run: an earlier request failed", None))
                    continue
                run.request(req)
            if wrap and run.failed:
                if local.in_transaction:
                    local.execute("ROLLBACK", None)
            elif wrap:
                assert p.txid is not None
                local.connection.remember(p.txid, kept(run.results))
                local.execute("COMMIT", None)
        except DuplicateTransactionError as e:  # committed meanwhile by a retry of it
            if local.in_transaction:
                local.execute("ROLLBACK", None)
            return _padded(json.loads(e.outcome), p), e.cid, True
        cid = local.last_cid if local.last_cid != before else 0
        return run.results, cid, False

    def _fresh_enough(self, c: Consistency) -> None:
        """Wait until reads here are as fresh as asked (bounded)."""
        if c.level == "local":
            return
        if c.level == "leader":
            if not self._follows():
                try:
                    self.db.gate.admit()  # leads now, its lease valid: nothing newer elsewhere
                except HctError as e:
                    raise Refused(503, str(e), error_code(e)) from None
                return
            want = self.forwarding.leader_snapshot()
        else:
            want = c.min_cid
        self.forwarding.applied(
            want, c.timeout, "read on the leader, or allow a longer timeout_ms", "reads need"
        )


class _Run:
    """The requests of one pipeline run here, with their results."""

    def __init__(self, s: ClientStream, txid: str | None, atomic: bool, max_answer: int) -> None:
        self.local = s.local
        self.txid = None if atomic else txid  # recorded just before the COMMIT it runs
        self.atomic = atomic  # one transaction: a failed batch step fails it all
        self.results: list[dict[str, Any]] = []
        self.failed = False
        self.size = 0  # bytes of rows so far
        self.max_answer = max_answer

    def request(self, req: Request) -> None:
        try:
            self.results.append(self._one(req))
        except DuplicateTransactionError:
            raise
        except RequestError as e:
            self.failed = True
            self.results.append(hrana.failed(str(e), "HRANA_PROTO_ERROR"))
        except (HctError, DbError, apsw.Error) as e:
            self.failed = True
            self.results.append(hrana.failed(str(e), error_code(e)))

    def _one(self, req: Request) -> dict[str, Any]:
        if req.kind == "execute":
            assert req.stmt is not None
            return hrana.ok("execute", result=self._stmt(req.stmt))
        if req.kind == "batch":
            return hrana.ok("batch", result=self._batch(req))
        if req.kind == "sequence":
            for st in parse(req.sql):
                self._stmt(hrana.Stmt(st.text, want_rows=False))
            return hrana.ok("sequence")
        if req.kind == "get_autocommit":
            return hrana.ok("get_autocommit", is_autocommit=not self.local.in_transaction)
        return hrana.ok("close")

    def _stmt(self, stmt: hrana.Stmt) -> dict[str, Any]:
        if self.txid is not None and self.local.in_transaction:
            stmts = parse(stmt.sql)
            if stmts and stmts[0].kind is Kind.COMMIT:
                self.local.connection.remember(self.txid, kept(self.results))
                self.txid = None
        r = self.local.execute(stmt.sql, stmt.params)
        rows = r.rows if stmt.want_rows else []
        if r.rowcount >= 0:  # a write's rows: it ran, its answer must say so
            return _result(r, rows)
        self.size += sum(row_bytes(x) for x in rows)
        if self.size > self.max_answer:
            raise RequestError(
                f"the answer would exceed {self.max_answer} bytes: ask for fewer rows"
                " (LIMIT/OFFSET, or a narrower WHERE)"
            )
        return _result(r, rows)

    def _batch(self, req: Request) -> dict[str, Any]:
        outcomes: list[bool | None] = []
        results: list[dict[str, Any] | None] = []
        errors: list[dict[str, Any] | None] = []
        for step in req.steps:
            if step.condition is not None and not hrana.condition_holds(
                step.condition, outcomes, not self.local.in_transaction
            ):
                outcomes.append(None)
                results.append(None)
                errors.append(None)
                continue
            try:
                results.append(self._stmt(step.stmt))
                errors.append(None)
                outcomes.append(True)
            except DuplicateTransactionError:
                raise
            except (HctError, DbError, apsw.Error) as e:
                results.append(None)
                errors.append(hrana.error(str(e), error_code(e)))
                outcomes.append(False)
                self.failed = self.failed or self.atomic
        return {"step_results": results, "step_errors": errors}


def _padded(kept: Any, p: Pipeline) -> list[dict[str, Any]]:
    """A retried transaction's first answer, one result per request: what was
    kept (nothing when ``transact()`` recorded it, or when it was too big),
    then "not kept" for the rest: the duplicate answer's cid is its outcome."""
    out = list(kept) if isinstance(kept, list) else []
    for r in p.requests[len(out) :]:
        if r.kind == "close":
            out.append(hrana.ok("close"))
        else:
            out.append(
                hrana.failed(
                    "this transaction id was committed before; this result was not kept"
                    " (its cid is in the answer)",
                    "HCT_NOT_KEPT",
                )
            )
    return out[: len(p.requests)]


def _kinds(p: Pipeline) -> list[Kind]:
    return [st.kind for sql in _statements(p) for st in parse(sql)]


def _check_txid_shape(p: Pipeline) -> None:
    """A pipeline with a txid commits at most one transaction, and ends it:
    no savepoints, no BEGIN left open, nothing but a ROLLBACK after its
    COMMIT (so what a retry is answered is all that ran)."""
    kinds = _kinds(p)
    if any(k in _SAVEPOINTS for k in kinds):
        raise RequestError(
            "a pipeline with a txid ends its transaction with COMMIT (or has none),"
            " not with SAVEPOINT/RELEASE"
        )
    commits = [i for i, k in enumerate(kinds) if k is Kind.COMMIT]
    begins = [i for i, k in enumerate(kinds) if k is Kind.BEGIN]
    if begins and (not commits or commits[-1] < begins[-1]):
        raise RequestError("a pipeline with a txid that begins a transaction must commit it")
    if len(commits) > 1 or len(begins) > 1:
        raise RequestError("a pipeline with a txid commits one transaction")
    if commits and any(k is not Kind.ROLLBACK for k in kinds[commits[0] + 1 :]):
        raise RequestError(
            "a pipeline with a txid ends with its COMMIT (a ROLLBACK for when it failed aside)"
        )


def _statements(p: Pipeline) -> list[str]:
    out: list[str] = []
    for r in p.requests:
        if r.stmt is not None:
            out.append(r.stmt.sql)
        out.extend(step.stmt.sql for step in r.steps)
        if r.sql:
            out.append(r.sql)
    return out


def _has(p: Pipeline, kinds: Any, how: Any = any) -> bool:
    """Whether any (or with ``how=all``, every) statement of ``p`` is of ``kinds``."""
    return bool(how(st.kind in kinds for sql in _statements(p) for st in parse(sql)))


def _result(r: Result, rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    wrote = r.rowcount > 0  # a rowid is news only after a write (as sqlite3's lastrowid)
    return hrana.stmt_result(r.columns, rows, max(0, r.rowcount), r.lastrowid if wrote else None)


def _raw(r: Request) -> dict[str, Any]:
    """A request as sent on (to the leader)."""
    if r.kind == "execute":
        assert r.stmt is not None
        return {"type": "execute", "stmt": _raw_stmt(r.stmt)}
    if r.kind == "batch":
        steps = [{"stmt": _raw_stmt(s.stmt), "condition": s.condition} for s in r.steps]
        return {"type": "batch", "batch": {"steps": steps}}
    if r.kind == "sequence":
        return {"type": "sequence", "sql": r.sql}
    return {"type": r.kind}


def _raw_stmt(s: hrana.Stmt) -> dict[str, Any]:
    d = hrana.encode_stmt(s.sql, dict(s.named) if s.named else list(s.args))
    d["want_rows"] = s.want_rows
    return d
