"""Seed-style progress lines: ``hct_testserver: tm=<ms>ms <event>``.

Emitted at DEBUG level on the ``hctserver.trace`` logger; ``--verbose``
turns them on.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger("hctserver.trace")


class Trace:
    """Timestamps events relative to the start of a node's run."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def restart(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, fmt: str, *args: Any) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            ms = int((time.monotonic() - self.t0) * 1000)
            logger.debug("hct_testserver: tm=%dms " + fmt, ms, *args)
