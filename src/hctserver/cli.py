"""The ``hctserver`` command line. It only calls the public API.

Errors print one line on stderr and exit with the code :data:`EXIT_CODES`
gives their class (docs/CLI.md): 1 verify found a difference / unexpected
error, 2 usage or configuration, 3 database or journal, 4 divergence or
incompatible history, 5 the peer broke the protocol, 6 network (unreachable
or lost leader, port in use), 7 a job failed, 8 a write bypassed the
journal, 9 verify: one database is behind the other, 130 interrupted.
``leader`` and ``follower`` stop cleanly on SIGTERM or Ctrl-C and exit 0.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import apsw

from . import __version__
from .cluster import ClusterNode, cluster_status
from .errors import (
    AddressInUseError,
    ApplyError,
    AuthError,
    BusyError,
    CommitUnknownError,
    ConfigError,
    DatabaseInUseError,
    DiskFullError,
    DivergenceError,
    GapError,
    HctError,
    IncompatibleError,
    JobError,
    JournalError,
    ModeError,
    NotReplicationDatabaseError,
    PeerError,
    ProtocolError,
    TransientError,
    UnjournaledWriteError,
    UnsupportedStatementError,
)
from .etcd import EtcdClient
from .follower import Follower
from .jobs import Job
from .journal import Database
from .leader import Leader
from .logs import FORMATS, LEVELS
from .logs import configure as configure_logging
from .node import Node
from .retention import RetentionPolicy
from .security import HttpSecurity, Security, read_secret
from .snapshot import describe
from .snapshot import make as backup
from .systables import FORMATS as ENTRY_FORMATS
from .top import read_status, run_top
from .verify import Behind, compare

# First match wins: TruncatedMessageError is both a ProtocolError and transient.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (DiskFullError, 10),
    (apsw.FullError, 10),
    (ConfigError, 2),
    (AuthError, 11),
    (JobError, 7),
    (UnjournaledWriteError, 8),
    (IncompatibleError, 4),
    (GapError, 4),
    (DivergenceError, 4),
    (ApplyError, 4),
    (TransientError, 6),
    (ProtocolError, 5),
    (PeerError, 6),
    (AddressInUseError, 6),
    (NotReplicationDatabaseError, 3),
    (DatabaseInUseError, 3),
    (ModeError, 3),
    (CommitUnknownError, 3),
    (BusyError, 3),
    (UnsupportedStatementError, 3),
    (JournalError, 3),
)
VERIFY_DIFFERENT = 1
VERIFY_BEHIND = 9


def exit_code(e: BaseException) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(e, cls):
            return code
    return 1


DEBUG_ENV = "HCTSERVER_DEBUG"
log = logging.getLogger("hctserver")


def defaults_of(cls: type) -> dict[str, Any]:
    return {
        k: p.default
        for k, p in inspect.signature(cls).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {s}")
    return v


def _delay(s: str) -> float:
    v = _positive_float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {s}")
    return v


def _count(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {s}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {s}")
    return v


def _cid(s: str) -> int:
    return _count(s)


_UNITS = {"k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30,
          "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}  # fmt: skip


def _size(s: str) -> int:
    """A count or a size, >= 0, with an optional unit (K, M, G, T; or KiB, ...)."""
    text = s.strip().lower().replace("_", "").replace(",", "")
    num = text.rstrip("kmgtib")
    unit = text[len(num) :]
    try:
        v = float(num) * (_UNITS[unit] if unit else 1)
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a number or a size (like 256M): {s}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {s}")
    return int(v)


# Resource bounds (docs/SECURITY.md): flag -> (keyword of Leader/Follower, type, what)
LEADER_BOUNDS = {
    "--max-connections": ("max_connections", _count, "requests served at once"),
    "--max-syncs": ("max_syncs", _count, "SYNC replies streamed at once"),
    "--max-subscribers": ("max_subscribers", _count, "subscribers per stream"),
    "--sub-buffer-bytes": ("sub_buffer_bytes", _count, "bytes queued per subscriber"),
    "--sub-stall-timeout": ("sub_stall_timeout", _delay, "seconds a subscriber may take nothing"),
    "--request-timeout": ("request_timeout", _delay, "seconds to send a whole request"),
    "--send-timeout": ("send_timeout", _delay, "seconds one reply chunk may wait"),
    "--max-snapshots": ("max_snapshots", _count, "snapshots built or sent at once"),
}
FOLLOWER_BOUNDS = {
    "--max-entry-bytes": ("max_size", _count, "largest entry accepted"),
    "--max-streams": ("max_streams", _count, "most streams a leader may announce"),
    "--queue-bytes": ("queue_bytes", _count, "bytes received and held before applying"),
    "--io-timeout": ("io_timeout", _delay, "seconds without a whole entry before giving up"),
    "--connect-timeout": ("connect_timeout", _delay, "seconds to connect"),
    "--max-snapshot-bytes": ("max_snapshot_bytes", _count, "largest snapshot accepted"),
}
# Journal retention: flag -> (RetentionPolicy field, type, what)
RETENTION = {
    "--retain-cids": ("cids", _size, "keep at most N entries, 0: no such limit"),
    "--retain-bytes": ("bytes", _size, "keep at most N bytes of entries, 0: no such limit"),
    "--retain-seconds": ("seconds", _positive_float, "keep no entry older, 0: no such limit"),
    "--retain-max-bytes": (
        "max_bytes",
        _size,
        "hard cap: past it, truncate even what a connected follower needs (0: none)",
    ),
}


def _bounds(s: argparse.ArgumentParser, bounds: dict[str, Any], defaults: dict[str, Any]) -> None:
    for flag, (key, kind, what) in bounds.items():
        s.add_argument(
            flag,
            type=kind,
            default=None,
            dest=key,
            metavar="N" if kind is _count else "S",
            help=f"{what} (default {defaults[key]:,})",
        )


def _retention(s: argparse.ArgumentParser) -> None:
    policy = defaults_of(RetentionPolicy)
    for flag, (key, kind, what) in RETENTION.items():
        s.add_argument(
            flag,
            type=kind,
            default=policy[key],
            dest=f"retain_{key}",
            metavar="S" if kind is _positive_float else "N",
            help=f"journal retention: {what} (default {policy[key]:,})",
        )


def _sync_opts(s: argparse.ArgumentParser) -> None:
    """Synchronous commit (docs/FAILOVER.md)."""
    g = s.add_argument_group("synchronous commit (docs/FAILOVER.md)")
    g.add_argument(
        "--sync-followers",
        type=_count,
        default=0,
        metavar="K",
        help="a commit returns only once K followers acknowledged it (default 0: asynchronous)",
    )
    g.add_argument(
        "--sync-timeout",
        type=_delay,
        default=None,
        metavar="S",
        help="after S seconds without K acknowledgements, commit asynchronously (said in the"
        " log, /status and /metrics) until K followers catch up (default: wait as long as"
        " it takes)",
    )
    g.add_argument(
        "--sync-level",
        choices=("durable", "applied"),
        default="durable",
        help="what a follower acknowledges: applied and on disk (durable, the default), or"
        " applied (survives the follower process, not its machine)",
    )


def _security_opts(s: argparse.ArgumentParser, leader: bool) -> None:
    """TLS and the shared secret (docs/SECURITY.md)."""
    g = s.add_argument_group("security (docs/SECURITY.md)")
    g.add_argument(
        "--auth-file",
        metavar="FILE",
        help="a shared secret (16+ bytes, mode 600) that "
        + ("every follower must prove it holds" if leader else "the leader and this follower")
        + " prove to each other (never sent)",
    )
    g.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="this leader's certificate chain: serve TLS only"
        if leader
        else "this follower's client certificate (for a leader with --tls-client-ca)",
    )
    g.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    if leader:
        g.add_argument(
            "--tls-client-ca",
            metavar="PEM",
            help="mutual TLS: every follower must show a certificate signed by this CA",
        )
    else:
        g.add_argument(
            "--tls-ca",
            metavar="PEM",
            help="speak TLS, and verify the leader's certificate against this CA"
            " ('system': the platform's trusted CAs)",
        )
        g.add_argument(
            "--tls-server-name",
            metavar="NAME",
            help="the name the leader's certificate must hold (default: --host)",
        )
    g.add_argument("--http-tls-cert", metavar="PEM", help="serve --http over TLS (https)")
    g.add_argument("--http-tls-key", metavar="PEM", help="the private key of --http-tls-cert")
    g.add_argument(
        "--http-token-file",
        metavar="FILE",
        help="/status and /metrics require this bearer token (16+ bytes, mode 600);"
        " /health stays open",
    )


def _client_opts(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--token-file", metavar="FILE", help="the node's bearer token (its --http-token-file)"
    )
    s.add_argument("--ca", metavar="PEM", help="the CA of an https node's certificate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hctserver",
        description="Leader/follower replication for SQLite (the hctree hct_testserver).",
    )
    p.add_argument("--version", action="version", version=f"hctserver {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("init", help="create or adopt a replication-enabled database")
    s.add_argument("db", metavar="DB")
    s.add_argument(
        "--format",
        choices=ENTRY_FORMATS,
        default=None,
        help="the format of the entries this database's leader writes: session (default)"
        " or hctree (the original C nodes'; a new, empty database only)",
    )
    s.add_argument(
        "--sql",
        action="append",
        default=[],
        metavar="SQL",
        help="run SQL as one journaled transaction (repeatable)",
    )

    def node_opts(s: argparse.ArgumentParser, leader: bool) -> None:
        s.add_argument("db", metavar="DB")
        s.add_argument(
            "--host",
            default="127.0.0.1",
            help="interface to listen on" if leader else "the leader's address",
        )
        s.add_argument(
            "--port",
            type=int,
            default=21212,
            help="port to listen on (0: any free port)" if leader else "the leader's port",
        )
        s.add_argument(
            "--seconds",
            type=_positive_float,
            default=0,
            help="after this many seconds the jobs' timeout() turns true (0: never)",
        )
        s.add_argument(
            "--job",
            action="append",
            default=[],
            metavar="JOB",
            help="a Python script (globals db, timeout) or a bundled job:"
            " writer, monitor, snapshot (repeatable)",
        )
        s.add_argument(
            "--http",
            metavar="ADDR",
            help="serve /status, /metrics and /health on HOST:PORT (PORT alone: loopback)",
        )
        s.add_argument(
            "--health-max-lag",
            type=_delay,
            default=10.0,
            metavar="S",
            help="a follower lagging more than S seconds is unhealthy (default 10)",
        )
        s.add_argument(
            "--log-level",
            choices=LEVELS,
            default="info",
            help="least severe log lines printed on stderr (default info)",
        )
        s.add_argument(
            "--log-format", choices=FORMATS, default="text", help="text (default) or json lines"
        )
        s.add_argument(
            "--verbose",
            action="store_true",
            help="also print the original's hct_testserver debug lines (stdout)",
        )
        s.add_argument("--quiet", action="store_true", help="print nothing but errors")
        s.add_argument(
            "--synchronous",
            choices=("NORMAL", "FULL", "EXTRA"),
            default="NORMAL",
            help="SQLite's synchronous setting for the database: NORMAL (the default: a commit"
            " survives the process, and is on disk at the next checkpoint) or FULL (on disk"
            " at once)",
        )
        _security_opts(s, leader)

    s = sub.add_parser("leader", help="serve a database to followers (until stopped)")
    node_opts(s, True)
    _bounds(s, LEADER_BOUNDS, defaults_of(Leader))
    _retention(s)
    s.add_argument(
        "--no-snapshots",
        action="store_true",
        help="send followers no snapshots (they replay the journal, or are refused)",
    )
    _sync_opts(s)
    s = sub.add_parser(
        "node", help="a member of an etcd-coordinated cluster: leads or follows (docs/FAILOVER.md)"
    )
    s.add_argument("db", metavar="DB")
    s.add_argument("--etcd", required=True, metavar="URL", help="etcd's address (http://HOST:PORT)")
    s.add_argument("--name", required=True, help="this node's name, unique in the cluster")
    s.add_argument("--port", type=int, required=True, help="port to serve on while leading")
    s.add_argument("--host", default="127.0.0.1", help="interface to serve on (default 127.0.0.1)")
    s.add_argument(
        "--advertise", metavar="HOST:PORT", help="the address followers use (default HOST:PORT)"
    )
    s.add_argument("--cluster", default="default", help="the cluster's name in etcd")
    s.add_argument(
        "--http", metavar="ADDR", help="serve /status, /metrics and /health on HOST:PORT or PORT"
    )
    s.add_argument(
        "--ttl", type=int, default=5, metavar="S", help="the leader lease's TTL (default 5 s)"
    )
    s.add_argument(
        "--job",
        action="append",
        default=[],
        metavar="J",
        help="a job run while this node leads: a Python script or a bundled job (repeatable)",
    )
    s.add_argument("--log-level", choices=LEVELS, default="info", help="(default info)")
    s.add_argument("--log-format", choices=FORMATS, default="text", help="text or json lines")
    s.add_argument("--verbose", action="store_true", help="also print the original's debug lines")
    s.add_argument("--quiet", action="store_true", help="print nothing but errors")
    s.add_argument(
        "--synchronous", choices=("NORMAL", "FULL", "EXTRA"), default="NORMAL",
        help="SQLite's synchronous setting (see the leader)",
    )  # fmt: skip
    _sync_opts(s)
    s = sub.add_parser("cluster", help="an etcd-coordinated cluster: status")
    csub = s.add_subparsers(dest="cluster_command", metavar="WHAT", required=True)
    c = csub.add_parser("status", help="every node: role, position, lag, health")
    c.add_argument("--etcd", required=True, metavar="URL", help="etcd's address")
    c.add_argument("--cluster", default="default", help="the cluster's name in etcd")
    c.add_argument("--json", action="store_true", help="a JSON array of objects")
    s = sub.add_parser("follower", help="follow a leader (until stopped)")
    node_opts(s, False)
    _bounds(s, FOLLOWER_BOUNDS, defaults_of(Follower))
    _retention(s)
    s.add_argument(
        "--once",
        action="store_true",
        help="end when the leader ends its run (the original's behaviour) instead of reconnecting",
    )
    s.add_argument(
        "--retry-max",
        type=_delay,
        default=5.0,
        metavar="S",
        help="longest wait between reconnection attempts, in seconds (default 5)",
    )
    s.add_argument(
        "--syncthreads",
        type=int,
        default=1,
        metavar="N",
        help="threads processing sync replies, 1 to 16",
    )
    s.add_argument(
        "--syncbytes",
        type=int,
        default=0,
        metavar="B",
        help="repeat SYNC while replies shrink and stay above B bytes",
    )
    s.add_argument(
        "--reseed",
        action="store_true",
        help="if this database's history differs from the leader's, keep a copy of it"
        " beside it and start again from a snapshot of the leader",
    )
    s.add_argument(
        "--no-bootstrap",
        action="store_true",
        help="never install a snapshot from the leader (only replay its journal)",
    )
    s.add_argument(
        "--bootstrap-min",
        type=_size,
        default=10_000,
        metavar="N",
        help="an empty follower bootstraps from a snapshot when the leader's journal holds"
        " more than N entries (default 10,000); otherwise it replays",
    )

    s = sub.add_parser(
        "backup", help="write a consistent snapshot of a database (a replication database)"
    )
    s.add_argument("db", metavar="DB")
    s.add_argument("out", metavar="OUT", help="the snapshot file to write (replaced)")
    s.add_argument("--json", action="store_true", help="print the result as JSON")

    s = sub.add_parser(
        "status", help="show a database's replication state, or a running node's (URL)"
    )
    s.add_argument(
        "db",
        metavar="DB|URL",
        help="a database file, or a running node's HTTP address (http://HOST:PORT)",
    )
    s.add_argument("--json", action="store_true", help="print JSON")
    _client_opts(s)

    s = sub.add_parser("top", help="a live view of running nodes (their --http addresses)")
    s.add_argument("urls", metavar="URL", nargs="+", help="http://HOST:PORT of each node")
    s.add_argument(
        "--interval", type=_delay, default=1.0, metavar="S", help="refresh every S seconds"
    )
    s.add_argument(
        "--count", type=int, default=0, metavar="N", help="stop after N refreshes (0: Ctrl-C)"
    )
    _client_opts(s)

    s = sub.add_parser("verify", help="check that two databases are identical")
    s.add_argument("db1", metavar="DB1")
    s.add_argument("db2", metavar="DB2", nargs="?")
    s.add_argument(
        "--journal",
        action="store_true",
        help="recompute every journal hash and the chain (of DB1 alone, or of both)",
    )

    s = sub.add_parser("rollback", help="discard journal entries above the first hole")
    s.add_argument("db", metavar="DB")

    s = sub.add_parser("truncate", help="drop journal entries below a cid into the baseline")
    s.add_argument("db", metavar="DB")
    s.add_argument(
        "--min-cid", type=_cid, required=True, metavar="C", help="keep entries with cid >= C"
    )

    s = sub.add_parser("demo", help="a leader, six writers and followers, live")
    s.add_argument("--seconds", type=_positive_float, default=10.0)
    s.add_argument("--followers", type=int, default=2, metavar="N")
    s.add_argument("--plot", metavar="FILE.png", help="draw follower lag over time")

    s = sub.add_parser("bench", help="measure commit rates, catch-up and lag")
    s.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    s.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    s.add_argument(
        "--entries",
        type=int,
        metavar="N",
        help="journal entries for the catch-up and handshake runs (default 500,000;"
        " 30,000 with --quick)",
    )
    return p


# --- commands ---------------------------------------------------------------------


def cmd_init(a: argparse.Namespace) -> int:
    db = Database(a.db, format=a.format)
    db.set_mode("leader")
    conn = db.connect()
    try:
        for sql in a.sql:
            conn.execute("BEGIN")
            try:
                conn.execute(sql)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
    finally:
        conn.close()
    st = db.status()
    print(
        f"{a.db}: replication database at cid {st['snapshot']} ({st['journal_entries']}"
        " journal entries)"
    )
    return 0


def _logging(a: argparse.Namespace) -> None:
    level = "error" if a.quiet else a.log_level
    configure_logging(level, a.log_format, trace=a.verbose)


def _node(a: argparse.Namespace, follower: bool) -> Node:
    opts: dict[str, Any] = {
        "port": a.port,
        "host": a.host,
        "seconds": a.seconds,
        "follower": follower,
        "http": a.http,
        "health_max_lag": a.health_max_lag,
        "synchronous": a.synchronous,
    }
    if follower:
        opts.update(syncthreads=a.syncthreads, syncbytes=a.syncbytes, once=a.once)
    opts["security"] = Security(
        cert=a.tls_cert,
        key=a.tls_key,
        ca=getattr(a, "tls_ca", None),
        client_ca=getattr(a, "tls_client_ca", None),
        server_name=getattr(a, "tls_server_name", None),
        auth_file=a.auth_file,
    )
    opts["http_security"] = HttpSecurity(a.http_tls_cert, a.http_tls_key, a.http_token_file)
    if a.http is None and (a.http_tls_cert or a.http_token_file):
        raise ConfigError("--http-tls-cert and --http-token-file need --http")
    # a leader serves an existing replication database (`hctserver init` makes one)
    node = Node(a.db, init=follower, **opts)
    bounds = FOLLOWER_BOUNDS if follower else LEADER_BOUNDS
    for key, _, _ in bounds.values():
        if getattr(a, key) is not None:
            node.extra[key] = getattr(a, key)
    if follower:
        node.extra["retry_max"] = a.retry_max
        node.extra["reseed"] = a.reseed
        node.extra["bootstrap"] = not a.no_bootstrap
        node.extra["bootstrap_min"] = a.bootstrap_min
    else:
        node.extra["snapshots"] = not a.no_snapshots
        node.extra["sync_followers"] = a.sync_followers
        node.extra["sync_timeout"] = a.sync_timeout
        node.extra["sync_level"] = a.sync_level
    node.extra["retention"] = RetentionPolicy(
        **{key: getattr(a, f"retain_{key}") for key, _, _ in RETENTION.values()}
    )
    for j in a.job:
        node.job(j)
    return node


class _Signals:
    """SIGTERM and SIGINT stop the node cleanly (from a thread of their own:
    a handler runs between two bytecodes of the main thread, which may hold
    a lock the stop needs)."""

    def __init__(self, node: Node | ClusterNode) -> None:
        self.node = node
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name
        threading.Thread(target=self.node.stop, name="hct-signal", daemon=True).start()

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _serve(node: Node, a: argparse.Namespace, role: str) -> int:
    """Start ``node``, wait until it ends or a signal stops it, close it."""
    with _Signals(node) as sig:
        try:
            node.start()
            log.info("%s", _banner(node, a, role))
            if role == "follower" and not a.quiet and sys.stderr.isatty():
                _progress(node)
            node.wait()
            cid = node.db.snapshot()
        finally:
            node.close()
    how = f"stopped by {sig.received}" if sig.received else "done"
    log.info("%s %s at cid %d", role, how, cid)
    return 0


def _banner(node: Node, a: argparse.Namespace, role: str) -> str:
    http = f"; HTTP on {node.http_url}" if node.http_url else ""
    if role == "follower":
        mode = "until it ends its run" if a.once else "until stopped"
        return f"follower of {a.host}:{node.port} ({mode}){http}"
    if node.jobs:
        return f"leader on {a.host}:{node.port} running {len(node.jobs)} jobs{http}"
    until = f"for {a.seconds:g} s" if a.seconds else "until stopped"
    return f"leader on {a.host}:{node.port} serving {until}{http}"


def cmd_leader(a: argparse.Namespace) -> int:
    _logging(a)
    return _serve(_node(a, False), a, "leader")


def cmd_node(a: argparse.Namespace) -> int:
    _logging(a)
    etcd = EtcdClient(a.etcd)
    db = Database(a.db, adopt=False, synchronous=a.synchronous)
    leader_options: dict[str, Any] = {
        "sync_followers": a.sync_followers,
        "sync_timeout": a.sync_timeout,
        "sync_level": a.sync_level,
    }
    node = ClusterNode(
        db,
        etcd,
        name=a.name,
        port=a.port,
        host=a.host,
        advertise=a.advertise,
        cluster=a.cluster,
        ttl=a.ttl,
        jobs=[Job(j) for j in a.job],
        leader_options=leader_options,
    )
    with _Signals(node) as sig:
        try:
            node.start()
            http = f"; HTTP on {node.serve_http(a.http).url}" if a.http else ""
            log.info("node %s of cluster %s (etcd %s)%s", a.name, a.cluster, etcd.url, http)
            node.wait()
        finally:
            node.stop()
            node.wait(30)
            node.close_http()
            cid = db.snapshot()
            db.close()
    how = f"stopped by {sig.received}" if sig.received else "done"
    log.info("node %s %s at cid %d", a.name, how, cid)
    return 0


def cmd_cluster(a: argparse.Namespace) -> int:
    rows = cluster_status(EtcdClient(a.etcd), a.cluster)
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no node of cluster {a.cluster} is registered in etcd")
        return 1
    for r in rows:
        health = "healthy" if r["healthy"] else "unhealthy"
        print(
            f"{r['name']:<16} {r['role']:<9} {r['address']:<22} cid {r['snapshot']:>10,}"
            f"  lag {r['lag_cids']:>8,} cids  {r['state']}, {health}"
        )
    return 0


def cmd_follower(a: argparse.Namespace) -> int:
    _logging(a)
    return _serve(_node(a, True), a, "follower")


def _progress(node: Node) -> None:
    """Show catch-up progress on the terminal until the follower streams."""
    from rich.console import Console
    from rich.live import Live

    console = Console(stderr=True, highlight=False)
    doc = node.status()
    with Live(console=console, transient=True, refresh_per_second=8) as live:
        while doc["state"] in ("connecting", "catching up") and not node.wait(0.125):
            doc = node.status()
            c = doc["catchup"]
            total = f"/{c['total']:,}" if c["total"] is not None else ""
            eta = f", ETA {c['eta_s']:,.0f} s" if c["eta_s"] is not None else ""
            live.update(
                f"catching up: {c['done']:,}{total} entries, {c['rate_per_s']:,.0f} entries/s{eta},"
                f" applied up to cid {doc['snapshot']:,}"
            )
    c = doc["catchup"]
    if doc["state"] == "streaming" and c["seconds"] is not None:
        console.print(f"caught up: {c['done']:,} entries in {c['seconds']:.1f} s; streaming")


def cmd_status(a: argparse.Namespace) -> int:
    if "://" in a.db:
        doc = read_status(a.db, 5.0, _token(a), a.ca)
        if a.json:
            print(json.dumps(doc, indent=2))
        else:
            _print_flat(doc)
        return 0
    db = Database(a.db, init=False)
    st = db.status()
    st.pop("mode")  # a property of a running node, not of the file
    if a.json:
        print(json.dumps(st, indent=2))
        return 0
    _print_flat(st)
    return 0


def _print_flat(doc: dict[str, Any], prefix: str = "") -> None:
    """``key  value`` lines; nested documents as ``outer.inner``, lists of
    documents one per line."""
    rows: list[tuple[str, str]] = []

    def walk(d: dict[str, Any], pre: str) -> None:
        for k, v in d.items():
            key = f"{pre}{k.replace('_', ' ')}"
            if isinstance(v, dict):
                walk(v, f"{key}.")
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for i, item in enumerate(v):
                    walk(item, f"{key}[{i}].")
            elif isinstance(v, list):
                rows.append((key, ", ".join(str(x) for x in v) or "-"))
            else:
                rows.append((key, "-" if v is None else str(v)))

    walk(doc, prefix)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def cmd_top(a: argparse.Namespace) -> int:
    if a.count < 0:
        raise ConfigError("--count must be 0 (until Ctrl-C) or more")
    return run_top(a.urls, a.interval, a.count, _token(a), a.ca)


def _token(a: argparse.Namespace) -> bytes | None:
    return None if a.token_file is None else read_secret(a.token_file, "--token-file")


def cmd_verify(a: argparse.Namespace) -> int:
    if a.db2 is None and not a.journal:
        raise ConfigError("verify needs two databases, or --journal and one")
    if a.journal:
        for path in (a.db1, a.db2):
            if path is None:
                continue
            db = Database(path, init=False)
            try:
                broken, n = db.check_journal(), db.journal_stats()[0]
            finally:
                db.close()
            if broken is not None:
                print(f"broken journal: {path}: {broken}")
                return VERIFY_DIFFERENT
            print(f"journal intact: {path} ({n:,} entries)")
        if a.db2 is None:
            return 0
    diff = compare(a.db1, a.db2)
    if diff is None:
        print(f"identical: {a.db1} and {a.db2} (cid {Database(a.db1, init=False).snapshot()})")
        return 0
    if isinstance(diff, Behind):
        print(f"behind: {diff}")
        return VERIFY_BEHIND
    print(f"different: {diff}")
    return VERIFY_DIFFERENT


def cmd_rollback(a: argparse.Namespace) -> int:
    n = Database(a.db, init=False).rollback()
    print(f"{a.db}: discarded {n} journal entries above the first hole")
    return 0


def cmd_truncate(a: argparse.Namespace) -> int:
    db = Database(a.db, init=False)
    n = db.truncate(a.min_cid)
    print(f"{a.db}: removed {n} journal entries; baseline at cid {db.baseline()[0]}")
    return 0


def cmd_backup(a: argparse.Namespace) -> int:
    db = Database(a.db, init=False)
    try:
        info = backup(db, a.out)
    finally:
        db.close()
    if a.json:
        print(json.dumps({"path": os.path.abspath(a.out), **describe(info)}))
    else:
        print(
            f"{a.out}: a snapshot of {a.db} at cid {info.cid} ({info.size:,} bytes,"
            f" {info.rows:,} rows in {info.tables} tables); seed a follower with it:"
            f" hctserver follower {a.out} --host LEADER"
        )
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    if a.followers < 1:
        raise ConfigError("--followers must be at least 1")
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--plot needs matplotlib: pip install 'hctserver[plot]' (or matplotlib)"
            ) from None
    return run_demo(seconds=a.seconds, followers=a.followers, plot=a.plot)


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import run_bench

    if a.entries is not None and a.entries < 1000:
        raise ConfigError("--entries must be at least 1000")
    return run_bench(quick=a.quick, json_path=a.json, entries=a.entries)


COMMANDS = {
    "init": cmd_init,
    "leader": cmd_leader,
    "follower": cmd_follower,
    "node": cmd_node,
    "cluster": cmd_cluster,
    "status": cmd_status,
    "top": cmd_top,
    "verify": cmd_verify,
    "rollback": cmd_rollback,
    "truncate": cmd_truncate,
    "backup": cmd_backup,
    "demo": cmd_demo,
    "bench": cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except HctError as e:
        print(f"hctserver: error: {e}", file=sys.stderr)
        return exit_code(e)
    except apsw.Error as e:
        print(f"hctserver: error: SQLite: {e}", file=sys.stderr)
        return 10 if isinstance(e, apsw.FullError) else 3
    except KeyboardInterrupt:
        print("hctserver: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get(DEBUG_ENV):
            raise
        print(
            f"hctserver: internal error: {type(e).__name__}: {e} (set {DEBUG_ENV}=1 for a"
            " traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        _quiet_exit()


def _quiet_exit() -> None:
    # daemon threads (streams, jobs) may still be winding down; nothing to wait for
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join(5)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
