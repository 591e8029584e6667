"""ALTER TABLE, DROP TABLE and CREATE TABLE ... AS inside a journaled transaction.

The session extension cannot follow a table through the first two and does
not see the rows of the third. So the capture is closed, the statement runs,
what was recorded so far is re-expressed against the new shape of the
tables (the follower runs the schema first, then the data), the new
table's rows are added, and recording starts again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import apsw

from . import patchset
from .authorizer import Authorizer
from .capture import Capture
from .sqltext import Kind, Statement, ddl_texts
from .sqlutil import fetchone, table_rows_patchset
from .transaction import Transaction


class Reshaper:
    """Runs schema changes that reshape captured rows, for one connection."""

    def __init__(self, conn: apsw.Connection, cap: Capture, auth: Authorizer) -> None:
        self.conn = conn
        self.cap = cap
        self.auth = auth

    def execute(
        self, st: Statement, bindings: Any, tx: Transaction, abort: Callable[[], None]
    ) -> Any:
        """Run ``st`` in ``tx``; ``abort`` ends the transaction if the
        recording cannot be carried past the statement."""
        cap = self.cap
        saved = cap.save()
        before = cap.take()  # encoded while the tables still have their old shape
        roots = self._rootpages()
        try:
            cur = self.conn.execute(st.text, bindings)
            cap.invalidate()
        except BaseException:
            if saved is not None:  # nothing changed: carry on as if not taken
                cap.restore(saved)
            else:
                tx.acc = patchset.merge([tx.acc, before])
                tx.reshapes += 1
            raise
        acc = patchset.merge([tx.acc, before])
        tx.reshapes += 1
        try:
            if st.kind is Kind.DDL_RESHAPE:
                if acc:
                    acc = self._reexpress(acc, roots)
                tx.ddl.append(ddl_texts(st))
            else:
                created = self._created_table(st.name, roots)
                if created is not None:
                    with self.auth.bypass():
                        acc = patchset.merge([acc, table_rows_patchset(self.conn, created)])
                        (sql,) = fetchone(
                            self.conn,
                            "SELECT sql FROM sqlite_schema WHERE type='table' AND name=?",
                            (created,),
                        )
                    tx.ddl.append((sql, ddl_texts(st)[1]))
            tx.acc = acc
        except BaseException:
            abort()
            raise
        return cur

    def _created_table(self, name: str, roots_before: dict[str, int]) -> str | None:
        if name.lower() in roots_before:
            return None  # IF NOT EXISTS met an existing table: nothing happened
        for (real,) in self.conn.execute(
            "SELECT name FROM sqlite_schema WHERE type='table' AND name=? COLLATE NOCASE", (name,)
        ):
            return str(real)
        return None

    def _rootpages(self) -> dict[str, int]:
        with self.auth.bypass():
            return {
                name.lower(): root
                for name, root in self.conn.execute(
                    "SELECT name, rootpage FROM sqlite_schema WHERE type='table'"
                )
            }

    def _reexpress(self, acc: bytes, roots_before: dict[str, int]) -> bytes:
        """Rewrite recorded changes after the schema changed under them: follow
        renamed tables by root page, drop dropped ones, and read each touched
        row back in its new shape."""
        names_after = {root: name for name, root in self._rootpages().items()}
        real_names = {
            n.lower(): n
            for (n,) in self.conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")
        }
        out = []
        with self.auth.bypass():
            for table in patchset.decode(acc):
                root = roots_before.get(table.name.lower())
                new = names_after.get(root) if root is not None else None
                if new is None:
                    continue  # dropped: its rows went with it
                out.append(self._reexpress_table(real_names[new], table))
        return b"".join(out)

    def _reexpress_table(self, name: str, table: patchset.Table) -> bytes:
        sh = self.cap.shape(name)  # the table's new shape
        # primary-key values travel in primary-key order, go out in column order
        order = sorted(range(len(sh.pkcols)), key=lambda k: sh.pkcols[k])
        parts = [sh.header]
        for op, indirect, old, newrow in table.changes:
            src = newrow if op == patchset.INSERT else old
            key = [src[c] for c in table.pk_columns]
            if op == patchset.DELETE:
                parts.append(patchset.encode_delete([key[k] for k in order], indirect))
                continue
            row = self.conn.execute(sh.select, key).fetchone()
            if row is None:
                continue
            if op == patchset.INSERT:
                parts.append(patchset.encode_insert(row, indirect))
            else:
                others = [row[i] for i in sh.others]
                parts.append(patchset.encode_update([key[k] for k in order], others, indirect))
        return b"".join(parts) if len(parts) > 1 else b""
