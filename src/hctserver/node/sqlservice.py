"""The node's SQL endpoint: Hrana-over-HTTP pipelines (``POST /v2/pipeline``).

Each stream (a baton) owns a connection to the node's database. Where the
node leads, a pipeline runs here, through the same gate as every writer.
Where it follows, a pipeline that only reads runs here; any other (a
write, a transaction, a transaction id) goes whole to the leader, whose
client URL the follower learned in ACCEPT, and the answer comes back once
this node has applied what it committed (read your writes). A transaction
begun through a follower stays on the leader until it ends.

Bounded: ``max_streams`` streams (idle ones outside a transaction are
dropped first when full, any after ``idle`` seconds, one inside a
transaction, which may hold the write lock, after ``tx_idle``), one
pipeline at a time per stream, request bodies of :data:`hrana.MAX_BODY` bytes.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import apsw

from ..client.exceptions import Error as DbError
from ..client.exceptions import ProgrammingError
from ..client.local import LocalBackend
from ..client.remote import Stream
from ..errors import HctError, StreamLostError
from ..journal.database import Database
from ..journal.gate import FOLLOWER
from ..journal.sqltext import Kind, parse
from ..protocol import hrana
from ..protocol.hrana import Consistency, Pipeline, Request, RequestError

log = logging.getLogger("hctserver")

MAX_STREAMS = 64
IDLE = 30.0  # seconds a stream may wait for its next pipeline
POOL = 16  # idle streams to the leader kept for forwarding
KEPT_MAX = 65536  # bytes of an answer kept with its transaction id
TX_IDLE = 10.0  # seconds a stream may idle inside a transaction (it may hold the write lock)
_CONTROL = frozenset({Kind.BEGIN, Kind.COMMIT, Kind.ROLLBACK, Kind.SAVEPOINT, Kind.RELEASE})
_READS = frozenset({Kind.READ, Kind.OTHER})


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
        return "HCT_" + type(e).__name__
    if isinstance(e, apsw.Error):
        ext = getattr(e, "extendedresult", None)
        name = apsw.mapping_extended_result_codes.get(ext) if isinstance(ext, int) else None
        name = name or apsw.mapping_result_codes.get(getattr(e, "result", -1))
        return name if isinstance(name, str) else None
    return None


@dataclass
class _Stream:
    baton: str
    local: LocalBackend
    used: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    remote: Stream | None = None  # a transaction forwarded to the leader, open

    @property
    def in_transaction(self) -> bool:
        return self.remote is not None or self.local.in_transaction


class Answer(Exception):
    """A pipeline refused as a whole: an HTTP status and a reason."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


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
    ) -> None:
        self.db = db
        self.token = token
        self.ca = ca
        self.max_streams = max_streams
        self.idle = idle
        self.tx_idle = tx_idle
        self.timeout = timeout
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._pool: list[Stream] = []  # streams to the leader, idle
        self._closed = False

    # --- HTTP --------------------------------------------------------------------

    def handle(self, body: bytes) -> tuple[int, bytes]:
        """One ``POST /v2/pipeline``: (status, JSON body)."""
        try:
            p = hrana.parse_pipeline(body)
            stream = self._take(p.baton)
        except RequestError as e:
            return 400, error_body(str(e), "HRANA_PROTO_ERROR")
        except Answer as e:
            return e.status, error_body(str(e), e.code)
        if not stream.lock.acquire(blocking=False):
            return 400, error_body("this stream is running another pipeline", "STREAM_BUSY")
        try:
            return 200, self._run(stream, p)
        except Answer as e:
            return e.status, error_body(str(e), e.code)
        except (HctError, DbError) as e:
            return 503, error_body(str(e), error_code(e))
        finally:
            stream.used = time.monotonic()
            stream.lock.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            streams, self._streams = list(self._streams.values()), {}
            pool, self._pool = self._pool, []
        for s in streams:
            self._drop(s)
        for remote in pool:
            remote.close()

    # --- streams -----------------------------------------------------------------

    def _take(self, baton: str | None) -> _Stream:
        now = time.monotonic()
        with self._lock:
            if self._closed:
                raise Answer(503, "the node is stopping", "HCT_STOPPING")
            stale = [
                x
                for x in self._streams.values()
                if now - x.used > (self.tx_idle if x.in_transaction else self.idle)
            ]
            for x in stale:
                del self._streams[x.baton]
            s: _Stream | None = None
            if baton is not None:
                s = self._streams.pop(baton, None)
                if s is None:
                    raise Answer(
                        400,
                        "unknown or expired baton: the stream ended (idle for more than"
                        f" {self.idle:g} s, {self.tx_idle:g} s in a transaction, or closed);"
                        " an open transaction was rolled back: run it again",
                        "STREAM_EXPIRED",
                    )
            if s is None and len(self._streams) >= self.max_streams:
                idle = [x for x in self._streams.values() if not x.in_transaction]
                if not idle:
                    raise Answer(503, f"all {self.max_streams} streams are in use", "HCT_BUSY")
                oldest = min(idle, key=lambda x: x.used)
                del self._streams[oldest.baton]
                stale.append(oldest)
        for x in stale:
            self._drop(x)
        if s is None:
            s = _Stream("", LocalBackend.over(self.db), now)
        s.baton = secrets.token_urlsafe(18)  # a new one each pipeline: an old one is void
        return s

    def _keep(self, s: _Stream) -> None:
        with self._lock:
            if not self._closed:
                self._streams[s.baton] = s
                return
        self._drop(s)

    def _drop(self, s: _Stream) -> None:
        if s.remote is not None:
            s.remote.close()
            s.remote = None
        try:
            s.local.close()
        except (HctError, DbError, apsw.Error) as e:
            log.debug("closing a client stream: %s", e)

    # --- pipelines ---------------------------------------------------------------

    def _run(self, s: _Stream, p: Pipeline) -> bytes:
        closing = any(r.kind == "close" for r in p.requests)
        # a transaction begun on the leader ends there, even if this node leads now
        if s.remote is not None or (self._follows() and (p.txid or not _reads_only(p))):
            results, extra = self._forward(s, p)
        else:
            self._fresh_enough(p.consistency)
            results, extra = self._here(s, p)
        keep = not closing
        if keep:
            self._keep(s)
        else:
            self._drop(s)
        return hrana.response(
            s.baton if keep else None,
            results,
            cid=extra.get("cid", s.local.last_cid),
            snapshot=self.db.snapshot(),
            in_transaction=keep and s.in_transaction,
            duplicate=bool(extra.get("duplicate")),
        )

    def _here(self, s: _Stream, p: Pipeline) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        local = s.local
        if p.txid is not None:
            found = local.connection.recall(p.txid)
            if found is not None:
                cid, outcome = found
                return _padded(json.loads(outcome), p), {"cid": cid, "duplicate": True}
        wrap = p.txid is not None and not local.in_transaction and not _controls(p)
        if wrap:
            local.execute("BEGIN IMMEDIATE", None)
        run = _Run(self, s, p.txid if not wrap else None)
        for req in p.requests:
            if wrap and run.failed:
                run.results.append(hrana.failed("not run: an earlier request failed", None))
                continue
            run.request(req)
        if wrap:
            assert p.txid is not None
            if run.failed:
                local.execute("ROLLBACK", None)
            else:
                local.connection.remember(p.txid, kept(run.results))
                local.execute("COMMIT", None)
        return run.results, {}

    def _fresh_enough(self, c: Consistency) -> None:
        """Wait until reads here are as fresh as asked (bounded)."""
        if c.level == "local":
            return
        db = self.db
        if c.level == "leader":
            if not self._follows():
                try:
                    db.gate.admit()  # leads now, its lease valid: its snapshot is the newest
                except HctError as e:
                    raise Answer(503, str(e), error_code(e)) from None
                return
            remote = self._leader_stream(c.timeout)
            try:
                want = remote.leader_snapshot()
            except (HctError, apsw.Error) as e:
                remote.close()
                raise Answer(502, f"asking the leader for its newest cid failed: {e}",
                             error_code(e)) from None  # fmt: skip
            self._give_back(remote)
        else:
            want = c.min_cid
        self._applied(
            want, c.timeout, "read on the leader, or allow a longer timeout_ms", "reads need"
        )

    # --- forwarding --------------------------------------------------------------

    def _follows(self) -> bool:
        st = self.db.gate.state()
        return st is not None and st.state == FOLLOWER

    def _leader_stream(self, timeout: float, fresh: bool = False) -> Stream:
        st = self.db.gate.state()
        url = st.client if st is not None else ""
        if not url:
            leader = st.leader if st is not None else ""
            raise Answer(
                503,
                f"this node follows {leader or 'no leader yet'}, which has not said where it"
                " serves SQL clients (start the leader with --http): writes cannot be forwarded",
                "HCT_NotLeaderError",
            )
        with self._lock:
            while self._pool and not fresh:
                kept = self._pool.pop()
                if kept.url == url and time.monotonic() - kept.used < self.idle / 2:
                    return kept
                kept.close()  # the leader changed, or may forget it soon
        return Stream(url, token=self.token, ca=self.ca, timeout=timeout)

    def _give_back(self, remote: Stream) -> None:
        """A stream to the leader, outside a transaction: kept for the next
        forward (its connection stays open), up to :data:`POOL`."""
        with self._lock:
            if not self._closed and len(self._pool) < POOL:
                self._pool.append(remote)
                return
        remote.close()

    def _forward(self, s: _Stream, p: Pipeline) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        reqs = [_raw(r) for r in p.requests if r.kind != "close"]
        remote = s.remote or self._leader_stream(self.timeout)
        try:
            try:
                results = self._send(remote, reqs, p)
            except StreamLostError:
                if s.remote is not None:  # its transaction is gone: the client must know
                    raise
                remote.close()  # refused before it ran anything: safe to send again
                remote = self._leader_stream(self.timeout, fresh=True)
                results = self._send(remote, reqs, p)
        except (HctError, apsw.Error) as e:
            s.remote = None
            remote.close()
            raise Answer(502, f"forwarding to the leader failed: {e}", error_code(e)) from None
        if len(results) < len(p.requests):
            results.append(hrana.ok("close"))
        s.remote = remote if remote.in_transaction else None
        if s.remote is None:
            self._give_back(remote)
        cid = remote.answered_cid
        if cid:
            self._applied(cid)
        return results, {"cid": cid, "duplicate": remote.duplicate}

    @staticmethod
    def _send(remote: Stream, reqs: list[dict[str, Any]], p: Pipeline) -> list[dict[str, Any]]:
        remote.consistency = p.consistency.level
        remote.min_cid = p.consistency.min_cid
        return remote.pipeline(reqs, txid=p.txid)

    def _applied(
        self,
        cid: int,
        timeout: float | None = None,
        advice: str = "it will be: read on the leader, or wait for it",
        what: str = "the leader committed",
    ) -> None:
        """Return once this node has applied ``cid`` (a forwarded write, a
        fresh enough read), else 504."""
        db = self.db
        if db.snapshot() >= cid:
            return
        timeout = self.timeout if timeout is None else timeout
        db.gate.want(cid)
        if not db.wait_for(cid, timeout):
            raise Answer(
                504,
                f"{what} cid {cid}; this node has applied cid {db.snapshot()} after"
                f" waiting {timeout:g} s: {advice}",
                "HCT_LagError",
            )


class _Run:
    """The requests of one pipeline run here, with their results."""

    def __init__(self, service: SqlService, s: _Stream, txid: str | None) -> None:
        self.local = s.local
        self.txid = txid  # recorded just before the COMMIT this pipeline runs
        self.results: list[dict[str, Any]] = []
        self.failed = False

    def request(self, req: Request) -> None:
        try:
            self.results.append(self._one(req))
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
        wrote = r.rowcount > 0  # a rowid is news only after a write (as sqlite3's lastrowid)
        return hrana.stmt_result(
            r.columns, rows, max(0, r.rowcount), r.lastrowid if wrote else None
        )

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
            except (HctError, DbError, apsw.Error) as e:
                results.append(None)
                errors.append(hrana.error(str(e), error_code(e)))
                outcomes.append(False)
        return {"step_results": results, "step_errors": errors}


def _padded(kept: Any, p: Pipeline) -> list[dict[str, Any]]:
    """A retried transaction's first answer, one result per request: what was
    kept (nothing when ``transact()`` recorded it), then empty successes."""
    out = list(kept) if isinstance(kept, list) else []
    for r in p.requests[len(out) :]:
        if r.kind == "execute":
            out.append(hrana.ok("execute", result=hrana.stmt_result([], [], 0, None)))
        elif r.kind == "batch":
            none: list[Any] = [None] * len(r.steps)
            out.append(hrana.ok("batch", result={"step_results": none, "step_errors": none}))
        else:
            out.append(hrana.ok(r.kind))
    return out[: len(p.requests)]


def _statements(p: Pipeline) -> list[str]:
    out: list[str] = []
    for r in p.requests:
        if r.stmt is not None:
            out.append(r.stmt.sql)
        out.extend(step.stmt.sql for step in r.steps)
        if r.sql:
            out.append(r.sql)
    return out


def _reads_only(p: Pipeline) -> bool:
    return all(st.kind in _READS for sql in _statements(p) for st in parse(sql))


def _controls(p: Pipeline) -> bool:
    return any(st.kind in _CONTROL for sql in _statements(p) for st in parse(sql))


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
