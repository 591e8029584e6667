"""Which statements are which, as the DB-API driver's backends need to know."""

from __future__ import annotations

from ..journal import sqltext
from ..journal.sqltext import Kind, Statement
from .exceptions import ProgrammingError


def one_statement(sql: str) -> Statement | None:
    """The one statement of ``sql`` (None for only comments or blanks)."""
    stmts = sqltext.parse(sql)
    if len(stmts) > 1:
        raise ProgrammingError("You can only execute one statement at a time.")
    return stmts[0] if stmts else None


def may_return_rows(st: Statement | None) -> bool:
    """Whether a statement can have result columns even when it gave no rows."""
    if st is None:
        return False
    if st.kind is Kind.READ:
        return True
    words = sqltext.tokens(st.text, limit=1 << 30)
    if st.kind is Kind.WRITE:
        return "RETURNING" in words
    return st.kind is Kind.OTHER and words[:1] == ["PRAGMA"]


def sets_rowid(st: Statement) -> bool:
    """Whether a writing statement is an INSERT or REPLACE (what sets
    SQLite's last insert rowid when it changed rows)."""
    words = sqltext.tokens(st.text, limit=1 << 30)
    if words[:1] == ["WITH"]:
        return bool({"INSERT", "REPLACE"} & set(words))
    return words[:1] in (["INSERT"], ["REPLACE"])
