"""The original's Tcl object as a Python class.

=====================================  ==========================================
Tcl (``hct_testserver``)               Python (``hctserver.node.Node``)
=====================================  ==========================================
``hct_testserver srv DBFILE ?OPTS?``   ``srv = Node(DBFILE, **opts)``
``srv configure -port 0 -seconds 5``   ``srv.configure(port=0, seconds=5)``
``srv job {script}``                   ``srv.job(fn)``, ``srv.job("script.py")``,
                                       ``srv.job("writer")``
``srv run``                            ``srv.run()`` (or ``start()`` + ``wait()``)
``srv delete``                         ``srv.close()``
``hct_testserver_timeout`` (in a job)  ``timeout()`` (global of a job)
``db eval {SQL}`` (in a job)           ``db.execute(SQL)`` (global of a job)
=====================================  ==========================================

Options: ``port`` (21212), ``host`` ("127.0.0.1"), ``seconds`` (0 = never),
``follower`` (False), ``syncthreads`` (1, from 1 to 16), ``syncbytes`` (0),
and ours: ``once`` (False: a follower runs until stopped, reconnecting when
it loses its leader; True: the original's run, which ends with the leader's),
``http`` (None; ``"HOST:PORT"`` or ``"PORT"`` serves ``/status``, ``/metrics``
and ``/health`` there, loopback by default) and ``health_max_lag`` (10 s: a
follower lagging more is unhealthy), ``security``
(:class:`~hctserver.security.Security`: TLS and a shared secret on the
replication port) and ``http_security``
(:class:`~hctserver.security.HttpSecurity`: TLS and a bearer token for the
HTTP endpoint).
"""

from __future__ import annotations

import os
from typing import Any

from .errors import ConfigError
from .follower import Follower
from .httpserver import HttpEndpoint, Routes, parse_address
from .jobs import Job, JobFunction
from .journal import Database
from .leader import Leader
from .metrics import Metrics
from .security import HttpSecurity, Security
from .status import HEALTH_MAX_LAG, follower_lag, health, node_status
from .trace import Trace

DEFAULTS: dict[str, Any] = {
    "port": 21212,
    "host": "127.0.0.1",
    "seconds": 0,
    "follower": False,
    "syncthreads": 1,
    "syncbytes": 0,
    "once": False,
    "http": None,
    "health_max_lag": HEALTH_MAX_LAG,
    "security": None,
    "http_security": None,
    "synchronous": "NORMAL",
}

_TYPES: dict[str, tuple[type, ...]] = {
    "port": (int,),
    "host": (str,),
    "seconds": (int, float),
    "follower": (bool,),
    "syncthreads": (int,),
    "syncbytes": (int,),
    "once": (bool,),
    "http": (str, type(None)),
    "health_max_lag": (int, float),
    "security": (Security, type(None)),
    "http_security": (HttpSecurity, type(None)),
    "synchronous": (str,),
}


class Node:
    """A leader or follower node for one database file.

    Creating it opens the database (FOLLOWER mode) and rolls back entries
    above the first hole, as the original does.
    """

    def __init__(self, path: str | os.PathLike[str], *, init: bool = True, **options: Any) -> None:
        """``init=False``: the database must exist (a leader's, made by
        ``hctserver init``). A follower never adopts a plain SQLite file that
        holds tables: it would write into it."""
        self.options = dict(DEFAULTS)
        self.configure(**options)
        self.db = Database(
            path,
            init=init,
            adopt=not self.options["follower"],
            synchronous=self.options["synchronous"],
        )
        self.db.rollback()
        self.jobs: list[Job] = []
        self.extra: dict[str, Any] = {}
        self._node: Leader | Follower | None = None
        self._http: HttpEndpoint | None = None

    def configure(self, **options: Any) -> dict[str, Any]:
        """Set options; returns the whole configuration."""
        for name, value in options.items():
            if name not in DEFAULTS:
                raise ConfigError(
                    f"unknown option {name!r}; options are {', '.join(sorted(DEFAULTS))}"
                )
            _check(name, value)
            if name == "synchronous" and hasattr(self, "db") and value != self.db.synchronous:
                raise ConfigError(
                    "synchronous is set when the node is made: Node(path, synchronous=...)"
                )
        self.options.update(options)
        return dict(self.options)

    def job(self, target: JobFunction | str | os.PathLike[str]) -> int:
        """Add a job; returns its number (0, 1, ...)."""
        self.jobs.append(Job(target))
        return len(self.jobs) - 1

    @property
    def port(self) -> int:
        """The port listened on (a leader started with port 0 reports the real one)."""
        if isinstance(self._node, Leader):
            return self._node.port
        return int(self.options["port"])

    @property
    def runner(self) -> Leader | Follower | None:
        return self._node

    def start(self) -> None:
        o = self.options
        trace = Trace()
        if o["follower"]:
            f = Follower(
                self.db,
                host=o["host"],
                port=o["port"],
                syncthreads=o["syncthreads"],
                syncbytes=o["syncbytes"],
                jobs=self.jobs,
                seconds=o["seconds"],
                once=o["once"],
                trace=trace,
                security=o["security"],
                **self.extra,
            )
            self._node = f
            f.start()
        else:
            leader = Leader(
                self.db,
                self.jobs,
                host=o["host"],
                port=o["port"],
                seconds=o["seconds"],
                trace=trace,
                security=o["security"],
                **self.extra,
            )
            self._node = leader
            leader.start()
        if o["http"] is not None:
            self._serve_http(o["http"])

    def _serve_http(self, address: str) -> None:
        runner = self._node
        assert runner is not None
        try:
            self._http = serve_http(
                runner,
                address,
                float(self.options["health_max_lag"]),
                self.options["http_security"],
            )
        except BaseException:
            runner.close()
            raise

    @property
    def http_url(self) -> str | None:
        """The HTTP endpoint's base URL (its real port), if ``http`` is set."""
        return None if self._http is None else self._http.url

    def status(self) -> dict[str, Any]:
        """The running node's ``/status`` document."""
        assert self._node is not None, "start() first"
        return node_status(self._node)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the run to end; raises the node's first error. False if
        ``timeout`` passed first."""
        assert self._node is not None, "start() first"
        return self._node.wait(timeout)

    def run(self) -> None:
        self.start()
        self.wait()

    def stop(self) -> None:
        """Ask the node to stop; safe from any thread (:meth:`wait` then returns)."""
        if self._node is not None:
            self._node.stop()

    @property
    def error(self) -> BaseException | None:
        """The node's first error, if any."""
        return None if self._node is None else self._node.error

    def close(self, timeout: float = 5.0) -> None:
        """Stop the node and close the database. Returns within about
        ``timeout`` seconds, even in the middle of a catch-up; the database
        stays consistent. Errors stay in :attr:`error`."""
        if self._node is not None:
            self._node.close(timeout)
        if self._http is not None:
            self._http.close()
        self.db.close()


def serve_http(
    runner: Leader | Follower,
    address: str,
    health_max_lag: float = HEALTH_MAX_LAG,
    security: HttpSecurity | None = None,
) -> HttpEndpoint:
    """Serve a started leader's or follower's ``/status``, ``/metrics`` and
    ``/health`` on ``address`` (``HOST:PORT`` or ``PORT``), in threads of
    its task group (they stop with it); close the endpoint after the node."""
    host, port = parse_address(address)
    if isinstance(runner, Leader):
        metrics = Metrics(lambda: node_status(runner), "leader")
    else:
        metrics = Metrics(lambda: node_status(runner), "follower", lambda: _streaming_lag(runner))
    routes = Routes(
        lambda: node_status(runner), metrics.render, lambda: health(runner, health_max_lag)
    )
    sec = security or HttpSecurity()
    ep = HttpEndpoint(host, port, routes, tls=sec.tls(), token=sec.token())
    g = runner.group
    g.spawn("hct-http", ep.serve, on_stop=ep.stop)
    if metrics.sampler is not None:
        g.spawn("hct-lag-sampler", metrics.sampler.run, g.stopping)
    return ep


def _streaming_lag(follower: Follower) -> float | None:
    """The follower's lag in seconds while it streams (for the histogram)."""
    state, _, lag_ms, _ = follower_lag(follower)
    return lag_ms / 1000 if state == "streaming" and lag_ms is not None else None


def _check(name: str, value: Any) -> None:
    wrong_bool = isinstance(value, bool) and _TYPES[name] != (bool,)
    if wrong_bool or not isinstance(value, _TYPES[name]):
        raise ConfigError(f"option {name} takes {_TYPES[name][0].__name__}, not {value!r}")
    num = value if isinstance(value, (int, float)) else 0
    if name == "port" and not 0 <= num <= 65535:
        raise ConfigError(f"port must be between 0 and 65535, not {value}")
    if name == "syncthreads" and not 1 <= num <= 16:
        raise ConfigError(f"syncthreads must be between 1 and 16, not {value}")
    if name == "http" and isinstance(value, str):
        parse_address(value)
    if name == "health_max_lag" and not (0 < num < float("inf")):
        raise ConfigError(f"health_max_lag must be a finite number of seconds > 0, not {value}")
    if name in ("seconds", "syncbytes") and not num >= 0:
        raise ConfigError(f"{name} must be >= 0, not {value}")
    if name == "seconds" and num == float("inf"):
        raise ConfigError("seconds must be finite (0 means never)")
    if name == "synchronous" and value not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ConfigError(f"synchronous must be NORMAL, FULL, EXTRA or OFF, not {value!r}")
