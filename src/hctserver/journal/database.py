"""The journal layer's front door: :class:`Database` and :func:`connect`.

A :class:`Database` is the store (:mod:`hctserver.journal.store`) plus factories for
the two ways to change it: journaled connections for user code
(:mod:`hctserver.journal.connection`) and the follower's applier
(:mod:`hctserver.journal.apply`). This layer has no networking.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ..errors import ModeError
from .apply import Applier
from .connection import JournaledConnection
from .groupcommit import GroupCommitter
from .store import Mode, Store


class Database(Store):
    """A replication-enabled SQLite database (see :class:`hctserver.journal.store.Store`).

    :meth:`connect` gives connections that journal their writes in LEADER
    mode and refuse them in FOLLOWER mode; :meth:`applier` applies entries
    received from a leader and refuses to exist in LEADER mode.
    """

    _committer: GroupCommitter | None = None
    _committer_lock = threading.Lock()

    def connect(self) -> JournaledConnection:
        """A connection for user code: journals writes in LEADER mode."""
        return JournaledConnection(self, committer=self.committer())

    def committer(self) -> GroupCommitter:
        """The group committer that every connection's ``transact`` shares."""
        with self._committer_lock:
            if self._committer is None:
                self._committer = GroupCommitter(self)
            return self._committer

    def close(self) -> None:
        with self._committer_lock:
            if self._committer is not None:
                self._committer.close()
                self._committer = None
        super().close()

    def applier(self, **options: Any) -> Applier:
        """The follower's entry applier (see :class:`hctserver.journal.apply.Applier`)."""
        return Applier(self, **options)


def connect(
    path: str | os.PathLike[str], *, adopt: bool = False, **options: Any
) -> JournaledConnection:
    """Open ``path`` for an application that writes to a replicated database.

    A new or empty file is made a replication-enabled database. A plain
    SQLite file that already holds tables (another application's) is taken
    over only when asked: ``adopt=True`` (or ``hctserver init`` on it first)
    makes its schema and rows journal entry cid 1.

    Every transaction committed through the connection becomes a journal
    entry, and passes the commit gate (:mod:`hctserver.journal.gate`): while a node
    serves the file, a commit is made only while that node leads, and
    returns only once it is acknowledged as the node's own jobs' are (with
    ``--sync-followers K``, by K followers). A file that a node has served
    refuses writes while no node serves it (NoNodeError); a follower's file
    refuses them (NotLeaderError, naming the leader). ``options`` go to
    :class:`Database` (``synchronous``, ``busy_timeout``, ...).

    The connection owns its database object: ``close()`` closes both.
    """
    db = Database(path, adopt=adopt, **options)
    try:
        if db.role == "follower":
            raise ModeError(
                f"{db.path} is a follower's database (a replica): writes there would"
                " diverge from its leader; connect to the leader's database instead"
            )
        try:
            db.set_mode(Mode.LEADER)  # the gate decides each commit
        except ModeError:
            pass  # a cluster node's file, following now (a hole): reads only
        return JournaledConnection(db, owns_db=True, committer=db.committer())
    except BaseException:
        db.close()
        raise
