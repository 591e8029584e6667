"""Addresses: IPv6, and the warning for a leader reachable beyond this machine."""

from __future__ import annotations

import re
import socket

import pytest

from helpers import wait_until
from nodes import assert_identical, init_db, snapshot_of
from procs import HCT, processes, stop


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _leader_port(procs, p) -> int:
    def port() -> int | None:
        m = re.search(r"leader on \S+:(\d+)", procs.stderr(p))
        return int(m.group(1)) if m else None

    wait_until(lambda: port() is not None or p.poll() is not None, 60, "the leader's start")
    found = port()
    assert found is not None, procs.stderr(p)
    return found


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_a_leader_and_follower_on_ipv6_loopback_replicate(tmp_path) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 50)
    with processes(str(tmp_path)) as procs:
        leader = procs.start(*HCT, "leader", lp, "--host", "::1", "--port", "0", "--job", "writer")
        port = _leader_port(procs, leader)
        assert "leader on ::1:" in procs.stderr(leader)
        assert "beyond this machine" not in procs.stderr(leader)  # loopback: no warning
        f = procs.start(*HCT, "follower", fp, "--host", "::1", "--port", str(port))
        wait_until(lambda: "caught up: streaming" in procs.stderr(f), 60, "streaming over IPv6")
        wait_until(lambda: snapshot_of(fp) > snapshot_of(lp) - 5000 > 0, 60, "live commits")
        stop(leader)
        final = snapshot_of(lp)
        wait_until(lambda: snapshot_of(fp) == final, 60, "the follower at the end")
        stop(f)
    assert_identical(lp, fp)


def test_a_leader_beyond_loopback_without_protection_is_warned_about(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 1)
    with processes(str(tmp_path)) as procs:
        leader = procs.start(*HCT, "leader", lp, "--host", "0.0.0.0", "--port", "0")
        _leader_port(procs, leader)
        wait_until(lambda: "beyond this machine" in procs.stderr(leader), 10, "the warning")
        err = procs.stderr(leader)
        assert re.search(r"WARNING +listening on 0\.0\.0\.0:\d+, beyond this machine", err), err
        assert "no TLS and no authentication" in err
        stop(leader)
