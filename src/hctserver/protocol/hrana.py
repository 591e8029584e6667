"""The client protocol's messages: libSQL's Hrana over HTTP (version 2),
as pure functions, plus hctserver's few extensions.

A client POSTs a *pipeline* of requests to ``/v2/pipeline`` and gets one
result per request. A ``baton`` in the answer keeps the stream (a SQL
session: a connection with its transaction) open for the next pipeline;
without one the stream ends with the pipeline. docs/CLIENTS.md has the
field tables; this module checks every field a peer sends and bounds what
it may make the node keep.

Extensions (top-level fields a Hrana client leaves out and ignores):

* request ``txid``: the client's id for the transaction this pipeline
  commits: a retry with the same id is answered with the first outcome;
* request ``consistency`` (``"local"``, ``"leader"``, ``"at_least"`` with
  ``min_cid``) and ``timeout_ms``: how fresh the reads must be;
* response ``cid`` (the newest cid this stream committed, 0 if none) and
  ``duplicate`` (true when the answer is a retried txid's first outcome).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ProtocolError

VERSION_PATH = "/v2"
PIPELINE_PATH = "/v2/pipeline"
MAX_BODY = 8 << 20  # bytes of one pipeline request
MAX_REQUESTS = 1000  # requests in one pipeline
MAX_STEPS = 1000  # steps in one batch
MAX_ARGS = 32766  # SQLite's own limit on bindings
MAX_TXID = 128  # characters of a transaction id
MAX_CONDITION_DEPTH = 16
MAX_TIMEOUT_MS = 60_000

CONSISTENCY = ("local", "leader", "at_least")

Value = Any  # None | int | float | str | bytes


class RequestError(ProtocolError):
    """A pipeline request is malformed: the client gets 400 and the reason."""


# --- values ------------------------------------------------------------------------


def encode_value(v: Value) -> dict[str, Any]:
    """A SQLite value as Hrana sends it (integers as strings: JSON's numbers
    lose 64-bit precision in many languages)."""
    if v is None:
        return {"type": "null"}
    if isinstance(v, bool):
        return {"type": "integer", "value": str(int(v))}
    if isinstance(v, int):
        return {"type": "integer", "value": str(v)}
    if isinstance(v, float):
        if not math.isfinite(v):  # JSON has no inf/nan: SQLite gives inf only, as text would
            return {"type": "float", "value": str(v)}
        return {"type": "float", "value": v}
    if isinstance(v, str):
        return {"type": "text", "value": v}
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"type": "blob", "base64": base64.b64encode(bytes(v)).decode("ascii")}
    raise TypeError(f"cannot send a {type(v).__name__} as a SQLite value")


def decode_value(d: Any) -> Value:
    if not isinstance(d, dict):
        raise RequestError(f"a value must be an object with a type, not {d!r:.60}")
    t = d.get("type")
    try:
        if t == "null":
            return None
        if t == "integer":
            raw = d["value"]
            n = int(raw) if isinstance(raw, (str, int)) and not isinstance(raw, bool) else None
            if n is None or not -(1 << 63) <= n < 1 << 63:
                raise ValueError(raw)
            return n
        if t == "float":
            raw = d["value"]
            if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
                raise ValueError(raw)
            return float(raw)
        if t == "text":
            s = d["value"]
            if not isinstance(s, str):
                raise ValueError(s)
            return s
        if t == "blob":
            b = d.get("base64", "")
            if not isinstance(b, str):
                raise ValueError(b)
            return base64.b64decode(b + "=" * (-len(b) % 4), validate=True)
    except (KeyError, ValueError, binascii.Error):
        raise RequestError(f"bad {t} value: {d!r:.80}") from None
    raise RequestError(f"unknown value type {t!r}: null, integer, float, text or blob")


# --- requests ----------------------------------------------------------------------


@dataclass(frozen=True)
class Stmt:
    sql: str
    args: tuple[Value, ...] = ()
    named: tuple[tuple[str, Value], ...] = ()
    want_rows: bool = True

    @property
    def params(self) -> Sequence[Value] | Mapping[str, Value] | None:
        if self.named:  # not both: the parser refuses that
            return {k.lstrip(":@$"): v for k, v in self.named}
        return self.args or None


Cond = Any  # the condition, checked and kept as its dict


@dataclass(frozen=True)
class Step:
    stmt: Stmt
    condition: Cond | None = None


@dataclass(frozen=True)
class Request:
    """One request of a pipeline: ``kind`` is execute, batch, sequence,
    close or get_autocommit."""

    kind: str
    stmt: Stmt | None = None
    steps: tuple[Step, ...] = ()
    sql: str = ""


@dataclass(frozen=True)
class Consistency:
    level: str = "local"
    min_cid: int = 0
    timeout: float = 5.0


@dataclass(frozen=True)
class Pipeline:
    baton: str | None
    requests: tuple[Request, ...]
    txid: str | None = None
    consistency: Consistency = field(default_factory=Consistency)


def _obj(d: Any, what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise RequestError(f"{what} must be a JSON object")
    return d


def _stmt(d: Any) -> Stmt:
    d = _obj(d, "stmt")
    sql = d.get("sql")
    if not isinstance(sql, str):
        if d.get("sql_id") is not None:
            raise RequestError("stored SQL (sql_id) is not supported: send the text in sql")
        raise RequestError("stmt.sql must be a string")
    args = d.get("args") or []
    named = d.get("named_args") or []
    if not isinstance(args, list) or not isinstance(named, list):
        raise RequestError("stmt.args and stmt.named_args must be arrays")
    if len(args) + len(named) > MAX_ARGS:
        raise RequestError(f"at most {MAX_ARGS} arguments in one statement")
    if args and named:
        raise RequestError("a statement takes args or named_args, not both")
    pairs = []
    for a in named:
        a = _obj(a, "a named argument")
        name = a.get("name")
        if not isinstance(name, str):
            raise RequestError("a named argument needs a string name")
        pairs.append((name, decode_value(a.get("value"))))
    want = d.get("want_rows", True)
    return Stmt(sql, tuple(decode_value(a) for a in args), tuple(pairs), want is not False)


def _condition(c: Any, step: int, depth: int = 0) -> Cond:
    if depth > MAX_CONDITION_DEPTH:
        raise RequestError("batch conditions nest too deep")
    c = _obj(c, "a batch condition")
    t = c.get("type")
    if t in ("ok", "error"):
        s = c.get("step")
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < step:
            raise RequestError(f"a condition of step {step} must name an earlier step")
    elif t == "not":
        _condition(c.get("cond"), step, depth + 1)
    elif t in ("and", "or"):
        conds = c.get("conds")
        if not isinstance(conds, list):
            raise RequestError(f"an {t} condition needs conds")
        for x in conds:
            _condition(x, step, depth + 1)
    elif t != "is_autocommit":
        raise RequestError(f"unknown batch condition {t!r}")
    return c


def _request(d: Any) -> Request:
    d = _obj(d, "a request")
    t = d.get("type")
    if t == "execute":
        return Request("execute", stmt=_stmt(d.get("stmt")))
    if t == "batch":
        steps = _obj(d.get("batch"), "batch").get("steps")
        if not isinstance(steps, list) or len(steps) > MAX_STEPS:
            raise RequestError(f"batch.steps must be an array of at most {MAX_STEPS} steps")
        out = []
        for i, s in enumerate(steps):
            s = _obj(s, "a batch step")
            cond = s.get("condition")
            out.append(Step(_stmt(s.get("stmt")), None if cond is None else _condition(cond, i)))
        return Request("batch", steps=tuple(out))
    if t == "sequence":
        sql = d.get("sql")
        if not isinstance(sql, str):
            raise RequestError("sequence.sql must be a string")
        return Request("sequence", sql=sql)
    if t in ("close", "get_autocommit"):
        return Request(t)
    raise RequestError(
        f"unknown request type {t!r}: execute, batch, sequence, close or get_autocommit"
    )


def parse_pipeline(body: bytes) -> Pipeline:
    """Check and decode a pipeline request body."""
    if len(body) > MAX_BODY:
        raise RequestError(f"a pipeline request may have at most {MAX_BODY} bytes")
    try:
        d = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not JSON: {e}") from None
    except RecursionError:
        raise RequestError("the body's JSON nests too deep") from None
    d = _obj(d, "the pipeline request")
    baton = d.get("baton")
    if baton is not None and not isinstance(baton, str):
        raise RequestError("baton must be a string or null")
    reqs = d.get("requests")
    if not isinstance(reqs, list) or len(reqs) > MAX_REQUESTS:
        raise RequestError(f"requests must be an array of at most {MAX_REQUESTS}")
    txid = d.get("txid")
    if txid is not None and (not isinstance(txid, str) or not 0 < len(txid) <= MAX_TXID):
        raise RequestError(f"txid must be a string of 1 to {MAX_TXID} characters")
    return Pipeline(baton, tuple(_request(r) for r in reqs), txid, _consistency(d))


def _consistency(d: dict[str, Any]) -> Consistency:
    level = d.get("consistency", "local")
    if level not in CONSISTENCY:
        raise RequestError(f"consistency must be one of {', '.join(CONSISTENCY)}")
    min_cid = d.get("min_cid", 0)
    if not isinstance(min_cid, int) or isinstance(min_cid, bool) or min_cid < 0:
        raise RequestError("min_cid must be a cid (an integer >= 0)")
    if level == "at_least" and "min_cid" not in d:
        raise RequestError("consistency at_least needs min_cid")
    ms = d.get("timeout_ms", 5000)
    if not isinstance(ms, int) or isinstance(ms, bool) or not 0 <= ms <= MAX_TIMEOUT_MS:
        raise RequestError(f"timeout_ms must be an integer from 0 to {MAX_TIMEOUT_MS}")
    return Consistency(level, min_cid, ms / 1000)


# --- results -----------------------------------------------------------------------


def stmt_result(
    cols: Sequence[tuple[str, str | None]],
    rows: Sequence[Sequence[Value]],
    affected: int,
    last_rowid: int | None,
) -> dict[str, Any]:
    return {
        "cols": [{"name": n, "decltype": t} for n, t in cols],
        "rows": [[encode_value(v) for v in r] for r in rows],
        "affected_row_count": affected,
        "last_insert_rowid": None if last_rowid is None else str(last_rowid),
    }


def error(message: str, code: str | None = None) -> dict[str, Any]:
    return {"message": message, "code": code}


def ok(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": "ok", "response": {"type": kind, **fields}}


def failed(message: str, code: str | None = None) -> dict[str, Any]:
    return {"type": "error", "error": error(message, code)}


def response(
    baton: str | None,
    results: list[dict[str, Any]],
    *,
    cid: int,
    snapshot: int,
    in_transaction: bool,
    duplicate: bool = False,
) -> bytes:
    d: dict[str, Any] = {
        "baton": baton,
        "base_url": None,
        "results": results,
        "cid": cid,
        "snapshot": snapshot,
        "in_transaction": in_transaction,
    }
    if duplicate:
        d["duplicate"] = True
    return json.dumps(d, separators=(",", ":")).encode()


def condition_holds(cond: Cond, outcomes: Sequence[bool | None], autocommit: bool) -> bool:
    """Evaluate a batch step's condition: ``outcomes[i]`` True if step i
    succeeded, False if it failed, None if it was skipped."""
    t = cond["type"]
    if t == "ok":
        return outcomes[cond["step"]] is True
    if t == "error":
        return outcomes[cond["step"]] is False
    if t == "not":
        return not condition_holds(cond["cond"], outcomes, autocommit)
    if t == "and":
        return all(condition_holds(c, outcomes, autocommit) for c in cond["conds"])
    if t == "or":
        return any(condition_holds(c, outcomes, autocommit) for c in cond["conds"])
    return autocommit  # is_autocommit


# --- the client's side ---------------------------------------------------------------


def encode_stmt(sql: str, params: Sequence[Value] | Mapping[str, Value] | None) -> dict[str, Any]:
    d: dict[str, Any] = {"sql": sql}
    if isinstance(params, Mapping):
        d["named_args"] = [{"name": k, "value": encode_value(v)} for k, v in params.items()]
    elif params:
        d["args"] = [encode_value(v) for v in params]
    return d


def decode_result(
    r: Any,
) -> tuple[list[tuple[str, str | None]], list[tuple[Value, ...]], int, int | None]:
    """A StmtResult: (columns, rows, affected rows, last insert rowid)."""
    try:
        cols = [(str(c.get("name") or ""), c.get("decltype")) for c in r["cols"]]
        rows = [tuple(decode_value(v) for v in row) for row in r["rows"]]
        affected = int(r.get("affected_row_count", 0))
        last = r.get("last_insert_rowid")
        return cols, rows, affected, None if last is None else int(last)
    except (KeyError, TypeError, ValueError, AttributeError, RequestError) as e:
        raise ProtocolError(f"the node sent a malformed statement result: {e}") from None
