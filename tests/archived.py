"""A leader's database archived as the archive tests need it: its archiver
(to a directory, or to a store given), a clock that moves only when told,
and copies of the database at chosen cids."""

from __future__ import annotations

from typing import Any

from hctserver import Database
from hctserver.journal import snapshot
from hctserver.journal.archive import Archiver, DirStore, ObjectStore
from hctserver.node.jobs import WRITER_SQL

from nodes import init_db

T0 = 1_700_000_000_000_000  # µs


class FakeClock:
    """Wall clock in µs that moves only when told to."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * 1e6)


class Leader:
    """A leader's database, its archiver, and copies of it at chosen cids."""

    def __init__(
        self, tmp_path: Any, name: str = "l.db", store: ObjectStore | None = None, **archiver: Any
    ) -> None:
        self.dir = tmp_path
        self.path = str(tmp_path / name)
        init_db(self.path)
        self.db = Database(self.path, init=False)
        self.db.set_mode("leader")
        self.conn = self.db.connect()
        self.clock = FakeClock()
        self.store = store or DirStore(str(tmp_path / f"archive-{name}"))
        archiver.setdefault("max_delay", 0.0)
        self.archiver = Archiver(self.db, self.store, clock=self.clock, **archiver)

    def write(self, n: int) -> int:
        for _ in range(n):
            self.conn.execute(WRITER_SQL)
        return self.db.snapshot()

    def copy(self) -> tuple[int, str]:
        cid = self.db.snapshot()
        out = str(self.dir / f"copy-{cid}.db")
        snapshot.copy(self.db, out)
        return cid, out

    def close(self) -> None:
        self.archiver.close()
        self.conn.close()
        self.db.close()
