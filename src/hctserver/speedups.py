"""Which implementation of the hot loops runs: compiled or pure Python.

:mod:`hctserver.native` (built from native.c at install time where a C
compiler works) holds compiled twins of a few pure-Python functions in
:mod:`hctserver.position`, :mod:`hctserver.protocol.wire` and
:mod:`hctserver.journal.patchset`. Those modules ask :func:`native` for it once, at
import. ``HCTSERVER_PURE=1`` in the environment forces the pure-Python
versions (as CI does for one full run of the suite).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

ENV = "HCTSERVER_PURE"


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get(ENV, "") not in ("", "0"):
        return None, f"python (forced by {ENV})"
    try:
        mod = importlib.import_module(f"{__package__}.native")  # beside this module, if built
    except ImportError:
        return None, "python (the compiled extension is not built: no C compiler at install)"
    return mod, "native"


_MODULE, IMPLEMENTATION = _load()


def native() -> ModuleType | None:
    """The compiled module, or None when the pure-Python twins run."""
    return _MODULE


def implementation() -> str:
    """``"native"``, or ``"python (why)"``."""
    return IMPLEMENTATION
