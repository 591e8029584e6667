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
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import apsw

from ..cluster.etcd import EtcdClient
from ..cluster.member import ClusterNode, cluster_status
from ..errors import (
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
from ..journal import archive
from ..journal.database import Database
from ..journal.snapshot import describe
from ..journal.snapshot import make as backup
from ..journal.systables import FORMATS as ENTRY_FORMATS
from ..journal.verify import Behind, compare
from ..net.security import read_secret
from ..node import config
from ..node.assemble import seed_from_archive
from ..node.logs import configure as configure_logging
from ..node.nodelock import NodeLock
from ..node.testserver import Node
from ..version import VERSION as __version__
from .top import read_status, run_top

# First match wins: TruncatedMessageError is both a ProtocolError and transient.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (DiskFullError, 10),
    (apsw.FullError, 10),
    (ConfigError, 2),
    (AuthError, 11),
    (JobError, 7),
    (UnjournaledWriteError, 8),
    (IncompatibleError, 4),
    (archive.ArchiveMismatchError, 4),
    (archive.ArchiveError, 3),
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


SECTION_TITLES = {
    "": "the node",
    "security": "security (docs/SECURITY.md)",
    "http": "HTTP endpoint (docs/OPERATIONS.md)",
    "retention": "journal retention (docs/OPERATIONS.md)",
    "log": "logging",
    "leader": "leader: bounds (docs/SECURITY.md), snapshots, synchronous commit (docs/FAILOVER.md)",
    "follower": "follower: bounds (docs/SECURITY.md), reconnection, bootstrap",
    "cluster": "cluster: etcd and this node's place (docs/FAILOVER.md)",
}


def _config_flags(
    s: argparse.ArgumentParser, role: str | None, only: Callable[[str], bool] = bool
) -> None:
    """Every option of ``role`` (all of them for None) as a flag, from the
    one table in :mod:`hctserver.node.config`; a flag not given is left out of
    the namespace, so that a --config file's value stands."""
    s.add_argument(
        "--config", metavar="FILE", help="a TOML file of options (flags override it; docs/CLI.md)"
    )
    groups: dict[str, Any] = {}  # section -> its argument group
    for key, o, _ in config.options():
        if (role is not None and (role not in o.roles or key in ("role", "db"))) or not only(key):
            continue
        section = key.rpartition(".")[0]
        g = groups.get(section) or groups.setdefault(
            section, s.add_argument_group(SECTION_TITLES[section])
        )
        default = config.default_of(key)
        shown = _shown(default)
        kw: dict[str, Any] = {"dest": key, "default": argparse.SUPPRESS, "help": o.help + shown}
        if o.kind == "bool":
            kw.update(action="store_const", const=not o.negate)
        elif o.kind == "list":
            kw.update(action="append", metavar="JOB")
        else:
            kw.update(metavar=None if o.choices else _METAVARS.get(o.kind, "X"),
                      choices=o.choices or None)  # fmt: skip
        g.add_argument(config.flag_of(key), **kw)


_METAVARS = {"count": "N", "size": "N", "int": "N", "port": "PORT", "delay": "S", "seconds": "S",
             "path": "FILE", "address": "ADDR", "str": "TEXT"}  # fmt: skip


def _shown(default: Any) -> str:
    if default is None or isinstance(default, (bool, tuple)):
        return ""
    return f" (default {default:,})" if isinstance(default, int) else f" (default {default:g})" if (
        isinstance(default, float)) else f" (default {default})"  # fmt: skip


def _flags(a: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(a).items() if k in _KEYS and v is not None}


def load_config(a: argparse.Namespace, role: str | None) -> config.NodeConfig:
    """The configuration the parsed arguments ``a`` give for ``role``
    (with ``--config`` and ``HCTSERVER_*``)."""
    cfg = config.load(role, _flags(a), a.config)
    if role is not None and cfg.db is None:
        raise ConfigError(f"{role}: give the database file (DB, or db in --config)")
    return cfg


_KEYS = frozenset(k for k, _, _ in config.options())


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

    for role, what in (
        ("leader", "serve a database to followers (until stopped)"),
        ("follower", "follow a leader (until stopped)"),
        ("node", "a member of an etcd-coordinated cluster: leads or follows (docs/FAILOVER.md)"),
    ):
        s = sub.add_parser(role, help=what)
        s.add_argument("db", metavar="DB", nargs="?", help="the database file (or db in --config)")
        _config_flags(s, role)
    s = sub.add_parser(
        "restore", help="rebuild a database at any cid or time the archive holds (docs/ARCHIVE.md)"
    )
    s.add_argument("url", metavar="URL", help="the archive: file:///DIR or s3://BUCKET/PREFIX")
    s.add_argument("db", metavar="DB", help="the database to write (a new file)")
    when = s.add_mutually_exclusive_group()
    when.add_argument("--cid", type=_cid, metavar="N", help="restore to cid N")
    when.add_argument(
        "--time",
        metavar="T",
        help="restore to the last commit at or before T (ISO 8601, or @UNIX-SECONDS)",
    )
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s = sub.add_parser("archive", help="a continuous archive: list, verify, snapshot, prune")
    asub = s.add_subparsers(dest="archive_command", metavar="WHAT", required=True)
    c = asub.add_parser("ls", help="the archive's snapshots and its cid and time range")
    c.add_argument("url", metavar="URL")
    c.add_argument("--json", action="store_true", help="print JSON")
    c = asub.add_parser("verify", help="check every object and the whole hash chain")
    c.add_argument("url", metavar="URL")
    c = asub.add_parser("snapshot", help="store a snapshot of DB in the archive now")
    c.add_argument("url", metavar="URL")
    c.add_argument("db", metavar="DB")
    c = asub.add_parser("prune", help="delete what no restore within the kept history needs")
    c.add_argument("url", metavar="URL")
    c.add_argument(
        "--keep", type=_delay, required=True, metavar="S", help="seconds of history to keep"
    )
    c.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    s = sub.add_parser("config", help="show a node's effective configuration")
    csub = s.add_subparsers(dest="config_command", metavar="WHAT", required=True)
    c = csub.add_parser(
        "show", help="print the configuration that --config, HCTSERVER_* and flags give, as TOML"
    )
    _config_flags(c, None)
    s = sub.add_parser("cluster", help="an etcd-coordinated cluster: status")
    csub = s.add_subparsers(dest="cluster_command", metavar="WHAT", required=True)
    c = csub.add_parser("status", help="every node: role, position, lag, health")
    c.add_argument("--json", action="store_true", help="a JSON array of objects")
    _config_flags(c, "node", lambda k: k == "cluster.cluster" or k.startswith("cluster.etcd"))

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
    s.add_argument(
        "--sections",
        metavar="A,B",
        help="run only these sections (leader, followers, pipeline, failover, metrics,"
        " catchup, lag, clients)",
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


def _logging(c: config.LogOptions) -> None:
    configure_logging("error" if c.quiet else c.level, c.format, trace=c.verbose)


def _node(cfg: config.NodeConfig) -> Node:
    assert cfg.db is not None
    # a leader serves an existing replication database (`hctserver init` makes one)
    return Node(cfg.db, init=cfg.role == "follower", config=cfg)


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


def _serve(node: Node, cfg: config.NodeConfig) -> int:
    """Start ``node``, wait until it ends or a signal stops it, close it."""
    role = cfg.role
    with _Signals(node) as sig:
        try:
            node.start()
            log.info("%s", _banner(node, cfg))
            if role == "follower" and not cfg.log.quiet and sys.stderr.isatty():
                _progress(node)
            node.wait()
            cid = node.db.snapshot()
        finally:
            node.close()
    how = f"stopped by {sig.received}" if sig.received else "done"
    log.info("%s %s at cid %d", role, how, cid)
    return 0


def _banner(node: Node, cfg: config.NodeConfig) -> str:
    http = f"; HTTP on {node.http_url}" if node.http_url else ""
    if cfg.role == "follower":
        mode = "until it ends its run" if cfg.follower.once else "until stopped"
        return f"follower of {cfg.host}:{node.port} ({mode}){http}"
    if node.jobs:
        return f"leader on {cfg.host}:{node.port} running {len(node.jobs)} jobs{http}"
    until = f"for {cfg.seconds:g} s" if cfg.seconds else "until stopped"
    return f"leader on {cfg.host}:{node.port} serving {until}{http}"


def cmd_leader(a: argparse.Namespace) -> int:
    cfg = load_config(a, "leader")
    _logging(cfg.log)
    return _serve(_node(cfg), cfg)


def cmd_follower(a: argparse.Namespace) -> int:
    cfg = load_config(a, "follower")
    _logging(cfg.log)
    return _serve(_node(cfg), cfg)


def cmd_node(a: argparse.Namespace) -> int:
    cfg = load_config(a, "node")
    _logging(cfg.log)
    assert cfg.db is not None and cfg.cluster.etcd is not None
    etcd = _etcd(cfg.cluster)
    etcd.check(f"/hctserver/{cfg.cluster.cluster}/")  # TLS and credentials: fail now, once
    if cfg.leader.archive is not None:
        archive.open_store(cfg.leader.archive)  # a bad URL fails now, not once elected
    seed_from_archive(cfg.db, cfg.bootstrap_from)
    db = Database(cfg.db, adopt=False, synchronous=cfg.synchronous)
    node = ClusterNode(db, etcd, cfg)
    name, cluster = cfg.cluster.name, cfg.cluster.cluster
    with _Signals(node) as sig:
        try:
            node.start()
            http = f"; HTTP on {node.http_url}" if node.http_url else ""
            log.info("node %s of cluster %s (etcd %s)%s", name, cluster, etcd.url, http)
            node.wait()
        finally:
            node.close()
            cid = db.snapshot()
            db.close()
    how = f"stopped by {sig.received}" if sig.received else "done"
    log.info("node %s %s at cid %d", name, how, cid)
    return 0


def _etcd(c: config.ClusterOptions) -> EtcdClient:
    assert c.etcd is not None
    return EtcdClient(c.etcd, ca=c.etcd_ca, cert=c.etcd_cert, key=c.etcd_key, user=c.etcd_user,
                      password_file=c.etcd_password_file)  # fmt: skip


def cmd_restore(a: argparse.Namespace) -> int:
    when = None if a.time is None else archive.parse_time(a.time)
    r = archive.restore(a.url, a.db, cid=a.cid, time=when)
    if a.json:
        print(json.dumps({"path": r.path, "cid": r.cid, "hash": r.hash.hex(),
                          "time": archive.show_time(r.time_us), "from": r.anchor,
                          "entries": r.entries}))  # fmt: skip
    else:
        print(
            f"{r.path}: restored at cid {r.cid:,} (committed {archive.show_time(r.time_us)}),"
            f" from {r.anchor} and {r.entries:,} entries, every hash checked"
        )
    return 0


def cmd_archive(a: argparse.Namespace) -> int:
    if a.archive_command == "ls":
        li = archive.ls(a.url)
        doc = {
            "url": li.url,
            "segments": li.segments,
            "ranges": li.ranges,
            "first_time": None if li.first_time_us is None else archive.show_time(li.first_time_us),
            "last_time": None if li.last_time_us is None else archive.show_time(li.last_time_us),
            "snapshots": [{"cid": r.cid, "time": archive.show_time(r.time_us), "name": r.name}
                          for r in li.snapshots],
        }  # fmt: skip
        if a.json:
            print(json.dumps(doc, indent=2))
        else:
            _print_flat(doc)
        return 0
    if a.archive_command == "verify":
        v = archive.verify(a.url)
        runs = ", ".join(f"{lo:,}-{hi:,}" for lo, hi in v.runs) or "none"
        print(f"archive intact: {a.url}: {v.segments} segments, {v.entries:,} entries,"
              f" {v.snapshots} snapshots; chain runs over cids {runs}")  # fmt: skip
        return 0
    if a.archive_command == "snapshot":
        lock = NodeLock(a.db)  # a running leader ships there itself: two archivers would clash
        lock.acquire("archive snapshot")
        lock.release()
        db = Database(a.db, init=False)
        try:
            ref = archive.Archiver(db, archive.open_store(a.url)).snapshot_now()
        finally:
            db.close()
        print(f"{a.url}: snapshot of {a.db} at cid {ref.cid:,} ({ref.name})")
        return 0
    pr = archive.prune(a.url, a.keep, dry_run=a.dry_run)
    verb = "would delete" if a.dry_run else "deleted"
    print(f"{a.url}: {verb} {len(pr.deleted)} objects; oldest snapshot kept: {pr.kept_snapshot}")
    return 0


def cmd_config(a: argparse.Namespace) -> int:
    print(config.dump(load_config(a, None)), end="")
    return 0


def cmd_cluster(a: argparse.Namespace) -> int:
    cfg = config.load(None, _flags(a), a.config, check_roles=False)
    if cfg.cluster.etcd is None:
        raise ConfigError("cluster status needs --etcd URL (or etcd in --config's [cluster])")
    rows = cluster_status(_etcd(cfg.cluster), cfg.cluster.cluster)
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no node of cluster {cfg.cluster.cluster} is registered in etcd")
        return 1
    for r in rows:
        health = "healthy" if r["healthy"] else "unhealthy"
        print(
            f"{r['name']:<16} {r['role']:<9} {r['address']:<22} cid {r['snapshot']:>10,}"
            f"  lag {r['lag_cids']:>8,} cids  {r['state']}, {health}"
        )
    return 0


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
    sections = a.sections.split(",") if a.sections else None
    try:
        return run_bench(quick=a.quick, json_path=a.json, entries=a.entries, sections=sections)
    except ValueError as e:
        raise ConfigError(str(e)) from None


COMMANDS = {
    "init": cmd_init,
    "leader": cmd_leader,
    "follower": cmd_follower,
    "node": cmd_node,
    "config": cmd_config,
    "restore": cmd_restore,
    "archive": cmd_archive,
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
