"""The Tcl-like Node API: options, jobs, errors, debug lines."""

from __future__ import annotations

import logging
import queue
import re
import socket
from typing import Any

import pytest

from hctserver.errors import AddressInUseError, ConfigError, ConnectError, JobError
from hctserver.node.testserver import Node

from helpers import wait_until
from nodes import assert_identical, controlled_job, follower_node, init_db, leader_node


def test_configure_validates_every_option(tmp_path) -> None:
    n = Node(str(tmp_path / "x.db"))
    assert n.configure() == {
        "port": 21212,
        "host": "127.0.0.1",
        "seconds": 0,
        "follower": False,
        "syncthreads": 1,
        "syncbytes": 0,
        "once": False,
        "http": None,
        "health_max_lag": 10.0,
        "security": None,
        "http_security": None,
        "synchronous": "NORMAL",
    }
    for bad, match in [
        ({"synchronous": "FAST"}, "synchronous must be NORMAL, FULL"),
        ({"synchronous": "FULL"}, "set when the node is made"),
        ({"security": "tls"}, "option security takes Security"),
        ({"http": "nope"}, "--http takes HOST:PORT or PORT"),
        ({"http": "127.0.0.1:99999"}, "port must be between 0 and 65535"),
        ({"health_max_lag": 0}, "health_max_lag must be a finite number"),
        ({"colour": 1}, "unknown option 'colour'"),
        ({"port": "80"}, "option port takes int"),
        ({"port": 70000}, "port must be between 0 and 65535"),
        ({"syncthreads": 0}, "syncthreads must be between 1 and 16"),
        ({"syncthreads": 17}, "syncthreads must be between 1 and 16"),
        ({"follower": 1}, "option follower takes bool"),
        ({"once": "yes"}, "option once takes bool"),
        ({"seconds": float("nan")}, "seconds must be >= 0"),
        ({"seconds": float("inf")}, "seconds must be finite"),
        ({"seconds": -1}, "seconds must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=match):
            n.configure(**bad)
    assert n.configure(host="0.0.0.0", seconds=2.5)["host"] == "0.0.0.0"
    with pytest.raises(ConfigError, match="neither a Python script nor a bundled job"):
        n.job("no-such-job")


def test_a_script_job_runs_with_db_and_timeout(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp)
    script = tmp_path / "job.py"
    script.write_text(
        "assert callable(timeout) and not timeout()\n"
        "for i in range(5):\n"
        "    db.execute('INSERT INTO t1 VALUES(?, ?, ?)', (i, __name__, 'x'))\n"
    )
    leader = leader_node(lp, [str(script)])
    leader.wait()
    rows = leader.db.connect().execute("SELECT b FROM t1").fetchall()
    assert rows == [("__hctjob__",)] * 5 and leader.db.max_cid() == 6


def test_a_failing_job_is_reported(tmp_path) -> None:
    def boom(db: Any, timeout: Any) -> None:
        raise ValueError("nope")

    leader = leader_node(str(tmp_path / "l.db"), [boom])
    with pytest.raises(JobError, match=r"job 0 \(boom\): ValueError: nope"):
        leader.wait()


def test_listen_and_connect_errors_are_clear(tmp_path) -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    n = Node(str(tmp_path / "l.db"), port=port)
    with pytest.raises(AddressInUseError, match="address already in use"):
        n.start()
    busy.close()
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    f = follower_node(str(tmp_path / "f.db"), port)
    with pytest.raises(ConnectError, match="connection refused"):
        f.wait(30)


def test_follower_jobs_read_the_snapshot_and_debug_lines_are_emitted(tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="hctserver.trace")
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 5)
    commands: queue.Queue[str] = queue.Queue()
    leader = leader_node(lp, [controlled_job(commands)])
    seen: list[int] = []

    def reader(db: Any, timeout: Any) -> None:
        while not timeout.wait(0.01):
            seen.append(db.snapshot())
        seen.append(db.execute("SELECT count(*) FROM t1").fetchone()[0])

    f = Node(fp, follower=True, port=leader.port, once=True)
    f.job(reader)
    f.start()
    wait_until(lambda: f.runner is not None and f.runner.stats.phase == "stream")
    commands.put("INSERT OR REPLACE INTO t1 VALUES(1000, 'x', 'y')")
    wait_until(lambda: leader.db.max_cid() == 7)
    assert f.db.wait_for(7, timeout=30)
    leader.runner.timeout.expire()
    leader.wait()
    f.wait(30)
    assert_identical(lp, fp)
    assert seen[:-1] == sorted(seen[:-1]) and 7 in seen[:-1]
    lines = [r.getMessage() for r in caplog.records if r.name == "hctserver.trace"]
    assert any(re.fullmatch(r"hct_testserver: tm=\d+ms SYNC: first CID = 1", x) for x in lines)
    assert any("syncreply" in x for x in lines)


def test_synchronous_is_the_databases_setting(tmp_path) -> None:
    n = Node(str(tmp_path / "x.db"), synchronous="FULL")
    assert n.db.synchronous == "FULL"
    c = n.db.open_connection()
    assert c.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    c.close()
    n.db.close()


def test_a_node_is_a_context_manager_that_stops_what_it_started(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp)
    with Node(lp, port=0) as leader:
        leader.start()
        port = leader.port
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it listens
        raised = False
        try:
            with Node(str(tmp_path / "f.db"), follower=True, port=port) as f:
                f.start()
                raise RuntimeError("a test that fails")
        except RuntimeError:
            raised = True
        assert raised and f.db.closed and f.runner is not None and f.runner.group.stopping.is_set()
    assert leader.db.closed
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
