"""Fault injection for tests and drills: a full disk, on demand, and crashes.

Off unless the environment variable ``HCTSERVER_FAULT_DISK`` names a
control file. Then every connection hctserver opens goes through a small
VFS shim over SQLite's default one: while the control file says ``full``,
any write that would make a file grow fails with SQLITE_FULL, as on a disk
with no free blocks (writes inside a file's current size still succeed).
Write anything else into the file and space "returns". It costs a Python
call per write, so it is for tests and operator drills only.

Crashes: with ``HCTSERVER_FAULT_KILL=N``, the process kills itself
(SIGKILL, as a power cut would stop it) at the N-th :func:`kill_point` it
reaches; with ``HCTSERVER_FAULT_KILL=count:FILE`` it writes how many it has
reached into FILE instead, so that a test knows how many there are.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import apsw

ENV = "HCTSERVER_FAULT_DISK"
KILL_ENV = "HCTSERVER_FAULT_KILL"
VFS_NAME = "hctserver-faults"


class _Control:
    """Reads the control file when it changes (by mtime)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mtime = -1.0
        self._full = False

    def full(self) -> bool:
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            return False
        if mtime != self._mtime:
            self._mtime = mtime
            try:
                with open(self.path) as f:
                    self._full = f.read().strip() == "full"
            except OSError:
                self._full = False
        return self._full


class _FaultVFS(apsw.VFS):
    def __init__(self, control: _Control) -> None:
        self.control = control
        super().__init__(VFS_NAME, "")

    def xOpen(self, name: Any, flags: Any) -> apsw.VFSFile:
        return _FaultFile(self.control, name, flags)


class _FaultFile(apsw.VFSFile):
    def __init__(self, control: _Control, name: Any, flags: Any) -> None:
        self.control = control
        super().__init__("", name, flags)

    def xWrite(self, data: Any, offset: int) -> None:
        if offset + len(data) > self.xFileSize() and self.control.full():
            raise apsw.FullError("database or disk is full (injected by HCTSERVER_FAULT_DISK)")
        super().xWrite(data, offset)

    def xTruncate(self, newsize: int) -> None:
        if newsize > self.xFileSize() and self.control.full():
            raise apsw.FullError("database or disk is full (injected by HCTSERVER_FAULT_DISK)")
        super().xTruncate(newsize)


_vfs: _FaultVFS | None = None


def vfs_name() -> str | None:
    """The VFS hctserver's connections should use: None (SQLite's default)
    unless fault injection is on."""
    global _vfs
    path = os.environ.get(ENV)
    if not path:
        return None
    if _vfs is None:
        _vfs = _FaultVFS(_Control(path))
    return VFS_NAME


_reached = 0


def kill_point(name: str) -> None:
    """A point where a crash drill may kill this process (see the module's
    docstring); nothing at all when ``HCTSERVER_FAULT_KILL`` is not set."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    global _reached
    _reached += 1
    if spec.startswith("count:"):
        with open(spec[6:], "w") as f:
            f.write(f"{_reached} {name}\n")
    elif spec.isdigit() and _reached == int(spec):
        os.kill(os.getpid(), signal.SIGKILL)
