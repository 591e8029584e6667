"""The protocol's rules in memory: no sockets, no threads, no SQLite.

A leader session answers bytes from a journal held in a list; a follower
session's plan is carried out against it by a small harness, one side
against the other, through the real wire encoders and decoders.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from hctserver.errors import (
    ConnectError,
    ConnectionLostError,
    IncompatibleError,
    LeaderBusyError,
    NoSnapshotsError,
    PeerError,
    ProtocolError,
    SizeLimitError,
    UnknownMessageTypeError,
)
from hctserver.position import ZERO_HASH, Entry, Position, fold
from hctserver.protocol import bootstrap, wire
from hctserver.protocol.session import (
    BUSY,
    DRAINING,
    Backoff,
    BackoffOver,
    Bootstrap,
    Bootstrapped,
    CloseStreams,
    Fail,
    Finish,
    Flush,
    FollowerSession,
    LeaderSession,
    NoRequest,
    Phase,
    Refuse,
    RequestFailed,
    RetryPolicy,
    ServeSnapshot,
    ServeSub,
    ServeSync,
    StartJobs,
    StartStreaming,
    StopRequested,
    StreamEnded,
    Subscribe,
    Subscribed,
    Sync,
    SyncDone,
    leader_error,
)

# --- an in-memory leader ------------------------------------------------------------


class MemLeader:
    """A leader's journal and streams in lists (implements LeaderView)."""

    def __init__(self, njob: int = 2, max_subscribers: int = 16) -> None:
        self.entries: list[Entry] = []
        self.vh = {0: ZERO_HASH}
        self.njob = njob
        self.max_subscribers = max_subscribers
        self.draining = False
        self.feedback = False  # the feedback extension (tested on its own)
        self.snapshots = False  # the bootstrap extension
        self.baseline = 0
        self.up = True
        self.streams: dict[int, list[bytearray]] = {k: [] for k in range(njob)}
        self.busy_subs = 0  # answer this many SUBs with "retry later"

    def commit(self, job: int) -> Entry:
        cid = len(self.entries) + 1
        e = Entry(cid, 0, "", f"row {cid}".encode())
        self.entries.append(e)
        self.vh[cid] = fold(self.vh[cid - 1], e.hash())
        for stream in self.streams[job]:
            stream += wire.encode_entry(*e)
        return e

    def position(self) -> Position:
        cid = len(self.entries)
        return Position(cid, self.vh[cid])

    def hash_at(self, cid: int) -> bytes | None:
        return self.vh.get(cid)

    def live_subscribers(self, job: int) -> int:
        return len(self.streams[job])

    def answer(self, request: bytes) -> tuple[bytes, bytearray | None]:
        """The reply to one connection's request, and its stream if a SUB."""
        if not self.up:
            raise ConnectError("cannot connect to the leader: connection refused")
        s = LeaderSession(self)
        got = s.receive_data(request)
        assert got is not None
        act = got if isinstance(got, Refuse) else s.decide(got)
        if isinstance(act, Refuse):
            return wire.encode_error(act.message), None
        if isinstance(act, ServeSync):
            return wire.encode_syncreply(act.njob, self.entries[act.after :]), None
        if isinstance(act, ServeSnapshot):
            return bootstrap.encode_offer(self.baseline, len(self.entries)), None
        assert isinstance(act, ServeSub)
        if self.busy_subs:
            self.busy_subs -= 1
            return wire.encode_error(BUSY), None
        stream = bytearray()
        self.streams[act.job].append(stream)
        return wire.encode_subreply_start(), stream

    def truncate(self, min_cid: int) -> None:
        """Forget H below ``min_cid - 1`` (the new baseline)."""
        self.baseline = min_cid - 1
        for cid in [c for c in self.vh if c < self.baseline]:
            del self.vh[cid]

    def kill(self) -> None:
        self.up = False
        self.streams = {k: [] for k in range(self.njob)}


class Replica:
    """A follower's database: entries applied in cid order, duplicates checked."""

    def __init__(self) -> None:
        self.applied: list[Entry] = []
        self.h = ZERO_HASH
        self.pending: dict[int, Entry] = {}

    @property
    def position(self) -> Position:
        return Position(len(self.applied), self.h)

    def add(self, entries: list[Entry]) -> None:
        for e in entries:
            if e.cid <= len(self.applied):
                assert self.applied[e.cid - 1] == e
            else:
                self.pending[e.cid] = e
        while len(self.applied) + 1 in self.pending:
            e = self.pending.pop(len(self.applied) + 1)
            self.applied.append(e)
            self.h = fold(self.h, e.hash())


class Harness:
    """Carries out a FollowerSession's plan against a MemLeader."""

    def __init__(self, leader: MemLeader, session: FollowerSession, reseed: bool = False) -> None:
        self.reseed = reseed
        self.leader = leader
        self.session = session
        self.replica = Replica()
        self.streams: dict[int, tuple[bytearray, wire.ReplyDecoder]] = {}
        self.done: Finish | Fail | None = None
        self.log: list[Any] = []

    def run(self, max_steps: int = 1000) -> None:
        """Carry out actions until the plan is empty (waiting for events)."""
        for _ in range(max_steps):
            act = self.session.next_action()
            if act is None:
                return
            self.log.append(act)
            if isinstance(act, (Finish, Fail)):
                self.done = act
                return
            ev = self.do(act)
            if ev is not None:
                self.session.handle(ev)
        raise AssertionError("the plan never settles")

    def do(self, act: Any) -> Any:
        if isinstance(act, Sync):
            return self.sync(act.final)
        if isinstance(act, Subscribe):
            return self.subscribe(act.job)
        if isinstance(act, Bootstrap):
            return self.bootstrap()
        if isinstance(act, CloseStreams):
            self.streams.clear()
        return None  # Backoff: the test decides when the wait is over

    def sync(self, final: bool) -> Any:
        pos = self.replica.position
        try:
            reply, _ = self.leader.answer(wire.encode_sync(pos.cid, pos.hash))
        except ConnectError as e:
            return RequestFailed(None, e)
        dec = wire.ReplyDecoder(wire.SYNC)
        dec.feed(reply)
        njob, entries = -1, []
        for ev in dec.next_events():
            if isinstance(ev, wire.ErrorReply):
                return RequestFailed(None, leader_error(ev.message))
            if isinstance(ev, wire.SyncReplyStart):
                njob = ev.njob
            elif isinstance(ev, Entry):
                entries.append(ev)
        self.replica.add(entries)
        return SyncDone(final, njob, dec.entry_bytes)

    def bootstrap(self) -> Any:
        """The bootstrap extension, as bootclient and bootserve carry it out."""
        lead, pos = self.leader, self.replica.position
        reply, _ = lead.answer(bootstrap.encode_request())
        kind = struct.unpack_from("<i", reply)[0]
        if kind == wire.ERROR:
            return RequestFailed(None, IncompatibleError("the leader sends no snapshots"))
        want = bootstrap.Want(pos.cid, pos.hash, bootstrap.RESEED if self.reseed else 0)
        newest = len(lead.entries)
        if bootstrap.verdict(want, lead.baseline, newest, lead.hash_at(pos.cid)) is None:
            return RequestFailed(None, IncompatibleError("the history differs"))
        self.replica.applied, self.replica.h = list(lead.entries), lead.vh[newest]
        self.replica.pending.clear()
        return Bootstrapped(newest)

    def subscribe(self, job: int) -> Any:
        try:
            reply, stream = self.leader.answer(wire.encode_sub(job))
        except ConnectError as e:
            return RequestFailed(job, e)
        dec = wire.ReplyDecoder(wire.SUB)
        dec.feed(reply)
        for ev in dec.next_events():
            if isinstance(ev, wire.ErrorReply):
                return RequestFailed(job, leader_error(ev.message))
        assert stream is not None
        self.streams[job] = (stream, dec)
        return Subscribed(job)

    def deliver(self) -> None:
        """Bytes the streams carried so far reach the replica."""
        for stream, dec in self.streams.values():
            dec.feed(bytes(stream))
            stream.clear()
            self.replica.add([e for e in dec.next_events() if isinstance(e, Entry)])

    def streams_end(self) -> None:
        """The leader went away: every stream ends."""
        ended = list(self.streams)
        self.streams.clear()
        for job in ended:
            self.session.handle(StreamEnded(job))
            self.run()


def no_jitter() -> RetryPolicy:
    return RetryPolicy(0.1, 5.0, rng=lambda: 1.0)


# --- the leader's rules: the original's conformance cases -----------------------------


def leader_with(n: int = 5, njob: int = 2) -> MemLeader:
    leader = MemLeader(njob)
    for i in range(n):
        leader.commit(i % njob)
    return leader


def decide(leader: MemLeader, data: bytes) -> Any:
    s = LeaderSession(leader)
    got = s.receive_data(data)
    return got if isinstance(got, Refuse) or got is None else s.decide(got)


def test_sync_from_empty_and_from_a_known_position() -> None:
    leader = leader_with(5)
    assert decide(leader, wire.encode_sync(0, ZERO_HASH)) == ServeSync(0, 2)
    assert decide(leader, wire.encode_sync(3, leader.vh[3])) == ServeSync(3, 2)
    assert decide(leader, wire.encode_sync(5, leader.vh[5])) == ServeSync(5, 2)


def test_sync_from_another_history_or_ahead_is_incompatible() -> None:
    leader = leader_with(5)
    wrong = decide(leader, wire.encode_sync(3, b"\x01" * 16))
    assert wrong == Refuse(wire.INCOMPATIBLE, "incompatible", wrong.detail)
    ahead = decide(leader, wire.encode_sync(6, ZERO_HASH))
    assert (ahead.message, ahead.reason) == (wire.INCOMPATIBLE, "ahead")
    leader.vh.pop(2)  # truncated below: no hash known at cid 2
    below = decide(leader, wire.encode_sync(2, b"\x02" * 16))
    assert below.message == wire.INCOMPATIBLE and "baseline" in below.detail


def test_sub_checks_the_job_and_the_subscriber_limit() -> None:
    leader = MemLeader(njob=2, max_subscribers=1)
    assert decide(leader, wire.encode_sub(1)) == ServeSub(1)
    for bad in (2, -1):
        r = decide(leader, wire.encode_sub(bad))
        assert isinstance(r, Refuse) and f"no such job: {bad}" in r.message
        assert r.message.endswith("retry later")  # the leader may have restarted
    leader.streams[0].append(bytearray())
    full = decide(leader, wire.encode_sub(0))
    assert "too many subscribers for job 0 (the limit is 1)" in full.message


def test_unknown_truncated_and_silent_requests_are_refused() -> None:
    leader = leader_with(1)
    r = decide(leader, struct.pack("<i", 7))
    assert (
        isinstance(r, Refuse) and r.reason == "protocol" and "unknown message type 7" in r.message
    )
    s = LeaderSession(leader)
    assert s.receive_data(wire.encode_sync(0, ZERO_HASH)[:10]) is None
    eof = s.receive_eof()
    assert isinstance(eof, Refuse) and "middle of a message" in eof.message
    assert LeaderSession(leader).receive_eof() == NoRequest()
    assert "no complete request within 10 s" in LeaderSession(leader).timed_out(10).message


def test_a_request_split_at_every_byte_decides_the_same() -> None:
    leader = leader_with(4)
    for req in (wire.encode_sync(2, leader.vh[2]), wire.encode_sub(1)):
        want = decide(leader, req)
        for i in range(1, len(req)):
            s = LeaderSession(leader)
            assert s.receive_data(req[:i]) is None
            got = s.receive_data(req[i:])
            assert s.decide(got) == want  # type: ignore[arg-type]


def test_a_draining_leader_refuses_with_retry_later() -> None:
    leader = leader_with(2)
    leader.draining = True
    assert decide(leader, wire.encode_sync(0, ZERO_HASH)) == Refuse(DRAINING, "draining")


def test_leader_errors_are_typed_final_or_transient() -> None:
    assert isinstance(leader_error(wire.INCOMPATIBLE), IncompatibleError)
    assert isinstance(leader_error(BUSY), LeaderBusyError)
    assert isinstance(leader_error(DRAINING), LeaderBusyError)
    final = leader_error("go away")
    assert type(final) is PeerError


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    r = no_jitter()
    assert [round(r.delay(n), 3) for n in range(1, 9)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    low = RetryPolicy(0.1, 5.0, rng=lambda: 0.0)
    assert low.delay(3) == pytest.approx(0.2)  # half of 0.4


# --- the follower's rules, one side against the other ------------------------------------


def test_a_follower_catches_up_subscribes_and_streams() -> None:
    leader = leader_with(50, njob=3)
    h = Harness(leader, FollowerSession())
    h.session.start()
    h.run()
    kinds = [type(a).__name__ for a in h.log]
    assert kinds == [
        "Sync",
        "Subscribe",
        "Subscribe",
        "Subscribe",
        "StartStreaming",
        "StartJobs",
        "Sync",
        "Streaming",
    ]
    assert h.session.phase is Phase.STREAMING and set(h.streams) == {0, 1, 2}
    assert h.replica.position == leader.position()
    for i in range(30):
        leader.commit(i % 3)
    h.deliver()
    assert h.replica.position == leader.position()


def test_a_service_follower_outlives_its_leader() -> None:
    leader = leader_with(10)
    h = Harness(leader, FollowerSession(retry=no_jitter()))
    h.session.start()
    h.run()
    for _ in range(3):  # the leader dies, commits after its restart, dies again
        leader.commit(0)
        h.deliver()
        leader.kill()
        h.streams_end()  # resubscribing fails: back off
        assert isinstance(h.log[-1], Backoff) and h.done is None
        assert h.session.phase is Phase.BACKING_OFF
        leader.up = True
        leader.commit(1)
        h.session.handle(BackoffOver())
        h.run()
        assert h.session.phase is Phase.STREAMING
        assert h.replica.position == leader.position()
    backoffs = [a for a in h.log if isinstance(a, Backoff)]
    assert backoffs and all(a.seconds <= 5.0 for a in backoffs)
    assert sum(isinstance(a, StartJobs) for a in h.log) == 1  # jobs start once


def test_backoff_grows_while_the_leader_stays_away_and_resets_after() -> None:
    leader = leader_with(3)
    s = FollowerSession(retry=no_jitter())
    h = Harness(leader, s)
    leader.up = False
    s.start()
    delays = []
    for _ in range(4):
        act = s.next_action()
        while not isinstance(act, Backoff):
            assert act is not None
            ev = h.do(act)
            if ev is not None:
                s.handle(ev)
            act = s.next_action()
        delays.append(act.seconds)
        s.handle(BackoffOver())
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8])
    leader.up = True
    h.run()
    assert s.phase is Phase.STREAMING and s.attempts == 0


def test_a_lost_leader_cancels_the_rest_of_the_plan() -> None:
    s = FollowerSession(retry=no_jitter())
    s.start()
    assert s.next_action() == Sync(False)
    s.handle(SyncDone(False, 4, 100))
    assert s.next_action() == Subscribe(0)
    s.handle(RequestFailed(0, ConnectionLostError("reset")))
    assert [s.next_action() for _ in range(4)] == [
        CloseStreams(),
        Flush(),
        Backoff(0.1, "reset"),
        None,  # Subscribe(1..3) are gone
    ]


def test_a_busy_leader_is_retried_later_not_taken_for_gone() -> None:
    leader = leader_with(5)
    leader.busy_subs = 1
    h = Harness(leader, FollowerSession(retry=no_jitter()))
    h.session.start()
    h.run()
    assert h.session.phase is Phase.BACKING_OFF
    h.session.handle(BackoffOver())
    h.run()
    assert any(isinstance(a, Backoff) and "retry later" in a.reason for a in h.log)
    assert h.session.phase is Phase.STREAMING and h.done is None


@pytest.mark.parametrize("once", [False, True])
def test_an_incompatible_history_fails_at_once_in_both_modes(once: bool) -> None:
    leader = leader_with(5)
    h = Harness(leader, FollowerSession(once=once, bootstrap=False))
    h.replica.applied = [Entry(1, 0, "", b"other")]
    h.replica.h = fold(ZERO_HASH, h.replica.applied[0].hash())
    h.session.start()
    h.run()
    assert isinstance(h.done, Fail) and isinstance(h.done.error, IncompatibleError)


def test_a_protocol_violation_is_final_in_service_mode() -> None:
    s = FollowerSession()
    s.start()
    assert s.next_action() == Sync(final=False)
    s.handle(RequestFailed(None, ProtocolError("garbage")))
    act = s.next_action()
    assert isinstance(act, Fail) and isinstance(act.error, ProtocolError)


def test_once_the_run_ends_with_the_leaders() -> None:
    leader = leader_with(5)
    h = Harness(leader, FollowerSession(once=True))
    h.session.start()
    h.run()
    leader.commit(0)
    h.deliver()
    leader.kill()
    h.streams_end()
    assert isinstance(h.done, Finish)
    assert h.replica.position == leader.position()


def test_once_a_leader_that_cannot_be_reached_at_start_is_an_error() -> None:
    leader = leader_with(2)
    leader.up = False
    h = Harness(leader, FollowerSession(once=True))
    h.session.start()
    h.run()
    assert isinstance(h.done, Fail) and isinstance(h.done.error, ConnectError)


def test_a_dropped_stream_is_resubscribed_and_the_gap_synced() -> None:
    leader = leader_with(5)
    h = Harness(leader, FollowerSession())
    h.session.start()
    h.run()
    leader.streams[0].clear()  # the leader dropped our stream of job 0 ...
    del h.streams[0]
    leader.commit(0)  # ... and this commit travelled on nothing
    h.session.handle(StreamEnded(0))
    h.run()
    assert h.log[-2:] == [Subscribe(0, again=True), Sync(final=True)]
    assert h.replica.position == leader.position()


def test_syncbytes_repeats_the_catch_up_while_replies_shrink() -> None:
    s = FollowerSession(syncbytes=1000)
    s.start()
    assert s.next_action() == Sync(False)
    s.handle(SyncDone(False, 2, 5000))
    assert [s.next_action(), s.next_action()] == [Flush(), Sync(False)]
    s.handle(SyncDone(False, 2, 3000))
    assert [s.next_action(), s.next_action()] == [Flush(), Sync(False)]
    s.handle(SyncDone(False, 2, 500))  # below syncbytes: subscribe
    assert s.next_action() == Subscribe(0)


def test_stop_finishes_from_any_phase() -> None:
    for phase_events in ([], [SyncDone(False, 1, 10)], [SyncDone(False, 1, 10), Subscribed(0)]):
        s = FollowerSession()
        s.start()
        for ev in phase_events:
            s.handle(ev)
        s.handle(StopRequested())
        assert s.next_action() == Finish() and s.next_action() is None


def test_a_leader_with_no_streams_goes_straight_to_the_final_sync() -> None:
    s = FollowerSession()
    s.start()
    s.next_action()
    s.handle(SyncDone(False, 0, 0))
    assert [s.next_action() for _ in range(3)] == [StartStreaming(), StartJobs(), Sync(True)]


# --- bootstrap ----------------------------------------------------------------------


def test_a_follower_below_the_baseline_bootstraps_then_streams() -> None:
    leader = leader_with(8)
    leader.snapshots = True
    h = Harness(leader, FollowerSession())
    h.replica.add(leader.entries[:2])  # at cid 2
    leader.truncate(5)  # baseline 4: cid 2 is below it
    h.session.start()
    h.run()
    assert [type(a) for a in h.log[:2]] == [Sync, Bootstrap]
    assert h.session.phase is Phase.STREAMING and h.done is None
    assert h.replica.position == leader.position()
    leader.commit(0)
    h.deliver()
    assert h.replica.position == leader.position()


@pytest.mark.parametrize("once", [False, True])
def test_a_diverged_follower_is_refused_a_snapshot_unless_it_asks_to_be_reseeded(
    once: bool,
) -> None:
    for reseed in (False, True):
        leader = leader_with(5)
        leader.snapshots = True
        h = Harness(leader, FollowerSession(once=once), reseed=reseed)
        h.replica.applied = [Entry(1, 0, "", b"other")]
        h.replica.h = fold(ZERO_HASH, h.replica.applied[0].hash())
        h.session.start()
        h.run()
        assert sum(isinstance(a, Bootstrap) for a in h.log) == 1
        if reseed:
            assert h.session.phase is Phase.STREAMING
            assert h.replica.position == leader.position()
        else:
            assert isinstance(h.done, Fail) and isinstance(h.done.error, IncompatibleError)
            assert len(h.replica.applied) == 1  # untouched


def test_a_leader_without_snapshots_refuses_and_the_refusal_is_final() -> None:
    leader = leader_with(5)
    leader.truncate(4)
    h = Harness(leader, FollowerSession())
    h.replica.add(leader.entries[:1])
    h.session.start()
    h.run()
    assert sum(isinstance(a, Bootstrap) for a in h.log) == 1
    assert isinstance(h.done, Fail) and isinstance(h.done.error, IncompatibleError)


def test_an_empty_follower_bootstraps_first_only_when_replay_would_be_long() -> None:
    assert not FollowerSession(bootstrap_min=100).bootstrap_first(True, 100)
    assert not FollowerSession(bootstrap_min=100).bootstrap_first(True, -1)  # unknown
    assert not FollowerSession(bootstrap_min=100).bootstrap_first(False, 10**6)
    assert not FollowerSession(bootstrap=False).bootstrap_first(True, 10**6)
    s = FollowerSession(bootstrap_min=100)
    s.start()
    assert s.next_action() == Sync(final=False)
    assert s.bootstrap_first(True, 101) and s.phase is Phase.BOOTSTRAPPING
    s.handle(Bootstrapped(500))
    assert s.next_action() == Sync(final=False) and s.phase is Phase.CATCHING_UP


def test_a_sync_refused_while_streaming_starts_over_and_so_bootstraps() -> None:
    leader = leader_with(5)
    leader.snapshots = True
    h = Harness(leader, FollowerSession(retry=no_jitter()))
    h.session.start()
    h.run()
    assert h.session.phase is Phase.STREAMING
    h.session.handle(RequestFailed(None, IncompatibleError("truncated past us")))
    h.run()
    assert h.session.phase is Phase.BACKING_OFF and h.done is None
    once = FollowerSession(once=True)
    once.phase = Phase.STREAMING
    once.handle(RequestFailed(None, IncompatibleError("truncated past us")))
    act = once.next_action()
    assert isinstance(act, Fail)  # the original's run: final, as before


def test_an_empty_follower_replays_after_all_when_the_leader_sends_no_snapshots() -> None:
    s = FollowerSession(bootstrap_min=100)
    s.start()
    assert s.next_action() == Sync(final=False)
    assert s.bootstrap_first(True, 1000)
    s.handle(RequestFailed(None, NoSnapshotsError("no snapshots here")))
    assert s.next_action() == Sync(final=False) and s.phase is Phase.CATCHING_UP
    s.handle(RequestFailed(None, IncompatibleError("below the baseline")))
    assert s.next_action() == Bootstrap()  # once more, as for any refused SYNC
    s.handle(RequestFailed(None, NoSnapshotsError("no snapshots here")))
    act = s.next_action()
    assert isinstance(act, Fail) and isinstance(act.error, NoSnapshotsError)


def test_the_bootstrap_decoder_checks_types_and_sizes() -> None:
    dec = bootstrap.Decoder(frozenset({bootstrap.HEAD, bootstrap.DATA, bootstrap.END}))
    head = bootstrap.encode_head(7, 2, b"h" * 16, 3, bootstrap.BELOW)
    data = bootstrap.data_header(3) + b"abc"
    end = bootstrap.encode_end(b"d" * 32)
    stream = head + data + end
    got = [m for i in range(len(stream)) for m in dec.feed(stream[i : i + 1])]
    assert got == [
        bootstrap.Head(7, 2, b"h" * 16, 3, bootstrap.BELOW),
        bootstrap.Data(b"abc"),
        bootstrap.End(b"d" * 32),
    ]
    with pytest.raises(UnknownMessageTypeError):
        bootstrap.Decoder(frozenset({bootstrap.DATA})).feed(bootstrap.encode_offer(0, 1))
    with pytest.raises(SizeLimitError):
        bootstrap.Decoder(frozenset({bootstrap.DATA})).feed(
            bootstrap.data_header(bootstrap.MAX_DATA + 1)
        )
    bad = bootstrap.encode_head(7, 2, b"h" * 16, -1, bootstrap.BELOW)
    with pytest.raises(ProtocolError):
        bootstrap.Decoder(frozenset({bootstrap.HEAD})).feed(bad)


def test_the_leader_answers_a_snapshot_request_only_with_the_extension() -> None:
    leader = leader_with(3)
    refused = decide(leader, bootstrap.encode_request())
    assert isinstance(refused, Refuse) and refused.message == wire.INCOMPATIBLE
    leader.snapshots = True
    assert decide(leader, bootstrap.encode_request()) == ServeSnapshot()


def test_the_verdict() -> None:
    h3 = b"3" * 16
    w = bootstrap.Want
    assert bootstrap.verdict(w(0, ZERO_HASH, 0), 0, 10, ZERO_HASH) == bootstrap.BEHIND
    assert bootstrap.verdict(w(0, ZERO_HASH, 0), 5, 10, None) == bootstrap.BELOW
    assert bootstrap.verdict(w(3, h3, 0), 2, 10, h3) == bootstrap.BEHIND
    assert bootstrap.verdict(w(3, h3, 0), 2, 10, b"x" * 16) is None
    assert bootstrap.verdict(w(11, h3, 0), 2, 10, None) is None  # ahead
    assert bootstrap.verdict(w(11, h3, bootstrap.RESEED), 2, 10, None) == bootstrap.DIVERGED
