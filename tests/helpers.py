"""Small builders shared by the tests."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from hctserver import Database, Entry


def leader(
    path: str, n: int = 10, *, schema: str = "CREATE TABLE t1(a INTEGER PRIMARY KEY, b, c)"
) -> Database:
    """A LEADER database with one schema entry and ``n`` writer-loop commits."""
    db = Database(path)
    db.set_mode("leader")
    c = db.connect()
    c.execute(schema)
    for _ in range(n):
        c.execute("BEGIN CONCURRENT")
        c.execute("REPLACE INTO t1 VALUES(random() % 50, randomblob(20), randomblob(20))")
        c.execute("COMMIT")
    c.close()
    return db


def entries(db: Database) -> list[Entry]:
    return list(db.iter_entries())


def replay(src: Database, path: str, upto: int | None = None) -> Database:
    db = Database(path)
    ap = db.applier()
    ap.add_many(src.iter_entries(upto=upto))
    ap.apply()
    ap.close()
    return db


def file_bytes(path: str) -> bytes:
    """The database as one byte string (main file plus WAL, if any)."""
    out = b""
    for suffix in ("", "-wal"):
        p = path + suffix
        if os.path.exists(p):
            with open(p, "rb") as f:
                out += f.read()
    return out


def wait_until(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll a condition with a deadline (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def complete_lines(text: str) -> list[str]:
    """The lines of a log another process is still writing, without its
    last one if that is not whole yet (read between two writes of a line)."""
    lines = text.split("\n")
    return [line for line in lines[:-1] if line]  # what follows the last newline is partial
