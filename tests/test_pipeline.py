"""The synchronous commit pipeline (issue 26): a follower whose leader waits
for acknowledgements applies and reports at once, its reports never wait
for the leader's answers, and the leader's writers wait for their own cid
while the next groups commit."""

from __future__ import annotations

import threading
import time

import pytest

from hctserver import Database
from hctserver.errors import (
    CommitUnknownError,
    ConfigError,
    NoNodeError,
    UnsupportedStatementError,
)
from hctserver.journal.gate import GatePublisher
from hctserver.journal.groupcommit import prepare
from hctserver.net.transport import TCP, Conn, Waker
from hctserver.node.follower import Follower
from hctserver.node.leader import Leader
from hctserver.node.reporter import Reporter
from hctserver.protocol import feedback, wire

from helpers import wait_until
from nodes import follower_node, init_db, leader_node, snapshot_of

# --- the reporter, against a leader played by the test ------------------------------


class _FakeLeader:
    """Accepts one feedback channel: answers the probe with ACCEPT, records
    every REPORT, and answers nothing unless told (:meth:`state`)."""

    def __init__(self) -> None:
        self.listener = TCP.listen("127.0.0.1", 0)
        self.port = self.listener.port
        self.reports: list[feedback.Report] = []
        self.conn: Conn | None = None
        self._ready = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        conn = self.listener.accept(Waker())
        assert conn is not None
        probe = bytearray()
        buf = bytearray(4096)
        while len(probe) < len(wire.encode_sync(feedback.PROBE_CID, feedback.PROBE_HASH)):
            n = conn.recv_into(buf, 10)
            if not n:
                return
            probe += buf[:n]
        conn.send_all(feedback.encode_accept(1, 5), 10)
        self.conn = conn
        self._ready.set()
        dec = feedback.Decoder(frozenset({feedback.REPORT}))
        while True:
            try:
                n = conn.recv_into(buf, 30)
            except Exception:
                return
            if not n:
                return
            for m in dec.feed(memoryview(buf)[:n]):
                assert isinstance(m, feedback.Report)
                self.reports.append(m)

    def state(self, flags: int) -> None:
        assert self._ready.wait(10) and self.conn is not None
        self.conn.send_all(feedback.encode_state(7, 0, flags), 10)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


def _reporter(port: int, pos: list[int], waits: list[bool]) -> tuple[Reporter, threading.Event]:
    r = Reporter(
        "f",
        lambda: (pos[0], pos[0], pos[0]),
        interval=3600.0,  # no periodic report in the test's time: only moves report
        on_waits=waits.append,
    )
    conn = TCP.connect("127.0.0.1", port, 10)
    assert r.hello(conn) == 1
    stop = threading.Event()
    threading.Thread(target=r.run, args=(stop,), daemon=True).start()
    return r, stop


def test_reports_go_out_at_each_move_while_the_leader_answers_nothing() -> None:
    """Full duplex: no REPORT waits for the STATE answering the one before."""
    fake = _FakeLeader()
    pos = [1]
    waits: list[bool] = []
    r, stop = _reporter(fake.port, pos, waits)
    try:
        wait_until(lambda: [x.applied for x in fake.reports] == [1], what="the first report")
        for cid in range(2, 12):
            pos[0] = cid
            r.wake()
            wait_until(lambda c=cid: fake.reports[-1].applied == c, what=f"the report of {cid}")
        assert [x.applied for x in fake.reports] == list(range(1, 12))
        assert not waits and not r.view.waits
    finally:
        stop.set()
        r.wake()
        fake.close()


def test_a_state_is_read_when_it_arrives_and_tells_whether_the_leader_waits() -> None:
    """STATE is read as it comes, not only after a REPORT: a leader that
    starts waiting for acknowledgements is heard at once."""
    fake = _FakeLeader()
    pos = [3]
    waits: list[bool] = []
    r, stop = _reporter(fake.port, pos, waits)
    try:
        wait_until(lambda: len(fake.reports) == 1, what="the first report")
        fake.state(feedback.WAITS)  # no report is due for an hour
        wait_until(lambda: waits == [True], what="WAITS heard")
        assert r.view.waits and r.view.newest == 7
        fake.state(0)
        wait_until(lambda: waits == [True, False], what="no longer waiting")
        fake.state(feedback.WAITS)
        wait_until(lambda: waits == [True, False, True], what="waiting again")
        r.detach()  # the session ends: nobody waits on this follower any more
        assert waits == [True, False, True, False] and not r.view.waits
        assert len(fake.reports) == 1
    finally:
        stop.set()
        r.wake()
        fake.close()


# --- nodes ----------------------------------------------------------------------------


@pytest.mark.parametrize("sync", [1, 0])
def test_a_follower_applies_at_once_only_for_a_leader_that_waits(tmp_path, sync: int) -> None:
    """With --sync-followers the follower's sink applies without its batching
    delay (told by STATE), and each commit the leader makes is acknowledged;
    an asynchronous leader's follower keeps batching."""
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 3)
    leader = leader_node(lp, [], sync_followers=sync)
    f = follower_node(fp, leader.port, once=False)
    try:
        runner, frun = leader.runner, f.runner
        assert isinstance(runner, Leader) and isinstance(frun, Follower)
        wait_until(lambda: len(runner.followers) == 1, what="the feedback channel")
        rep = frun.reporter
        wait_until(lambda: rep.view.lag_ms is not None, what="a STATE")
        app = leader.db.connect()
        cid = 0
        for i in range(10):
            cid = app.transact([("REPLACE INTO t1 VALUES(?, 'p', ?)", (i, i))]).cid
            if sync:
                assert snapshot_of(fp) >= cid  # acknowledged: applied and durable there
        app.close()
        sink = frun._sink  # the follower's apply side
        assert sink is not None
        assert sink.eager is bool(sync) and rep.view.waits is bool(sync)
        assert runner.sync.status()["acked_cid"] >= (cid if sync else 0)
        wait_until(lambda: snapshot_of(fp) >= cid, what="the follower has every commit")
    finally:
        f.close()
        leader.close()


# --- the gate: one acknowledgement releases every cid up to it ------------------------


def test_an_acknowledgement_releases_exactly_the_commits_it_covers(tmp_path) -> None:
    """Writers of this process wait each for its own cid; a published
    acknowledgement releases those at or below it and no other; a moved
    deadline releases nobody; the node stopping releases the rest with
    CommitUnknownError."""
    path = str(tmp_path / "g.db")
    init_db(path)
    db = Database(path)
    db.set_role("leader")
    pub = GatePublisher(path)
    pub.lead(sync_k=1, sync_timeout=None, valid_until=time.monotonic() + 60)
    gate = db.gate
    ticket = gate.admit()
    done: dict[int, object] = {}

    def wait(cid: int) -> None:
        try:
            gate.acknowledge(ticket, cid)
            done[cid] = "acked"
        except CommitUnknownError as e:
            done[cid] = e

    threads = [threading.Thread(target=wait, args=(c,)) for c in range(1, 9)]
    try:
        for t in threads:
            t.start()
        pub.extend(time.monotonic() + 90)  # a moved deadline: nobody returns
        pub.acked(3)
        wait_until(lambda: sorted(done) == [1, 2, 3], what="cids 1 to 3 released")
        pub.acked(6)
        wait_until(lambda: sorted(done) == [1, 2, 3, 4, 5, 6], what="cids 4 to 6 released")
        assert all(done[c] == "acked" for c in range(1, 7))
        pub.stop()
        wait_until(lambda: len(done) == 8, what="the rest released")
        assert all(isinstance(done[c], CommitUnknownError) for c in (7, 8))
    finally:
        pub.stop()
        for t in threads:
            t.join(10)
        pub.close()
        db.close()


# --- a transaction's own durability ----------------------------------------------------


def test_a_transaction_may_ask_for_local_or_replicated_durability(tmp_path) -> None:
    """``local`` does not wait for the node's followers; ``replicated`` waits
    for one follower on a node without synchronous commit (and, with
    --sync-timeout, gives up with CommitUnknownError as the node's commits
    do); the gate's leadership checks hold for both."""
    path = str(tmp_path / "d.db")
    init_db(path)
    db = Database(path)
    db.set_role("leader")
    db.set_mode("leader")
    pub = GatePublisher(path)
    cm = db.committer()
    write = prepare([("REPLACE INTO t1 VALUES(1, 'd', random())", None)])
    try:
        # a synchronous node whose follower never acknowledges
        pub.lead(sync_k=1, sync_timeout=0.2, valid_until=time.monotonic() + 60)
        entry, _ = cm.transact(write, durability="local")
        assert entry is not None  # returned without an acknowledgement
        with pytest.raises(CommitUnknownError, match="did not acknowledge"):
            cm.transact(write)  # the node's setting: it waits, then gives up
        with pytest.raises(ConfigError, match="durability must be one of"):
            cm.transact(write, durability="fsync")
        # an asynchronous node: replicated waits for one follower
        pub.lead(sync_k=0, sync_timeout=0.2, valid_until=time.monotonic() + 60)
        entry, _ = cm.transact(write)
        assert entry is not None
        with pytest.raises(CommitUnknownError, match="1 followers did not acknowledge"):
            cm.transact(write, durability="replicated")
        pub.acked_one(db.max_cid() + 1)  # the next commit's cid: one follower has it
        entry, _ = cm.transact(write, durability="replicated")
        assert entry is not None and entry.cid == db.max_cid()
        # in an explicit transaction, for that transaction only
        pub.lead(sync_k=1, sync_timeout=0.2, valid_until=time.monotonic() + 60)
        c = db.connect()
        with pytest.raises(UnsupportedStatementError, match="BEGIN first"):
            c.set_durability("local")
        c.execute("BEGIN")
        c.set_durability("local")
        c.execute("REPLACE INTO t1 VALUES(2, 'd', 2)")
        c.execute("COMMIT")  # returned: nobody acknowledged it
        c.execute("BEGIN")
        c.execute("REPLACE INTO t1 VALUES(3, 'd', 3)")
        with pytest.raises(CommitUnknownError):
            c.execute("COMMIT")  # the next one has the node's setting again
        done = c.transact(["REPLACE INTO t1 VALUES(4, 'd', 4)"], durability="local")
        assert done.cid == db.max_cid()  # the public API: returned without an acknowledgement
        pub.stop()
        with pytest.raises(NoNodeError):
            cm.transact(write, durability="local")  # no node serves it: refused
        c.close()
    finally:
        pub.stop()
        pub.close()
        db.close()
