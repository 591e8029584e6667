"""The leader's end of the bootstrap extension: decide, build, send.

A snapshot is built (:func:`hctserver.journal.snapshot.make`) into a file beside
the database, from one read transaction (as long as the copy of the rows),
and then sent from that
file: a follower that reads slowly holds up no checkpoint and no writer.
The file is unlinked as soon as it is open for sending, so nothing is left
behind, even by a crash (except a build in progress: cleaned at start).
At most ``max_snapshots`` are built or sent at once; more are refused with
"retry later". The position of a snapshot sent is pinned for a while
(:class:`hctserver.journal.retention.Pins`), so that its follower finds the
journal after it when it SYNCs next.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import logging
import os
import shutil
import threading
import time

from ..errors import DiskFullError, HctError, ProtocolError, TimedOutError
from ..journal import snapshot
from ..journal.retention import SNAPSHOT, Pins
from ..journal.store import Store
from ..net.transport import Conn
from ..protocol import bootstrap, wire
from ..protocol.session import RETRY

log = logging.getLogger("hctserver")

_CHUNK = 1 << 20
PIN_AFTER_SEND = 120.0  # seconds a sent snapshot's position stays pinned


def clean_temp(db_path: str) -> None:
    """Remove snapshot files a crashed leader left being built."""
    for path in glob.glob(glob.escape(db_path) + ".hct-snap-*"):
        snapshot.remove_files(path)


class SnapshotServer:
    def __init__(
        self,
        db: Store,
        pins: Pins,
        *,
        max_snapshots: int = 2,
        request_timeout: float = 5.0,
        send_timeout: float = 30.0,
    ) -> None:
        self.db = db
        self.pins = pins
        self.max_snapshots = max_snapshots
        self.request_timeout = request_timeout
        self.send_timeout = send_timeout
        self._slots = threading.BoundedSemaphore(max(1, max_snapshots))
        self._names = itertools.count(1)
        self._lock = threading.Lock()
        self.served = 0
        self.refused = 0
        self.sending = 0
        self.bytes_sent = 0
        self.last: dict[str, object] | None = None  # the last one sent, for /status

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "served": self.served,
                "refused": self.refused,
                "in_progress": self.sending,
                "sent_bytes": self.bytes_sent,
                "last": self.last,
            }

    def serve(self, conn: Conn) -> None:
        """Answer one request (the SYNC that asked has been read)."""
        db = self.db
        baseline = db.baseline()[0]
        conn.send_all(bootstrap.encode_offer(baseline, db.snapshot()), self.send_timeout)
        try:
            want = self._read_want(conn)
        except ProtocolError as e:
            self._refuse(conn, f"bad snapshot request: {e}", f"a bad snapshot request: {e}")
            return
        newest = db.snapshot()
        verdict = bootstrap.verdict(want, db.baseline()[0], newest, db.hash_at(want.cid))
        if verdict is None:
            self._refuse(
                conn,
                wire.INCOMPATIBLE,
                f"a snapshot for a follower at cid {want.cid} whose history differs from this"
                " leader's (it did not ask to be replaced: --reseed)",
            )
            return
        if not self._slots.acquire(blocking=False):
            self._refuse(
                conn,
                f"too many snapshots in progress (the limit is {self.max_snapshots}); {RETRY}",
                "too many snapshots in progress",
            )
            return
        try:
            with self._lock:
                self.sending += 1
            self._send(conn, want, verdict)
        finally:
            with self._lock:
                self.sending -= 1
            self._slots.release()

    def _read_want(self, conn: Conn) -> bootstrap.Want:
        dec = bootstrap.Decoder(frozenset({bootstrap.WANT}))
        deadline = time.monotonic() + self.request_timeout
        buf = bytearray(256)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimedOutError(f"no WANT within {self.request_timeout:g} s")
            n = conn.recv_into(buf, left)
            if n == 0:
                raise TimedOutError("the follower closed before sending WANT")
            for msg in dec.feed(memoryview(buf)[:n]):
                assert isinstance(msg, bootstrap.Want)
                return msg

    def _refuse(self, conn: Conn, message: str, why: str) -> None:
        with self._lock:
            self.refused += 1
        log.warning("refused %s: %s", conn.peer, why)
        conn.send_all(wire.encode_error(message), self.send_timeout)
        conn.shutdown_write()

    def _send(self, conn: Conn, want: bootstrap.Want, verdict: int) -> None:
        db = self.db
        path = f"{db.path}.hct-snap-{os.getpid()}-{next(self._names)}"
        t0 = time.monotonic()
        # from before the build: the journal after the snapshot must outlive it
        pin = self.pins.hold(db.snapshot(), f"{SNAPSHOT} for {conn.peer}")
        size = 0
        try:
            free = shutil.disk_usage(os.path.dirname(db.path) or ".").free
            if free < os.path.getsize(db.path):  # a snapshot is at most the file's size
                self._refuse(
                    conn,
                    f"the leader's disk has too little space for a snapshot; {RETRY}",
                    f"{free} bytes free, less than the database's size",
                )
                return
            try:
                info = snapshot.make(db, path)
            except DiskFullError as e:
                self._refuse(conn, f"the leader's disk is full; {RETRY}", str(e))
                return
            except (OSError, HctError) as e:
                self._refuse(conn, f"the leader could not make a snapshot ({e}); {RETRY}", str(e))
                return
            built = time.monotonic() - t0
            self.pins.move(pin, info.cid)
            size = self._stream(conn, path, info, verdict, built)
        finally:
            # until its follower SYNCs from it (Pins.settle), or checked and installed
            # it at a modest 10 MiB/s plus two minutes
            self.pins.release(pin, PIN_AFTER_SEND + size / (10 << 20))
            snapshot.remove_files(path)
        with self._lock:
            self.served += 1
            self.last = {
                "peer": conn.peer,
                "cid": info.cid,
                "bytes": size,
                "seconds": round(time.monotonic() - t0, 3),
            }
        log.info("sent %s its snapshot at cid %d", conn.peer, info.cid)

    def _stream(
        self, conn: Conn, path: str, info: snapshot.SnapshotInfo, verdict: int, built: float
    ) -> int:
        """Send the snapshot file at ``path``; returns its size."""
        with open(path, "rb") as f:
            snapshot.remove_files(path)  # open: nothing to clean up later
            size = os.fstat(f.fileno()).st_size
            log.info(
                "sending %s a snapshot at cid %d (%d bytes, built in %.2f s; it is %s)",
                conn.peer,
                info.cid,
                size,
                built,
                bootstrap.VERDICTS[verdict],
            )
            conn.send_all(
                bootstrap.encode_head(info.cid, info.schemacid, info.hash, size, verdict),
                self.send_timeout,
            )
            digest = hashlib.sha256()
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                conn.send_all(bootstrap.data_header(len(chunk)) + chunk, self.send_timeout)
                with self._lock:
                    self.bytes_sent += len(chunk) + 8
            conn.send_all(bootstrap.encode_end(digest.digest()), self.send_timeout)
            conn.shutdown_write()
        return size
