"""What the DB-API driver (:mod:`hctserver.client.dbapi`) needs of a database:
one statement at a time, results fully read.

Two backends implement it: :class:`hctserver.client.local.LocalBackend` (a
file on this machine, through ``hctserver.connect()``: reads local, writes
journaled, or forwarded to the leader on a follower's file) and
:class:`hctserver.client.remote.RemoteBackend` (a node over HTTP).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

Value: TypeAlias = int | float | str | bytes | None
Params: TypeAlias = Sequence[Value] | Mapping[str, Value] | None


@dataclass
class Result:
    """One statement's outcome.

    ``columns``: (name, declared type or None) per column, empty for a
    statement that returns no rows; ``rowcount``: rows changed by an
    INSERT/UPDATE/DELETE/REPLACE, -1 for anything else (as ``sqlite3``);
    ``lastrowid``: the connection's last inserted rowid after it; ``cid``:
    the cid of the transaction the statement committed (0 if none)."""

    columns: list[tuple[str, str | None]] = field(default_factory=list)
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    rowcount: int = -1
    lastrowid: int | None = None
    cid: int = 0


class Backend(Protocol):
    """Errors are raised as :mod:`hctserver.client.exceptions` classes."""

    def execute(self, sql: str, params: Params) -> Result:
        """Run one statement (BEGIN/COMMIT/ROLLBACK/SAVEPOINT included)."""
        ...

    def executemany(self, sql: str, seq: Iterable[Params]) -> Result:
        """Run one statement once per set of parameters; ``rowcount`` is the sum."""
        ...

    @property
    def in_transaction(self) -> bool: ...

    @property
    def last_cid(self) -> int:
        """The cid of the last transaction this backend committed (0 if none)."""
        ...

    def close(self) -> None: ...
