"""The original's Tcl object as a Python class.

=====================================  ==========================================
Tcl (``hct_testserver``)               Python (``hctserver.node.testserver.Node``)
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
(:class:`~hctserver.net.security.Security`: TLS and a shared secret on the
replication port) and ``http_security``
(:class:`~hctserver.net.security.HttpSecurity`: TLS and a bearer token for the
HTTP endpoint).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ..errors import ConfigError
from ..journal.database import Database
from ..net.httpserver import HttpEndpoint, parse_address
from ..net.security import HttpSecurity, Security
from .assemble import follower_role, leader_role, seed_from_archive, serve_runner_http
from .config import NodeConfig, SecurityOptions
from .follower import Follower
from .jobs import Job, JobFunction
from .leader import Leader
from .status import HEALTH_MAX_LAG, node_status
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

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        init: bool = True,
        config: NodeConfig | None = None,
        **options: Any,
    ) -> None:
        """``init=False``: the database must exist (a leader's, made by
        ``hctserver init``). A follower never adopts a plain SQLite file that
        holds tables: it would write into it. ``config``: every other option
        (the ``hctserver leader``/``follower`` flags); ``options`` override it."""
        self._base = config or NodeConfig()
        self.options = dict(DEFAULTS)
        self.options.update(_options_of(self._base))
        self.configure(**options)
        if self.options["follower"]:
            seed_from_archive(os.fspath(path), self._base.bootstrap_from)
        self.db = Database(
            path,
            init=init,
            adopt=not self.options["follower"],
            synchronous=self.options["synchronous"],
        )
        self.db.rollback()
        self.jobs: list[Job] = [Job(j) for j in self._base.jobs]
        self.extra: dict[str, Any] = {}  # constructor keywords that are not options (tests)
        self._node: Leader | Follower | None = None
        self._http: HttpEndpoint | None = None

    @property
    def config(self) -> NodeConfig:
        """The node's whole configuration, with the options set on it."""
        o, base = self.options, self._base
        sec: Security = o["security"] or Security()
        hs: HttpSecurity = o["http_security"] or HttpSecurity()
        return dataclasses.replace(
            base,
            role="follower" if o["follower"] else "leader",
            host=o["host"],
            port=o["port"],
            seconds=float(o["seconds"]),
            synchronous=o["synchronous"],
            follower=dataclasses.replace(
                base.follower,
                syncthreads=o["syncthreads"],
                syncbytes=o["syncbytes"],
                once=o["once"],
            ),
            http=dataclasses.replace(
                base.http,
                address=o["http"],
                tls_cert=hs.cert,
                tls_key=hs.key,
                token_file=hs.token_file,
                health_max_lag=float(o["health_max_lag"]),
            ),
            security=SecurityOptions(
                sec.auth_file, sec.cert, sec.key, sec.client_ca, sec.ca, sec.server_name
            ),
        )

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
        cfg = self.config
        hooks = {"trace": Trace(), **self.extra}
        if self.options["follower"]:
            self._node = follower_role(self.db, cfg, self.jobs, **hooks)
        else:
            self._node = leader_role(self.db, cfg, self.jobs, **hooks)
        self._node.start()
        if cfg.http.address is not None:
            try:
                self._http = serve_runner_http(self._node, cfg.http)
            except BaseException:
                self._node.close()
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

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the node and close the database. Returns within about
        ``timeout`` seconds, even in the middle of a catch-up; the database
        stays consistent. Errors stay in :attr:`error`."""
        if self._node is not None:
            self._node.close(timeout)
        if self._http is not None:
            self._http.close()
        self.db.close()


def _options_of(cfg: NodeConfig) -> dict[str, Any]:
    """The Tcl-style options a configuration gives."""
    return {
        "port": cfg.port,
        "host": cfg.host,
        "seconds": cfg.seconds,
        "follower": cfg.role == "follower",
        "syncthreads": cfg.follower.syncthreads,
        "syncbytes": cfg.follower.syncbytes,
        "once": cfg.follower.once,
        "http": cfg.http.address,
        "health_max_lag": cfg.http.health_max_lag,
        "security": cfg.security.security() if cfg.security != SecurityOptions() else None,
        "http_security": None if cfg.http.security() == HttpSecurity() else cfg.http.security(),
        "synchronous": cfg.synchronous,
    }


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
