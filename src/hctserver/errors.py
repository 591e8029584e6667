"""Every exception hctserver raises on purpose.

Each class carries ``exit_code``: the command line turns an error into one
line on stderr and exits with that code (documented in docs/CLI.md).
"""

from __future__ import annotations


class HctError(Exception):
    """Base class of all hctserver errors."""

    exit_code = 1


# --- configuration and usage ------------------------------------------------


class ConfigError(HctError):
    """An option or argument is invalid."""

    exit_code = 2


class JobError(HctError):
    """A job (workload code run by a node) raised an exception."""

    exit_code = 7


# --- the journal layer --------------------------------------------------------


class NotReplicationDatabaseError(HctError):
    """The file is not a replication-enabled database (or not SQLite at all)."""

    exit_code = 3


class ModeError(HctError):
    """The operation is not allowed in the database's current mode."""

    exit_code = 3


class BusyError(HctError):
    """The write lock could not be taken within the busy timeout."""

    exit_code = 3


class UnsupportedStatementError(HctError):
    """A statement the journal cannot capture faithfully was refused."""

    exit_code = 3


class JournalError(HctError):
    """A journal operation got arguments it cannot honour (e.g. truncate)."""

    exit_code = 3


class DivergenceError(HctError):
    """An entry with a cid already present arrived with a different hash."""

    exit_code = 4


class ApplyError(HctError):
    """A journal entry could not be applied (corrupt data, unknown encoding,
    or a row conflict showing the follower is not at the entry's base)."""

    exit_code = 4


# --- the wire and the nodes -------------------------------------------------


class ProtocolError(HctError):
    """Bytes on the wire do not form a valid message."""

    exit_code = 5


class UnknownMessageTypeError(ProtocolError):
    """A message started with a type number this side does not accept."""


class EntryTooSmallError(ProtocolError):
    """An entry's size field is below the 17-byte minimum."""


class MissingNulError(ProtocolError):
    """An entry's schema text has no terminating NUL byte."""


class SizeLimitError(ProtocolError):
    """A declared size exceeds the configured maximum."""


class TruncatedMessageError(ProtocolError):
    """The peer closed the connection in the middle of a message."""


class ConnectError(HctError):
    """The leader could not be reached (refused, unreachable, timed out)."""

    exit_code = 6


class AddressInUseError(HctError):
    """The leader could not listen: the port is already in use."""

    exit_code = 6


class PeerError(HctError):
    """The peer sent an ERROR message, or vanished or stalled mid-exchange."""

    exit_code = 6


class IncompatibleError(PeerError):
    """The leader refused our position: "incompatible database version"."""

    exit_code = 4
