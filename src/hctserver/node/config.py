"""A node's configuration: one typed object for every role, however it was given.

:class:`NodeConfig` is a frozen dataclass made of sections (frozen
dataclasses too): what every role shares (``security``, ``http``,
``retention``, ``log``) and what is a role's own (``leader``,
``follower``, ``cluster``). A cluster node runs both roles in turn, so
one shape serves the three commands; ``role`` says which sections apply.

Each option is described once, by its field's metadata (:class:`Opt`): its
flag, help, kind and roles. From that one table come the command-line
flags of ``leader``, ``follower`` and ``node``, the keys of a TOML file
(``--config``; a section per dataclass section), the ``HCTSERVER_*``
environment variables and ``config show``. Values from every source pass
through :func:`coerce`, so a bad one gets the same one-line
:class:`~hctserver.errors.ConfigError` wherever it came from. Precedence:
defaults < file < environment < flags.

Dataclasses rather than pydantic or attrs: the standard library is enough
for frozen, typed records, and the package gains no dependency.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..journal.retention import RetentionPolicy
from ..net.httpserver import parse_address
from ..net.security import HttpSecurity, Security
from .logs import FORMATS, LEVELS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROLES = ("leader", "follower", "node")
LEADS = frozenset({"leader", "node"})
FOLLOWS = frozenset({"follower", "node"})
ALL = frozenset(ROLES)
ENV_PREFIX = "HCTSERVER_"

_UNITS = {"k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30,
          "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}  # fmt: skip


@dataclass(frozen=True)
class Opt:
    """How one option is given: ``kind`` names its parser in :func:`coerce`."""

    help: str
    kind: str
    roles: frozenset[str] = ALL
    flag: str | None = None  # default: --FIELD-NAME
    choices: tuple[str, ...] = ()
    lo: int | None = None
    hi: int | None = None
    negate: bool = False  # a flag that turns the option off (--no-snapshots)
    required: frozenset[str] = frozenset()  # roles that must give it


def opt(default: Any, help: str, kind: str, **how: Any) -> Any:
    return field(default=default, metadata={"opt": Opt(help, kind, **how)})


def _size(text: str) -> float:
    t = text.strip().lower().replace("_", "").replace(",", "")
    num = t.rstrip("kmgtib")
    unit = t[len(num) :]
    return float(num) * (_UNITS[unit] if unit else 1)


def coerce(o: Opt, value: Any, where: str) -> Any:
    """``value`` (text from a flag or the environment, or a TOML value) as
    the option's type; a ConfigError naming ``where`` if it is not one."""

    def bad(want: str) -> ConfigError:
        return ConfigError(f"{where} must be {want}, not {value!r}")

    k = o.kind
    if k == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false",
                                                         "no", "off"):  # fmt: skip
            return value.lower() in ("1", "true", "yes", "on")
        raise bad("true or false")
    if k in ("str", "path", "address", "choice"):
        if not isinstance(value, str) or not value:
            raise bad("a non-empty string")
        if k == "choice" and value not in o.choices:
            raise bad("one of " + ", ".join(o.choices))
        if k == "address":
            parse_address(value)
        return value
    if k == "list":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise bad("a list of strings")
        return tuple(items)
    if isinstance(value, bool):
        raise bad("a number")
    try:
        if isinstance(value, str):
            num = _size(value) if k == "size" else float(value)
        elif isinstance(value, (int, float)):
            num = float(value)
        else:
            raise bad("a number")
    except (ValueError, KeyError):
        raise bad("a number" + (" or a size like 256M" if k == "size" else "")) from None
    if not math.isfinite(num):
        raise bad("a finite number")
    if k in ("int", "count", "size", "port"):
        if num != int(num):
            raise bad("a whole number")
        lo = {"count": 1, "size": 0, "port": 0}.get(k, o.lo)
        hi = 65535 if k == "port" else o.hi
        if (lo is not None and num < lo) or (hi is not None and num > hi):
            raise bad(f"between {lo} and {hi}" if hi is not None else f"at least {lo}")
        return int(num)
    if k == "seconds" and num < 0:
        raise bad("a number of seconds >= 0")
    if k == "delay" and num <= 0:
        raise bad("a number of seconds > 0")
    return num


# --- the sections -------------------------------------------------------------------


@dataclass(frozen=True)
class SecurityOptions:
    """TLS and the shared secret on the replication port (docs/SECURITY.md)."""

    auth_file: str | None = opt(None, "a shared secret (16+ bytes, mode 600) the leader and its"
                                " followers prove to each other (never sent)", "path")  # fmt: skip
    tls_cert: str | None = opt(
        None, "this node's certificate chain: a leader serves TLS only; a follower shows it"
        " as its client certificate", "path", flag="--tls-cert")  # fmt: skip
    tls_key: str | None = opt(None, "the private key of --tls-cert", "path")
    tls_client_ca: str | None = opt(
        None, "mutual TLS: every follower must show a certificate signed by this CA", "path",
        roles=LEADS)  # fmt: skip
    tls_ca: str | None = opt(
        None, "speak TLS to the leader and verify its certificate against this CA ('system':"
        " the platform's trusted CAs)", "path", roles=FOLLOWS)  # fmt: skip
    tls_server_name: str | None = opt(
        None, "the name the leader's certificate must hold (default: its host)", "str",
        roles=FOLLOWS)  # fmt: skip

    def security(self) -> Security:
        return Security(
            cert=self.tls_cert,
            key=self.tls_key,
            ca=self.tls_ca,
            client_ca=self.tls_client_ca,
            server_name=self.tls_server_name,
            auth_file=self.auth_file,
        )


@dataclass(frozen=True)
class HttpOptions:
    """The HTTP endpoint: /status, /metrics, /health, and SQL clients."""

    address: str | None = opt(None, "serve /status, /metrics and /health on HOST:PORT (PORT"
                              " alone: loopback)", "address", flag="--http")  # fmt: skip
    tls_cert: str | None = opt(None, "serve --http over TLS (https)", "path",
                               flag="--http-tls-cert")  # fmt: skip
    tls_key: str | None = opt(None, "the private key of --http-tls-cert", "path",
                              flag="--http-tls-key")  # fmt: skip
    token_file: str | None = opt(None, "/status and /metrics require this bearer token (16+"
                                 " bytes, mode 600); /health stays open", "path",
                                 flag="--http-token-file")  # fmt: skip
    health_max_lag: float = opt(10.0, "a follower lagging more than S seconds is unhealthy",
                                "delay")  # fmt: skip
    sql: str = opt("auto", "serve SQL clients on --http (POST /v2/pipeline, docs/CLIENTS.md):"
                   " auto: only when --http is loopback or has a token", "choice",
                   choices=("auto", "on", "off"), flag="--http-sql")  # fmt: skip
    tls_ca: str | None = opt(None, "verify the leader's https endpoint against this CA when"
                             " forwarding writes to it", "path", flag="--http-tls-ca")  # fmt: skip

    def security(self) -> HttpSecurity:
        return HttpSecurity(self.tls_cert, self.tls_key, self.token_file)

    def serves_sql(self, host: str) -> bool:
        """Whether SQL clients are served on ``host`` (the --http host)."""
        if self.sql != "auto":
            return self.sql == "on"
        return self.token_file is not None or host in ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class RetentionOptions:
    """Journal retention (docs/OPERATIONS.md)."""

    cids: int = opt(1_000_000, "journal retention: keep at most N entries, 0: no such limit",
                    "size", flag="--retain-cids")  # fmt: skip
    bytes: int = opt(256 << 20, "journal retention: keep at most N bytes of entries, 0: no"
                     " such limit", "size", flag="--retain-bytes")  # fmt: skip
    seconds: float = opt(0.0, "journal retention: keep no entry older, 0: no such limit",
                         "seconds", flag="--retain-seconds")  # fmt: skip
    max_bytes: int = opt(1 << 30, "journal retention: hard cap, past it truncate even what a"
                         " connected follower needs (0: none)", "size",
                         flag="--retain-max-bytes")  # fmt: skip

    def policy(self) -> RetentionPolicy:
        return RetentionPolicy(self.cids, self.bytes, self.seconds, self.max_bytes)


@dataclass(frozen=True)
class LogOptions:
    level: str = opt("info", "least severe log lines printed on stderr", "choice",
                     choices=LEVELS, flag="--log-level")  # fmt: skip
    format: str = opt("text", "log lines as text or json", "choice", choices=FORMATS,
                      flag="--log-format")  # fmt: skip
    verbose: bool = opt(False, "also print the original's hct_testserver debug lines (stdout)",
                        "bool")  # fmt: skip
    quiet: bool = opt(False, "print nothing but errors", "bool")


@dataclass(frozen=True)
class LeaderOptions:
    """The leader role's own (docs/SECURITY.md for the bounds, FAILOVER.md for sync)."""

    max_connections: int = opt(64, "requests served at once", "count", roles=LEADS)
    max_syncs: int = opt(2, "SYNC replies streamed at once", "count", roles=LEADS)
    max_subscribers: int = opt(16, "subscribers per stream", "count", roles=LEADS)
    sub_buffer_bytes: int = opt(64 << 20, "bytes queued per subscriber", "count", roles=LEADS)
    sub_stall_timeout: float = opt(10.0, "seconds a subscriber may take nothing", "delay",
                                   roles=LEADS)  # fmt: skip
    request_timeout: float = opt(5.0, "seconds to send a whole request", "delay", roles=LEADS)
    send_timeout: float = opt(30.0, "seconds one reply chunk may wait", "delay", roles=LEADS)
    max_snapshots: int = opt(2, "snapshots built or sent at once", "count", roles=LEADS)
    snapshots: bool = opt(True, "send followers no snapshots (they replay the journal, or are"
                          " refused)", "bool", roles=LEADS, negate=True,
                          flag="--no-snapshots")  # fmt: skip
    sync_followers: int = opt(0, "a commit returns only once K followers acknowledged it (0:"
                              " asynchronous)", "int", lo=0, roles=LEADS)  # fmt: skip
    sync_timeout: float | None = opt(
        None, "after S seconds without K acknowledgements, commit asynchronously (said in the"
        " log, /status and /metrics) until K followers catch up (default: wait as long as it"
        " takes)", "delay", roles=LEADS)  # fmt: skip
    archive: str | None = opt(None, "ship the journal continuously to this archive: file:///DIR"
                              " or s3://BUCKET/PREFIX (docs/ARCHIVE.md)", "str",
                              roles=LEADS)  # fmt: skip
    archive_max_delay: float = opt(1.0, "seconds a commit may wait before its segment is"
                                   " stored (at most that much is lost with the leader)",
                                   "delay", roles=LEADS)  # fmt: skip
    archive_snapshot_every: float = opt(3600.0, "seconds between the archive's snapshots (0:"
                                        " none but those a restore point needs)", "seconds",
                                        roles=LEADS)  # fmt: skip
    archive_keep: float = opt(0.0, "seconds of history the archive keeps, pruned at each"
                              " snapshot (0: everything)", "seconds", roles=LEADS)  # fmt: skip
    sync_level: str = opt("durable", "what a follower acknowledges: applied and on disk"
                          " (durable), or applied", "choice", choices=("durable", "applied"),
                          roles=LEADS)  # fmt: skip


@dataclass(frozen=True)
class FollowerOptions:
    """The follower role's own."""

    max_size: int = opt(32 << 20, "largest entry accepted", "count", roles=FOLLOWS,
                        flag="--max-entry-bytes")  # fmt: skip
    max_streams: int = opt(256, "most streams a leader may announce", "count", roles=FOLLOWS)
    queue_bytes: int = opt(16 << 20, "bytes received and held before applying", "count",
                           roles=FOLLOWS)  # fmt: skip
    io_timeout: float = opt(30.0, "seconds without a whole entry before giving up", "delay",
                            roles=FOLLOWS)  # fmt: skip
    connect_timeout: float = opt(10.0, "seconds to connect", "delay", roles=FOLLOWS)
    max_snapshot_bytes: int = opt(1 << 40, "largest snapshot accepted", "count",
                                  roles=FOLLOWS)  # fmt: skip
    retry_max: float = opt(5.0, "longest wait between reconnection attempts, in seconds",
                           "delay", roles=FOLLOWS)  # fmt: skip
    syncthreads: int = opt(1, "threads processing sync replies, 1 to 16", "int", lo=1, hi=16,
                           roles=FOLLOWS)  # fmt: skip
    syncbytes: int = opt(0, "repeat SYNC while replies shrink and stay above B bytes", "size",
                         roles=FOLLOWS)  # fmt: skip
    bootstrap: bool = opt(True, "never install a snapshot from the leader (only replay its"
                          " journal)", "bool", roles=FOLLOWS, negate=True,
                          flag="--no-bootstrap")  # fmt: skip
    bootstrap_min: int = opt(10_000, "an empty follower bootstraps from a snapshot when the"
                             " leader's journal holds more than N entries", "size",
                             roles=FOLLOWS)  # fmt: skip
    once: bool = opt(False, "end when the leader ends its run (the original's behaviour)"
                     " instead of reconnecting", "bool", roles=frozenset({"follower"}))  # fmt: skip
    reseed: bool = opt(False, "if this database's history differs from the leader's, keep a"
                       " copy of it beside it and start again from a snapshot of the leader"
                       " (a cluster node always does)", "bool",
                       roles=frozenset({"follower"}))  # fmt: skip


@dataclass(frozen=True)
class ClusterOptions:
    """A cluster node's: etcd and its place in the cluster (docs/FAILOVER.md)."""

    etcd: str | None = opt(None, "etcd's address (http://HOST:PORT or https://...)", "str",
                           roles=frozenset({"node"}), required=frozenset({"node"}))  # fmt: skip
    name: str | None = opt(None, "this node's name, unique in the cluster", "str",
                           roles=frozenset({"node"}), required=frozenset({"node"}))  # fmt: skip
    cluster: str = opt("default", "the cluster's name in etcd", "str", roles=frozenset({"node"}))
    advertise: str | None = opt(None, "the address followers use (default HOST:PORT)", "str",
                                roles=frozenset({"node"}))  # fmt: skip
    ttl: int = opt(5, "the leader lease's TTL in seconds", "int", lo=2,
                   roles=frozenset({"node"}))  # fmt: skip
    etcd_ca: str | None = opt(None, "verify etcd's https certificate against this CA", "path",
                              roles=frozenset({"node"}))  # fmt: skip
    etcd_cert: str | None = opt(None, "the client certificate shown to etcd (mutual TLS)",
                                "path", roles=frozenset({"node"}))  # fmt: skip
    etcd_key: str | None = opt(None, "the private key of --etcd-cert", "path",
                               roles=frozenset({"node"}))  # fmt: skip
    etcd_user: str | None = opt(None, "etcd user name (etcd's authentication)", "str",
                                roles=frozenset({"node"}))  # fmt: skip
    etcd_password_file: str | None = opt(None, "a file holding the etcd user's password",
                                         "path", roles=frozenset({"node"}))  # fmt: skip


SECTIONS: dict[str, type] = {
    "security": SecurityOptions,
    "http": HttpOptions,
    "retention": RetentionOptions,
    "log": LogOptions,
    "leader": LeaderOptions,
    "follower": FollowerOptions,
    "cluster": ClusterOptions,
}


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs, in any role. Build it with :func:`load`
    (defaults, a file, the environment, flags) or directly."""

    role: str = opt("leader", "the role: leader, follower or node (a cluster member)", "choice",
                    choices=ROLES)  # fmt: skip
    db: str | None = opt(None, "the database file", "path")
    host: str = opt("127.0.0.1", "a leader's interface to listen on; a follower's leader",
                    "str")  # fmt: skip
    port: int = opt(21212, "a leader's port (0: any free port); a follower's leader's port",
                    "port")  # fmt: skip
    seconds: float = opt(0.0, "after this many seconds the jobs' timeout() turns true (0:"
                         " never)", "seconds")  # fmt: skip
    jobs: tuple[str, ...] = opt((), "a Python script (globals db, timeout) or a bundled job:"
                                " writer, monitor, snapshot (repeatable)", "list",
                                flag="--job")  # fmt: skip
    bootstrap_from: str | None = opt(None, "a new follower (its file does not exist yet) starts"
                                     " from the archive's newest cid, then catches up from the"
                                     " leader (docs/ARCHIVE.md)", "str",
                                     roles=FOLLOWS)  # fmt: skip
    synchronous: str = opt("NORMAL", "SQLite's synchronous setting: NORMAL (a commit survives"
                           " the process, on disk at the next checkpoint), FULL or EXTRA (on"
                           " disk at once)", "choice",
                           choices=("NORMAL", "FULL", "EXTRA"))  # fmt: skip
    security: SecurityOptions = field(default_factory=SecurityOptions)
    http: HttpOptions = field(default_factory=HttpOptions)
    retention: RetentionOptions = field(default_factory=RetentionOptions)
    log: LogOptions = field(default_factory=LogOptions)
    leader: LeaderOptions = field(default_factory=LeaderOptions)
    follower: FollowerOptions = field(default_factory=FollowerOptions)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)

    def __post_init__(self) -> None:
        for key, o, value in _walk(self):
            if key in ("role", "db"):
                continue
            if self.role in o.required and value is None:
                raise ConfigError(f"{_flag(key, o)} is required for {self.role}")
        if self.role == "node" and not 0 < self.port <= 65535:
            raise ConfigError(f"a cluster node needs a fixed --port (1-65535), not {self.port}")
        if self.http.address is None and (self.http.tls_cert or self.http.token_file):
            raise ConfigError("--http-tls-cert and --http-token-file need --http")
        if self.leader.archive_keep and not self.leader.archive_snapshot_every:
            raise ConfigError(
                "--archive-keep prunes at each of the archive's snapshots: give"
                " --archive-snapshot-every too"
            )
        self.security.security()  # the pairs (cert and key) are checked there
        self.http.security()
        self.retention.policy()

    def to_dict(self) -> dict[str, Any]:
        """As TOML would hold it (``config show``)."""
        return dataclasses.asdict(self)


def _flag(key: str, o: Opt) -> str:
    return o.flag or "--" + key.rpartition(".")[2].replace("_", "-")


def options() -> Iterator[tuple[str, Opt, type]]:
    """Every option: (dotted key, how it is given, the class that holds it)."""
    for f in dataclasses.fields(NodeConfig):
        if f.name in SECTIONS:
            for g in dataclasses.fields(SECTIONS[f.name]):
                yield f"{f.name}.{g.name}", g.metadata["opt"], SECTIONS[f.name]
        else:
            yield f.name, f.metadata["opt"], NodeConfig


def flag_of(key: str) -> str:
    return next(_flag(k, o) for k, o, _ in options() if k == key)


def default_of(key: str) -> Any:
    section, _, name = key.rpartition(".")
    obj: Any = NodeConfig()
    return getattr(getattr(obj, section) if section else obj, name)


def _walk(cfg: NodeConfig) -> Iterator[tuple[str, Opt, Any]]:
    for key, o, _ in options():
        section, _, name = key.rpartition(".")
        yield key, o, getattr(getattr(cfg, section) if section else cfg, name)


def read_file(path: str) -> dict[str, Any]:
    """A TOML file's options as dotted keys; unknown keys are errors."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read the configuration file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    known = {k for k, _, _ in options()}
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if isinstance(v, dict) and k in SECTIONS:
            for name, value in v.items():
                out[f"{k}.{name}"] = value
        else:
            out[k] = v
    for k in out:
        if k not in known:
            raise ConfigError(f"{path}: unknown option {k!r} (see hctserver config show)")
    return out


def read_env(environ: Mapping[str, str]) -> dict[str, str]:
    """``HCTSERVER_LEADER__MAX_CONNECTIONS=8`` (sections joined by ``__``)."""
    out = {}
    for key, _, _ in options():
        name = ENV_PREFIX + key.replace(".", "__").upper()
        if name in environ:
            out[key] = environ[name]
    return out


def load(
    role: str | None = None,
    flags: Mapping[str, Any] | None = None,
    file: str | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    check_roles: bool = True,
) -> NodeConfig:
    """Defaults, then ``file`` (TOML), then ``environ`` (``HCTSERVER_*``),
    then ``flags`` (dotted keys, as :func:`options` names them)."""
    raw: dict[str, tuple[Any, str]] = {}
    if file is not None:
        from_file = read_file(file)
        if role is not None and from_file.get("role", role) != role:
            raise ConfigError(f"{file} configures a {from_file['role']}, not a {role}")
        raw.update((k, (v, f"{file}: {k}")) for k, v in from_file.items())
    env = read_env(os.environ if environ is None else environ)
    raw.update((k, (v, ENV_PREFIX + k.replace(".", "__").upper())) for k, v in env.items())
    by_key = {k: o for k, o, _ in options()}
    for k, v in (flags or {}).items():
        raw[k] = (v, _flag(k, by_key[k]))
    if role is not None:
        raw["role"] = (role, "the command")
    top: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for k, (v, where) in raw.items():
        value = coerce(by_key[k], v, where)
        section, _, name = k.rpartition(".")
        (parts[section] if section else top)[name] = value
    role_now = top.get("role", "leader")
    for k, (_, where) in raw.items():
        if check_roles and role_now not in by_key[k].roles:
            raise ConfigError(f"{where} does not apply to a {role_now}")
    sections = {s: SECTIONS[s](**v) for s, v in parts.items()}
    return NodeConfig(**top, **sections)


def dump(cfg: NodeConfig) -> str:
    """``cfg`` as a TOML file (the options that apply to its role; None
    values are left out, as TOML has no null)."""
    top: list[str] = []
    sections: dict[str, list[str]] = {}
    for key, o, value in _walk(cfg):
        if cfg.role not in o.roles or value is None:
            continue
        section, _, name = key.rpartition(".")
        line = f"{name} = {_toml(value)}"
        (sections.setdefault(section, []) if section else top).append(line)
    out = top[:]
    for s, lines in sections.items():
        out += ["", f"[{s}]", *lines]
    return "\n".join(out) + "\n"


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, tuple):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a TOML basic string
