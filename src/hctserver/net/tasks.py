"""The threads of one node: one owner, one stop signal, the first error kept.

Modelled on Go's errgroup with a context (as LiteFS uses them): every
thread of a node is started by its :class:`TaskGroup`; the first one that
fails records its error and stops the group; :meth:`TaskGroup.stop` sets
the stop signal every loop waits on and runs each task's ``on_stop`` (close
a socket, wake a poller, interrupt SQLite) so that blocked threads notice
at once; :meth:`TaskGroup.join` waits for them in reverse order of start.

A failure is reported once, by the group's owner: ``wait`` raises the first
error, and the CLI prints it as its one-line error (a cluster node logs it
and starts again). The group itself logs a typed error only at DEBUG (with
its traceback); see :func:`_log_first`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import HctError, JobError

log = logging.getLogger("hctserver")


class Task:
    """One thread of a group."""

    def __init__(
        self,
        group: TaskGroup,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        on_stop: Callable[[], None] | None,
        ends_group: bool,
    ) -> None:
        self.group = group
        self.name = name
        self.on_stop = on_stop
        self.ends_group = ends_group
        self.done = threading.Event()
        self._fn = fn
        self._args = args
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._fn(*self._args)
        except BaseException as e:
            self.group.fail(e, self.name)
        finally:
            self.done.set()
            self.group.ended(self)

    def join(self, timeout: float | None) -> bool:
        """Wait for the thread; False if it is still running."""
        if self.thread is threading.current_thread():
            return False
        self.thread.join(timeout)
        return not self.thread.is_alive()


class TaskGroup:
    """Starts, stops and joins the threads of one node."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._tasks: list[Task] = []

    def spawn(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        on_stop: Callable[[], None] | None = None,
        ends_group: bool = False,
    ) -> Task:
        """Run ``fn(*args)`` in a new thread. ``on_stop`` unblocks it when the
        group stops; with ``ends_group`` its return stops the group."""
        task = Task(self, name, fn, args, on_stop, ends_group)
        with self._lock:
            self._tasks.append(task)
            stopped = self.stopping.is_set()
        task.thread.start()
        if stopped and on_stop is not None:
            _call(on_stop, name)
        return task

    def fail(self, exc: BaseException, where: str) -> None:
        """Record ``exc`` if it is the first error, then stop the group.
        Errors after the stop began are consequences of stopping: logged only."""
        with self._lock:
            first = self.error is None and not self.stopping.is_set()
            if first:
                self.error = exc
        if first:
            _log_first(exc, where)
        else:
            log.debug("%s ended with %r while stopping", where, exc)
        self.stop()

    def ended(self, task: Task) -> None:
        with self._lock:
            if task in self._tasks:
                self._tasks.remove(task)
            self._changed.notify_all()
        if task.ends_group:
            self.stop()

    def stop(self) -> None:
        """Set the stop signal and unblock every task (newest first)."""
        with self._lock:
            if self.stopping.is_set():
                return
            self.stopping.set()
            tasks = list(self._tasks)
            self._changed.notify_all()
        for task in reversed(tasks):
            if task.on_stop is not None:
                _call(task.on_stop, task.name)

    def tasks(self) -> list[Task]:
        with self._lock:
            return list(self._tasks)

    def wait(self, tasks: list[Task], timeout: float | None = None) -> bool:
        """Wait until every task in ``tasks`` has ended or the group stops.
        Returns False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not self.stopping.is_set() and not all(t.done.is_set() for t in tasks):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def join(self, timeout: float) -> list[str]:
        """Stop, then wait for every task, newest first, all within ``timeout``
        seconds. Returns the names of tasks still running after it."""
        self.stop()
        deadline = time.monotonic() + timeout
        late = []
        for task in reversed(self.tasks()):
            if not task.join(max(0.0, deadline - time.monotonic())):
                late.append(task.name)
        if late:
            log.warning("%s: still running after %.1f s: %s", self.name, timeout, ", ".join(late))
        return late

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def _log_first(exc: BaseException, where: str) -> None:
    """Log a group's first error so that the user sees it once.

    A typed error (:class:`HctError`) is the owner's to report: ``wait``
    raises it and the CLI prints it as one line (docs/CLI.md). Logging it
    here too printed it twice, with a traceback of our own code that tells
    an operator nothing (a hostile leader's garbage, say): so DEBUG only.
    Two kinds keep an ERROR line with a traceback at once: a job's failure
    (the bug is in the workload's code, and its traceback is the clue:
    docs/CLI.md promises it) and an untyped exception (a bug of ours)."""
    if isinstance(exc, JobError):
        log.error("%s: %s", where, exc, exc_info=exc.__cause__ or exc)
    elif isinstance(exc, HctError):
        log.debug("%s: %s", where, exc, exc_info=exc)
    else:
        log.error("%s failed", where, exc_info=exc)


def _call(fn: Callable[[], None], name: str) -> None:
    try:
        fn()
    except Exception:
        log.exception("stopping %s", name)
