"""The client protocol (Hrana over HTTP) on real nodes: pipelines, streams,
transactions, transaction ids, read consistency, forwarding from a
follower, ``hctserver.connect()`` on a follower's file, and what a bad or
hostile request gets."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shlex
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest

import hctserver
from hctserver.client.remote import Stream
from hctserver.errors import NotLeaderError
from hctserver.journal.database import Database
from hctserver.node.config import HttpOptions, NodeConfig
from hctserver.node.sqlservice import SqlService
from hctserver.node.testserver import Node
from hctserver.protocol import hrana

from helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent


def _config(**http: Any) -> NodeConfig:
    return dataclasses.replace(NodeConfig(), http=HttpOptions("127.0.0.1:0", **http))


def post(url: str, body: Any, token: str | None = None) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v2/pipeline", data, {"Content-Type": "application/json"})
    if token is not None:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"message": raw.decode()}


def ex(sql: str, *args: Any) -> dict[str, Any]:
    return {"type": "execute", "stmt": hrana.encode_stmt(sql, list(args))}


CLOSE = {"type": "close"}


def rows_of(result: dict[str, Any]) -> list[tuple[Any, ...]]:
    assert result["type"] == "ok", result
    return hrana.decode_result(result["response"]["result"])[1]


@pytest.fixture
def leader(tmp_path: Path) -> Iterator[Node]:
    node = Node(str(tmp_path / "l.db"), port=0, config=_config())
    node.start()
    try:
        s, r = post(
            str(node.http_url),
            {"requests": [ex("CREATE TABLE t(a INTEGER PRIMARY KEY, b)"), CLOSE]},
        )
        assert s == 200 and r["results"][0]["type"] == "ok", r
        yield node
    finally:
        node.stop()


@pytest.fixture
def follower(tmp_path: Path, leader: Node) -> Iterator[Node]:
    node = Node(
        str(tmp_path / "f.db"), follower=True, port=leader.port, config=_config(), once=False
    )
    node.start()
    try:
        wait_until(
            lambda: node.db.snapshot() >= leader.db.snapshot() and bool(_gate_client(node)),
            30,
            "the follower caught up and knows the leader's client URL",
        )
        yield node
    finally:
        node.stop()


def _gate_client(node: Node) -> str:
    st = node.db.gate.state()
    return "" if st is None else st.client


# --- the messages, in memory ------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [None, 0, -(1 << 63), (1 << 63) - 1, 1.5, -0.0, "", "héllo\0x", b"", b"\x00\xff" * 9]
)
def test_values_cross_the_json_unchanged(value: Any) -> None:
    back = hrana.decode_value(json.loads(json.dumps(hrana.encode_value(value))))
    assert back == value and type(back) is type(value)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{nope", "not JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"requests": 5}', "requests must be an array"),
        (b'{"requests": [{"type": "drop_everything"}]}', "unknown request type"),
        (b'{"requests": [{"type": "execute", "stmt": {}}]}', "stmt.sql must be a string"),
        (b'{"requests": [{"type": "execute", "stmt": {"sql_id": 3}}]}', "stored SQL"),
        (
            b'{"requests": [{"type": "execute", "stmt": {"sql": "x", "args": [{"type": "integer", "value": "9223372036854775808"}]}}]}',  # noqa: E501
            "bad integer value",
        ),
        (
            b'{"requests": [{"type": "execute", "stmt": {"sql": "x", "args": [{"type": "date"}]}}]}',  # noqa: E501
            "unknown value type",
        ),
        (b'{"requests": [], "txid": ""}', "txid must be a string"),
        (b'{"requests": [], "consistency": "eventual"}', "consistency must be one of"),
        (b'{"requests": [], "consistency": "at_least"}', "needs min_cid"),
        (b'{"requests": [], "timeout_ms": 3600000}', "timeout_ms"),
        (
            b'{"requests": [{"type": "batch", "batch": {"steps": [{"stmt": {"sql": "x"}, "condition": {"type": "ok", "step": 0}}]}}]}',  # noqa: E501
            "earlier step",
        ),
    ],
)
def test_a_malformed_pipeline_is_refused_with_the_reason(body: bytes, says: str) -> None:
    with pytest.raises(hrana.RequestError, match=says):
        hrana.parse_pipeline(body)


def test_limits_on_what_one_request_may_carry() -> None:
    many = json.dumps({"requests": [CLOSE] * (hrana.MAX_REQUESTS + 1)}).encode()
    with pytest.raises(hrana.RequestError, match="at most"):
        hrana.parse_pipeline(many)
    with pytest.raises(hrana.RequestError, match="at most"):
        hrana.parse_pipeline(b" " * (hrana.MAX_BODY + 1))
    deep: dict[str, Any] = {"type": "is_autocommit"}
    for _ in range(hrana.MAX_CONDITION_DEPTH + 2):
        deep = {"type": "not", "cond": deep}
    step = {"stmt": {"sql": "x"}, "condition": deep}
    with pytest.raises(hrana.RequestError, match="nest too deep"):
        hrana.parse_pipeline(
            json.dumps({"requests": [{"type": "batch", "batch": {"steps": [step]}}]}).encode()
        )


def test_batch_conditions() -> None:
    ok0, err1 = {"type": "ok", "step": 0}, {"type": "error", "step": 1}
    outcomes = [True, False, None]
    assert hrana.condition_holds(ok0, outcomes, False)
    assert hrana.condition_holds(err1, outcomes, False)
    assert not hrana.condition_holds({"type": "ok", "step": 2}, outcomes, False)  # skipped
    assert hrana.condition_holds({"type": "and", "conds": [ok0, err1]}, outcomes, False)
    assert not hrana.condition_holds(
        {"type": "not", "cond": {"type": "or", "conds": [ok0]}}, outcomes, False
    )
    assert hrana.condition_holds({"type": "is_autocommit"}, outcomes, True)


# --- a leader ------------------------------------------------------------------------------


def test_execute_batch_and_sequence_on_the_leader(leader: Node) -> None:
    url = str(leader.http_url)
    s, r = post(url, {"requests": [
        ex("INSERT INTO t(b) VALUES(?)", "x"),
        {"type": "sequence", "sql": "INSERT INTO t(b) VALUES('y'); INSERT INTO t(b) VALUES('z')"},
        {"type": "batch", "batch": {"steps": [
            {"stmt": {"sql": "BEGIN"}},
            {"stmt": {"sql": "INSERT INTO t(a, b) VALUES(1, 'dup')"}, "condition": {"type": "ok", "step": 0}},  # noqa: E501
            {"stmt": {"sql": "COMMIT"}, "condition": {"type": "ok", "step": 1}},
            {"stmt": {"sql": "ROLLBACK"}, "condition": {"type": "not", "cond": {"type": "ok", "step": 2}}},  # noqa: E501
        ]}},
        ex("SELECT a, b FROM t ORDER BY a"),
        {"type": "get_autocommit"},
        CLOSE,
    ]})  # fmt: skip
    assert s == 200 and r["baton"] is None
    res = r["results"]
    first = res[0]["response"]["result"]
    assert first["affected_row_count"] == 1 and first["last_insert_rowid"] == "1"
    steps = res[2]["response"]["result"]
    assert steps["step_results"][1] is None and "UNIQUE" in steps["step_errors"][1]["message"]
    assert steps["step_errors"][1]["code"].startswith("SQLITE_CONSTRAINT")
    assert steps["step_results"][2] is None and steps["step_results"][3] is not None  # rolled back
    cols = res[3]["response"]["result"]["cols"]
    assert cols == [{"name": "a", "decltype": "INTEGER"}, {"name": "b", "decltype": None}]
    assert rows_of(res[3]) == [(1, "x"), (2, "y"), (3, "z")]
    assert res[4]["response"]["is_autocommit"] is True
    assert r["cid"] == leader.db.snapshot() and r["in_transaction"] is False


def test_an_interactive_transaction_on_one_stream(leader: Node) -> None:
    url = str(leader.http_url)
    s, r = post(
        url,
        {
            "requests": [
                ex("BEGIN"),
                ex("INSERT INTO t(b) VALUES('mine')"),
                ex("SELECT count(*) FROM t"),
            ]
        },
    )
    assert s == 200 and r["in_transaction"] and rows_of(r["results"][2]) == [(1,)]
    baton = r["baton"]
    _, other = post(url, {"requests": [ex("SELECT count(*) FROM t"), CLOSE]})
    assert rows_of(other["results"][0]) == [(0,)]  # not committed: another stream does not see it
    s, r = post(url, {"baton": baton, "requests": [ex("COMMIT"), ex("SELECT count(*) FROM t")]})
    assert s == 200 and not r["in_transaction"] and rows_of(r["results"][1]) == [(1,)]
    assert r["cid"] == leader.db.snapshot()
    # a baton is good once: the old one is refused, the stream goes on with the new one
    s, old = post(url, {"baton": baton, "requests": [ex("SELECT 1")]})
    assert s == 400 and old["code"] == "BATON_USED" and "used already" in old["message"]
    s, r = post(
        url,
        {
            "baton": r["baton"],
            "requests": [ex("BEGIN"), ex("INSERT INTO t(b) VALUES('dropped')"), CLOSE],
        },
    )
    assert s == 200 and r["baton"] is None
    _, r = post(url, {"requests": [ex("SELECT b FROM t ORDER BY a"), CLOSE]})
    assert rows_of(r["results"][0]) == [("mine",)]  # closing a stream rolled its transaction back


def test_a_retried_transaction_id_is_answered_not_applied_again(leader: Node) -> None:
    url = str(leader.http_url)
    body = {
        "txid": "order-17",
        "requests": [ex("INSERT INTO t(b) VALUES(?)", "once"), ex("SELECT count(*) FROM t"), CLOSE],
    }
    s1, r1 = post(url, body)
    s2, r2 = post(url, body)
    assert s1 == s2 == 200 and "duplicate" not in r1 and r2["duplicate"] is True
    assert r1["cid"] == r2["cid"] > 0 and r2["results"][:2] == r1["results"][:2]
    _, r = post(url, {"requests": [ex("SELECT count(*), max(b) FROM t"), CLOSE]})
    assert rows_of(r["results"][0]) == [(1, "once")]
    # the record is a replicated row that user SQL may read but not change
    _, r = post(
        url, {"requests": [ex("SELECT id, cid FROM hct_txid"), ex("DELETE FROM hct_txid"), CLOSE]}
    )
    assert rows_of(r["results"][0]) == [("order-17", r1["cid"])]
    assert (
        r["results"][1]["type"] == "error"
        and "not authorized" in r["results"][1]["error"]["message"]
    )
    # a transaction that failed is not recorded: a retry runs it
    bad = {"txid": "t2", "requests": [ex("INSERT INTO t(a, b) VALUES(1, 'clash')"), CLOSE]}
    s, r = post(url, bad)
    assert s == 200 and r["results"][0]["type"] == "error" and "duplicate" not in r
    s, r = post(
        url, {"txid": "t2", "requests": [ex("INSERT INTO t(a, b) VALUES(2, 'fixed')"), CLOSE]}
    )
    assert s == 200 and r["results"][0]["type"] == "ok" and "duplicate" not in r


def test_a_transaction_id_in_an_interactive_transaction_is_recorded_at_its_commit(
    leader: Node,
) -> None:
    url = str(leader.http_url)
    _, r = post(url, {"requests": [ex("BEGIN IMMEDIATE"), ex("INSERT INTO t(b) VALUES('i')")]})
    s, r = post(url, {"baton": r["baton"], "txid": "inter-1", "requests": [ex("COMMIT"), CLOSE]})
    assert s == 200 and r["results"][0]["type"] == "ok"
    s, again = post(
        url,
        {
            "txid": "inter-1",
            "requests": [
                ex("BEGIN IMMEDIATE"),
                ex("INSERT INTO t(b) VALUES('i')"),
                ex("COMMIT"),
                CLOSE,
            ],
        },
    )
    assert again["duplicate"] is True and again["cid"] == r["cid"]
    _, r = post(url, {"requests": [ex("SELECT count(*) FROM t"), CLOSE]})
    assert rows_of(r["results"][0]) == [(1,)]


def test_transact_with_a_transaction_id_through_connect(leader: Node) -> None:
    conn = hctserver.connect(leader.db.path)
    try:
        first = conn.transact([("INSERT INTO t(b) VALUES(?)", ("tx",))], txid="local-1")
        again = conn.transact([("INSERT INTO t(b) VALUES(?)", ("tx",))], txid="local-1")
        assert first.cid == again.cid > 0 and again.rows == []
        assert conn.execute("SELECT count(*) FROM t").fetchall() == [(1,)]
    finally:
        conn.close()


def test_http_level_refusals(tmp_path: Path, leader: Node) -> None:
    url = str(leader.http_url)
    s, r = post(url, b"{nope")
    assert s == 400 and "not JSON" in r["message"]
    with urllib.request.urlopen(url + "/v2", timeout=10) as resp:  # what Hrana clients probe
        assert resp.status == 200
    tok = tmp_path / "token"
    tok.write_text("s3cret-token-of-16+bytes\n")
    tok.chmod(0o600)
    off = Node(str(tmp_path / "off.db"), port=0, config=_config(sql="off"))
    guarded = Node(str(tmp_path / "tok.db"), port=0, config=_config(token_file=str(tok)))
    off.start()
    guarded.start()
    try:
        s, r = post(str(off.http_url), {"requests": []})
        assert s == 404 and "/v2/pipeline" in r["message"]
        s, _ = post(str(guarded.http_url), {"requests": []})
        assert s == 401
        s, _ = post(
            str(guarded.http_url),
            {"requests": [ex("SELECT 1"), CLOSE]},
            token="s3cret-token-of-16+bytes",
        )
        assert s == 200
        with pytest.raises(Exception, match="give the node's token"):
            Stream(str(guarded.http_url)).execute("SELECT 1", None)
    finally:
        off.stop()
        guarded.stop()


def test_streams_are_bounded_and_idle_ones_go_first(tmp_path: Path) -> None:
    db = Database(str(tmp_path / "b.db"))
    db.set_mode("leader")
    svc = SqlService(db, max_streams=2, idle=60)
    try:

        def run(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            s, out = svc.handle(json.dumps(body).encode())
            return s, json.loads(out)

        s, a = run({"requests": [ex("CREATE TABLE x(v)")]})  # open, idle outside a transaction
        s, _ = run({"requests": [ex("BEGIN"), ex("SELECT count(*) FROM x")]})
        s, c = run({"requests": [ex("BEGIN"), ex("SELECT count(*) FROM x")]})  # pushes out a
        assert s == 200 and c["in_transaction"]
        s, r = run({"baton": a["baton"], "requests": []})
        assert s == 400 and r["code"] == "STREAM_EXPIRED"
        s, r = run({"requests": [ex("SELECT 1")]})  # both others hold transactions
        assert s == 503 and r["code"] == "HCT_BUSY" and "2 streams" in r["message"]
    finally:
        svc.close()
        db.close()


# --- a follower -------------------------------------------------------------------------------


def test_a_follower_reads_itself_and_forwards_writes(leader: Node, follower: Node) -> None:
    url = str(follower.http_url)
    for i in range(5):
        s, r = post(url, {"requests": [ex("INSERT INTO t(b) VALUES(?)", i), CLOSE]})
        assert s == 200 and r["results"][0]["type"] == "ok", r
        assert (
            r["cid"] == leader.db.snapshot() and follower.db.snapshot() >= r["cid"]
        )  # read your writes
        _, seen = post(url, {"requests": [ex("SELECT count(*) FROM t"), CLOSE]})
        assert rows_of(seen["results"][0]) == [(i + 1,)]
    # an interactive transaction through the follower runs on the leader until it ends
    _, r = post(
        url,
        {
            "requests": [
                ex("BEGIN"),
                ex("INSERT INTO t(b) VALUES('tx')"),
                ex("SELECT count(*) FROM t"),
            ]
        },
    )
    assert r["in_transaction"] and rows_of(r["results"][2]) == [(6,)]
    _, r = post(url, {"baton": r["baton"], "requests": [ex("COMMIT"), CLOSE]})
    assert r["cid"] == leader.db.snapshot() and follower.db.snapshot() >= r["cid"]
    # a transaction id through the follower: once
    body = {"txid": "via-f", "requests": [ex("INSERT INTO t(b) VALUES('id')"), CLOSE]}
    assert post(url, body)[1]["cid"] == post(url, body)[1]["cid"]
    _, r = post(url, {"requests": [ex("SELECT count(*) FROM t WHERE b='id'"), CLOSE]})
    assert rows_of(r["results"][0]) == [(1,)]


def test_read_consistency_levels(leader: Node, follower: Node) -> None:
    url = str(follower.http_url)
    top = leader.db.snapshot()
    s, r = post(url, {"consistency": "leader", "requests": [ex("SELECT count(*) FROM t"), CLOSE]})
    assert s == 200 and r["snapshot"] >= top
    s, r = post(
        url, {"consistency": "at_least", "min_cid": top, "requests": [ex("SELECT 1"), CLOSE]}
    )
    assert s == 200
    s, r = post(
        url,
        {
            "consistency": "at_least",
            "min_cid": top + 1000,
            "timeout_ms": 300,
            "requests": [ex("SELECT 1")],
        },
    )
    assert (
        s == 504
        and r["code"] == "HCT_LagError"
        and f"reads need cid {top + 1000}; this node has applied" in r["message"]
    )
    s, r = post(
        str(leader.http_url), {"consistency": "leader", "requests": [ex("SELECT 1"), CLOSE]}
    )
    assert s == 200


def test_connect_on_a_followers_file_in_another_process(
    leader: Node, follower: Node, tmp_path: Path
) -> None:
    script = tmp_path / "app.py"
    script.write_text(
        textwrap.dedent("""
        import json, sys
        import hctserver
        conn = hctserver.connect(sys.argv[1])
        out = []
        for i in range(3):
            conn.execute("INSERT INTO t(b) VALUES(?)", (f"app{i}",))
            out.append(conn.execute("SELECT count(*) FROM t WHERE b LIKE 'app%'").fetchall()[0][0])
        with conn:
            conn.execute("INSERT INTO t(b) VALUES('block')")
            out.append(conn.execute("SELECT count(*) FROM t").fetchall()[0][0])
        done = conn.transact([("INSERT INTO t(b) VALUES(?)", ("batch",)), "SELECT count(*) FROM t"])
        out.append(done.rows[1][0][0])
        out.append(conn.transact(["INSERT INTO t(b) VALUES('k')"], txid="app-k").cid)
        out.append(conn.transact(["INSERT INTO t(b) VALUES('k')"], txid="app-k").cid)
        out.append(conn.execute("SELECT count(*) FROM t").fetchall()[0][0])
        print(json.dumps(out))
        conn.close()
    """)
    )
    p = subprocess.run(
        [sys.executable, str(script), follower.db.path], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out[:3] == [1, 2, 3]  # each write visible on the follower's file when it returned
    assert out[3] == 4 and out[4] == 5 and out[5] == out[6] > 0 and out[7] == 6


def test_a_follower_whose_leader_serves_no_clients_says_so(tmp_path: Path) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    lead = Node(lp, port=0)  # no --http: no client URL to forward to
    lead.start()
    f = Node(fp, follower=True, port=lead.port, config=_config(), once=False)
    try:
        c = hctserver.connect(lp)
        c.execute("CREATE TABLE t(a)")
        c.close()
        f.start()
        wait_until(lambda: f.db.snapshot() >= lead.db.snapshot(), 30, "caught up")
        s, r = post(str(f.http_url), {"requests": [ex("INSERT INTO t VALUES(1)"), CLOSE]})
        assert s == 503 and "has not said where it serves SQL clients" in r["message"]
        s, r = post(str(f.http_url), {"requests": [ex("SELECT count(*) FROM t"), CLOSE]})
        assert s == 200 and rows_of(r["results"][0]) == [(0,)]  # reads still work
        conn = hctserver.connect(fp)
        try:
            with pytest.raises(NotLeaderError, match="start the leader with --http"):
                conn.execute("INSERT INTO t VALUES(1)")
            assert conn.execute("SELECT count(*) FROM t").fetchall() == [(0,)]
        finally:
            conn.close()
    finally:
        f.stop()
        lead.stop()


def test_the_curl_examples_in_the_docs_work(leader: Node, follower: Node) -> None:
    doc = (ROOT / "docs" / "CLIENTS.md").read_text()
    cmds = re.findall(r"```sh\n(curl .*?)\n```", doc, re.S)
    assert len(cmds) >= 2, "docs/CLIENTS.md shows curl commands"
    for node in (leader, follower):
        for cmd in cmds:
            line = cmd.replace("\\\n", " ").replace("http://127.0.0.1:8080", str(node.http_url))
            p = subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, (line, p.stderr)
            out = json.loads(p.stdout)
            assert all(r["type"] == "ok" for r in out["results"]), out
    with apsw.Connection(leader.db.path) as c:
        assert c.execute("SELECT count(*) FROM fruit").fetchall()[0][0] == 2  # one per node


def test_connect_reads_at_the_leaders_position_when_asked(leader: Node, follower: Node) -> None:
    lead = Stream(str(leader.http_url))
    fc = hctserver.connect(follower.db.path)
    lc = hctserver.connect(leader.db.path)
    try:
        for i in range(3):
            lead.execute("INSERT INTO t(b) VALUES(?)", (i,))
            cid = fc.catch_up_with_leader()  # the "leader" consistency, per call
            assert cid >= lead.cid
            assert fc.execute("SELECT count(*) FROM t").fetchall() == [(i + 1,)]
        assert fc.wait_for(lead.cid, 10)  # "at_least(cid)"
        assert lc.catch_up_with_leader() == leader.db.snapshot()  # the leader's own file
    finally:
        lead.close()
        fc.close()
        lc.close()


def test_a_node_that_is_not_there_is_named_with_what_to_check() -> None:
    from hctserver.errors import ConnectError

    from procs import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectError, match=r"cannot reach .*is a node running there, with --http"):
        Stream(url, timeout=5).execute("SELECT 1", None)
    con = hctserver.dbapi.connect(url, timeout=5)
    with pytest.raises(hctserver.dbapi.OperationalError, match="cannot reach"):
        con.execute("SELECT 1")


def test_a_transaction_left_idle_is_rolled_back_and_frees_the_write_lock(tmp_path: Path) -> None:
    import threading

    db = Database(str(tmp_path / "i.db"), busy_timeout=0.2)
    db.set_mode("leader")
    svc = SqlService(db, tx_idle=0.3)
    stop = threading.Event()
    reaper = threading.Thread(target=svc.run, args=(stop,))
    reaper.start()
    other = db.connect()
    try:

        def run(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            s, out = svc.handle(json.dumps(body).encode())
            return s, json.loads(out)

        run({"requests": [ex("CREATE TABLE x(v)"), CLOSE]})
        s, held = run({"requests": [ex("BEGIN IMMEDIATE"), ex("INSERT INTO x VALUES(1)")]})
        assert s == 200 and held["in_transaction"]

        def writes() -> bool:  # another writer, not a SQL client: no request wakes anything
            try:
                other.execute("INSERT INTO x VALUES(2)")
                return True
            except hctserver.errors.BusyError:
                return False

        wait_until(writes, 30, "the write lock freed by the reaper")
        s, r = run({"baton": held["baton"], "requests": [ex("COMMIT")]})
        assert s == 400 and r["code"] == "STREAM_EXPIRED" and "in a transaction" in r["message"]
        assert other.execute("SELECT v FROM x").fetchall() == [(2,)]
    finally:
        stop.set()
        reaper.join()
        other.close()
        svc.close()
        db.close()


def test_a_large_answer_is_not_kept_with_its_transaction_id(leader: Node) -> None:
    url = str(leader.http_url)
    big = "x" * 70_000
    body = {"txid": "big", "requests": [ex("INSERT INTO t(b) VALUES(?) RETURNING b", big), CLOSE]}
    s, first = post(url, body)
    assert s == 200 and rows_of(first["results"][0]) == [(big,)]
    s, again = post(url, body)
    assert again["duplicate"] and again["cid"] == first["cid"]
    not_kept = again["results"][0]  # too big to keep: said so, the cid is the outcome
    assert not_kept["type"] == "error" and not_kept["error"]["code"] == "HCT_NOT_KEPT"
    with apsw.Connection(leader.db.path) as c:
        (n,) = c.execute("SELECT length(outcome) FROM hct_txid WHERE id='big'").fetchone()
    assert n <= 65536


def test_an_endpoint_without_the_client_protocol_is_named_as_such(tmp_path: Path) -> None:
    """An HTTP server that knows no POST (an hctserver from before the client
    protocol answers 501) or no /v2/pipeline (404)."""
    import http.server
    import threading

    from hctserver.errors import ConnectError

    class Old(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # /status and /health only, as before
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a: Any) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Old)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        with pytest.raises(ConnectError, match=r"serves no SQL clients .*HTTP 501"):
            Stream(url).execute("SELECT 1", None)
    finally:
        srv.shutdown()
        srv.server_close()


def test_sql_over_https_with_a_token_through_a_follower(tmp_path: Path) -> None:
    pytest.importorskip("trustme")
    from pki import Pki

    pki = Pki(tmp_path / "certs")
    token = Path(pki.secret).read_bytes().strip()
    tls = {"tls_cert": pki.leader, "tls_key": pki.leader, "token_file": pki.secret}
    lead = Node(str(tmp_path / "l.db"), port=0, config=_config(**tls))
    lead.start()
    f = Node(
        str(tmp_path / "f.db"),
        follower=True,
        port=lead.port,
        config=_config(**tls, tls_ca=pki.ca),
        once=False,
    )
    blind = Node(  # verifies the leader's certificate against no CA of ours
        str(tmp_path / "b.db"), follower=True, port=lead.port, config=_config(**tls), once=False
    )
    try:
        assert str(lead.http_url).startswith("https://")
        Stream(str(lead.http_url), token=token, ca=pki.ca).execute("CREATE TABLE t(a)", None)
        f.start()
        blind.start()
        for n in (f, blind):
            wait_until(lambda n=n: bool(_gate_client(n)), 30, "the client URL learned")
        via = Stream(str(f.http_url), token=token, ca=pki.ca)
        via.execute("INSERT INTO t VALUES(1)", None)
        assert f.db.snapshot() >= via.cid > 0
        with pytest.raises(hctserver.errors.AuthError, match="give the node's token"):
            Stream(str(f.http_url), token=b"not the token at all", ca=pki.ca).execute(
                "SELECT 1", None
            )
        with pytest.raises(hctserver.errors.ConnectError, match="certificate verify failed"):
            Stream(str(blind.http_url), token=token, ca=pki.ca).execute(
                "INSERT INTO t VALUES(2)", None
            )
    finally:
        blind.stop()
        f.stop()
        lead.stop()


# --- what a review found (each: the way it broke) -----------------------------------------


@contextlib.contextmanager
def _service(tmp_path: Path, **options: Any) -> Iterator[tuple[Database, SqlService]]:
    """A leader's database with table x(v UNIQUE) and a SQL service on it,
    both closed when the block ends."""
    db = Database(str(tmp_path / "svc.db"), busy_timeout=0.5)
    db.set_mode("leader")
    svc = SqlService(db, **options)
    try:
        svc.handle(json.dumps({"requests": [ex("CREATE TABLE x(v UNIQUE)"), CLOSE]}).encode())
        yield db, svc
    finally:
        svc.close()
        db.close()


def _call(svc: SqlService, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    s, out = svc.handle(json.dumps(body).encode())
    return s, json.loads(out)


def test_a_refused_pipeline_ends_its_stream_and_frees_the_write_lock(tmp_path: Path) -> None:
    with _service(tmp_path) as (db, svc):
        other = db.connect()
        try:
            _, held = _call(
                svc, {"requests": [ex("BEGIN IMMEDIATE"), ex("INSERT INTO x VALUES(1)")]}
            )
            s, r = _call(  # refused as a whole: a freshness wait that timed out
                svc,
                {"baton": held["baton"], "consistency": "at_least", "min_cid": 10**9,
                 "timeout_ms": 50, "requests": [ex("SELECT 1")]},
            )  # fmt: skip
            assert s == 504
            other.execute("INSERT INTO x VALUES(2)")  # the lock is free: no BusyError
            assert other.execute("SELECT v FROM x").fetchall() == [(2,)]
            s, r = _call(svc, {"baton": held["baton"], "requests": [ex("COMMIT")]})
            assert s == 400 and r["code"] == "BATON_USED"
        finally:
            other.close()


def test_two_retries_of_one_transaction_id_at_once_apply_it_once(tmp_path: Path) -> None:
    import threading

    with _service(tmp_path) as (db, svc):
        db.busy_timeout = 10.0
        _, held = _call(svc, {"requests": [ex("BEGIN IMMEDIATE"), ex("INSERT INTO x VALUES(0)")]})
        body = {"txid": "twice", "requests": [ex("INSERT INTO x VALUES(7)"), CLOSE]}
        out: list[tuple[int, dict[str, Any]]] = []
        ts = [threading.Thread(target=lambda: out.append(_call(svc, body))) for _ in range(2)]
        for t in ts:
            t.start()
        wait_until(lambda: svc.streams.running == 2, 30, "both retries waiting for the lock")
        _call(svc, {"baton": held["baton"], "requests": [ex("COMMIT"), CLOSE]})
        for t in ts:
            t.join(60)
        assert sorted(s for s, _ in out) == [200, 200], out
        assert sorted(bool(r.get("duplicate")) for _, r in out) == [False, True]
        assert len({r["cid"] for _, r in out}) == 1
        _, r = _call(svc, {"requests": [ex("SELECT count(*) FROM x WHERE v=7"), CLOSE]})
        assert rows_of(r["results"][0]) == [(1,)]


def test_a_transaction_id_with_savepoints_is_refused(tmp_path: Path) -> None:
    with _service(tmp_path) as (_db, svc):
        body = {"txid": "sp", "requests": [ex("SAVEPOINT a"), ex("INSERT INTO x VALUES(1)"),
                                           ex("RELEASE a"), CLOSE]}  # fmt: skip
        s, r = _call(svc, body)
        assert s == 400 and "not with SAVEPOINT/RELEASE" in r["message"]
        _, r = _call(svc, {"requests": [ex("SELECT count(*) FROM x"), CLOSE]})
        assert rows_of(r["results"][0]) == [(0,)]


def test_a_failed_statement_in_a_transaction_id_pipeline_is_a_result(tmp_path: Path) -> None:
    with _service(tmp_path) as (_db, svc):
        _call(svc, {"requests": [ex("INSERT INTO x VALUES(1)"), CLOSE]})
        first = ex("INSERT OR ROLLBACK INTO x VALUES(1)")
        body = {"txid": "or-rollback", "requests": [first, ex("INSERT INTO x VALUES(2)"), CLOSE]}
        s, r = _call(svc, body)  # SQLite ended the transaction itself
        assert s == 200 and "UNIQUE" in r["results"][0]["error"]["message"]
        assert r["results"][1]["type"] == "error" and r["cid"] == 0
        _, r = _call(svc, {"requests": [ex("SELECT v FROM x"), CLOSE]})
        assert rows_of(r["results"][0]) == [(1,)]  # all or nothing
        s, r = _call(svc, {"txid": "batch", "requests": [{"type": "batch", "batch": {"steps": [
            {"stmt": {"sql": "INSERT INTO x VALUES(3)"}},
            {"stmt": {"sql": "INSERT INTO x VALUES(1)"}}]}}, CLOSE]})  # fmt: skip
        _, r = _call(svc, {"requests": [ex("SELECT count(*) FROM x"), CLOSE]})
        assert rows_of(r["results"][0]) == [(1,)]  # a failed step fails the whole transaction


def test_long_pipelines_are_interrupted_and_large_answers_refused(tmp_path: Path) -> None:
    import threading

    with _service(tmp_path, max_run=0.3, max_answer=100_000) as (_db, svc):
        stop = threading.Event()
        reaper = threading.Thread(target=svc.run, args=(stop,))
        reaper.start()
        try:
            forever = (
                "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM c) SELECT max(n) FROM c"
            )
            s, r = _call(svc, {"requests": [ex(forever), CLOSE]})
            assert s == 200 and "interrupt" in r["results"][0]["error"]["message"]
            s, r = _call(
                svc,
                {
                    "requests": [
                        ex("SELECT zeroblob(60000) UNION ALL SELECT zeroblob(60001)"),
                        CLOSE,
                    ]
                },
            )
            assert "exceed 100000 bytes" in r["results"][0]["error"]["message"]
            s, r = _call(svc, {"requests": [ex("SELECT zeroblob(1000)"), CLOSE]})
            assert r["results"][0]["type"] == "ok"
        finally:
            stop.set()
            reaper.join()


def test_a_clients_session_state_never_reaches_another_through_a_follower(
    leader: Node, follower: Node
) -> None:
    url = str(follower.http_url)
    s, r = post(
        url,
        {"requests": [ex("PRAGMA recursive_triggers=1"), ex("INSERT INTO t(b) VALUES(1)"), CLOSE]},
    )
    assert s == 200
    for _ in range(3):  # forwarded, on whichever pooled leader stream comes up
        s, r = post(
            url,
            {
                "requests": [
                    ex("INSERT INTO t(b) VALUES(2)"),
                    ex("PRAGMA recursive_triggers"),
                    CLOSE,
                ]
            },
        )
        assert rows_of(r["results"][1]) == [(0,)]
    # a follower's connections stay read-only: what would change its file unjournaled is refused
    s, r = post(url, {"requests": [ex("PRAGMA query_only=0"), ex("ANALYZE"), CLOSE]})
    assert all(x["type"] == "error" for x in r["results"][:2]), r
    with apsw.Connection(follower.db.path) as c:
        assert c.execute(
            "SELECT count(*) FROM sqlite_schema WHERE name LIKE 'sqlite_stat%'"
        ).fetchall() == [(0,)]


def test_a_forwarded_answer_carries_only_its_own_cid(leader: Node, follower: Node) -> None:
    url = str(follower.http_url)
    _, a = post(url, {"requests": [ex("INSERT INTO t(a, b) VALUES(1, 'a')"), CLOSE]})
    _, b = post(url, {"requests": [ex("INSERT INTO t(a, b) VALUES(1, 'clash')"), CLOSE]})
    assert a["cid"] > 0 and b["results"][0]["type"] == "error" and b["cid"] == 0


def test_connect_on_a_follower_behaves_as_on_the_leader(leader: Node, follower: Node) -> None:
    conn = hctserver.connect(follower.db.path, timeout=120)
    try:
        with conn:  # forwarded
            conn.execute("INSERT INTO t(b) VALUES('outer')")
            with conn:  # nested: a savepoint on the leader, not a second BEGIN
                conn.execute("INSERT INTO t(b) VALUES('inner')")
            with pytest.raises(hctserver.errors.UnsupportedStatementError, match="commit or roll"):
                conn.transact(["INSERT INTO t(b) VALUES('no')"])
        conn.execute("SELECT 1; INSERT INTO t(b) VALUES('second')")  # forwarded as a whole
        assert conn.catch_up_with_leader() == leader.db.snapshot()  # timeout over 60 s: capped
        got = conn.execute("SELECT b FROM t ORDER BY a").fetchall()
        assert got == [("outer",), ("inner",), ("second",)]
        with pytest.raises(hctserver.errors.UnsupportedStatementError, match="query_only"):
            conn.execute("PRAGMA query_only=0")
    finally:
        conn.close()


def test_a_kept_alive_connection_the_node_dropped_is_replaced_before_a_request(
    leader: Node,
) -> None:
    import socket

    s = Stream(str(leader.http_url))
    s.execute("INSERT INTO t(b) VALUES('first')", None)
    host, port = str(leader.http_url).rsplit("/", 1)[1].split(":")
    crowd = []  # half-sent heads push the idle kept-alive connection out of the node's 64
    try:
        for _ in range(80):
            c = socket.create_connection((host, int(port)))
            c.sendall(b"POST /v2/pipeline HTTP/1.1\r\nHost: x\r\n")
            crowd.append(c)
        s.execute("INSERT INTO t(b) VALUES('second')", None)  # no "cannot reach"
    finally:
        for c in crowd:
            c.close()
        s.close()


# --- what a second review found --------------------------------------------------------


def test_no_trigger_on_hctservers_tables_and_no_user_code_inside_its_statements(
    tmp_path: Path,
) -> None:
    with _service(tmp_path) as (_db, svc):
        for table in ("hct_journal", "hct_txid", "hct_local"):
            trig = f"CREATE TRIGGER evil_{table} AFTER INSERT ON {table} BEGIN SELECT 1; END"
            _, r = _call(svc, {"requests": [ex(trig), CLOSE]})
            assert r["results"][0]["type"] == "error", (table, r)
        # a trigger on a user table fires inside hctserver's own statements only if they
        # write that table, which they never do: user triggers still work on user writes
        _call(svc, {"requests": [ex("CREATE TABLE log(v)"), CLOSE]})
        _, r = _call(svc, {"requests": [
            ex("CREATE TRIGGER keep AFTER INSERT ON x BEGIN INSERT INTO log VALUES(new.v); END"),
            ex("INSERT INTO x VALUES(5)"), ex("SELECT v FROM log"), CLOSE]})  # fmt: skip
        assert rows_of(r["results"][2]) == [(5,)]
        body = {"txid": "once", "requests": [ex("INSERT INTO x VALUES(6)"), CLOSE]}
        _call(svc, body)
        _, again = _call(svc, body)
        assert again["duplicate"] is True


def test_a_write_whose_rows_are_large_still_commits_and_says_so(tmp_path: Path) -> None:
    with _service(tmp_path, max_answer=1000) as (_db, svc):
        big = {"requests": [ex("INSERT INTO x VALUES(zeroblob(5000)) RETURNING length(v)"), CLOSE]}
        _, r = _call(svc, big)  # the bound is for what a read asks: a write's rows come back
        assert r["results"][0]["type"] == "ok" and r["cid"] > 0
        _, r = _call(svc, {"requests": [ex("SELECT v FROM x"), CLOSE]})
        assert "exceed 1000 bytes" in r["results"][0]["error"]["message"]


def test_transaction_ids_are_pruned_whichever_stream_records_them(tmp_path: Path) -> None:
    from hctserver.journal import txids

    with _service(tmp_path) as (db, svc):
        for i in range(5):  # each on a stream of its own
            _call(svc, {"txid": f"old-{i}", "requests": [ex(f"INSERT INTO x VALUES({i})"), CLOSE]})
        conn = db.connect()
        conn.execute("BEGIN IMMEDIATE")
        conn.remember("new", "[]", window=-3600)  # everything is older than an hour ahead
        conn.execute("COMMIT")
        assert conn.execute(f"SELECT id FROM {txids.TXIDS}").fetchall() == [("new",)]
        conn.close()


def test_a_txid_goes_with_the_pipeline_that_commits_and_ends_there(tmp_path: Path) -> None:
    with _service(tmp_path) as (_db, svc):
        bad = [
            [ex("BEGIN"), ex("INSERT INTO x VALUES(1)")],  # no COMMIT here
            [
                ex("BEGIN"),
                ex("INSERT INTO x VALUES(1)"),
                ex("COMMIT"),
                ex("INSERT INTO x VALUES(2)"),
            ],
            [ex("INSERT INTO x VALUES(1)"), ex("COMMIT"), ex("BEGIN"), ex("COMMIT")],
        ]
        for reqs in bad:
            s, r = _call(svc, {"txid": "shape", "requests": reqs})
            assert s == 400 and "txid" in r["message"], r
        _, held = _call(svc, {"requests": [ex("BEGIN"), ex("INSERT INTO x VALUES(3)")]})
        s, r = _call(svc, {"baton": held["baton"], "txid": "late", "requests": [ex("SELECT 1")]})
        assert s == 400 and "no COMMIT" in r["message"]
        _, r = _call(svc, {"requests": [ex("SELECT count(*) FROM x"), CLOSE]})
        assert rows_of(r["results"][0]) == [(0,)]


def test_a_lost_connection_is_told_apart_from_what_may_have_run(tmp_path: Path) -> None:
    """A Stream whose node stops answering: a read says so, a write's outcome
    is unknown, and the stream never sends its old baton again."""
    import socket
    import threading

    from hctserver.errors import CommitUnknownError, TimedOutError

    quiet = socket.create_server(("127.0.0.1", 0))  # accepts, reads, never answers
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                c, _ = quiet.accept()
            except OSError:
                return
            conns.append(c)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        s = Stream(f"http://127.0.0.1:{quiet.getsockname()[1]}", timeout=0.3)
        with pytest.raises(TimedOutError):
            s.execute("SELECT 1", None)
        with pytest.raises(CommitUnknownError, match="whether it committed is unknown"):
            s.execute("INSERT INTO x VALUES(1)", None)
        assert not s.in_transaction
    finally:
        stop.set()
        quiet.close()
        for c in conns:
            c.close()


def test_a_followers_pooled_streams_carry_no_pragma_from_a_transaction(
    leader: Node, follower: Node
) -> None:
    url = str(follower.http_url)
    _, r = post(url, {"requests": [ex("BEGIN"), ex("PRAGMA recursive_triggers=1")]})
    _, r = post(
        url,
        {"baton": r["baton"], "requests": [ex("INSERT INTO t(b) VALUES(1)"), ex("COMMIT"), CLOSE]},
    )
    for _ in range(3):
        _, r = post(
            url,
            {
                "requests": [
                    ex("INSERT INTO t(b) VALUES(2)"),
                    ex("PRAGMA recursive_triggers"),
                    CLOSE,
                ]
            },
        )
        assert rows_of(r["results"][1]) == [(0,)]


def test_connect_on_a_follower_sends_large_transactions_with_a_clear_limit(
    leader: Node, follower: Node
) -> None:
    conn = hctserver.connect(follower.db.path)
    try:
        many = [("INSERT INTO t(b) VALUES(?)", (i,)) for i in range(1200)]
        with pytest.raises(hctserver.errors.UnsupportedStatementError, match="split it"):
            conn.transact(many)
        with conn:  # in BEGIN … COMMIT instead
            conn.executemany("INSERT INTO t(b) VALUES(?)", [(i,) for i in range(1200)])
        assert conn.execute("SELECT count(*) FROM t").fetchall() == [(1200,)]
    finally:
        conn.close()
