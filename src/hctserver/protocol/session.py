"""The protocol's rules for each side, without I/O (as h11 does for HTTP).

:class:`LeaderSession` takes the bytes of one incoming connection and says
what to do: serve a SYNC from cid c, subscribe to job k, or refuse with
this message. :class:`FollowerSession` takes what happened to the
follower's requests (a reply ended, a stream closed, a connection failed)
and says what to do next: SYNC, subscribe, wait and reconnect, finish, or
fail. Neither touches a socket, a thread or SQLite: the nodes
(:mod:`hctserver.node.leader`, :mod:`hctserver.node.follower`) carry the actions out,
and tests drive the sessions in memory, one against the other.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..errors import (
    AuthError,
    HctError,
    IncompatibleError,
    LeaderBusyError,
    NoSnapshotsError,
    PeerError,
    ProtocolError,
    is_transient,
)
from ..position import Position
from . import auth, bootstrap, feedback, wire

RETRY = wire.RETRY
BUSY = f"too many connections to the leader; {RETRY}"
DRAINING = f"the leader is shutting down; {RETRY}"

# ===================================================================================
# The leader's side
# ===================================================================================


class LeaderView(Protocol):
    """What the leader's rules need to know about the leader."""

    @property
    def njob(self) -> int: ...

    @property
    def max_subscribers(self) -> int: ...

    @property
    def draining(self) -> bool: ...

    def position(self) -> Position: ...

    def hash_at(self, cid: int) -> bytes | None: ...

    def live_subscribers(self, job: int) -> int: ...

    @property
    def feedback(self) -> bool:
        """Does this leader take feedback channels (the extension's probe)?"""
        ...

    @property
    def snapshots(self) -> bool:
        """Does this leader send snapshots (the bootstrap extension)?"""
        ...


@dataclass(frozen=True)
class Refuse:
    """Send ERROR(message) and close. ``reason`` is a short tag for logs and
    counters; ``detail`` says more for the leader's log."""

    message: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class ServeSync:
    """Send SYNCREPLY(njob), every entry above ``after`` in cid order, then 0."""

    after: int
    njob: int


@dataclass(frozen=True)
class ServeSub:
    """Send SUBREPLY, then every commit of job ``job`` as it happens.
    ``follower``: the feedback extension's id of the subscriber (0: none)."""

    job: int
    follower: int = 0


@dataclass(frozen=True)
class ServeFeedback:
    """The feedback extension's probe: send ACCEPT and keep the connection
    as the follower's feedback channel (:mod:`hctserver.protocol.feedback`)."""


@dataclass(frozen=True)
class ServeSnapshot:
    """The bootstrap extension's request: OFFER, read WANT, then a snapshot
    or a refusal (:mod:`hctserver.protocol.bootstrap`)."""


@dataclass(frozen=True)
class NoRequest:
    """The peer closed without asking anything: just close."""


LeaderAction = Refuse | ServeSync | ServeSub | ServeFeedback | ServeSnapshot | NoRequest
Request = wire.SyncRequest | wire.SubRequest


class LeaderSession:
    """One incoming connection, from the leader's side. Feed bytes with
    :meth:`receive_data` until it returns a request or an action; pass a
    request to :meth:`decide` (with the leader's subscriber lock held for a
    SUB, so that the check and the registration are one step)."""

    def __init__(self, view: LeaderView) -> None:
        self.view = view
        self._decoder = wire.RequestDecoder()

    def receive_data(self, data: bytes | bytearray | memoryview) -> Request | Refuse | None:
        """The request once it is whole; a refusal if the bytes are not one."""
        self._decoder.feed(data)
        try:
            events = self._decoder.next_events()
        except ProtocolError as e:
            return Refuse(str(e), "protocol")
        if not events:
            return None
        ev = events[0]
        assert isinstance(ev, (wire.SyncRequest, wire.SubRequest))
        return ev

    def receive_eof(self) -> LeaderAction:
        try:
            self._decoder.eof()
        except ProtocolError as e:
            return Refuse(str(e), "protocol")
        return NoRequest()

    def timed_out(self, seconds: float) -> Refuse:
        return Refuse(
            f"no complete request within {seconds:g} s; {RETRY}",
            "timeout",
            f"no complete request within {seconds:g} s",
        )

    def decide(self, req: Request) -> LeaderAction:
        v = self.view
        if v.draining:
            return Refuse(DRAINING, "draining")
        if isinstance(req, wire.SyncRequest):
            if feedback.is_probe(req.cid, req.hash):
                if v.feedback:
                    return ServeFeedback()
                # answered as the original answers it, counted apart
                why = "a feedback probe (feedback is off)"
                return Refuse(wire.INCOMPATIBLE, "feedback-off", why)
            if bootstrap.is_request(req.cid, req.hash):
                if v.snapshots:
                    return ServeSnapshot()
                why = "a snapshot request (snapshots are off)"
                return Refuse(wire.INCOMPATIBLE, "snapshots-off", why)
            if auth.is_request(req.cid, req.hash):  # a leader with a secret read it already
                return Refuse(auth.NOT_HERE, "auth", "a follower with a shared secret")
            snap = v.position()
            if req.cid > snap.cid:
                return Refuse(
                    wire.INCOMPATIBLE,
                    "ahead",
                    f"follower at cid {req.cid} is ahead of the leader (snapshot {snap.cid})",
                )
            h = v.hash_at(req.cid)
            if h != req.hash:
                why = "is below the leader's baseline" if h is None else "has a different history"
                return Refuse(wire.INCOMPATIBLE, "incompatible", f"follower at cid {req.cid} {why}")
            return ServeSync(req.cid, v.njob)
        k = req.job
        if not 0 <= k < v.njob:
            return Refuse(
                f"no such job: {k} (this leader runs {v.njob} streams, numbered 0 to"
                f" {v.njob - 1}; SYNC again); {RETRY}",
                "no-such-job",
            )
        if v.live_subscribers(k) >= v.max_subscribers:
            return Refuse(
                f"too many subscribers for job {k} (the limit is {v.max_subscribers}); {RETRY}",
                "too-many-subscribers",
            )
        return ServeSub(k, req.follower)


# ===================================================================================
# The follower's side
# ===================================================================================


def leader_error(message: str) -> PeerError | AuthError:
    """The typed error for an ERROR message from a leader."""
    if message in auth.REFUSALS:
        return AuthError(f"the leader refused this follower: {message}")
    if message == wire.INCOMPATIBLE:
        return IncompatibleError(
            "error from leader: incompatible database version (this database's history"
            " differs from the leader's, is ahead of it, or predates its truncated"
            " journal; re-seed it from an empty file)"
        )
    if message.endswith(RETRY):
        return LeaderBusyError(f"error from leader: {message}")
    return PeerError(f"error from leader: {message}")


class Phase(enum.Enum):
    IDLE = "idle"
    CATCHING_UP = "catching up"  # SYNC and apply the reply (step 2)
    BOOTSTRAPPING = "bootstrapping"  # the leader cannot serve our position: a snapshot
    SUBSCRIBING = "subscribing"  # SUB to every job (step 4)
    FINAL_SYNC = "final sync"  # SYNC for what came between (step 5)
    STREAMING = "streaming"  # apply the streams (step 6)
    BACKING_OFF = "backing off"  # lost the leader: wait, then start over
    DONE = "done"


# --- events: what happened ------------------------------------------------


@dataclass(frozen=True)
class SyncDone:
    """A SYNCREPLY ended; its entries were handed to the sink."""

    final: bool
    njob: int
    nbytes: int


@dataclass(frozen=True)
class Subscribed:
    job: int


@dataclass(frozen=True)
class StreamEnded:
    """Job ``job``'s SUB stream closed (``error``: why, if not cleanly)."""

    job: int
    error: HctError | None = None


@dataclass(frozen=True)
class RequestFailed:
    """A SYNC (``job`` None) or SUB request failed."""

    job: int | None
    error: BaseException


@dataclass(frozen=True)
class BackoffOver:
    pass


@dataclass(frozen=True)
class StopRequested:
    pass


@dataclass(frozen=True)
class Bootstrapped:
    """A snapshot from the leader was installed: the position is ``cid``."""

    cid: int


@dataclass(frozen=True)
class HoleSeen:
    """Entries wait above a hole that the streams have not filled for a while."""


FollowerEvent = (
    SyncDone
    | Subscribed
    | StreamEnded
    | RequestFailed
    | BackoffOver
    | StopRequested
    | HoleSeen
    | Bootstrapped
)


# --- actions: what to do --------------------------------------------------------


@dataclass(frozen=True)
class Sync:
    """Open a connection and SYNC from the applied position."""

    final: bool


@dataclass(frozen=True)
class Subscribe:
    job: int
    again: bool = False  # a stream of this job ended; this replaces it


@dataclass(frozen=True)
class Bootstrap:
    """Ask the leader for a snapshot and install it (the bootstrap extension)."""


@dataclass(frozen=True)
class Flush:
    """Apply everything received before going on (the syncbytes loop)."""


@dataclass(frozen=True)
class StartStreaming:
    """Every stream is open: apply as entries arrive, in groups over time."""


@dataclass(frozen=True)
class StartJobs:
    """Start the local read-only jobs (once, on the caught-up database)."""


@dataclass(frozen=True)
class Streaming:
    """Caught up and streaming (for logs and status)."""


@dataclass(frozen=True)
class CloseStreams:
    pass


@dataclass(frozen=True)
class Backoff:
    seconds: float
    reason: str


@dataclass(frozen=True)
class Finish:
    """Done: flush what was received and end the run."""


@dataclass(frozen=True)
class Fail:
    error: BaseException


FollowerAction = (
    Sync
    | Bootstrap
    | Subscribe
    | Flush
    | StartStreaming
    | StartJobs
    | Streaming
    | CloseStreams
    | Backoff
    | Finish
    | Fail
)


@dataclass
class RetryPolicy:
    """Capped exponential backoff with jitter: attempt n waits a random time
    between half and all of ``min(cap, initial * 2**(n-1))``."""

    initial: float = 0.1
    cap: float = 5.0
    rng: Callable[[], float] = random.random

    def delay(self, attempt: int) -> float:
        base = min(self.cap, self.initial * 2.0 ** max(0, attempt - 1))
        return float(base * (0.5 + 0.5 * self.rng()))


class FollowerSession:
    """The follower's rules (SPEC section 3, and the service behaviour).

    Default (service) mode: a lost leader, whatever the cause, means close
    the streams, back off, and start over from the applied position, for as
    long as the follower runs. ``once``: the original's run, which ends when
    the leader closes its streams and stops accepting connections.
    Final errors (an incompatible history, a protocol violation) fail at once
    in both modes. With ``bootstrap``, a catch-up SYNC that the leader
    refuses (the position is below its baseline, or the history differs)
    asks for a snapshot instead, once per catch-up; the leader decides
    whether this follower may have one.

    The session keeps a plan: :meth:`next_action` gives its next step (None:
    wait for an event), :meth:`handle` tells it what happened and may
    replace the plan (a lost leader cancels the steps it still had).
    """

    def __init__(
        self,
        *,
        once: bool = False,
        syncbytes: int = 0,
        retry: RetryPolicy | None = None,
        max_resubscribes: int = 20,
        bootstrap: bool = True,
        bootstrap_min: int = 10_000,
    ) -> None:
        self.once = once
        self.bootstrap = bootstrap
        self.bootstrap_min = bootstrap_min
        self._bootstrapped = False
        self._first = False  # bootstrapping before any SYNC (bootstrap_first)
        self.syncbytes = syncbytes
        self.retry = retry or RetryPolicy()
        self.max_resubscribes = max_resubscribes
        self.phase = Phase.IDLE
        self.njob = 0
        self.subscribed: set[int] = set()
        self.attempts = 0  # failed attempts since the last time we streamed
        self.reconnects = 0
        self.resubscribes: dict[int, int] = {}
        self._plan: deque[FollowerAction] = deque()
        self._prev_bytes = 1 << 62
        self._jobs_started = False

    def start(self) -> None:
        self._catch_up()

    def next_action(self) -> FollowerAction | None:
        return self._plan.popleft() if self._plan else None

    def bootstrap_first(self, empty: bool, behind: int) -> bool:
        """At the start of a catch-up: should an ``empty`` follower that is
        ``behind`` entries behind (-1: unknown) ask for a snapshot at once
        rather than replay? Only when replay would be long. If so, the
        caller does, and reports Bootstrapped or RequestFailed."""
        if self.bootstrap and empty and behind > self.bootstrap_min:
            self.phase = Phase.BOOTSTRAPPING
            self._first = True
            return True
        return False

    def _catch_up(self) -> None:
        self._bootstrapped = self._first = False
        self.phase = Phase.CATCHING_UP
        self._prev_bytes = 1 << 62
        self.subscribed = set()
        self._plan.append(Sync(final=False))

    def handle(self, ev: FollowerEvent) -> None:
        if self.phase is Phase.DONE:
            return
        if isinstance(ev, StopRequested):
            self._end(Finish())
        elif isinstance(ev, SyncDone):
            self._sync_done(ev)
        elif isinstance(ev, Subscribed):
            self._subscribed(ev.job)
        elif isinstance(ev, StreamEnded):
            self._stream_ended(ev)
        elif isinstance(ev, RequestFailed):
            self._failed(ev)
        elif isinstance(ev, Bootstrapped):
            if self.phase is Phase.BOOTSTRAPPING:
                self._bootstrapped, self._first = True, False
                self.phase = Phase.CATCHING_UP
                self._plan.append(Sync(final=False))
        elif isinstance(ev, HoleSeen):
            if self.phase is Phase.STREAMING and not self._plan:
                self._plan.append(Sync(final=True))  # ask for what the streams lost
        elif self.phase is Phase.BACKING_OFF:  # BackoffOver
            self._catch_up()

    def _sync_done(self, ev: SyncDone) -> None:
        if self.phase is Phase.CATCHING_UP:
            self.njob = ev.njob
            sb = self.syncbytes
            if sb and sb <= ev.nbytes <= self._prev_bytes:
                self._prev_bytes = ev.nbytes
                self._plan.extend((Flush(), Sync(final=False)))
                return
            self.phase = Phase.SUBSCRIBING
            self.subscribed = set()
            self._plan.extend(Subscribe(k) for k in range(self.njob))
            if self.njob == 0:
                self._all_subscribed()
        elif self.phase is Phase.FINAL_SYNC:
            self.phase = Phase.STREAMING
            self.attempts = 0
            self._plan.append(Streaming())

    def _all_subscribed(self) -> None:
        self.phase = Phase.FINAL_SYNC
        self._plan.append(StartStreaming())
        if not self._jobs_started:
            self._jobs_started = True
            self._plan.append(StartJobs())
        self._plan.append(Sync(final=True))

    def _subscribed(self, job: int) -> None:
        self.subscribed.add(job)
        if self.phase is Phase.SUBSCRIBING:
            if len(self.subscribed) == self.njob:
                self._all_subscribed()
        elif self.phase in (Phase.FINAL_SYNC, Phase.STREAMING):
            self._plan.append(Sync(final=True))  # what the lost stream carried meanwhile

    def _stream_ended(self, ev: StreamEnded) -> None:
        if self.phase not in (Phase.SUBSCRIBING, Phase.FINAL_SYNC, Phase.STREAMING):
            return
        self.subscribed.discard(ev.job)
        if ev.error is not None and not is_transient(ev.error):
            self._end(Fail(ev.error))
            return
        n = self.resubscribes[ev.job] = self.resubscribes.get(ev.job, 0) + 1
        if self.once and n > self.max_resubscribes:
            self._end(
                Fail(
                    PeerError(
                        f"the leader dropped job {ev.job}'s stream {n} times; this follower"
                        " cannot keep up with it"
                    )
                )
            )
            return
        self._plan.append(Subscribe(ev.job, again=True))

    def _failed(self, ev: RequestFailed) -> None:
        err = ev.error
        if (
            isinstance(err, IncompatibleError)
            and ev.job is None
            and self.phase is Phase.CATCHING_UP
            and self.bootstrap
            and not self._bootstrapped
        ):
            self.phase = Phase.BOOTSTRAPPING
            self._plan.append(Bootstrap())
            return
        if (
            isinstance(err, IncompatibleError)
            and ev.job is None
            and self.phase in (Phase.FINAL_SYNC, Phase.STREAMING)
            and self.bootstrap
            and not self.once
        ):
            self._lost(err)  # truncated under us: the catch-up after the back-off bootstraps
            return
        if isinstance(err, NoSnapshotsError) and self._first:
            self._first = False  # no snapshot to be had: replay after all
            self.phase = Phase.CATCHING_UP
            self._plan.append(Sync(final=False))
            return
        if (
            isinstance(err, IncompatibleError)
            and self._bootstrapped
            and self.phase is Phase.CATCHING_UP
            and not self.once
        ):
            self._lost(err)  # truncated past the snapshot at once: start over later
            return
        if self.phase is Phase.BOOTSTRAPPING and is_transient(err) and self.once:
            self._end(Fail(err))
            return
        if not is_transient(err):
            self._end(Fail(err))
        elif not self.once:
            self._lost(err)
        elif ev.job is not None and self.phase is not Phase.SUBSCRIBING:
            self._once_stream_over(ev.job, err)
        elif ev.job is None and self.phase is Phase.FINAL_SYNC:
            self._end(
                Fail(
                    PeerError(
                        f"the leader stopped before this follower finished subscribing ({err});"
                        " the database is consistent but may lack the leader's last commits:"
                        " run the follower again against a live leader"
                    )
                )
            )
        else:
            self._end(Fail(err))  # the original gives up when it cannot start

    def _once_stream_over(self, job: int, err: BaseException) -> None:
        """Once mode: resubscribing to ``job`` failed. A busy leader is asked
        again; a leader that is gone has ended this stream."""
        if isinstance(err, LeaderBusyError):
            n = self.resubscribes[job] = self.resubscribes.get(job, 0) + 1
            if n <= self.max_resubscribes:
                self._plan.extend((Backoff(self.retry.delay(n), str(err)), Subscribe(job, True)))
                return
        if not self.subscribed:
            self._end(Finish())

    def _lost(self, err: BaseException) -> None:
        self.attempts += 1
        self.reconnects += 1
        self.subscribed = set()
        self._plan.clear()
        delay = self.retry.delay(self.attempts)
        # whole entries received before the loss are good: keep them
        self._plan.extend((CloseStreams(), Flush(), Backoff(delay, str(err))))
        self.phase = Phase.BACKING_OFF

    def _end(self, action: Finish | Fail) -> None:
        self.phase = Phase.DONE
        self._plan.clear()
        self._plan.append(action)
