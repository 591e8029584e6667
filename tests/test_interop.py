"""Replication with the original C nodes (the reference build: skipped
when it is not here; ``$HCTSERVER_REFERENCE`` or ../shared/reference)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import apsw

from hctserver.position import ZERO_HASH, fold

from helpers import wait_until
from nodes import snapshot_of
from procs import HCT, free_port, processes, require_reference


def c_query(db: str, sql: str) -> list[str]:
    """Rows of ``sql`` on an hctree database, one Tcl list per line."""
    fixture = require_reference()
    p = subprocess.run(
        [str(fixture), str(fixture.parent / "query.tcl"), db, sql],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [line for line in p.stdout.splitlines() if not line.startswith("snapshot=")]


def c_position(db: str) -> tuple[int, bytes]:
    """The C database's (snapshot, version hash): its baseline folded with
    every journal row's hash."""
    (base,) = c_query(db, "SELECT cid, hex(hash) FROM sqlite_hct_baseline")
    cid, h = int(base.split()[0]), bytes.fromhex(base.split()[1])
    for line in c_query(db, "SELECT cid, hex(hash) FROM sqlite_hct_journal ORDER BY cid"):
        c, eh = line.split()
        assert int(c) == cid + 1, "a hole in the C journal"
        cid, h = int(c), fold(h, bytes.fromhex(eh))
    return cid, h


def our_position(db: str) -> tuple[int, bytes]:
    c = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        row = c.execute(
            "SELECT cid, vhash FROM hct_journal WHERE vhash IS NOT NULL ORDER BY cid DESC LIMIT 1"
        ).fetchone()
    finally:
        c.close()
    return (int(row[0]), bytes(row[1])) if row else (0, ZERO_HASH)


def c_rows(db: str) -> list[str]:
    return c_query(db, "SELECT a, hex(b), hex(c) FROM t1 ORDER BY a")


def our_rows(db: str) -> list[str]:
    c = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [
            f"{a} {b} {cc}" for a, b, cc in c.execute("SELECT a, hex(b), hex(c) FROM t1 ORDER BY a")
        ]
    finally:
        c.close()


def test_our_followers_follow_a_c_leader_from_the_start_and_mid_run(tmp_path: Path) -> None:
    cdb, early, late = (str(tmp_path / n) for n in ("c.db", "early.db", "late.db"))
    port = free_port()
    with processes(str(tmp_path)) as procs:
        leader = procs.c_leader(cdb, port, 6, 2)
        f1 = procs.start(*HCT, "follower", early, "--port", str(port), "--once")
        wait_until(lambda: snapshot_of(early) > 200, 30, "the first follower applying")
        f2 = procs.start(*HCT, "follower", late, "--port", str(port), "--once")
        assert f1.wait(60) == 0, procs.stderr(f1)
        assert f2.wait(60) == 0, procs.stderr(f2)
        assert leader.wait(60) == 0, procs.stdout(leader)
        assert "taking that as our baseline" in procs.stderr(f1)
    want = c_rows(cdb)
    assert len(want) > 100
    pos = c_position(cdb)
    for db in (early, late):
        assert our_rows(db) == want
        assert our_position(db) == pos


# --- the baseline convention and gaps, without the reference -----------------------


def _reply(*entries: tuple[int, int, str, bytes]) -> bytes:
    from hctserver.protocol import wire

    return (
        wire.encode_syncreply_start(1)
        + b"".join(wire.encode_entry(*e) for e in entries)
        + wire.END_OF_ENTRIES
    )


def test_a_reply_with_a_gap_stops_a_follower_at_once(tmp_path: Path) -> None:
    """Entries 1-6 will never come (the leader's schemacid says they were
    not an hctree start): a clear error at once, not a wait for the end."""
    import time

    import pytest

    from hctserver.errors import GapError

    from nodes import FakeLeader, follower_node

    fake = FakeLeader(_reply((7, 5, "", b"")))
    t0 = time.monotonic()
    f = follower_node(str(tmp_path / "f.db"), fake.port)
    try:
        with pytest.raises(GapError, match="cids 1 to 6 are gone"):
            f.wait(10)
    finally:
        f.close()
        fake.close()
    assert time.monotonic() - t0 < 2


def test_an_empty_follower_takes_an_hctree_leaders_baseline(tmp_path: Path) -> None:
    from hctserver import Database

    from nodes import FakeLeader, follower_node

    create = (7, 0, "CREATE TABLE t1(a INTEGER PRIMARY KEY, b, c)", b"")
    row = (8, 7, "", bytes.fromhex("5474310069020b04001b0875706461746564"))  # vectors: cid 18
    from hctserver.protocol import wire

    fake = FakeLeader(_reply(create, row), sub_reply=wire.encode_subreply_start())
    fp = str(tmp_path / "f.db")
    f = follower_node(fp, fake.port)
    try:
        wait_until(lambda: snapshot_of(fp) == 8, 10, "cid 8 applied")
    finally:
        f.close()
        fake.close()
    db = Database(fp, init=False)
    assert db.baseline() == (6, 0, ZERO_HASH)
    assert db.connect().execute("SELECT a, b, c FROM t1").fetchall() == [(2, "updated", 0)]
    db.close()


def c_follower(procs, db: str, port: int):  # type: ignore[no-untyped-def]
    """The C follower (tests/cfollower.tcl): it writes what it ended with to DB.dump."""
    fixture = require_reference()
    script = Path(__file__).with_name("cfollower.tcl")
    return procs.start(str(fixture), str(script), db, str(port), db + ".dump")


def c_dump(db: str) -> tuple[tuple[int, bytes], list[str]]:
    """A C follower's position (its baseline folded with every journal
    row's hash) and its t1 rows, from the dump it wrote."""
    lines = Path(db + ".dump").read_text().splitlines()
    (base,) = [ln.split() for ln in lines if ln.startswith("base ")]
    cid, h = int(base[1]), bytes.fromhex(base[2])
    for ln in lines:
        if ln.startswith("entry "):
            _, c, eh = ln.split()
            assert int(c) == cid + 1, "a hole in the C journal"
            cid, h = int(c), fold(h, bytes.fromhex(eh))
    rows = [ln[4:] for ln in lines if ln.startswith("row ")]
    return (cid, h), rows


def test_c_followers_follow_our_hctree_leader_from_the_start_and_mid_run(tmp_path: Path) -> None:
    lp, early, late, ours = (str(tmp_path / n) for n in ("l.db", "c1.db", "c2.db", "f.db"))
    require_reference()
    subprocess.run(
        [
            *HCT,
            "init",
            lp,
            "--format",
            "hctree",
            "--sql",
            "CREATE TABLE t1(a INTEGER PRIMARY KEY, b, c)",
        ],
        check=True,
        capture_output=True,
    )
    with processes(str(tmp_path)) as procs:
        leader, port = procs.leader(lp, "--seconds", "5", "--job", "writer", "--job", "writer")
        c1 = c_follower(procs, early, port)
        wait_until(lambda: snapshot_of(lp) > 3000, 30, "the leader writing")
        c2 = c_follower(procs, late, port)
        f = procs.start(*HCT, "follower", ours, "--port", str(port), "--once")
        for p in (c1, c2, f):
            assert p.wait(90) == 0, procs.stdout(p) + procs.stderr(p)
        assert leader.wait(60) == 0, procs.stderr(leader)
    pos = our_position(lp)
    assert pos[0] > 3000
    want = our_rows(lp)
    for db in (early, late):
        assert c_dump(db) == (pos, want)
    assert our_position(ours) == pos and our_rows(ours) == want


def test_our_follower_starved_by_a_c_leader_follows_it_by_sync(tmp_path: Path) -> None:
    """The C leader stops feeding a stream's later subscribers once one of
    them leaves: our later follower notices its streams are silent while the
    journal grows, and follows by SYNC (each entry still checked along the
    chain: its position hash is the C leader's at that cid)."""
    import signal

    cdb, first, later = (str(tmp_path / n) for n in ("c.db", "a.db", "b.db"))
    port = free_port()
    with processes(str(tmp_path)) as procs:
        leader = procs.c_leader(cdb, port, 12, 2)
        a = procs.start(*HCT, "follower", first, "--port", str(port), "--once")
        wait_until(lambda: "caught up: streaming" in procs.stderr(a), 30, "the first subscriber")
        b = procs.start(*HCT, "follower", later, "--port", str(port), "--once")
        wait_until(lambda: "caught up: streaming" in procs.stderr(b), 30, "the later subscriber")
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        at_kill = snapshot_of(later)
        wait_until(
            lambda: "following it by SYNC" in procs.stderr(b), 30, "the starved streams noticed"
        )
        wait_until(lambda: snapshot_of(later) > at_kill + 500, 30, "following by SYNC")
        assert b.wait(60) == 0, procs.stderr(b)
        assert leader.wait(60) == 0
    cid, h = our_position(later)
    c_cid, _ = c_position(cdb)
    assert cid > at_kill + 500 and cid <= c_cid
    # the C leader's chain at our cid is our hash: the same history, entry for entry
    (base,) = c_query(cdb, "SELECT cid, hex(hash) FROM sqlite_hct_baseline")
    ch = bytes.fromhex(base.split()[1])
    for line in c_query(
        cdb, f"SELECT cid, hex(hash) FROM sqlite_hct_journal WHERE cid<={cid} ORDER BY cid"
    ):
        ch = fold(ch, bytes.fromhex(line.split()[1]))
    assert ch == h


def test_hostile_hctree_data_stops_a_follower_with_nothing_applied(tmp_path: Path) -> None:
    import pytest

    from hctserver import Database
    from hctserver.errors import ProtocolError
    from hctserver.journal import hctformat
    from hctserver.protocol import wire

    from nodes import FakeLeader, follower_node

    create = (7, 0, "CREATE TABLE t1(a INTEGER PRIMARY KEY, b)", b"")
    system = hctformat.encode([hctformat.TableOps("hct_journal", [hctformat.Op("d", 7, ())])])
    cases = {
        "system table": (system, "not a table of the follower's schema"),
        "malformed": (b"Tt1\x00i\x01\x7f\x02", "cid 8: .*runs past the end"),
        "unknown kind": (b"Tt1\x00z", "cid 8: .*unknown record kind"),
    }
    for name, (data, match) in cases.items():
        fake = FakeLeader(_reply(create, (8, 7, "", data)), sub_reply=wire.encode_subreply_start())
        fp = str(tmp_path / f"{name}.db")
        f = follower_node(fp, fake.port)
        try:
            with pytest.raises(ProtocolError, match=match):
                f.wait(10)
        finally:
            f.close()
            fake.close()
        db = Database(fp, init=False)
        assert db.position().cid == 7, name  # the CREATE; nothing of cid 8
        db.close()
