"""Helpers to run real leaders and followers on 127.0.0.1 in tests."""

from __future__ import annotations

import os
import queue
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import apsw

from hctserver import Database
from hctserver.node.jobs import WRITER_SQL, writer
from hctserver.node.testserver import DEFAULTS as NODE_OPTIONS
from hctserver.node.testserver import Node
from hctserver.protocol import wire

import dbdump


def init_db(path: str, n: int = 0) -> None:
    """A database holding t1 and ``n`` writer-loop commits."""
    db = Database(path)
    db.set_mode("leader")
    c = db.connect()
    c.execute("CREATE TABLE t1(a INTEGER PRIMARY KEY, b, c)")
    for _ in range(n):
        c.execute("BEGIN CONCURRENT")
        c.execute(WRITER_SQL)
        c.execute("COMMIT")
    c.close()
    db.close()


def leader_node(path: str, jobs: list[Any], **extra: Any) -> Node:
    """A leader on an ephemeral port; ``extra``: Node options (such as
    ``security``) and keywords of :class:`hctserver.node.leader.Leader`."""
    options = {k: extra.pop(k) for k in list(extra) if k in NODE_OPTIONS}
    node = Node(path, port=0, **options)
    for j in jobs:
        node.job(j)
    node.extra.update(extra)
    node.start()
    return node


def follower_node(path: str, port: int, **options: Any) -> Node:
    """A follower started on ``path``; by default the original's run
    (``once``), which ends with the leader's."""
    extra = options.pop("extra", {})
    options.setdefault("once", True)
    node = Node(path, follower=True, port=port, **options)
    node.extra.update(extra)
    node.start()
    return node


def gated_writer(gate: threading.Event) -> Callable[[Any, Any], None]:
    """The original's writer loop, once ``gate`` opens, until the timeout."""

    def job(db: Any, timeout: Any) -> None:
        while not gate.wait(0.05):
            if timeout():
                return
        writer(db, timeout)

    return job


def controlled_job(commands: queue.Queue[str]) -> Callable[[Any, Any], None]:
    """Runs the SQL put in ``commands`` until the timeout."""

    def job(db: Any, timeout: Any) -> None:
        while not timeout():
            try:
                sql = commands.get(timeout=0.05)
            except queue.Empty:
                continue
            db.execute(sql)

    return job


def idle_job(db: Any, timeout: Any) -> None:
    while not timeout.wait(0.05):
        pass


def settled_bytes(path: str) -> bytes:
    """The database file's bytes after a full checkpoint (no WAL content left)."""
    c = apsw.Connection(path)
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    c.close()
    with open(path, "rb") as f:
        data = f.read()
    wal = path + "-wal"
    if os.path.exists(wal):
        assert os.path.getsize(wal) == 0
    return data


def snapshot_of(path: str) -> int:
    """The snapshot as another process sees it (plain apsw, read only)."""
    try:
        c = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    except apsw.CantOpenError:
        return -1
    try:
        c.set_busy_timeout(1000)
        rows = c.execute(
            "SELECT max(cid) FROM hct_journal WHERE vhash IS NOT NULL"
            " UNION ALL SELECT cid FROM hct_baseline"
        ).fetchall()
        return int(max(r[0] or 0 for r in rows))
    except (apsw.SQLError, apsw.BusyError):
        return -1  # not created yet, or busy this instant: ask again
    finally:
        c.close()


def assert_identical(leader: str, *followers: str) -> None:
    """Same rows, schema and position, and the same journal wherever both
    still hold it (above both baselines: retention, or a bootstrap from a
    snapshot, starts a journal later)."""
    want = dbdump.everything(leader)
    ldb = Database(leader, init=False)
    lp, lbase = ldb.position(), ldb.baseline()[0]
    for f in followers:
        fdb = Database(f, init=False)
        got = dbdump.everything(f)
        lo = max(lbase, fdb.baseline()[0])
        assert {**got, "journal": [r for r in got["journal"] if r[0] > lo]} == {
            **want,
            "journal": [r for r in want["journal"] if r[0] > lo],
        }, f
        assert fdb.position() == lp


class FakeLeader:
    """Answers every request with canned bytes, then closes; a SUB is answered
    with ``sub_reply`` instead, if given, and kept open. ``reply`` may be a
    list: the n-th request gets its n-th item (the last one from then on).

    As the original leader does, it answers a SYNC from a cid below its
    history (the feedback extension's probe, cid -1) with ``incompatible
    database version``, and closes a connection whose message type it does
    not know without a word (the original asserts): ``probes`` and
    ``unknown`` count them."""

    def __init__(self, reply: bytes | list[bytes], sub_reply: bytes | None = None) -> None:
        self.replies = reply if isinstance(reply, list) else [reply]
        self.served = 0
        self.probes = 0
        self.unknown = 0
        self.sub_reply = sub_reply
        self.kept: list[socket.socket] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                request = conn.recv(64)
                kind = struct.unpack_from("<i", request)[0] if len(request) >= 4 else 0
                if kind not in (1, 2):
                    self.unknown += 1
                    conn.close()
                    continue
                if kind == 1 and len(request) >= 12 and struct.unpack_from("<q", request, 4)[0] < 0:
                    self.probes += 1
                    with conn:
                        conn.sendall(wire.encode_error(wire.INCOMPATIBLE))
                    continue
                if self.sub_reply is not None and request[:4] == struct.pack("<i", 2):
                    conn.sendall(self.sub_reply)
                    self.kept.append(conn)
                    continue
                with conn:
                    self.served += 1
                    conn.sendall(self.replies[min(self.served - 1, len(self.replies) - 1)])
            except OSError:
                conn.close()  # the follower went away (or refused what it got)

    def close(self) -> None:
        self.sock.close()
        for c in self.kept:
            c.close()


def end_identical(leader: Node, f: Node, lp: str, fp: str) -> None:
    """End the leader's run, then the follower's; both closed even when that
    fails; then they must hold the same."""
    try:
        leader.runner.timeout.expire()  # type: ignore[union-attr]
        leader.wait(60)
        f.wait(60)
    finally:
        f.close()
        leader.close()
    assert_identical(lp, fp)
