"""A failure is reported once, by the owner of the thread that met it: one
line saying what went wrong, no traceback unless ``--log-level debug`` (or
for a real bug: an exception that is not one of hctserver's typed errors).

The real ``hctserver follower`` runs against a hostile fake leader (a real
socket on loopback, served by a thread: tests/nodes.py's FakeLeader); then
:class:`~hctserver.net.tasks.TaskGroup`'s own logging is checked with caplog.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest

from hctserver.errors import HctError, JobError, ProtocolError
from hctserver.net.tasks import TaskGroup
from hctserver.protocol import wire

from nodes import FakeLeader
from procs import processes

pytestmark = pytest.mark.timeout(180)

PROTOCOL_EXIT = 5  # docs/CLI.md: "the peer sent bytes that are not the protocol"
MAX_ENTRY = 1 << 20

# name: (what the fake leader answers a SYNC with, follower flags, the failure's words)
HOSTILE: dict[str, tuple[bytes, list[str], str]] = {
    # a SYNCREPLY announcing a million streams (and no entries)
    "a million streams": (
        struct.pack("<ii", wire.SYNCREPLY, 1_000_000) + struct.pack("<i", 0),
        [],
        "announces 1000000 streams",
    ),
    # one stream, then an entry whose size field says 1 GiB (16 bytes of it follow)
    "a 1 GiB entry": (
        struct.pack("<ii", wire.SYNCREPLY, 1) + struct.pack("<iqq", 1 << 30, 1, 0),
        ["--max-entry-bytes", str(MAX_ENTRY)],
        f"entry of {1 << 30} bytes exceeds the limit of {MAX_ENTRY} bytes",
    ),
    "garbage": (
        b"hello world, this is not the protocol",
        [],
        "unexpected reply type to SYNC",
    ),
}


def _follow(tmp_path: Path, reply: bytes, *args: str) -> tuple[int, str]:
    """Run ``hctserver follower --once`` against a fake leader answering
    ``reply``; its exit code and stderr. Both are stopped whatever happens."""
    fake = FakeLeader(reply)
    try:
        with processes(str(tmp_path)) as procs:
            p = procs.follower(str(tmp_path / "f.db"), fake.port, "--once", *args)
            code = p.wait(timeout=60)  # a protocol error is final: the run ends
            return code, procs.stderr(p)
    finally:
        fake.close()


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_leader_is_one_line_without_a_traceback(tmp_path: Path, case: str) -> None:
    reply, args, words = HOSTILE[case]
    code, err = _follow(tmp_path, reply, *args)
    assert code == PROTOCOL_EXIT, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    said = [x for x in lines if words in x]
    assert len(said) == 1, err  # not also logged by the thread that met it
    assert said[0] == lines[-1] and said[0].startswith("hctserver: error: "), err


@pytest.mark.parametrize("case", list(HOSTILE))
def test_at_debug_level_the_traceback_is_logged_too(tmp_path: Path, case: str) -> None:
    reply, args, words = HOSTILE[case]
    code, err = _follow(tmp_path, reply, *args, "--log-level", "debug")
    assert code == PROTOCOL_EXIT, err
    assert "Traceback" in err, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("hctserver: error: ") and words in lines[-1], err
    assert sum(x.startswith("hctserver: error: ") for x in lines) == 1, err


# --- TaskGroup.fail's own logging -----------------------------------------------------------


def _raise(exc: BaseException) -> None:
    raise exc


def _typed() -> ProtocolError:
    """A typed error with a cause, as the wire decoder raises them."""
    exc = ProtocolError("the peer sent nonsense")
    exc.__cause__ = ValueError("invalid literal for int()")
    return exc


def _first_error(exc: BaseException, caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Fail a group's thread with ``exc``; the group's records about it."""
    g = TaskGroup("test")
    g.spawn("hct-test", _raise, exc)
    assert g.join(10) == []
    assert g.error is exc  # kept for the owner, whose wait() raises it
    return [r for r in caplog.records if r.name == "hctserver" and "hct-test" in r.getMessage()]


def test_a_typed_error_is_left_to_the_owner_to_report(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hctserver")
    assert _first_error(_typed(), caplog) == []


def test_a_typed_error_has_its_traceback_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="hctserver")
    exc = _typed()
    [record] = _first_error(exc, caplog)
    assert record.levelno == logging.DEBUG
    assert record.exc_info is not None and record.exc_info[1] is exc
    assert "the peer sent nonsense" in record.getMessage()
    assert "invalid literal for int()" in caplog.text  # its cause, in the traceback


def test_an_untyped_error_is_a_bug_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hctserver")
    exc = KeyError("a bug")
    [record] = _first_error(exc, caplog)
    assert not isinstance(exc, HctError)
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and record.exc_info[1] is exc


def test_a_failed_job_is_logged_at_once_with_the_jobs_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """docs/CLI.md: a job that raises is logged at once with its traceback
    (the workload's own bug), then the node stops with the one-line error."""
    caplog.set_level(logging.INFO, logger="hctserver")
    cause = ValueError("the job broke")
    job = JobError("job 0 (bad): ValueError: the job broke")
    job.__cause__ = cause
    [record] = _first_error(job, caplog)
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and record.exc_info[1] is cause


def test_errors_after_the_stop_began_are_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="hctserver")
    g = TaskGroup("test")
    g.stop()
    g.fail(KeyError("while stopping"), "hct-late")
    assert g.error is None
    records = [r for r in caplog.records if "hct-late" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.DEBUG]
