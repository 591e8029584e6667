"""Conformance: a minimal client written only from SPEC section 2.

It uses socket, struct and hashlib, nothing of hctserver, to talk to a real
leader, and checks framing and hashes against the leader's journal (read
with plain apsw).
"""

from __future__ import annotations

import hashlib
import queue
import socket
import struct

import apsw

from helpers import wait_until
from nodes import controlled_job, init_db, leader_node


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, f"connection closed with {n - len(out)} bytes missing"
        out += chunk
    return out


def recv_i32(s: socket.socket) -> int:
    return int(struct.unpack("<i", recv_exact(s, 4))[0])


def recv_entry(s: socket.socket, size: int) -> tuple[int, int, bytes, bytes]:
    body = recv_exact(s, size)
    cid, schemacid = struct.unpack_from("<qq", body)
    nul = body.index(b"\x00", 16)
    schema, data = body[16:nul], body[nul + 1 :]
    assert size == 16 + len(schema) + 1 + len(data)
    return cid, schemacid, schema, data


def spec_hash(cid: int, schema: bytes, data: bytes, schemacid: int) -> bytes:
    return hashlib.md5(
        struct.pack(">q", cid) + schema + data + struct.pack(">q", schemacid)
    ).digest()


def journal_hashes(path: str) -> dict[int, bytes]:
    c = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return {cid: h for cid, h in c.execute("SELECT cid, hash FROM hct_journal")}
    finally:
        c.close()


def assert_streamed(s: socket.socket, path: str, cids: list[int]) -> None:
    """The next entries on a SUB stream are ``cids``, as the journal holds them."""
    seen = []
    for _ in cids:
        cid, schemacid, schema, data = recv_entry(s, recv_i32(s))
        seen.append((cid, spec_hash(cid, schema, data, schemacid)))
    hashes = journal_hashes(path)
    assert [c for c, _ in seen] == cids
    assert all(hashes[c] == h for c, h in seen)


def test_sync_from_empty_and_sub_with_a_spec_only_client(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 40)
    commands: queue.Queue[str] = queue.Queue()
    leader = leader_node(lp, [controlled_job(commands), controlled_job(queue.Queue())])
    port = leader.port
    try:
        # SYNC from an empty database: cid 0 and the zero hash
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(struct.pack("<iq", 1, 0) + bytes(16))
            assert recv_i32(s) == 4  # SYNCREPLY
            assert recv_i32(s) == 3  # nJob: two jobs, then the stream of other writers
            got = {}
            while (size := recv_i32(s)) != 0:
                cid, schemacid, schema, data = recv_entry(s, size)
                got[cid] = spec_hash(cid, schema, data, schemacid)
            assert s.recv(1) == b""  # then the leader closes
        assert got == journal_hashes(lp)
        assert sorted(got) == list(range(1, 42))

        # SUB to job 0, then make job 0 commit
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(struct.pack("<ii", 2, 0))
            assert recv_i32(s) == 5  # SUBREPLY
            wait_until(lambda: leader.runner.subscriber_counts()[0], what="the subscription")
            for i in range(3):
                commands.put(f"INSERT OR REPLACE INTO t1 VALUES({i}, 'sub', x'00ff')")
            assert_streamed(s, lp, [42, 43, 44])
        # SUB to the last stream: commits no job made, here from a plain connection
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(struct.pack("<ii", 2, 2))
            assert recv_i32(s) == 5  # SUBREPLY
            wait_until(lambda: leader.runner.subscriber_counts()[2], what="the subscription")
            app = leader.db.connect()
            for i in range(3):
                app.execute(f"INSERT OR REPLACE INTO t1 VALUES({i}, 'app', x'01')")
            app.close()
            assert_streamed(s, lp, [45, 46, 47])
        # a SUB for a job that does not exist gets ERROR with a NUL-terminated message
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(struct.pack("<ii", 2, 5))
            assert recv_i32(s) == 3
            n = recv_i32(s)
            msg = recv_exact(s, n)
            assert msg.endswith(b"\x00") and b"no such job" in msg
    finally:
        leader.runner.timeout.expire()
        leader.wait()
