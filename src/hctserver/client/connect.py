"""``hctserver.connect()``: a connection for an application beside any node.

On the leader's file it journals its writes (:func:`hctserver.journal.database.connect`).
On a follower's (or a cluster node's while it follows) it reads locally and
sends every write and every transaction to the leader, over the client
protocol, at the URL the node published in its gate file; a write returns
once this file has applied it, so the connection reads its own writes.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ModeError, NotLeaderError
from ..journal.connection import JournaledConnection
from ..journal.database import Database
from ..journal.store import Mode
from .remote import Stream, read_token


class Forwarder:
    """Opens streams to the leader of ``db``'s node (its gate says where)."""

    def __init__(self, db: Database, token: bytes | None, ca: str | None, timeout: float) -> None:
        self.db = db
        self.token = token
        self.ca = ca
        self.timeout = timeout

    def __call__(self) -> Stream:
        st = self.db.gate.state()
        url = "" if st is None else st.client
        if not url:
            where = f" (it follows {st.leader})" if st is not None and st.leader else ""
            raise NotLeaderError(
                f"{self.db.path} is a follower's database{where}, and its leader has not said"
                " where it serves SQL clients: start the leader with --http (loopback, a"
                " token, or --http-sql on), or write on the leader",
                leader=None if st is None else st.leader or None,
            )
        return Stream(url, token=self.token, ca=self.ca, timeout=self.timeout)


def connect(
    path: str | os.PathLike[str],
    *,
    adopt: bool = False,
    token: bytes | str | None = None,
    token_file: str | None = None,
    ca: str | None = None,
    timeout: float = 10.0,
    **options: Any,
) -> JournaledConnection:
    """Open ``path`` for an application (see :func:`hctserver.journal.database.connect`
    for the leader's side). On a follower's file, writes and transactions go
    to the leader (``token``/``token_file`` and ``ca``: the leader's HTTP
    token and the CA of its https endpoint, if it has them; ``timeout``: per
    request) and return once applied here; reads stay local."""
    db = Database(path, adopt=adopt, **options)
    try:
        if db.role != "follower":
            try:
                db.set_mode(Mode.LEADER)  # the gate decides each commit
            except ModeError:
                pass  # a cluster node's file, following now (a hole): writes are forwarded
        forward = Forwarder(db, read_token(token, token_file), ca, timeout)
        return JournaledConnection(db, owns_db=True, committer=db.committer(), forward=forward)
    except BaseException:
        db.close()
        raise
