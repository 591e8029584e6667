"""The continuous archive as an operator runs it: a leader with ``--archive``
under a write load, SIGKILLed and restarted; then ``archive verify`` and
``restore`` through the CLI, each restored database compared with the
leader at that cid."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from hctserver import Database
from hctserver.errors import TransientError
from hctserver.node.archiving import ArchiveTask
from hctserver.node.assemble import seed_from_archive

from helpers import wait_until
from procs import HCT, processes, stop

SECONDS = 3.0  # of writes before the kill and after the restart (the slow test: 30 + 30)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HCT, *args], capture_output=True, text=True, timeout=120)


def _cid(path: str) -> int:
    db = Database(path, init=False)
    try:
        return db.snapshot()
    finally:
        db.close()


def _writes_for(path: str, seconds: float) -> None:
    """The write load goes on for ``seconds`` (a duration of load, not a
    wait for something to happen: progress is checked on the way)."""
    start, until = _cid(path), time.monotonic() + seconds
    wait_until(lambda: time.monotonic() >= until, seconds + 5, f"{seconds:g} s of writes")
    assert _cid(path) > start + 100, "the writer job stalled"


def _baseline(path: str) -> int:
    db = Database(path, init=False)
    try:
        return db.baseline()[0]
    finally:
        db.close()


def _run(tmp: Path, seconds: float) -> None:
    lp, arch = str(tmp / "l.db"), tmp / "archive"
    url = f"file://{arch}"
    assert _cli("init", lp, "--sql", "CREATE TABLE t1(a INTEGER PRIMARY KEY, b, c)").returncode == 0
    leader_args = [
        "leader", lp, "--port", "0", "--job", "writer", "--archive", url,
        "--archive-max-delay", "0.2", "--retain-cids", "500", "--retain-bytes", "0",
        "--http", "0",
    ]  # fmt: skip
    with processes(str(tmp)) as procs:
        leader = procs.start(*HCT, *leader_args)
        wait_until(lambda: _cid(lp) > 2000, 60, "the writer job committing")
        mid = _cli("backup", lp, str(tmp / "mid.db"), "--json")  # the leader at one cid
        assert mid.returncode == 0, mid.stderr
        mid_cid = json.loads(mid.stdout)["cid"]
        _writes_for(lp, seconds)
        leader.kill()  # SIGKILL: what was not shipped is still in the journal
        leader.wait(30)
        killed_at = _cid(lp)
        leader = procs.start(*HCT, *leader_args)
        _writes_for(lp, seconds)
        assert _cid(lp) > killed_at
        # retention truncates the journal, behind the archive (never ahead: checked below)
        wait_until(lambda: _baseline(lp) > 0, 60, "retention cutting the journal")
        # a running leader ships there itself: a second archiver is refused
        p = _cli("archive", "snapshot", url, lp)
        assert p.returncode == 3 and "already served by a node" in p.stderr, p.stderr
        # a new follower starts from the archive, then catches up from the leader
        m = re.search(r"leader on \S+:(\d+)", procs.stderr(leader))
        assert m is not None
        fp = str(tmp / "f.db")
        f = procs.start(*HCT, "follower", fp, "--port", m.group(1), "--bootstrap-from", url,
                        "--once")  # fmt: skip
        wait_until(lambda: "bootstrapped from the archive" in procs.stderr(f), 60, "seeding")
        wait_until(lambda: "streaming" in procs.stderr(f), 60, "the follower streaming")
        assert stop(leader) < 30 and leader.returncode == 0, procs.stderr(leader)
        assert f.wait(60) == 0, procs.stderr(f)
    newest = _cid(lp)
    v = _cli("archive", "verify", url)
    assert v.returncode == 0 and "archive intact" in v.stdout, v.stdout + v.stderr
    ls = json.loads(_cli("archive", "ls", url, "--json").stdout)
    assert ls["ranges"][-1][1] == newest, (ls["ranges"], newest)  # a clean stop ships it all
    for name, cid, want in (("r-mid.db", mid_cid, tmp / "mid.db"), ("r-new.db", None, lp)):
        out = str(tmp / name)
        t0 = time.monotonic()
        r = _cli("restore", url, out, *(["--cid", str(cid)] if cid else []), "--json")
        took = time.monotonic() - t0
        print(f"restore to cid {cid or newest:,} of {newest:,} ({ls['segments']} segments,"
              f" ranges {ls['ranges']}, killed at {killed_at:,}): {took:.1f} s")  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["cid"] == (cid or newest)
        same = _cli("verify", out, str(want))
        assert same.returncode == 0 and "identical" in same.stdout, same.stdout + same.stderr
    assert _baseline(lp) <= ls["ranges"][-1][1]
    # to a time in the middle of the load: the last commit at or before it, a
    # state of the leader's history (behind the leader, equal to that cid's restore)
    at = json.loads(_cli("restore", url, str(tmp / "r-probe.db"), "--cid", str(mid_cid),
                         "--json").stdout)["time"]  # fmt: skip
    r = _cli("restore", url, str(tmp / "r-time.db"), "--time", at, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["cid"] >= mid_cid and got["time"] == at, (got, mid_cid, at)
    newest_copy = str(tmp / "r-new.db")  # identical to the leader, with the whole journal
    assert _cli("verify", str(tmp / "r-time.db"), newest_copy).returncode == 9  # behind it
    by_cid = str(tmp / "r-time-cid.db")
    assert _cli("restore", url, by_cid, "--cid", str(got["cid"])).returncode == 0
    assert _cli("verify", str(tmp / "r-time.db"), by_cid).returncode == 0
    same = _cli("verify", fp, lp)
    assert same.returncode == 0 and "identical" in same.stdout, same.stdout + same.stderr


def test_an_archived_leader_killed_and_restarted_restores_to_any_cid(tmp_path: Path) -> None:
    _run(tmp_path, SECONDS)


@pytest.mark.slow
def test_a_minute_of_writes_killed_and_restarted(tmp_path: Path) -> None:
    _run(tmp_path, 30.0)


def test_a_damaged_archive_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    lp, arch = str(tmp_path / "l.db"), tmp_path / "archive"
    url = f"file://{arch}"
    assert _cli("init", lp, "--sql", "CREATE TABLE t1(a INTEGER PRIMARY KEY, b, c)").returncode == 0
    with processes(str(tmp_path)) as procs:
        leader = procs.start(*HCT, "leader", lp, "--port", "0", "--job", "writer", "--archive",
                             url, "--archive-max-delay", "0.1")  # fmt: skip
        segs = arch / "v1" / "segments"
        wait_until(lambda: segs.exists() and len(list(segs.iterdir())) >= 3, 60, "segments")
        assert stop(leader) < 30 and leader.returncode == 0, procs.stderr(leader)
    victim = sorted(segs.iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:-20])  # truncated
    for args in (("archive", "verify", url), ("restore", url, str(tmp_path / "r.db"))):
        p = _cli(*args)
        assert p.returncode == 3, p.stdout + p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and victim.name in lines[0], lines
    assert not (tmp_path / "r.db").exists()


class _DownStore:
    """An object store that is down (as S3 out of reach): every call fails."""

    url = "down://"

    def put(self, name: str, data: bytes) -> None:
        raise TransientError("the store is down")

    def get(self, name: str) -> bytes:
        raise TransientError("the store is down")

    def list(self, prefix: str) -> list[str]:
        raise TransientError("the store is down")

    def delete(self, name: str) -> None:
        raise TransientError("the store is down")


def test_the_retention_floor_holds_while_the_store_is_down(tmp_path: Path) -> None:
    lp = str(tmp_path / "l.db")
    assert _cli("init", lp, "--sql", "CREATE TABLE t1(a INTEGER PRIMARY KEY, b, c)").returncode == 0
    db = Database(lp, init=False)
    db.set_mode("leader")
    try:
        c = db.connect()
        for i in range(50):
            c.execute("INSERT INTO t1 VALUES(?, 1, 1)", (i,))
        task = ArchiveTask(db, f"file://{tmp_path}/archive")
        assert task.floor() == -1  # nothing known yet: keep everything
        task.archiver.flush()
        shipped = task.floor()
        assert shipped == db.snapshot()
        task.archiver.store = _DownStore()
        for i in range(50, 60):
            c.execute("INSERT INTO t1 VALUES(?, 1, 1)", (i,))
        with pytest.raises(TransientError):
            task.archiver.flush()
        assert task.floor() == shipped  # not forgotten with the failure
        st = task.status()
        assert st["archived_cid"] == shipped and st["lag_cids"] == 10
        task.archiver.close()
        c.close()
    finally:
        db.close()


def test_bootstrap_from_an_empty_archive_starts_from_the_leader_alone(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/empty"
    (tmp_path / "empty").mkdir()
    assert seed_from_archive(str(tmp_path / "f.db"), url) is None
    assert not (tmp_path / "f.db").exists()
