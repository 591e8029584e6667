"""One node per database file.

A leader or follower node takes an exclusive ``flock`` on ``DB-hctserver.lock``
for as long as it runs; a second node on the same file (in any process) is
refused with the holder's pid and role. The operating system releases the
lock when the holder exits, however it exits, so a crash leaves nothing to
clean up. Applications writing through ``hctserver.connect()`` do not take
it: any number of them may write beside one leader.
"""

from __future__ import annotations

import fcntl
import os

from ..errors import DatabaseInUseError

SUFFIX = "-hctserver.lock"


class NodeLock:
    """The lock of one database file, held by one node."""

    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        self.path = db_path + SUFFIX
        self._fd: int | None = None

    def acquire(self, role: str) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another node"
            os.close(fd)
            raise DatabaseInUseError(
                f"{self.db_path} is already served by a node ({holder}); stop it first, or"
                " point this one at another file"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{role}, pid {os.getpid()}".encode())
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing drops the lock
