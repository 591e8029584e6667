"""The node's watchdog: nothing may write behind the journal's back.

Row writes by plain SQLite clients are refused by the guard triggers; what
triggers cannot stop (schema changes, dropped guards) is found here, within
``interval`` seconds, and stops the node with UnjournaledWriteError
(:mod:`hctserver.guard` explains the mechanism and its limits).
"""

from __future__ import annotations

import threading

from .store import Store


def watch(db: Store, stop: threading.Event, interval: float) -> None:
    """Check ``db`` every ``interval`` seconds until ``stop`` is set; raise
    UnjournaledWriteError on a finding."""
    while not stop.wait(interval):
        db.check_unjournaled()
