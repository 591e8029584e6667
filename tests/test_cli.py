"""The command line, run as a real subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import pty
import re
import select
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import apsw
import pytest

from hctserver import Database
from hctserver.tools.cli import build_parser

from helpers import wait_until
from nodes import init_db

ROOT = Path(__file__).resolve().parent.parent
HCT = [sys.executable, "-m", "hctserver"]


def run(*args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HCT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,  # type: ignore[call-overload]
    )


def one_line_error(
    p: subprocess.CompletedProcess[str], code: int, match: str, *, traceback: bool = False
) -> None:
    """The command failed with ``code`` and one last line naming the error.
    ``traceback``: a job's failure is also logged with its traceback, at once."""
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    errors = [x for x in lines if x.startswith("hctserver: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], p.stderr
    assert ("Traceback" in p.stderr) == traceback, p.stderr
    assert re.search(match, errors[0]), errors[0]


def start_leader(db: str, *args: str) -> tuple[subprocess.Popen[str], int]:
    p = subprocess.Popen(
        [*HCT, "leader", db, "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stderr is not None
    line = p.stderr.readline()
    m = re.search(r"leader on 127\.0\.0\.1:(\d+)", line)
    assert m, line
    return p, int(m.group(1))


def test_version_and_module_entry_point() -> None:
    p = run("--version")
    assert p.returncode == 0 and re.fullmatch(r"hctserver \d+\.\d+\.\d+\n", p.stdout)
    exe = shutil.which("hctserver", path=os.path.dirname(sys.executable))
    assert exe, "the console script is installed next to the interpreter"
    assert subprocess.run([exe, "--version"], capture_output=True, text=True).stdout == p.stdout


def test_init_status_rollback_truncate(tmp_path) -> None:
    db = str(tmp_path / "x.db")
    p = run(
        "init",
        db,
        "--sql",
        "CREATE TABLE t1(a INTEGER PRIMARY KEY, b, c)",
        "--sql",
        "INSERT INTO t1 VALUES(1, 2, 3); INSERT INTO t1 VALUES(2, 3, 4)",
    )
    assert p.returncode == 0, p.stderr
    assert "at cid 2" in p.stdout
    st = json.loads(run("status", db, "--json").stdout)
    for key in ("snapshot", "max_cid", "hash", "baseline_cid", "journal_entries"):
        assert key in st
    assert st["snapshot"] == 2 and st["max_cid"] == 2 and st["journal_entries"] == 2
    assert st["hash"] == Database(db, init=False).position().hash.hex()
    text = run("status", db).stdout
    assert re.search(r"snapshot\s+2", text) and re.search(r"first hole\s+-", text)
    assert "discarded 0" in run("rollback", db).stdout
    p = run("truncate", db, "--min-cid", "2")
    assert p.returncode == 0 and "baseline at cid 1" in p.stdout
    assert json.loads(run("status", db, "--json").stdout)["hash"] == st["hash"]
    one_line_error(run("truncate", db, "--min-cid", "9"), 3, "snapshot is 2")


def test_init_adopts_an_existing_database(tmp_path) -> None:
    db = str(tmp_path / "plain.db")
    c = apsw.Connection(db)
    c.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, v); INSERT INTO items VALUES(1, 'x')")
    c.close()
    one_line_error(run("status", db), 3, "not a replication database.*hctserver init")
    assert run("init", db).returncode == 0
    assert json.loads(run("status", db, "--json").stdout)["snapshot"] == 1


def test_verify_same_and_different(tmp_path) -> None:
    a, b = str(tmp_path / "a.db"), str(tmp_path / "b.db")
    init_db(a, 0)
    shutil.copy(a, b)
    p = run("verify", a, b)
    assert p.returncode == 0 and p.stdout.startswith("identical")
    for path, val in ((a, "x"), (b, "y")):
        d = Database(path)
        d.set_mode("leader")
        d.connect().execute("INSERT INTO t1 VALUES(42, ?, 'same')", (val,))
        d.close()
    p = run("verify", a, b)
    assert p.returncode == 1
    assert p.stdout.strip() == "different: table t1, key (42), column b: 'x' (str) != 'y' (str)"


def test_error_paths_are_one_line_with_documented_codes(tmp_path) -> None:
    one_line_error(run("status", str(tmp_path / "missing.db")), 3, "no such database")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    one_line_error(run("status", str(junk)), 3, "not an SQLite database")
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    one_line_error(
        run("follower", str(tmp_path / "f.db"), "--port", str(port), "--once"),
        6,
        "cannot connect to the leader.*connection refused",
    )
    # a leader serves an existing replication database: a typo is not a new one
    one_line_error(
        run("leader", str(tmp_path / "typo.db"), "--port", "0"), 3, "no such database.*init"
    )
    assert not (tmp_path / "typo.db").exists()
    init_db(str(tmp_path / "l.db"))
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        one_line_error(
            run(
                "leader",
                str(tmp_path / "l.db"),
                "--port",
                str(busy.getsockname()[1]),
                "--job",
                "writer",
            ),
            6,
            "address already in use",
        )
    finally:
        busy.close()
    one_line_error(
        run("follower", str(tmp_path / "f.db"), "--syncthreads", "0"),
        2,
        "syncthreads must be between 1 and 16",
    )
    one_line_error(
        run("leader", str(tmp_path / "l.db"), "--job", "nope"),
        2,
        "neither a Python script nor a bundled job",
    )
    one_line_error(run("init", str(tmp_path / "s.db"), "--sql", "CREATE TABLE"), 3, "SQLite")
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('job broke')\n")
    p = run("leader", str(tmp_path / "l.db"), "--port", "0", "--job", str(bad))
    one_line_error(p, 7, "job 0 .*RuntimeError: job broke", traceback=True)
    assert 'raise RuntimeError("job broke")' in p.stderr or "job broke" in p.stderr
    p = run("leader")
    assert p.returncode == 2 and "give the database file" in p.stderr


def test_incompatible_follower_exits_4(tmp_path) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    init_db(lp, 5)
    d = Database(fp)
    d.set_mode("leader")
    d.connect().execute("CREATE TABLE other(x)")
    d.close()
    leader, port = start_leader(lp, "--seconds", "30")
    try:
        one_line_error(run("follower", fp, "--port", str(port)), 4, "incompatible database version")
        one_line_error(
            run("follower", fp, "--port", str(port), "--once"), 4, "incompatible database version"
        )
    finally:
        leader.terminate()
        leader.wait(30)


def test_plot_without_matplotlib_is_a_clear_error(tmp_path) -> None:
    blocker = tmp_path / "matplotlib"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('not installed here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    one_line_error(
        run("demo", "--plot", str(tmp_path / "x.png"), env=env), 2, "--plot needs matplotlib"
    )
    assert not (tmp_path / "x.png").exists()


def test_demo_plot_draws_a_png(tmp_path) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib (the plot extra) is not installed")
    png = tmp_path / "lag.png"
    p = run("demo", "--seconds", "1", "--followers", "1", "--plot", str(png), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_leader_writer_monitor_follower_then_verify(tmp_path) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    assert run("init", lp, "--sql", "CREATE TABLE t1(a INTEGER PRIMARY KEY, b, c)").returncode == 0
    leader, port = start_leader(
        lp, "--job", "writer", "--job", "writer", "--job", "monitor", "--seconds", "3"
    )
    follower = subprocess.run(
        [*HCT, "follower", fp, "--port", str(port), "--once", "--job", "snapshot", "--verbose"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out, err = leader.communicate(timeout=60)
    assert leader.returncode == 0, err
    assert follower.returncode == 0, follower.stderr
    assert "max cid:" in out
    assert "snapshot:" in follower.stdout
    assert re.search(r"hct_testserver: tm=\d+ms ", follower.stdout)
    p = run("verify", lp, fp)
    assert p.returncode == 0, p.stdout
    assert Database(lp, init=False).snapshot() > 100


def test_example_scripts_run_as_jobs(tmp_path) -> None:
    lp, fp = str(tmp_path / "l.db"), str(tmp_path / "f.db")
    run("init", lp, "--sql", "CREATE TABLE t1(a INTEGER PRIMARY KEY, b, c)")
    ex = ROOT / "examples"
    leader, port = start_leader(
        lp,
        "--seconds",
        "2",
        "--job",
        str(ex / "leader_writer.py"),
        "--job",
        str(ex / "leader_writer.py"),
        "--job",
        str(ex / "leader_monitor.py"),
    )
    follower = run(
        "follower", fp, "--port", str(port), "--once", "--job", str(ex / "follower_snapshot.py")
    )
    out, _ = leader.communicate(timeout=60)
    assert leader.returncode == 0 and follower.returncode == 0, follower.stderr
    assert "max cid:" in out and "snapshot:" in follower.stdout
    assert run("verify", lp, fp).returncode == 0


def test_follower_shows_progress_on_a_terminal_only(tmp_path) -> None:
    lp = str(tmp_path / "l.db")
    init_db(lp, 3000)
    leader, port = start_leader(lp, "--seconds", "60")
    try:
        master, slave = pty.openpty()
        p = subprocess.Popen(
            [*HCT, "follower", str(tmp_path / "f.db"), "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=slave,
        )
        os.close(slave)
        seen = b""

        def caught_up() -> bool:
            nonlocal seen
            if select.select([master], [], [], 0.1)[0]:
                seen += os.read(master, 65536)
            return b"caught up: 3,001 entries" in seen

        wait_until(caught_up, what="the progress display")
        p.terminate()
        p.wait(30)
        os.close(master)
        # not a terminal: no progress display
        quiet = subprocess.Popen(
            [*HCT, "follower", str(tmp_path / "g.db"), "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(lambda: Database(str(tmp_path / "g.db")).snapshot() == 3001)
        quiet.terminate()
        _, err = quiet.communicate(timeout=30)
        assert "entries/s" not in err and "caught up: 3,001 entries" not in err
    finally:
        leader.terminate()
        leader.wait(30)


def test_demo_runs_and_verifies(tmp_path) -> None:
    p = run("demo", "--seconds", "2", cwd=str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "all followers identical to the leader" in p.stdout
    assert p.stdout.count("identical") >= 3  # two verdicts and the closing line
    # the live lines show each follower's lag as the leader sees it (feedback)
    assert re.search(r"follower 1 [\d,]+ \(lag [\d,]+ cids, [\d,]+ ms\)", p.stdout), p.stdout


def test_every_command_and_flag_is_documented() -> None:
    doc = (ROOT / "docs" / "CLI.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():  # type: ignore[union-attr]
        assert f"hctserver {name}" in doc, f"command {name} is not in docs/CLI.md"
        for action in p._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    assert opt in doc, f"{name} {opt} is not in docs/CLI.md"
    assert "--version" in doc


def test_every_bound_is_in_security_md_with_its_default() -> None:
    from hctserver.node import config

    doc = (ROOT / "docs" / "SECURITY.md").read_text()
    rows = {line.split("|")[-2].strip(" `"): line for line in doc.splitlines() if "| `--" in line}
    bounds = [
        k
        for k, o, _ in config.options()
        if k.startswith(("leader.", "follower.")) and o.kind in ("count", "delay")
        and k not in ("leader.sync_timeout", "leader.archive_max_delay", "follower.retry_max")
    ]  # fmt: skip
    assert len(bounds) == 14
    for key in bounds:
        flag = config.flag_of(key)
        assert flag in rows, f"{flag} is not in docs/SECURITY.md's tables"
        value = config.default_of(key)
        shown = (
            f"{value >> 20} MiB"
            if isinstance(value, int) and value >= 1 << 20
            else f"{value:g} s"
            if isinstance(value, float)
            else str(value)
        )
        assert f"| {shown} |" in rows[flag], (flag, shown, rows[flag])
