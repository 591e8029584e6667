"""Every exception hctserver raises on purpose.

Classes say what went wrong; the command line decides the exit code
(``hctserver.tools.cli.EXIT_CODES``). Network errors come in two kinds:

* :class:`TransientError` and its subclasses: the peer is unreachable,
  went away, timed out, or is busy or shutting down. Retrying later may
  succeed; a follower in its default mode reconnects by itself.
* everything else is final: retrying the same thing gives the same answer
  (an incompatible history, a protocol violation by the peer, a bad option).
"""

from __future__ import annotations


class HctError(Exception):
    """Base class of all hctserver errors."""


class TransientError(HctError):
    """A failure that retrying later may cure (refused, reset, timed out,
    busy, draining)."""


# --- configuration, usage, jobs -------------------------------------------------


class ConfigError(HctError):
    """An option or argument is invalid."""


class JobError(HctError):
    """A job (workload code run by a node) raised an exception."""


# --- the journal layer --------------------------------------------------------


class NotReplicationDatabaseError(HctError):
    """The file is not a replication-enabled database (or not SQLite at all)."""


class ModeError(HctError):
    """The operation is not allowed in the database's current mode or role."""


class NotLeaderError(ModeError):
    """A commit was refused before it was made (nothing written): this
    database's node does not lead now (it follows, or its lease lapsed).
    ``leader`` is the leader's address where known."""

    def __init__(self, message: str, leader: str | None = None) -> None:
        super().__init__(message)
        self.leader = leader


class NoNodeError(ModeError):
    """A commit was refused before it was made (nothing written): the file
    belongs to a replicated setup and no node serves it now."""


class CommitUnknownError(HctError):
    """The transaction was committed on this node, but its acknowledgement
    did not come (the leader stopped or lost its lease, or synchronous
    commit timed out while it waited): it may not be replicated, and may be
    discarded if another node leads. Not retried blindly: look for it first."""

    def __init__(self, message: str, cid: int = 0) -> None:
        super().__init__(message)
        self.cid = cid


class LagError(TransientError):
    """A write forwarded to the leader was committed there (as ``cid``) but
    not applied on this follower within the time allowed."""

    def __init__(self, message: str, cid: int = 0) -> None:
        super().__init__(message)
        self.cid = cid


class DuplicateTransactionError(HctError):
    """A transaction id was already recorded: that transaction committed
    (as ``cid``, answered ``outcome``); this one must not."""

    def __init__(self, message: str, cid: int = 0, outcome: str = "[]") -> None:
        super().__init__(message)
        self.cid = cid
        self.outcome = outcome


class StreamLostError(TransientError):
    """A node no longer knows a client's stream (idle too long, closed, or
    the node restarted): a transaction open on it was rolled back."""


class BusyError(HctError):
    """The write lock could not be taken within the busy timeout, or the
    transaction met a concurrent change and must be retried."""


class UnsupportedStatementError(HctError):
    """A statement the journal cannot capture faithfully was refused."""


class JournalError(HctError):
    """A journal operation got arguments it cannot honour (e.g. truncate)."""


class DatabaseInUseError(HctError):
    """Another node already serves this database file."""


class UnjournaledWriteError(HctError):
    """The database was changed behind the journal's back (a plain SQLite
    client changed its schema, or removed hctserver's guards)."""


class DiskFullError(TransientError):
    """The disk (or the file system's quota) is full. Nothing was written;
    the operation can be retried once space is freed."""


class DivergenceError(HctError):
    """An entry with a cid already present arrived with a different hash."""


class ApplyError(HctError):
    """A journal entry could not be applied (corrupt data, unknown encoding,
    or a row conflict showing the follower is not at the entry's base)."""


# --- the wire ----------------------------------------------------------------------


class ProtocolError(HctError):
    """Bytes on the wire do not form a valid message (the peer broke the protocol)."""


class UnknownMessageTypeError(ProtocolError):
    """A message started with a type number this side does not accept."""


class EntryTooSmallError(ProtocolError):
    """An entry's size field is below the 17-byte minimum."""


class MissingNulError(ProtocolError):
    """An entry's schema text has no terminating NUL byte."""


class SizeLimitError(ProtocolError):
    """A declared size exceeds the configured maximum."""


class TruncatedMessageError(ProtocolError, TransientError):
    """The peer closed the connection in the middle of a message (it went
    away; nothing partial is ever used)."""


# --- peers and the network ------------------------------------------------------


class ConnectError(TransientError):
    """The leader could not be reached (refused, unreachable, timed out)."""


class ConnectionLostError(TransientError):
    """An established connection failed: reset, closed early, or silent past
    its deadline."""


class TimedOutError(ConnectionLostError):
    """The peer sent (or took) nothing before the deadline."""


class AddressInUseError(HctError):
    """The leader could not listen (the port is in use, or the address is bad)."""


class PeerError(HctError):
    """The peer answered with an ERROR message that retrying will not cure."""


class LeaderBusyError(PeerError, TransientError):
    """The leader answered with an ERROR that retrying may cure: too many
    connections or subscribers, shutting down, or a job it no longer runs."""


class AuthError(HctError):
    """Authentication failed, on either side: a TLS certificate was refused
    (wrong CA, expired, another host's name, none given under mutual TLS),
    the TLS handshake failed, a shared secret was wrong or missing, or one
    side asked for TLS or a secret and the other did not. Final: the
    configuration must change."""


class PlainClientError(AuthError):
    """A client spoke the plain protocol to a leader that requires TLS."""


class IncompatibleError(PeerError):
    """The leader refused our position: "incompatible database version"."""


class GapError(HctError):
    """The leader's reply skips entries this follower needs, and it cannot
    be filled (the original C leader's journal starts above us)."""


class NoSnapshotsError(IncompatibleError):
    """The leader sends no snapshots (the original, or ``--no-snapshots``)."""


def is_transient(exc: BaseException) -> bool:
    """True when retrying later may succeed."""
    return isinstance(exc, TransientError)
