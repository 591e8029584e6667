"""Splitting SQL text into statements and sorting them by what they do.

The journaled connection must see transaction control and schema changes
before SQLite runs them (the journal row is written inside the transaction,
ahead of COMMIT). Only leading keywords are inspected; SQLite itself still
parses and runs every statement.
"""

from __future__ import annotations

import enum
import functools
from typing import NamedTuple

import apsw


class Kind(enum.Enum):
    READ = "read"  # SELECT, VALUES, EXPLAIN, read-only WITH
    WRITE = "write"  # INSERT, UPDATE, DELETE, REPLACE, writing WITH
    DDL = "ddl"  # CREATE/DROP of indexes, views, triggers; CREATE TABLE
    DDL_RESHAPE = "ddl-reshape"  # ALTER TABLE, DROP TABLE: reshape captured rows
    BEGIN = "begin"
    COMMIT = "commit"
    ROLLBACK = "rollback"
    SAVEPOINT = "savepoint"
    RELEASE = "release"
    ROLLBACK_TO = "rollback-to"
    VACUUM = "vacuum"
    OTHER = "other"  # PRAGMA, ANALYZE, REINDEX, ATTACH, temp DDL ...: not journaled


class Statement(NamedTuple):
    text: str
    kind: Kind
    name: str = ""  # savepoint name; table name of CREATE TABLE ... AS
    eager: bool = False  # BEGIN IMMEDIATE/EXCLUSIVE/CONCURRENT
    create_as: bool = False  # CREATE TABLE ... AS SELECT
    ended: bool = False  # a ";" ended it in the source (hctree journals it with it)


def tokens(sql: str, limit: int = 64) -> list[str]:
    """Leading tokens: words upper-cased, quoted identifiers unquoted,
    punctuation as single characters; comments and strings skipped."""
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n and len(out) < limit:
        c = sql[i]
        if c.isspace():
            i += 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c in '"`[':
            close = "]" if c == "[" else c
            j = i + 1
            buf = []
            while j < n:
                if sql[j] == close:
                    if close != "]" and j + 1 < n and sql[j + 1] == close:
                        buf.append(close)
                        j += 2
                        continue
                    break
                buf.append(sql[j])
                j += 1
            out.append("\x00" + "".join(buf))  # marker: quoted identifier
            i = j + 1
        elif c == "'":
            j = i + 1
            while j < n:
                if sql[j] == "'":
                    if j + 1 < n and sql[j + 1] == "'":
                        j += 2
                        continue
                    break
                j += 1
            out.append("'")
            i = j + 1
        elif c.isalnum() or c == "_" or ord(c) > 127:
            j = i
            while j < n and (sql[j].isalnum() or sql[j] in "_$" or ord(sql[j]) > 127):
                j += 1
            out.append(sql[i:j].upper())
            i = j
        else:
            out.append(c)
            i += 1
    return out


def ident(tok: str) -> str:
    """A token as an identifier (quoted ones keep their case)."""
    return tok[1:] if tok.startswith("\x00") else tok


def split(sql: str) -> list[str]:
    """Split into complete statements (trigger bodies stay whole)."""
    return [text for text, _ in split_ended(sql)]


def split_ended(sql: str) -> list[tuple[str, bool]]:
    """:func:`split`, and whether a ";" ended each statement."""
    out: list[tuple[str, bool]] = []
    start = 0
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`[":
            close = "]" if c == "[" else c
            j = sql.find(close, i + 1)
            while j >= 0 and close != "]" and j + 1 < n and sql[j + 1] == close:
                j = sql.find(close, j + 2)
            i = n if j < 0 else j + 1
            continue
        if sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        if sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        if c == ";" and apsw.complete(sql[start : i + 1]):
            _add(out, sql[start:i], True)
            start = i + 1
        i += 1
    _add(out, sql[start:], False)
    return out


def _add(out: list[tuple[str, bool]], text: str, ended: bool) -> None:
    if tokens(text, 1):
        out.append((text.strip(), ended))


_WRITE_WORDS = frozenset({"INSERT", "UPDATE", "DELETE", "REPLACE"})
# PRAGMAs that set what the database file holds (migration tools read user_version)
_REPLICATED_PRAGMAS = frozenset({"USER_VERSION", "APPLICATION_ID"})


def classify(text: str) -> Statement:
    t = tokens(text)
    if not t:
        return Statement(text, Kind.OTHER)
    w = t[0]
    nxt = t[1] if len(t) > 1 else ""
    if w == "BEGIN":
        return Statement(text, Kind.BEGIN, eager=nxt in ("IMMEDIATE", "EXCLUSIVE", "CONCURRENT"))
    if w in ("COMMIT", "END"):
        return Statement(text, Kind.COMMIT)
    if w == "ROLLBACK":
        if "TO" in t:
            return Statement(text, Kind.ROLLBACK_TO, name=_last_name(t))
        return Statement(text, Kind.ROLLBACK)
    if w == "SAVEPOINT":
        return Statement(text, Kind.SAVEPOINT, name=_last_name(t))
    if w == "RELEASE":
        return Statement(text, Kind.RELEASE, name=_last_name(t))
    if w == "CREATE":
        if nxt in ("TEMP", "TEMPORARY"):
            return Statement(text, Kind.OTHER)
        if nxt == "TABLE":
            name, rest = _object_name(t[2:])
            if rest and rest[0] == "AS":
                return Statement(text, Kind.DDL, name=name, create_as=True)
        return Statement(text, Kind.DDL)
    if w == "DROP":
        return Statement(text, Kind.DDL_RESHAPE if nxt == "TABLE" else Kind.DDL)
    if w == "ALTER":
        return Statement(text, Kind.DDL_RESHAPE)
    if w in _WRITE_WORDS:
        return Statement(text, Kind.WRITE)
    if w in ("SELECT", "VALUES", "EXPLAIN"):
        return Statement(text, Kind.READ)
    if w == "WITH":
        full = tokens(text, limit=1 << 30)
        return Statement(text, Kind.WRITE if _WRITE_WORDS.intersection(full) else Kind.READ)
    if w == "PRAGMA" and _REPLICATED_PRAGMAS.intersection(t) and ("=" in t or "(" in t):
        return Statement(text, Kind.DDL)  # journaled with the schema: followers run it too
    if w == "VACUUM":
        # VACUUM INTO writes another file; plain VACUUM may renumber rowids.
        return Statement(text, Kind.OTHER if "INTO" in t else Kind.VACUUM)
    return Statement(text, Kind.OTHER)


def _last_name(t: list[str]) -> str:
    return ident(t[-1]).lower() if t else ""


def _object_name(t: list[str]) -> tuple[str, list[str]]:
    """Parse ``[IF NOT EXISTS] [schema.]name`` -> (name, remaining tokens)."""
    if t[:3] == ["IF", "NOT", "EXISTS"]:
        t = t[3:]
    if len(t) >= 3 and t[1] == ".":
        t = t[2:]
    if not t:
        return "", []
    return ident(t[0]), t[1:]


@functools.lru_cache(maxsize=4096)
def parse(sql: str) -> tuple[Statement, ...]:
    """Statements of ``sql``, classified. Cached: the hot path sees the same text often."""
    out = []
    for text, ended in split_ended(sql):
        st = classify(text)
        out.append(Statement(*st[:-1], ended=True) if ended else st)
    return tuple(out)


def ddl_texts(st: Statement) -> tuple[str, str]:
    """A schema statement's text in our journal, and in hctree's (with the
    ";" that ended it in the source: FORMAT.md, section 4)."""
    return st.text, st.text + ";" if st.ended else st.text
