"""One typed configuration for every role: flags, a TOML file, the
environment and the API build the same object, and every option reaches
the running role the same way in ``leader``, ``follower`` and ``node``."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hctserver import Database
from hctserver.cluster.etcd import EtcdClient
from hctserver.cluster.member import ClusterNode
from hctserver.errors import ConfigError
from hctserver.journal.retention import RetentionPolicy
from hctserver.node import config
from hctserver.node.assemble import follower_role, leader_role
from hctserver.node.config import NodeConfig
from hctserver.node.follower import Follower
from hctserver.node.leader import Leader
from hctserver.tools.cli import build_parser, load_config

pytest.importorskip("trustme")
from pki import Pki

# options that do not go to the role's constructor (checked elsewhere: the
# HTTP endpoint in test_observe and test_cluster, logging in test_cli)
NOT_THE_ROLES = ("http.", "log.", "cluster.", "role", "db", "jobs", "synchronous")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki") / "certs")


def _value(key: str, o: config.Opt, pki: Pki) -> Any:
    """A valid value of the option, different from its default."""
    files = {
        "security.auth_file": pki.secret,
        "security.tls_cert": pki.leader,
        "security.tls_key": pki.leader,
        "security.tls_client_ca": pki.ca,
        "security.tls_ca": pki.ca,
        "http.tls_cert": pki.leader,
        "http.tls_key": pki.leader,
        "http.token_file": pki.secret,
    }
    if key in files:
        return files[key]
    if key == "leader.archive":
        return f"file://{pki.dir}/archive"
    default = config.default_of(key)
    special = {"port": 4321, "host": "127.0.0.2", "cluster.etcd": "http://127.0.0.1:1",
               "cluster.name": "n7", "cluster.advertise": "db7:7007",
               "http.address": "127.0.0.1:0", "jobs": ("writer",),
               "follower.syncthreads": 3, "leader.sync_followers": 2}  # fmt: skip
    if key in special:
        return special[key]
    if o.kind == "bool":
        return not default
    if o.kind == "choice":
        return next(c for c in o.choices if c != default)
    if o.kind in ("count", "size", "int"):
        return int(default or 0) + 3
    if o.kind in ("delay", "seconds"):
        return float(default or 0) + 7.5
    return f"{key.rpartition('.')[2]}-x"


def _argv(role: str, values: dict[str, Any]) -> list[str]:
    argv = [role, "x.db"]
    for key, value in values.items():
        o = next(o for k, o, _ in config.options() if k == key)
        flag = config.flag_of(key)
        if o.kind == "bool":
            if value != config.default_of(key):
                argv.append(flag)
        elif isinstance(value, tuple):
            for v in value:
                argv += [flag, v]
        else:
            argv += [flag, str(value)]
    return argv


def _settings(values: dict[str, Any], section: str) -> dict[str, Any]:
    return {k.partition(".")[2]: v for k, v in values.items() if k.startswith(section + ".")}


def _check_reaches(runner: Leader | Follower, values: dict[str, Any], section: str) -> None:
    got = runner.settings
    for name, value in _settings(values, section).items():
        assert got[name] == value, f"{section}.{name}: {got[name]!r} != {value!r}"
    assert got["seconds"] == values["seconds"]
    assert got["security"] == config.SecurityOptions(**_settings(values, "security")).security()
    policy = config.RetentionOptions(**_settings(values, "retention")).policy()
    assert got["retention"] == policy and isinstance(policy, RetentionPolicy)


@pytest.mark.parametrize("role", config.ROLES)
def test_every_option_reaches_the_running_role_in_every_command(
    role: str, pki: Pki, tmp_path: Path
) -> None:
    values = {
        k: _value(k, o, pki)
        for k, o, _ in config.options()
        if role in o.roles and k not in ("role", "db")
    }
    if role != "node":
        values.pop("security.tls_client_ca" if role == "follower" else "security.tls_ca", None)
    cfg = load_config(build_parser().parse_args(_argv(role, values)), role)
    for key, value in values.items():  # every flag reached the configuration
        section, _, name = key.rpartition(".")
        assert getattr(getattr(cfg, section) if section else cfg, name) == value, key
    db = Database(str(tmp_path / "n.db"))
    try:
        if role == "node":
            node = ClusterNode(db, EtcdClient("http://127.0.0.1:1"), cfg)
            leader, follower = node.make_leader(lambda: 0.0), node.make_follower("127.0.0.1", 9)
            assert follower.settings["reseed"] is True and follower.settings["once"] is False
            runners = [(leader, "leader"), (follower, "follower")]
        elif role == "leader":
            runners = [(leader_role(db, cfg, []), "leader")]
        else:
            runners = [(follower_role(db, cfg, []), "follower")]
        for runner, section in runners:
            _check_reaches(runner, values, section)
            assert (runner.settings["host"], runner.settings["port"]) == (
                ("127.0.0.1", 9) if role == "node" and section == "follower" else (
                    values["host"], values["port"])
            )  # fmt: skip
    finally:
        db.close()


@pytest.mark.parametrize(("section", "cls"), [("leader", Leader), ("follower", Follower)])
def test_the_table_defaults_are_the_roles_defaults(section: str, cls: type) -> None:
    params = inspect.signature(cls).parameters
    for f in dataclasses.fields(config.SECTIONS[section]):
        assert params[f.name].default == f.default, f"{section}.{f.name}"


def test_flags_and_the_environment_override_the_file(tmp_path: Path) -> None:
    f = tmp_path / "n.toml"
    f.write_text(
        'role = "leader"\ndb = "a.db"\nport = 7001\n[leader]\nmax_syncs = 4\nsync_timeout = 2\n'
        '[http]\naddress = "8001"\n[retention]\nbytes = "64M"\n'
    )
    cfg = config.load("leader", {}, str(f), {})
    assert (cfg.db, cfg.port, cfg.leader.max_syncs, cfg.leader.sync_timeout) == (
        "a.db", 7001, 4, 2.0)  # fmt: skip
    assert cfg.retention.bytes == 64 << 20 and cfg.http.address == "8001"
    env = {"HCTSERVER_LEADER__MAX_SYNCS": "5", "HCTSERVER_PORT": "7002"}
    cfg = config.load("leader", {"port": "7003"}, str(f), env)
    assert (cfg.port, cfg.leader.max_syncs) == (7003, 5)


def test_config_show_prints_a_file_that_loads_back_the_same(tmp_path: Path) -> None:
    for role in config.ROLES:
        extra = {"cluster.etcd": "http://127.0.0.1:2379", "cluster.name": "n1"}
        flags = {"db": "x.db", "leader.max_syncs": "7", **(extra if role == "node" else {})}
        if role == "follower":
            flags = {"db": "x.db", "follower.max_streams": "9"}
        cfg = config.load(role, flags, None, {})
        f = tmp_path / f"{role}.toml"
        f.write_text(config.dump(cfg))
        assert config.load(role, {}, str(f), {}) == cfg
    p = subprocess.run(
        [sys.executable, "-m", "hctserver", "config", "show", "--role", "follower", "--db", "f.db",
         "--max-streams", "9"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert 'role = "follower"' in p.stdout and "max_streams = 9" in p.stdout
    assert "max_syncs" not in p.stdout  # a leader's option


@pytest.mark.parametrize(
    ("text", "role", "match"),
    [
        ("colour = 1\n", "leader", "unknown option 'colour'"),
        ("[leader]\nmax_syncs = 0\n", "leader", "max_syncs must be at least 1"),
        ("[leader]\nmax_syncs = true\n", "leader", "must be a number"),
        ("[leader]\nmax_syncs = 2\n", "follower", "does not apply to a follower"),
        ('role = "follower"\n', "leader", "configures a follower, not a leader"),
        ("port = 70000\n", "leader", "between 0 and 65535"),
        ("[retention]\nbytes = \"many\"\n", "leader", "a size like 256M"),
        ("[security]\ntls_cert = \"a.pem\"\n", "leader", "--tls-cert and --tls-key go together"),
        ("port = [\n", "leader", "not valid TOML"),
        ("", "node", "--etcd is required for node"),
        ("[leader]\narchive_keep = 60\narchive_snapshot_every = 0\n", "leader",
         "--archive-keep prunes at each"),
    ],
)  # fmt: skip
def test_a_bad_file_is_one_clear_error(tmp_path: Path, text: str, role: str, match: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        config.load(role, {}, str(f), {})


def test_the_api_builds_the_same_object() -> None:
    cfg = NodeConfig(role="follower", port=9, follower=config.FollowerOptions(max_streams=9))
    assert cfg == config.load("follower", {"port": "9", "follower.max_streams": 9}, None, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 10  # type: ignore[misc]


def test_a_path_with_a_newline_survives_config_show(tmp_path: Path) -> None:
    cfg = config.load("leader", {"db": 'odd\nname "x".db'}, None, {})
    f = tmp_path / "odd.toml"
    f.write_text(config.dump(cfg))
    assert config.load("leader", {}, str(f), {}) == cfg


def test_a_cluster_node_needs_host_and_port_to_advertise(tmp_path: Path) -> None:
    flags = {"cluster.etcd": "http://127.0.0.1:1", "cluster.name": "n1", "cluster.advertise": "db1"}
    cfg = config.load("node", flags, None, {})
    db = Database(str(tmp_path / "n.db"))
    try:
        with pytest.raises(ConfigError, match="--advertise takes HOST:PORT"):
            ClusterNode(db, EtcdClient("http://127.0.0.1:1"), cfg)
    finally:
        db.close()
