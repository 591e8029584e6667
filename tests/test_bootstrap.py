"""Snapshot bootstrap, reseed and backup, with real nodes, sockets and files."""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import threading
import time

import apsw
import pytest

from hctserver import Database
from hctserver.journal import snapshot
from hctserver.protocol import bootstrap, wire

import dbdump
from helpers import replay, wait_until
from nodes import assert_identical, follower_node, gated_writer, init_db, leader_node, snapshot_of
from procs import HCT, processes


def _position(path: str) -> tuple[int, str]:
    db = Database(path, init=False)
    try:
        p = db.position()
        return p.cid, p.hash.hex()
    finally:
        db.close()


def _truncated_leader(lp: str, n: int, keep: int, at: str | None = None, upto: int = 0) -> None:
    """A leader of ``n`` writer commits truncated to its newest ``keep``;
    with ``at``, first a follower database there that replayed to ``upto``."""
    init_db(lp, n)
    db = Database(lp, init=False)
    try:
        if at is not None:
            replay(db, at, upto=upto).close()
        db.truncate(db.max_cid() - keep + 1)
        assert db.baseline()[0] == db.max_cid() - keep
    finally:
        db.close()


def test_1_new_and_behind_followers_bootstrap_from_a_truncated_leader(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    f_empty, f_100 = str(tmp_path / "empty.db"), str(tmp_path / "at100.db")
    _truncated_leader(lp, 200_000, 1000, at=f_100, upto=100)
    assert _position(f_100)[0] == 100
    gate = threading.Event()
    leader = leader_node(lp, [gated_writer(gate)])
    followers = []
    try:
        gate.set()  # the leader commits while the snapshots are made and sent
        for fp in (f_empty, f_100):
            followers.append(follower_node(fp, leader.port))
        for f in followers:
            wait_until(lambda f=f: f.runner.stats.phase == "stream", 60, "streaming")
            assert f.runner.bootstraps == 1
        sent = leader.runner.snapshot_server.stats()
        assert sent["served"] == 2
        wait_until(lambda: leader.db.snapshot() > leader.runner.start_cid + 200, 30, "commits")
    finally:
        leader.runner.timeout.expire()
        leader.wait(60)
        for f in followers:
            f.wait(60)
            f.close()
    assert_identical(lp, f_empty, f_100)  # rows, schema, position, journal after the snapshot
    # below the baseline, the leader cannot vouch for the old history: it is kept
    assert _position(f_100 + ".before-bootstrap")[0] == 100
    assert not os.path.exists(f_empty + ".before-bootstrap")  # nothing to keep
    for fp in (f_empty, f_100):
        db = Database(fp, init=False)
        assert db.check_journal() is None
        assert db.role == "follower"
        db.close()


def _state(path: str) -> tuple[object, ...]:
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], path
    finally:
        conn.close()
    return _position(path), dbdump.tables(path), dbdump.schema(path)


def test_2_a_follower_killed_anywhere_in_its_snapshot_install_is_old_or_new(tmp_path) -> None:
    lp, old = str(tmp_path / "l.db"), str(tmp_path / "old.db")
    _truncated_leader(lp, 30_000, 1000, at=old, upto=100)
    before, fp = _state(old), str(tmp_path / "f.db")
    with processes(str(tmp_path)) as procs:
        leader, port = procs.leader(lp)
        after = _state(lp)

        def run(kill: str, want_exit: bool) -> subprocess.Popen[str]:
            env = {**os.environ, "HCTSERVER_FAULT_KILL": kill}
            p = procs.follower(fp, port, env=env)
            wait_until(
                lambda: p.poll() is not None or "caught up: streaming" in procs.stderr(p),
                60,
                "the follower killed, or streaming",
            )
            if p.poll() is None:
                assert not want_exit, procs.stderr(p)
                p.terminate()
            p.wait(30)
            return p

        shutil.copy(old, fp)
        count = str(tmp_path / "points")
        run(f"count:{count}", False)  # how many crash points one bootstrap passes
        with open(count) as f:
            points = int(f.read().split()[0])
        assert points >= 12, points
        assert _state(fp) == after
        seed = random.randrange(1 << 30)
        # eleven random points, and the last (after the install's commit: new)
        picks = [*sorted(random.Random(seed).sample(range(1, points), 11)), points]
        seen = {"old": 0, "new": 0}
        for n in picks:
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(fp + suffix):
                    os.remove(fp + suffix)
            shutil.copy(old, fp)
            p = run(str(n), True)
            assert p.returncode == -9, (seed, n, procs.stderr(p))
            got = _state(fp)  # whole: old or new, never a mix
            assert got in (before, after), (seed, n)
            seen["old" if got == before else "new"] += 1
            run("", False)  # restarted without faults: it ends identical
            assert _state(fp) == after, (seed, n)
        assert seen["old"] and seen["new"], (seed, seen)
        assert not os.path.exists(fp + ".hct-bootstrap")
        leader.terminate()
        assert leader.wait(30) == 0


def _diverged(tmp_path) -> tuple[str, str]:
    """A leader, and a follower database whose history differs from it."""
    lp, other, fp = (str(tmp_path / n) for n in ("l.db", "other.db", "f.db"))
    init_db(lp, 300)
    init_db(other, 50)
    src = Database(other, init=False)
    replay(src, fp).close()
    src.close()
    return lp, fp


def test_3_a_diverged_follower_is_refused_untouched_unless_reseeded(tmp_path) -> None:
    lp, fp = _diverged(tmp_path)
    old_tables = dbdump.tables(fp)
    with open(fp, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with processes(str(tmp_path)) as procs:
        _, port = procs.leader(lp)
        p = procs.follower(fp, port)
        assert p.wait(60) == 4
        err = procs.stderr(p)
        assert "--reseed" in err and "differs" in err, err
        with open(fp, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest  # byte for byte
        assert not [n for n in os.listdir(tmp_path) if ".reseed-" in n]

        p = procs.follower(fp, port, "--reseed")
        wait_until(lambda: "caught up: streaming" in procs.stderr(p), 60, "streaming")
        p.terminate()
        assert p.wait(30) == 0
        err = procs.stderr(p)
    m = re.search(r"are kept in (\S+)", err)
    assert m, err
    aside = m.group(1)
    assert os.path.dirname(aside) == str(tmp_path) and ".reseed-" in aside
    assert dbdump.tables(aside) == old_tables
    assert _position(aside)[0] == 51
    assert_identical(lp, fp)


def test_a_leader_without_snapshots_refuses_and_says_what_to_do(tmp_path) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    _truncated_leader(lp, 300, 10)
    with processes(str(tmp_path)) as procs:
        _, port = procs.leader(lp, "--no-snapshots")
        p = procs.follower(fp, port)
        assert p.wait(60) == 4
        assert "sends no snapshots" in procs.stderr(p)
    assert snapshot_of(fp) == 0


def test_backup_writes_a_snapshot_that_seeds_a_follower(tmp_path) -> None:
    lp, out = str(tmp_path / "l.db"), str(tmp_path / "backup.db")
    init_db(lp, 500)
    done = subprocess.run([*HCT, "backup", lp, out, "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f'"cid": {_position(lp)[0]}' in done.stdout
    db = Database(out, init=False)
    assert db.position() == Database(lp, init=False).position()
    assert db.journal_stats()[0] == 0 and db.role is None
    db.close()
    assert dbdump.tables(out) == dbdump.tables(lp)
    gate = threading.Event()
    leader = leader_node(lp, [gated_writer(gate)])
    try:
        gate.set()
        wait_until(lambda: leader.db.snapshot() > 600, 30, "more commits")
        f = follower_node(out, leader.port)  # seeded: continues from the journal
        wait_until(lambda: f.runner.stats.phase == "stream", 60, "streaming")
        assert f.runner.bootstraps == 0
    finally:
        leader.runner.timeout.expire()
        leader.wait(60)
    f.wait(60)
    f.close()
    assert_identical(lp, out)


def test_an_empty_follower_replays_when_the_leader_sends_no_snapshots(tmp_path) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 12_000)  # more than bootstrap_min: it asks first
    leader = leader_node(lp, [], snapshots=False)
    try:
        f = follower_node(fp, leader.port)
        wait_until(lambda: f.runner.stats.phase == "stream", 60, "streaming")
        assert f.runner.bootstraps == 0
    finally:
        leader.close()
    f.wait(60)
    f.close()
    assert_identical(lp, fp)
    assert Database(fp, init=False).baseline()[0] == 0  # the whole journal, replayed


def test_a_bad_or_silent_snapshot_request_is_refused_and_the_leader_serves_on(
    tmp_path,
) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 20)
    leader = leader_node(lp, [], request_timeout=0.5)

    def ask(then: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", leader.port), timeout=5) as s:
            s.sendall(bootstrap.encode_request())
            offer = s.recv(28)
            assert struct.unpack_from("<ii", offer) == (bootstrap.OFFER, 20)
            s.sendall(then)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    try:
        garbage = ask(struct.pack("<ii", 99, 4) + b"junk")
        assert struct.unpack_from("<i", garbage)[0] == wire.ERROR
        assert b"bad snapshot request: unexpected bootstrap message type 99" in garbage
        t0 = time.monotonic()
        assert ask(b"") == b""  # silent: cut off at the request deadline
        assert time.monotonic() - t0 < 3
        ok = ask(bootstrap.encode_want(0, bytes(16), False))
        assert struct.unpack_from("<i", ok)[0] == bootstrap.HEAD  # and it serves on
        assert leader.runner.snapshot_server.stats()["refused"] == 1
    finally:
        leader.close()


def test_backup_of_a_missing_file_is_a_clear_error(tmp_path) -> None:
    done = subprocess.run(
        [*HCT, "backup", str(tmp_path / "nope.db"), str(tmp_path / "o.db")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 3 and "no such database" in done.stderr
    assert not os.path.exists(tmp_path / "o.db")
    lp = str(tmp_path / "l.db")
    init_db(lp, 10)
    done = subprocess.run([*HCT, "backup", lp, lp], capture_output=True, text=True)
    assert done.returncode == 2 and "the database itself" in done.stderr
    assert snapshot_of(lp) == 11


@pytest.mark.parametrize(
    "damage, why",
    [
        ("journal", "journal is not empty"),
        ("position", "not at the position"),
        ("schema", "schema holds"),
        ("bytes", "damaged"),
    ],
)
def test_a_damaged_or_hostile_snapshot_is_refused(tmp_path, damage: str, why: str) -> None:
    lp, path = str(tmp_path / "l.db"), str(tmp_path / "snap.db")
    init_db(lp, 200)
    db = Database(lp, init=False)
    info = snapshot.make(db, path)
    db.close()
    cid, h = info.cid, info.hash
    conn = apsw.Connection(path)
    conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)  # past the guards: a hostile file
    if damage == "journal":
        conn.execute("INSERT INTO hct_journal VALUES(999, '', x'', 0, x'00', NULL)")
    elif damage == "position":
        h = b"\x01" * 16
    elif damage == "schema":
        conn.execute("CREATE TRIGGER evil AFTER INSERT ON hct_journal BEGIN SELECT 1; END")
    conn.close()
    if damage == "bytes":
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            for page in range(1, size // 4096):  # every b-tree page's header and cells
                f.seek(page * 4096)
                f.write(b"\xff" * 64)
    with pytest.raises(Exception, match=why):
        snapshot.check(path, cid, h)
