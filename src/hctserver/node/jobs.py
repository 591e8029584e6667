"""Jobs: workload code a node runs, each in its own thread with its own
connection (``db``) and a ``timeout()`` callable (SPEC section 5).

A job is a Python callable ``fn(db, timeout)``, the path of a Python script
run with globals ``db`` and ``timeout``, or the name of a bundled job:
``writer`` (the original's example writer loop), ``monitor`` (prints
``max cid: N`` every second) and ``snapshot`` (prints the snapshot every
second).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import apsw

from ..errors import (
    BusyError,
    CommitUnknownError,
    ConfigError,
    DiskFullError,
    JobError,
    ModeError,
)

log = logging.getLogger("hctserver")

WRITER_SQL = "REPLACE INTO t1 VALUES(random() % 10000, randomblob(100), randomblob(100))"
T1_SQL = "CREATE TABLE t1(a INTEGER PRIMARY KEY, b, c)"


class Timeout:
    """``timeout()`` is true once ``seconds`` have passed (never if 0) or
    after :meth:`expire`. ``timeout.wait(s)`` sleeps up to s, waking early
    when it expires."""

    def __init__(self, seconds: float = 0) -> None:
        self._end = time.monotonic() + seconds if seconds > 0 else None
        self._expired = threading.Event()

    def __call__(self) -> bool:
        if self._expired.is_set():
            return True
        if self._end is not None and time.monotonic() >= self._end:
            self._expired.set()
            return True
        return False

    def expire(self) -> None:
        self._expired.set()

    def wait(self, seconds: float) -> bool:
        """Sleep until ``seconds`` pass or the timeout expires; returns timeout()."""
        if self._end is not None:
            seconds = min(seconds, max(0.0, self._end - time.monotonic()))
        self._expired.wait(seconds)
        return self()

    def wait_expired(self) -> None:
        """Block until the timeout expires (never, with 0 seconds and no expire())."""
        left = None if self._end is None else max(0.0, self._end - time.monotonic())
        self._expired.wait(left)
        self._expired.set()


JobFunction = Callable[[Any, Timeout], Any]


def writer(db: Any, timeout: Callable[[], bool]) -> None:
    """The original's example leader job: REPLACE random rows as fast as
    possible; "database is locked" is retried at once, a full disk after a
    growing pause (the job carries on when space returns)."""
    ensure_t1(db)
    pause = 0.0
    while not timeout():
        try:
            db.transact([WRITER_SQL])  # one call; concurrent writers commit in groups
            if pause:
                log.warning("the disk has space again: the writer goes on")
                pause = 0.0
        except (BusyError, apsw.BusyError):
            if db.in_transaction:
                db.execute("ROLLBACK")
        except (ModeError, CommitUnknownError):
            # the node stops leading (stopping, fenced, lease lapsed): the job ends
            # with the node; until then it tries again now and then
            wait = getattr(timeout, "wait", None)
            if wait is not None:
                wait(0.05)
        except (DiskFullError, apsw.FullError) as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if not pause:
                log.error("writer: %s; retrying every 5 s at most", e)
            pause = min(5.0, pause * 2 or 0.1)
            wait = getattr(timeout, "wait", None)
            if wait is not None:
                wait(pause)


def monitor(db: Any, timeout: Timeout) -> None:
    """Print the largest cid in the journal every second."""
    while True:
        (cid,) = db.execute("SELECT coalesce(max(cid), 0) FROM hct_journal").fetchone()
        print(f"max cid: {cid}", flush=True)
        if timeout.wait(1.0):
            break


def snapshot(db: Any, timeout: Timeout) -> None:
    """Print the snapshot available to readers every second."""
    while True:
        print(f"snapshot: {db.snapshot()}", flush=True)
        if timeout.wait(1.0):
            break


BUNDLED: dict[str, JobFunction] = {"writer": writer, "monitor": monitor, "snapshot": snapshot}


def ensure_t1(db: Any) -> None:
    """Create the example table t1 unless it exists (a journaled schema entry)."""
    found = db.execute("SELECT 1 FROM sqlite_schema WHERE type='table' AND name='t1'").fetchall()
    if not found:
        db.execute(T1_SQL.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))


class Job:
    """A job definition: a callable, a script path, or a bundled job's name."""

    def __init__(
        self, target: JobFunction | str | os.PathLike[str], name: str | None = None
    ) -> None:
        if callable(target):
            self.fn: JobFunction = target
            self.name = name or getattr(target, "__name__", "job")
        else:
            spec = os.fspath(target)
            if spec in BUNDLED:
                self.fn, self.name = BUNDLED[spec], name or spec
            elif os.path.isfile(spec):
                self.fn, self.name = _script(spec), name or os.path.basename(spec)
            else:
                raise ConfigError(
                    f"job {spec!r} is neither a Python script nor a bundled job"
                    f" ({', '.join(sorted(BUNDLED))})"
                )


def _script(path: str) -> JobFunction:
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        code = compile(source, path, "exec")
    except SyntaxError as e:
        raise ConfigError(f"job script {path}: {e.msg} at line {e.lineno}") from None

    def run(db: Any, timeout: Timeout) -> None:
        exec(code, {"db": db, "timeout": timeout, "__name__": "__hctjob__", "__file__": path})

    return run


def run_job(
    index: int,
    job: Job,
    connect: Callable[[], Any],
    timeout: Timeout,
    on_connect: Callable[[Any], None] | None = None,
) -> None:
    """Run one job with a connection of its own (in the thread a node gave
    it). A job that raises becomes a JobError carrying the original as its
    cause (and its traceback); ``sys.exit()`` with no code or 0 just ends it."""
    db = None
    try:
        db = connect()
        if on_connect is not None:
            on_connect(db)
        job.fn(db, timeout)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise JobError(f"job {index} ({job.name}) exited with {e.code!r}") from e
    except (DiskFullError, apsw.FullError) as e:
        raise DiskFullError(f"job {index} ({job.name}): the disk is full: {e}") from e
    except BaseException as e:
        raise JobError(f"job {index} ({job.name}): {type(e).__name__}: {e}") from e
    finally:
        if db is not None:
            try:
                db.close()
            except Exception:
                log.debug("closing job %d's connection", index, exc_info=True)
