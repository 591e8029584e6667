"""A follower's way to its leader for SQL clients: streams to the leader's
client URL (learned in ACCEPT, published in the gate file), and the wait
until what the leader committed is applied here (read your writes).

Idle streams to the leader are pooled (their connections stay open) for
the next forwarded pipeline, but only those that ran nothing that could
leave state behind on the leader's connection (a PRAGMA, say): a client's
session state never reaches another client.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import apsw

from ..client.remote import Stream
from ..errors import HctError, StreamLostError
from ..journal.database import Database
from ..protocol.hrana import Pipeline
from .sqlstreams import ClientStream, Refused

T = TypeVar("T")
POOL = 16  # idle streams to the leader kept for forwarding
APPLY_TIMEOUT = 10.0  # seconds a forwarded commit may take to be applied here


def failure_code(e: BaseException) -> str | None:
    if isinstance(e, HctError):
        return "HCT_" + type(e).__name__
    return None


class Forwarding:
    """See the module's docstring. ``token``/``ca``: what this node shows and
    trusts at its leader (the cluster's HTTP token, the CA of its https)."""

    def __init__(
        self, db: Database, token: bytes | None, ca: str | None, timeout: float, idle: float
    ) -> None:
        self.db = db
        self.token = token
        self.ca = ca
        self.timeout = timeout
        self.idle = idle  # the leader forgets a stream idle this long
        self._lock = threading.Lock()
        self._pool: list[Stream] = []
        self._closed = False

    def leader_url(self) -> str:
        st = self.db.gate.state()
        url = st.client if st is not None else ""
        if not url:
            leader = st.leader if st is not None else ""
            raise Refused(
                503,
                f"this node follows {leader or 'no leader yet'}, which has not said where it"
                " serves SQL clients (start the leader with --http): writes cannot be forwarded",
                "HCT_NotLeaderError",
            )
        return url

    def stream(self, fresh: bool = False) -> Stream:
        """A stream to the current leader: a pooled one, or a new one."""
        url = self.leader_url()
        stale: list[Stream] = []
        found = None
        with self._lock:
            while self._pool and not fresh:
                kept = self._pool.pop()
                if kept.url == url and time.monotonic() - kept.used < self.idle / 2:
                    found = kept
                    break
                stale.append(kept)  # the leader changed, or may forget it soon
        for s in stale:  # outside the lock: an old leader may not answer
            s.drop()
        return found or Stream(url, token=self.token, ca=self.ca, timeout=self.timeout)

    def give_back(self, remote: Stream, reusable: bool) -> None:
        """A stream to the leader, outside a transaction: kept for the next
        forward (up to :data:`POOL`) if ``reusable``, else closed."""
        if reusable and not remote.in_transaction:
            with self._lock:
                if not self._closed and len(self._pool) < POOL:
                    self._pool.append(remote)
                    return
        remote.close()

    def forward(
        self, s: ClientStream, p: Pipeline, reqs: list[dict[str, Any]], reusable: bool
    ) -> tuple[list[dict[str, Any]], int, bool]:
        """Run ``reqs`` on the leader (the stream's open transaction there, or
        a pooled stream): (results, the cid they committed, duplicate)."""
        held, s.remote = s.remote, None  # until it answers: a failure ends the transaction
        self.db.gate.want(self.db.snapshot() + 1)  # what arrives next: apply it at once
        remote, results = self._on_leader(
            held or self.stream(),
            held is None,
            "forwarding to the leader",
            lambda r: self._send(r, reqs, p),
        )
        s.remote = remote if remote.in_transaction else None
        if s.remote is None:
            self.give_back(remote, reusable)
        cid = remote.answered_cid
        if cid:
            self.applied(cid, APPLY_TIMEOUT)
        return results, cid, remote.duplicate

    @staticmethod
    def _send(remote: Stream, reqs: list[dict[str, Any]], p: Pipeline) -> list[dict[str, Any]]:
        remote.consistency = p.consistency.level
        remote.min_cid = p.consistency.min_cid
        return remote.pipeline(reqs, txid=p.txid)

    def leader_snapshot(self) -> int:
        """The leader's newest cid, asked while its lease holds."""
        remote, cid = self._on_leader(
            self.stream(), True, "asking the leader for its newest cid", Stream.leader_snapshot
        )
        self.give_back(remote, True)
        return cid

    def _on_leader(
        self, remote: Stream, pooled: bool, what: str, call: Callable[[Stream], T]
    ) -> tuple[Stream, T]:
        """``call(remote)``; a pooled stream the leader forgot (it refused it
        before anything ran) is replaced by a new one, once. Any failure: 502."""
        try:
            try:
                return remote, call(remote)
            except StreamLostError:
                if not pooled:  # its transaction is gone: the client must know
                    raise
                remote.drop()
                remote = self.stream(fresh=True)
                return remote, call(remote)
        except (HctError, apsw.Error) as e:
            remote.drop()
            raise Refused(502, f"{what} failed: {e}", failure_code(e)) from None

    def applied(
        self,
        cid: int,
        timeout: float,
        advice: str = "it will be: read on the leader, or wait for it",
        what: str = "the leader committed",
    ) -> None:
        """Return once this node has applied ``cid`` (a forwarded write, a
        fresh enough read), else 504."""
        db = self.db
        if db.snapshot() >= cid:
            return
        db.gate.want(cid)
        if not db.wait_for(cid, timeout):
            raise Refused(
                504,
                f"{what} cid {cid}; this node has applied cid {db.snapshot()} after"
                f" waiting {timeout:g} s: {advice}",
                "HCT_LagError",
            )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, []
        for remote in pool:
            remote.close()
