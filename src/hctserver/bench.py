"""``hctserver bench`` (see docs/PERFORMANCE.md)."""

from __future__ import annotations

from .errors import ConfigError


def run_bench(quick: bool = False, json_path: str | None = None) -> int:
    raise ConfigError("hctserver bench is not built yet")
