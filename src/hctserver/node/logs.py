"""Log lines an operator can use: a timestamp, a level and the message, as
text or as one JSON object per line (for journald, Loki, Elasticsearch).
docs/OPERATIONS.md says what each line means.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")


def _timestamp(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``2026-11-28T10:00:00.123Z INFO  message``"""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname:<7} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """``{"ts": "...", "level": "info", "logger": "hctserver", "msg": "..."}``"""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "thread": record.threadName,
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure(
    level: str = "info",
    fmt: str = "text",
    trace: bool = False,
    stream: TextIO | None = None,
) -> None:
    """Send hctserver's log to ``stream`` (stderr) at ``level``; ``trace``
    also prints the original's ``hct_testserver: tm=…`` lines on stdout."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    root = logging.getLogger("hctserver")
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(stream or sys.stderr)
    h.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(h)
    root.setLevel(getattr(logging, level.upper()))
    if trace:
        t = logging.getLogger("hctserver.trace")
        th = logging.StreamHandler(sys.stdout)
        th.setFormatter(logging.Formatter("%(message)s"))
        t.addHandler(th)
        t.setLevel(logging.DEBUG)
        t.propagate = False
