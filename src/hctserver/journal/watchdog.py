"""The node's watchdog: nothing may write behind the journal's back.

Row writes by plain SQLite clients are refused by the guard triggers; what
triggers cannot stop (schema changes, dropped guards) is found here, within
``interval`` seconds, and stops the node with UnjournaledWriteError
(:mod:`hctserver.journal.guard` explains the mechanism and its limits).
"""

from __future__ import annotations

import logging
import threading

import apsw

from .store import Store

log = logging.getLogger("hctserver")


def watch(db: Store, stop: threading.Event, interval: float) -> None:
    """Check ``db`` every ``interval`` seconds until ``stop`` is set; raise
    UnjournaledWriteError on a finding. A check that cannot run (the file is
    busy, an I/O error) is tried again at the next interval."""
    failed = False
    while not stop.wait(interval):
        try:
            db.check_unjournaled()
        except apsw.Error as e:
            if not failed:
                log.warning("checking %s for unjournaled writes failed (%s); retrying", db.path, e)
            failed = True
            continue
        failed = False
