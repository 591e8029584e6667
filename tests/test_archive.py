"""The continuous archive: shipping the journal to an object store, restore
to a cid or a time, checks of every damaged input, crash idempotence, prune.

Real SQLite files in tmp_path; a fake wall clock gives commit times (no
sleeps anywhere)."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest

from hctserver import Database
from hctserver.errors import ConfigError
from hctserver.journal import snapshot
from hctserver.journal.archive import (
    ArchiveError,
    ArchiveGapError,
    ArchiveMismatchError,
    Archiver,
    DirStore,
    ObjectMissingError,
    ls,
    open_store,
    parse_time,
    prune,
    register_scheme,
    restore,
    verify,
)
from hctserver.journal.archive_format import (
    SEGMENTS,
    SNAPSHOTS,
    SegmentRef,
    TimedEntry,
    decode_segment,
    encode_segment,
    parse_segment_name,
    segment_name,
)
from hctserver.journal.verify import compare
from hctserver.node.jobs import WRITER_SQL
from hctserver.position import Entry

from archived import T0, Leader
from nodes import assert_identical, init_db


@pytest.fixture
def leader(tmp_path: Any) -> Iterator[Leader]:
    lead = Leader(tmp_path)
    yield lead
    lead.close()


def restored_equals(copy: str, out: str) -> None:
    assert compare(copy, out) is None
    assert_identical(copy, out)


def segments(store: DirStore) -> list[SegmentRef]:
    return [parse_segment_name(n) for n in store.list(SEGMENTS)]


def a_history(lead: Leader) -> dict[str, tuple[int, str]]:
    """Writes in between ships, a schema change and a snapshot; copies at
    a middle cid (before the snapshot), after it, and at the newest."""
    lead.write(20)
    lead.archiver.ship_once()
    lead.clock.advance(10)
    lead.write(15)
    middle = lead.copy()
    lead.archiver.ship_once()
    lead.conn.execute("CREATE TABLE t2(x PRIMARY KEY, y)")
    lead.conn.execute("INSERT INTO t2 VALUES(1, 'one')")
    lead.archiver.snapshot_now()
    lead.clock.advance(10)
    lead.write(12)
    after = lead.copy()
    lead.archiver.ship_once()
    lead.conn.execute("ALTER TABLE t2 ADD COLUMN z")
    lead.write(7)
    lead.archiver.ship_once()
    return {"middle": middle, "after": after, "newest": lead.copy()}


# --- restore ----------------------------------------------------------------------


def test_restore_to_a_middle_cid_after_a_snapshot_and_the_newest(leader: Leader) -> None:
    copies = a_history(leader)
    assert leader.archiver.status().archived_cid == leader.db.snapshot()
    assert leader.archiver.status().lag_cids == 0
    for what, (cid, copy) in copies.items():
        out = str(leader.dir / f"r-{what}.db")
        got = restore(leader.store.url, out, cid=None if what == "newest" else cid)
        assert got.cid == cid
        restored_equals(copy, out)
        assert not [f for f in os.listdir(leader.dir) if ".restore-" in f]
    # from the start of the history for the middle, from the snapshot after it
    snaps = ls(leader.store).snapshots
    assert len(snaps) == 1
    mid = restore(leader.store, str(leader.dir / "r2.db"), cid=copies["middle"][0])
    assert mid.anchor == "the start of the history"
    after = restore(leader.store, str(leader.dir / "r3.db"), cid=copies["after"][0])
    assert after.anchor == snaps[0].name


def test_the_restored_database_goes_on_as_a_leader(leader: Leader) -> None:
    a_history(leader)
    out = str(leader.dir / "r.db")
    got = restore(leader.store, out)
    db = Database(out, init=False)
    try:
        assert db.role is None and db.position().cid == got.cid
        assert db.check_journal() is None
        db.set_mode("leader")
        c = db.connect()
        c.execute(WRITER_SQL)
        c.close()
        assert db.snapshot() == got.cid + 1
    finally:
        db.close()


def test_restore_to_a_time(leader: Leader) -> None:
    leader.write(10)  # at T0
    leader.archiver.ship_once()
    leader.clock.advance(60)
    first = leader.write(10)  # at T0 + 60 s
    c_first = leader.copy()
    leader.archiver.ship_once()
    leader.clock.advance(60)
    leader.write(5)  # at T0 + 120 s
    leader.archiver.snapshot_now()
    leader.clock.advance(60)
    leader.write(5)  # at T0 + 180 s
    leader.archiver.ship_once()
    t = (T0 + 90_000_000) / 1e6
    got = restore(leader.store, str(leader.dir / "r.db"), time=t)
    assert got.cid == first == c_first[0] and got.time_us == T0 + 60_000_000
    restored_equals(c_first[1], str(leader.dir / "r.db"))
    when = datetime.fromtimestamp(t, tz=timezone.utc)
    assert restore(leader.store, str(leader.dir / "r2.db"), time=when).cid == first
    assert parse_time(when.isoformat().replace("+00:00", "Z")) == when
    late = restore(leader.store, str(leader.dir / "r3.db"), time=(T0 + 200e6) / 1e6)
    assert late.cid == leader.db.snapshot()
    exact = restore(leader.store, str(leader.dir / "r4.db"), time=(T0 + 120e6) / 1e6)
    assert exact.cid == first + 5 and exact.anchor.startswith(SNAPSHOTS)
    with pytest.raises(ArchiveError, match="no commit at or before"):
        restore(leader.store, str(leader.dir / "r5.db"), time=(T0 - 1e6) / 1e6)
    assert not os.path.exists(leader.dir / "r5.db")
    with pytest.raises(ConfigError, match="not a time"):
        parse_time("yesterday")


def test_restore_refuses_an_existing_file_and_a_cid_past_the_end(leader: Leader) -> None:
    leader.write(5)
    leader.archiver.ship_once()
    out = leader.dir / "r.db"
    out.write_bytes(b"mine")
    with pytest.raises(ConfigError, match="exists"):
        restore(leader.store, str(out))
    assert out.read_bytes() == b"mine"
    with pytest.raises(ArchiveError, match="cid 99 is not in it"):
        restore(leader.store, str(leader.dir / "r2.db"), cid=99)
    with pytest.raises(ArchiveError, match="holds no archive"):
        restore(DirStore(str(leader.dir / "nothing")), str(leader.dir / "r3.db"))
    assert not os.path.exists(leader.dir / "r2.db") and not os.path.exists(leader.dir / "r3.db")


# --- damaged, missing, misplaced objects ----------------------------------------------


def _edit_entry(blob: bytes, ref: SegmentRef, fix_hash: bool) -> bytes:
    seg = decode_segment(blob, ref)
    te = seg.entries[2]
    e = te.entry
    data = e.data[:-1] + bytes([e.data[-1] ^ 1])
    edited = Entry(e.cid, e.schemacid, e.schema, data)
    seg.entries[2] = TimedEntry(edited, edited.hash() if fix_hash else te.hash, te.time_us)
    return encode_segment(seg.entries, seg.prev_hash, seg.hash)


def _damage(lead: Leader, how: str) -> str:
    """Damage the archive; returns the name of the object that is bad."""
    segs = segments(lead.store)
    a, b = segs[1], segs[2]
    root = lead.store.root
    path_a = os.path.join(root, *a.name.split("/"))
    blob_a = lead.store.get(a.name)
    if how == "missing":
        lead.store.delete(a.name)
        return segment_name(a.first, a.last)
    if how == "truncated":
        lead.store.put(a.name, blob_a[: len(blob_a) // 2])
    elif how == "renamed":
        os.rename(path_a, os.path.join(root, *segment_name(a.first, a.last - 1).split("/")))
        return segment_name(a.first, a.last - 1)
    elif how == "reordered":
        blob_b = lead.store.get(b.name)
        lead.store.put(a.name, blob_b)
        lead.store.put(b.name, blob_a)
    elif how == "edited":
        lead.store.put(a.name, _edit_entry(blob_a, a, fix_hash=False))
    elif how == "edited-and-rehashed":
        lead.store.put(a.name, _edit_entry(blob_a, a, fix_hash=True))
    elif how == "junk":
        lead.store.put(SEGMENTS + "notes.txt", b"hello")
        return SEGMENTS + "notes.txt"
    return a.name


DAMAGE = {
    "missing": "missing: no segment holds cids",
    "truncated": "truncated or damaged",
    "renamed": "renamed or moved",
    "reordered": "renamed or moved",
    "edited": "its hash does not match",
    "edited-and-rehashed": "do not fold to the version hash",
    "junk": "not a segment name",
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_archive_is_refused_naming_the_object(leader: Leader, how: str) -> None:
    for _ in range(4):
        leader.write(10)
        leader.archiver.ship_once()
    assert len(segments(leader.store)) == 4
    bad = _damage(leader, how)
    out = leader.dir / "r.db"
    with pytest.raises(ArchiveError) as err:
        restore(leader.store, str(out))
    msg = str(err.value)
    assert "\n" not in msg and bad in msg and DAMAGE[how] in msg, msg
    assert err.value.obj == bad
    assert not os.path.exists(out)
    assert [f for f in os.listdir(leader.dir) if f.startswith("r.db")] == []
    with pytest.raises(ArchiveError) as err2:
        verify(leader.store)
    assert bad in str(err2.value)
    if how == "missing":
        assert isinstance(err.value, ObjectMissingError)


def test_a_damaged_snapshot_is_refused_before_anything_is_written(leader: Leader) -> None:
    leader.write(10)
    ref = leader.archiver.snapshot_now()
    leader.write(5)
    leader.archiver.ship_once()
    blob = leader.store.get(ref.name)
    leader.store.put(ref.name, blob[:-20])
    with pytest.raises(ArchiveError, match="truncated or damaged") as err:
        restore(leader.store, str(leader.dir / "r.db"))
    assert err.value.obj == ref.name
    assert not os.path.exists(leader.dir / "r.db")
    with pytest.raises(ArchiveError, match="truncated or damaged"):
        verify(leader.store)


def test_an_archive_of_another_database(tmp_path: Any) -> None:
    one, two = Leader(tmp_path, "one.db"), Leader(tmp_path, "two.db")
    try:
        for lead in (one, two):
            for _ in range(3):
                lead.write(10)
                lead.archiver.ship_once()
        # a segment of the other database's archive put in place of one's own
        theirs = segments(two.store)[1]
        one.store.put(theirs.name, two.store.get(theirs.name))
        with pytest.raises(ArchiveError, match="does not follow") as err:
            restore(one.store, str(tmp_path / "r.db"))
        assert err.value.obj == theirs.name
        assert not os.path.exists(tmp_path / "r.db")
        # an archiver refuses to go on with another database's archive
        stray = Archiver(one.db, two.store, clock=one.clock)
        with pytest.raises(ArchiveMismatchError, match="another database's archive"):
            stray.ship_once()
        stray.close()
        assert len(segments(two.store)) == 3
    finally:
        one.close()
        two.close()


def test_an_archive_ahead_of_the_database_is_refused(tmp_path: Any) -> None:
    lead = Leader(tmp_path)
    try:
        lead.write(30)
        lead.archiver.ship_once()
        other = str(tmp_path / "young.db")
        init_db(other)
        young = Database(other, init=False)
        stray = Archiver(young, lead.store)
        with pytest.raises(ArchiveMismatchError, match="past"):
            stray.ship_once()
        stray.close()
        young.close()
    finally:
        lead.close()


# --- crashes and overlaps ---------------------------------------------------------------


class DiesAfterPut:
    """A store whose process 'dies' right after a put completes."""

    def __init__(self, store: DirStore) -> None:
        self.inner = store
        self.url = store.url
        self.armed = False

    def put(self, name: str, data: bytes) -> None:
        self.inner.put(name, data)
        if self.armed:
            self.armed = False
            raise OSError("the process died")

    def get(self, name: str) -> bytes:
        return self.inner.get(name)

    def list(self, prefix: str) -> list[str]:
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self.inner.delete(name)


def _contiguous(store: DirStore) -> None:
    segs = segments(store)
    for x, y in itertools.pairwise(segs):
        assert y.first == x.last + 1, (x, y)


def test_a_crash_after_a_put_leaves_no_gap_and_no_duplicate(leader: Leader) -> None:
    dies = DiesAfterPut(leader.store)
    first = Archiver(leader.db, dies, max_delay=0.0, clock=leader.clock)
    leader.write(10)
    first.ship_once()
    leader.write(10)
    dies.armed = True
    with pytest.raises(OSError, match="died"):
        first.ship_once()
    leader.write(10)
    # a new process: it lists the archive and goes on after the segment stored
    second = Archiver(leader.db, leader.store, max_delay=0.0, clock=leader.clock)
    assert second.ship_once() == 10
    assert second.status().archived_cid == leader.db.snapshot()
    leader.write(3)
    # the first one (had it lived on) lists again too, and goes on after it
    assert first.ship_once() == 3
    first.close()
    second.close()
    _contiguous(leader.store)
    assert [(s.first, s.last) for s in segments(leader.store)][-3:] == [
        (12, 21),
        (22, 31),
        (32, 34),
    ]
    cid, copy = leader.copy()
    assert restore(leader.store, str(leader.dir / "r.db")).cid == cid
    restored_equals(copy, str(leader.dir / "r.db"))


def test_a_crash_with_entries_unshipped_ships_them_next_time(leader: Leader) -> None:
    slow = Archiver(leader.db, leader.store, max_delay=3600.0, clock=leader.clock)
    leader.write(10)
    slow.ship_once(flush=True)
    leader.write(10)
    assert slow.ship_once() == 0 and slow.status().buffered == 10
    slow.close()  # dies with 10 entries read, not stored
    nxt = Archiver(leader.db, leader.store, max_delay=0.0, clock=leader.clock)
    assert nxt.ship_once() == 10
    nxt.close()
    _contiguous(leader.store)
    assert verify(leader.store).entries == leader.db.snapshot()


def test_a_second_archiver_on_the_same_archive_is_refused(leader: Leader) -> None:
    leader.write(10)
    leader.archiver.ship_once()
    other = Archiver(leader.db, leader.store, max_delay=0.0, clock=leader.clock)
    other.ship_once()  # both know the archive ends at cid 11
    leader.write(5)
    leader.archiver.ship_once()
    leader.write(5)
    with pytest.raises(ArchiveError, match="another archiver") as err:
        other.ship_once()
    assert err.value.obj == segment_name(12, 21)
    assert other.ship_once() == 5  # it listed again: on from cid 17
    other.close()
    _contiguous(leader.store)
    assert verify(leader.store).entries == 21


# --- closing segments, status, the loop -----------------------------------------------------


def test_a_segment_closes_by_size_or_by_age(tmp_path: Any) -> None:
    ticks = [0.0]
    lead = Leader(tmp_path, max_bytes=1000, max_delay=5.0, monotonic=lambda: ticks[0])
    try:
        lead.write(20)  # about 250 bytes each: a segment every 4 or 5 entries
        shipped = lead.archiver.ship_once()
        segs = segments(lead.store)
        assert len(segs) >= 4 and all(3 <= s.last - s.first + 1 <= 5 for s in segs)
        assert shipped == segs[-1].last
        lead.write(1)
        assert lead.archiver.ship_once() == 0
        st = lead.archiver.status()
        assert st.buffered == 22 - shipped and st.archived_cid == shipped
        assert st.lag_cids == st.buffered
        lead.clock.advance(2)
        assert lead.archiver.status().lag_seconds == pytest.approx(2.0)
        ticks[0] = 4.9
        assert lead.archiver.ship_once() == 0
        ticks[0] = 5.0
        assert lead.archiver.ship_once() == 22 - shipped
        assert lead.archiver.status().lag_cids == 0
        assert lead.archiver.status().lag_seconds == 0.0
    finally:
        lead.close()


def test_run_ships_what_is_left_when_stopped(leader: Leader) -> None:
    leader.archiver.max_delay = 3600.0
    leader.write(7)
    stop = threading.Event()
    stop.set()
    leader.archiver.run(stop)
    assert ls(leader.store).ranges == [(1, 8)]


# --- a truncated journal ---------------------------------------------------------------------


def test_a_truncated_journal_starts_the_archive_with_a_snapshot(leader: Leader) -> None:
    leader.write(30)
    leader.db.truncate(20)  # cids 1..19 are gone from the journal
    leader.archiver.ship_once()
    listing = ls(leader.store)
    assert [s.cid for s in listing.snapshots] == [31] and listing.ranges == []
    leader.write(5)
    leader.archiver.ship_once()
    assert ls(leader.store).ranges == [(32, 36)]
    cid, copy = leader.copy()
    assert restore(leader.store, str(leader.dir / "r.db")).cid == cid
    restored_equals(copy, str(leader.dir / "r.db"))
    with pytest.raises(ArchiveError, match="nothing to restore cid 20 from"):
        restore(leader.store, str(leader.dir / "r2.db"), cid=20)


def test_a_gap_is_refused_until_a_snapshot_bridges_it(leader: Leader) -> None:
    leader.write(10)
    leader.archiver.ship_once()
    leader.archiver.close()
    leader.write(10)
    leader.db.truncate(leader.db.snapshot())  # shipped by no one
    leader.write(3)
    arch = Archiver(leader.db, leader.store, max_delay=0.0, clock=leader.clock)
    with pytest.raises(ArchiveGapError, match="truncated before they were shipped"):
        arch.ship_once()
    ref = arch.snapshot_now()
    assert ref.cid == 24
    leader.write(2)
    leader.db.truncate(leader.db.snapshot())  # again, under a running archiver
    assert arch.snapshot_now().cid == 26  # at once: the gap is bridged
    leader.db.truncate(leader.db.snapshot() + 1)
    leader.write(4)
    arch.ship_once()
    arch.close()
    checked = verify(leader.store)
    assert checked.runs == [(1, 11), (27, 30)]
    cid, copy = leader.copy()
    assert restore(leader.store, str(leader.dir / "r.db")).cid == cid
    restored_equals(copy, str(leader.dir / "r.db"))
    restore(leader.store, str(leader.dir / "r2.db"), cid=5)
    with pytest.raises(ObjectMissingError, match=r"no segment holds cids 12\.\.26"):
        restore(leader.store, str(leader.dir / "r3.db"), cid=15)


# --- listing, verifying, pruning -------------------------------------------------------------


def test_ls_and_verify(leader: Leader) -> None:
    a_history(leader)
    listing = ls(leader.store.url)
    assert listing.ranges == [(1, leader.db.snapshot())]
    assert listing.first_time_us == T0 and listing.last_time_us == T0 + 20_000_000
    assert len(listing.snapshots) == 1
    checked = verify(leader.store.url)
    assert checked.entries == leader.db.snapshot() and checked.snapshots == 1
    assert checked.unchecked_snapshots == []


def test_prune_keeps_a_snapshot_before_the_oldest_segment_kept(leader: Leader) -> None:
    for _ in range(4):  # a snapshot, then segments, an hour apart each
        leader.write(10)
        leader.archiver.snapshot_now()
        leader.write(10)
        leader.archiver.ship_once()
        leader.clock.advance(3600)
    now = leader.clock() / 1e6
    snaps = ls(leader.store).snapshots
    assert len(snaps) == 4
    assert prune(leader.store, 10 * 3600, now=now).deleted == []
    done = prune(leader.store, 2.5 * 3600, now=now)
    # a restore to 2.5 hours ago needs the snapshot of 3 hours ago (the second)
    assert done.kept_snapshot == snaps[1].name
    assert snaps[0].name in done.deleted
    left = ls(leader.store)
    assert [s.name for s in left.snapshots] == [s.name for s in snaps[1:]]
    oldest_kept = segments(leader.store)[0]
    assert left.snapshots[0].cid <= oldest_kept.first
    verify(leader.store)
    cid, copy = leader.copy()
    assert restore(leader.store, str(leader.dir / "r.db")).cid == cid
    restored_equals(copy, str(leader.dir / "r.db"))
    old = restore(leader.store, str(leader.dir / "r2.db"), time=now - 2.5 * 3600)
    assert old.cid == 41  # the second hour's last commit
    with pytest.raises(ArchiveError, match="nothing to restore"):
        restore(leader.store, str(leader.dir / "r3.db"), time=now - 3.5 * 3600)


# --- stores ------------------------------------------------------------------------------------


def test_open_store_knows_file_urls_and_registered_schemes(tmp_path: Any) -> None:
    store = open_store(f"file://{tmp_path}/a")
    assert isinstance(store, DirStore) and store.root == f"{tmp_path}/a"
    store.put("v1/x/y", b"1")
    store.put("v1/x/y", b"2")  # replaced whole
    store.put("v1/z", b"3")
    assert store.get("v1/x/y") == b"2"
    assert store.list("v1/") == ["v1/x/y", "v1/z"] and store.list("v1/x") == ["v1/x/y"]
    assert os.listdir(os.path.join(store.root, ".tmp")) == []
    store.delete("v1/z")
    store.delete("v1/z")
    with pytest.raises(ObjectMissingError, match="v1/z"):
        store.get("v1/z")
    with pytest.raises(ArchiveError, match="invalid object name"):
        store.put("../evil", b"")
    with pytest.raises(ConfigError, match=r"gs:// is not supported \(use one of file://"):
        open_store("gs://bucket/prefix")
    with pytest.raises(ConfigError, match="plain path"):
        open_store(str(tmp_path))
    with pytest.raises(ConfigError, match="absolute"):
        open_store("file://host/x")
    register_scheme("mem-test", lambda url: DirStore(str(tmp_path / "mem")))
    assert isinstance(open_store("mem-test://x"), DirStore)


def test_a_newer_archive_format_is_named(tmp_path: Any) -> None:
    store = DirStore(str(tmp_path / "a"))
    store.put("v2/segments/x", b"")
    with pytest.raises(ArchiveError, match="format v2"):
        restore(store, str(tmp_path / "r.db"))


def test_an_hctree_format_history_restores_from_its_start(tmp_path: Any) -> None:
    path = str(tmp_path / "h.db")
    db = Database(path, format="hctree")  # its journal starts after cid 6
    db.set_mode("leader")
    c = db.connect()
    c.execute("CREATE TABLE t1(a INTEGER PRIMARY KEY, b)")
    for i in range(20):
        c.execute("INSERT INTO t1 VALUES(?, ?)", (i, "x" * i))
    store = DirStore(str(tmp_path / "a"))
    arch = Archiver(db, store, max_delay=0.0)
    arch.ship_once()
    arch.close()
    assert verify(store).runs == [(7, 27)]
    snapshot.copy(db, str(tmp_path / "copy.db"))
    c.close()
    db.close()
    got = restore(store, str(tmp_path / "r.db"))
    assert got.cid == 27 and got.anchor == "the start of the history"
    assert compare(str(tmp_path / "copy.db"), str(tmp_path / "r.db")) is None
