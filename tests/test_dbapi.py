"""The DB-API 2.0 driver (hctserver.client.dbapi): PEP 249's checklist, and
cases adapted from CPython's Lib/test/test_sqlite3 (dbapi, regression,
types, transactions, factories) that apply to it. Each runs on real files."""

from __future__ import annotations

import datetime
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest

import hctserver.client.dbapi as db
import sqlnodes
from hctserver import errors
from hctserver.client import exceptions, remote
from hctserver.client.backend import Result
from hctserver.client.local import LocalBackend
from hctserver.client.remote import RemoteBackend

# Where the driver tests run. "local": a new file in tmp_path (hctserver.connect
# makes it a replication-enabled database). "network": a leader node in this
# process serving a new database over HTTP (http://127.0.0.1:PORT).
TARGETS = ["local", "network"]


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "db.sqlite")
        return
    assert request.param == "network", request.param
    with sqlnodes.leader(tmp_path / "leader.db") as node:
        yield sqlnodes.url_of(node)


@pytest.fixture
def local(target: str) -> str:
    """For tests of what only a file on this machine has."""
    if "://" in target:
        pytest.skip("a database file on this machine only")
    return target


@pytest.fixture
def con(target: str) -> Iterator[db.Connection]:
    c = db.connect(target)
    yield c
    c.close()


@pytest.fixture
def cur(con: db.Connection) -> db.Cursor:
    con.execute("CREATE TABLE test(id INTEGER PRIMARY KEY, name TEXT, income INTEGER)")
    con.execute("INSERT INTO test(name) VALUES ('foo')")
    con.commit()
    return con.cursor()


# --- PEP 249: the module ---------------------------------------------------------


def test_module_globals() -> None:
    assert db.apilevel == "2.0"
    assert db.threadsafety in (0, 1, 2, 3)
    assert db.paramstyle in ("qmark", "numeric", "named", "format", "pyformat")
    assert callable(db.connect)
    assert db.PARSE_DECLTYPES == sqlite3.PARSE_DECLTYPES
    assert db.PARSE_COLNAMES == sqlite3.PARSE_COLNAMES
    assert db.sqlite_version_info >= (3, 35)


EXCEPTIONS = [
    ("Warning", Exception),
    ("Error", Exception),
    ("InterfaceError", db.Error),
    ("DatabaseError", db.Error),
    ("DataError", db.DatabaseError),
    ("OperationalError", db.DatabaseError),
    ("IntegrityError", db.DatabaseError),
    ("InternalError", db.DatabaseError),
    ("ProgrammingError", db.DatabaseError),
    ("NotSupportedError", db.DatabaseError),
]


@pytest.mark.parametrize(("name", "base"), EXCEPTIONS)
def test_exception_hierarchy(name: str, base: type) -> None:
    cls = getattr(db, name)
    assert issubclass(cls, base)
    assert issubclass(cls, getattr(sqlite3, name)), "sqlite3's class of the same name"
    assert getattr(db.Connection, name) is cls, "PEP 249's optional connection attribute"
    assert not issubclass(db.Warning, db.Error)


def test_constructors_and_type_objects() -> None:
    assert db.Date(2020, 1, 2) == datetime.date(2020, 1, 2)
    assert db.Time(3, 4, 5) == datetime.time(3, 4, 5)
    assert db.Timestamp(2020, 1, 2, 3, 4, 5) == datetime.datetime(2020, 1, 2, 3, 4, 5)
    ticks = datetime.datetime(2021, 6, 7, 8, 9, 10).timestamp()
    assert db.DateFromTicks(ticks) == datetime.date(2021, 6, 7)
    assert db.TimeFromTicks(ticks) == datetime.time(8, 9, 10)
    assert db.TimestampFromTicks(ticks) == datetime.datetime(2021, 6, 7, 8, 9, 10)
    assert bytes(db.Binary(b"\x00x")) == b"\x00x"
    assert db.STRING == "VARCHAR(10)" and db.STRING == "text" and db.STRING != "INTEGER"
    assert db.NUMBER == "INTEGER" and db.NUMBER == "REAL" and db.NUMBER != "BLOB"
    assert db.BINARY == "BLOB" and db.BINARY != "TEXT"
    assert db.DATETIME == "TIMESTAMP" and db.DATETIME == "date"
    assert db.ROWID == "ROWID" and db.ROWID != "INTEGER"


# --- PEP 249: connections and cursors -------------------------------------------


def test_connection_and_cursor_interface(con: db.Connection) -> None:
    for name in ("close", "commit", "rollback", "cursor", "execute", "executemany"):
        assert callable(getattr(con, name)), name
    cur = con.cursor()
    for name in ("close", "execute", "executemany", "fetchone", "fetchmany", "fetchall"):
        assert callable(getattr(cur, name)), name
    assert cur.description is None
    assert cur.rowcount == -1
    assert cur.lastrowid is None
    assert cur.arraysize == 1
    assert cur.connection is con
    cur.setinputsizes([10])
    cur.setoutputsize(10)
    cur.setoutputsize(10, 0)


def test_cursor_description(cur: db.Cursor) -> None:
    cur.execute("SELECT id, name AS n, income FROM test")
    assert cur.description is not None
    assert [d[0] for d in cur.description] == ["id", "n", "income"]
    assert all(len(d) == 7 and d[1:] == (None,) * 6 for d in cur.description)
    cur.execute("INSERT INTO test(name) VALUES ('x')")
    assert cur.description is None


def test_description_of_an_empty_result(cur: db.Cursor) -> None:
    """SQLAlchemy tells row-returning statements by description: an empty
    result must have one."""
    cur.execute("SELECT name, income FROM test WHERE id < 0")
    assert cur.description is not None and [d[0] for d in cur.description] == ["name", "income"]
    assert cur.fetchall() == []
    cur.execute("PRAGMA table_info(test)")
    assert cur.description is not None and cur.description[1][0] == "name"


def test_fetch_methods(cur: db.Cursor) -> None:
    cur.executemany("INSERT INTO test(name) VALUES (?)", [("a",), ("b",), ("c",)])
    cur.execute("SELECT name FROM test ORDER BY id")
    assert cur.fetchone() == ("foo",)
    assert cur.fetchmany() == [("a",)]  # arraysize 1
    cur.arraysize = 5
    assert cur.fetchmany(1) == [("b",)]
    assert cur.fetchall() == [("c",)]
    assert cur.fetchone() is None
    assert cur.fetchmany() == []
    assert cur.fetchall() == []
    cur.execute("SELECT name FROM test ORDER BY id")
    assert [r[0] for r in cur] == ["foo", "a", "b", "c"]


def test_execute_returns_the_cursor(cur: db.Cursor) -> None:
    assert cur.execute("SELECT 1") is cur
    assert cur.executemany("INSERT INTO test(name) VALUES (?)", [("x",)]) is cur
    assert cur.executescript("SELECT 1;") is cur


def test_connection_shortcuts(con: db.Connection) -> None:
    con.executescript("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
    con.executemany("INSERT INTO t VALUES (?)", [(2,), (3,)])
    assert con.execute("SELECT sum(x) FROM t").fetchone() == (6,)


# --- errors ----------------------------------------------------------------------


def test_sqlite3_handlers_catch_a_unique_violation(con: db.Connection) -> None:
    con.execute("CREATE TABLE u(x UNIQUE)")
    con.execute("INSERT INTO u VALUES (1)")
    with pytest.raises(sqlite3.IntegrityError) as info:
        con.execute("INSERT INTO u VALUES (1)")
    e = info.value
    assert isinstance(e, db.IntegrityError) and isinstance(e, sqlite3.DatabaseError)
    assert e.sqlite_errorcode == 2067  # SQLITE_CONSTRAINT_UNIQUE
    assert e.sqlite_errorname == "SQLITE_CONSTRAINT_UNIQUE"
    assert "UNIQUE constraint failed" in str(e)
    con.rollback()


def test_not_null_and_check_violations_are_integrity_errors(con: db.Connection) -> None:
    con.execute("CREATE TABLE c(x NOT NULL CHECK (x > 0))")
    with pytest.raises(db.IntegrityError) as info:
        con.execute("INSERT INTO c VALUES (NULL)")
    assert info.value.sqlite_errorname == "SQLITE_CONSTRAINT_NOTNULL"
    with pytest.raises(db.IntegrityError):
        con.execute("INSERT INTO c VALUES (-1)")


def test_bad_sql_is_an_operational_error(con: db.Connection) -> None:
    with pytest.raises(db.OperationalError) as info:
        con.execute("SELEC 1")
    assert info.value.sqlite_errorname == "SQLITE_ERROR"
    with pytest.raises(sqlite3.OperationalError):
        con.execute("SELECT * FROM no_such_table")


def test_several_statements_in_execute(con: db.Connection) -> None:
    with pytest.raises(db.ProgrammingError, match="one statement at a time"):
        con.execute("SELECT 1; SELECT 2")


def test_vacuum_is_not_supported(con: db.Connection) -> None:
    with pytest.raises(db.NotSupportedError, match="VACUUM"):
        con.execute("VACUUM")


@pytest.mark.parametrize(
    ("name", "cls", "code"),
    [
        ("SQLITE_CONSTRAINT_UNIQUE", db.IntegrityError, 2067),
        ("SQLITE_CONSTRAINT", db.IntegrityError, 19),
        ("SQLITE_MISMATCH", db.IntegrityError, 20),
        ("SQLITE_BUSY", db.OperationalError, 5),
        ("SQLITE_BUSY_SNAPSHOT", db.OperationalError, 517),
        ("SQLITE_ERROR", db.OperationalError, 1),
        ("SQLITE_READONLY", db.OperationalError, 8),
        ("SQLITE_IOERR_WRITE", db.OperationalError, 778),
        ("SQLITE_FULL", db.OperationalError, 13),
        ("SQLITE_NOMEM", db.OperationalError, 7),
        ("SQLITE_SCHEMA", db.OperationalError, 17),
        ("SQLITE_INTERNAL", db.InternalError, 2),
        ("SQLITE_NOTFOUND", db.InternalError, 12),
        ("SQLITE_CORRUPT", db.DatabaseError, 11),
        ("SQLITE_NOTADB", db.DatabaseError, 26),
        ("SQLITE_TOOBIG", db.DataError, 18),
        ("SQLITE_MISUSE", db.InterfaceError, 21),
        ("SQLITE_RANGE", db.InterfaceError, 25),
        ("NOT_A_CODE", db.DatabaseError, None),
    ],
)
def test_result_codes_map_as_in_cpython(name: str, cls: type, code: int | None) -> None:
    e = exceptions.from_code(name, "message")
    assert type(e) is cls
    assert str(e) == "message"
    assert e.sqlite_errorname == name
    assert e.sqlite_errorcode == code


def test_apsw_errors_keep_their_extended_code() -> None:
    conn = apsw.Connection(":memory:")
    conn.execute("CREATE TABLE t(x PRIMARY KEY)")
    conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(apsw.ConstraintError) as info:
        conn.execute("INSERT INTO t VALUES (1)")
    e = exceptions.from_apsw(info.value)
    assert type(e) is db.IntegrityError
    assert e.sqlite_errorname == "SQLITE_CONSTRAINT_PRIMARYKEY"
    with pytest.raises(apsw.BindingsError) as binding:
        conn.execute("SELECT ?", (1, 2))
    assert type(exceptions.from_apsw(binding.value)) is db.ProgrammingError


@pytest.mark.parametrize(
    ("error", "cls", "name"),
    [
        (errors.NotLeaderError("follows", leader="x:1"), db.OperationalError, "SQLITE_READONLY"),
        (errors.NoNodeError("no node"), db.OperationalError, "SQLITE_READONLY"),
        (errors.ModeError("mode"), db.OperationalError, "SQLITE_READONLY"),
        (errors.BusyError("busy"), db.OperationalError, "SQLITE_BUSY"),
        (errors.DiskFullError("full"), db.OperationalError, "SQLITE_FULL"),
        (errors.CommitUnknownError("unknown", cid=3), db.OperationalError, None),
        (errors.UnsupportedStatementError("no"), db.NotSupportedError, "SQLITE_AUTH"),
        (errors.ConnectError("down"), db.OperationalError, None),
        (errors.JournalError("other"), db.DatabaseError, None),
    ],
)
def test_hctserver_errors_map(error: errors.HctError, cls: type, name: str | None) -> None:
    e = exceptions.from_hct(error)
    assert type(e) is cls and str(e) == str(error)
    assert e.sqlite_errorname == name


# --- parameters ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [None, 0, -1, 2**63 - 1, -(2**63), 3.5, "", "häßlich ✓", "a\x00b", b"", b"\x00\xff"],
)
def test_values_round_trip(con: db.Connection, value: Any) -> None:
    con.execute("CREATE TABLE v(x)")
    con.execute("INSERT INTO v VALUES (?)", (value,))
    got = con.execute("SELECT x FROM v").fetchone()[0]
    assert got == value and type(got) is type(value)


def test_named_parameters(con: db.Connection) -> None:
    row = con.execute("SELECT :a, @b, $c, :a", {"a": 1, "b": "two", "c": None}).fetchone()
    assert row == (1, "two", None, 1)


def test_a_missing_named_parameter(con: db.Connection) -> None:
    with pytest.raises(db.ProgrammingError, match="binding parameter :b"):
        con.execute("SELECT :a, :b", {"a": 1})


@pytest.mark.parametrize("params", [(), (1, 2)])
def test_wrong_number_of_bindings(con: db.Connection, params: tuple[int, ...]) -> None:
    with pytest.raises(db.ProgrammingError):
        con.execute("SELECT ?", params)


def test_a_dict_for_question_marks(con: db.Connection) -> None:
    with pytest.raises(db.ProgrammingError):
        con.execute("SELECT ?", {"x": 1})


@pytest.mark.parametrize("params", [42, "ab", object()])
def test_parameters_of_an_unsupported_type(con: db.Connection, params: Any) -> None:
    with pytest.raises(db.ProgrammingError, match="unsupported type"):
        con.execute("SELECT ?", params)


@pytest.mark.parametrize("value", [object(), datetime.time(1, 2), [1], {1: 2}])
def test_values_of_an_unsupported_type(con: db.Connection, value: Any) -> None:
    with pytest.raises(db.ProgrammingError, match="Error binding parameter"):
        con.execute("SELECT ?", (value,))


def test_too_big_an_integer(con: db.Connection) -> None:
    with pytest.raises(OverflowError):
        con.execute("SELECT ?", (2**63,))


def test_values_are_adapted_as_sqlite3_does(con: db.Connection) -> None:
    class Text(str):
        pass

    row = con.execute(
        "SELECT ?, typeof(?), ?, ?, ?, ?",
        (True, False, bytearray(b"ab"), memoryview(b"cd"), Text("t"), 1.0),
    ).fetchone()
    assert row == (1, "integer", b"ab", b"cd", "t", 1.0)
    assert type(row[4]) is str


def test_default_date_adapters(con: db.Connection) -> None:
    row = con.execute(
        "SELECT ?, ?", (datetime.date(2020, 1, 2), datetime.datetime(2020, 1, 2, 3, 4, 5, 600))
    ).fetchone()
    assert row == ("2020-01-02", "2020-01-02 03:04:05.000600")


class Point:
    def __init__(self, x: float, y: float) -> None:
        self.x, self.y = x, y


class Conforming(Point):
    def __conform__(self, protocol: Any) -> str | None:
        if protocol is sqlite3.PrepareProtocol:
            return f"{self.x};{self.y}"
        return None


def test_register_adapter_and_conform(con: db.Connection) -> None:
    db.register_adapter(Point, lambda p: f"({p.x}, {p.y})")
    try:
        assert con.execute("SELECT ?", (Point(1, 2),)).fetchone() == ("(1, 2)",)
    finally:
        del db.adapters[Point]
    assert con.execute("SELECT ?", (Conforming(3, 4),)).fetchone() == ("3;4",)


# --- converters and detect_types ---------------------------------------------


@pytest.fixture
def typed(target: str) -> Iterator[db.Connection]:
    c = db.connect(target, detect_types=db.PARSE_DECLTYPES | db.PARSE_COLNAMES)
    c.execute("CREATE TABLE d(i INTEGER, d DATE, ts TIMESTAMP, p POINT(10), t TEXT)")
    yield c
    c.close()


def test_default_converters(typed: db.Connection) -> None:
    day = datetime.date(2022, 3, 4)
    when = datetime.datetime(2022, 3, 4, 5, 6, 7, 890)
    typed.execute("INSERT INTO d(d, ts) VALUES (?, ?)", (day, when))
    typed.execute("INSERT INTO d(d, ts) VALUES (?, ?)", (None, "2022-03-04 05:06:07"))
    rows = typed.execute("SELECT d, ts FROM d").fetchall()
    assert rows == [(day, when), (None, datetime.datetime(2022, 3, 4, 5, 6, 7))]


def test_a_registered_converter_gets_bytes(typed: db.Connection) -> None:
    seen: list[Any] = []

    def point(value: bytes) -> tuple[float, ...]:
        seen.append(value)
        return tuple(float(v) for v in value.split(b";"))

    db.register_converter("point", point)
    try:
        typed.execute("INSERT INTO d(i, p) VALUES (7, '1;2')")
        typed.execute("INSERT INTO d(i, p) VALUES (8, NULL)")
        assert typed.execute("SELECT p, i FROM d ORDER BY i").fetchall() == [
            ((1.0, 2.0), 7),
            (None, 8),
        ]
        assert seen == [b"1;2"], "not called for NULL"
        # a converter named in the column name wins (PARSE_COLNAMES); the name is cut at " ["
        cur = typed.execute('SELECT i AS "i [point]" FROM d WHERE i = 7')
        assert cur.fetchone() == ((7.0,),)
        assert cur.description is not None and cur.description[0][0] == "i"
    finally:
        del db.converters["POINT"]


def test_no_conversion_without_detect_types(con: db.Connection) -> None:
    con.execute("CREATE TABLE d(d DATE)")
    con.execute("INSERT INTO d VALUES (?)", (datetime.date(2020, 1, 2),))
    cur = con.execute('SELECT d AS "d [date]" FROM d')
    assert cur.fetchone() == ("2020-01-02",)
    assert cur.description is not None and cur.description[0][0] == "d [date]"


def test_text_factory(con: db.Connection) -> None:
    con.text_factory = bytes
    assert con.execute("SELECT 'ä', 1").fetchone() == ("ä".encode(), 1)
    con.text_factory = lambda b: b.decode().upper()
    assert con.execute("SELECT 'abc'").fetchone() == ("ABC",)
    con.text_factory = str
    assert con.execute("SELECT 'abc'").fetchone() == ("abc",)


# --- row factories ---------------------------------------------------------------


@pytest.mark.parametrize("factory", [db.Row, sqlite3.Row])
def test_row(con: db.Connection, factory: Any) -> None:
    con.row_factory = factory
    row = con.execute("SELECT 1 AS a, 'two' AS B").fetchone()
    assert isinstance(row, db.Row)
    assert row[0] == row["a"] == row["A"] == 1
    assert row["b"] == "two" and row[-1] == "two"
    assert row[0:2] == (1, "two")
    assert row.keys() == ["a", "B"]
    assert len(row) == 2 and list(row) == [1, "two"] and tuple(row) == (1, "two")
    with pytest.raises(IndexError):
        row["c"]
    with pytest.raises(IndexError):
        row[2]
    again = con.execute("SELECT 1 AS a, 'two' AS B").fetchone()
    assert row == again and hash(row) == hash(again)
    assert row != con.execute("SELECT 1 AS a, 'three' AS B").fetchone()
    assert row != con.execute("SELECT 1 AS x, 'two' AS B").fetchone()


def test_a_callable_row_factory(con: db.Connection) -> None:
    def as_dict(cursor: db.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
        assert cursor.description is not None
        return {d[0]: v for d, v in zip(cursor.description, row, strict=True)}

    con.row_factory = as_dict
    assert con.execute("SELECT 1 AS a, 2 AS b").fetchall() == [{"a": 1, "b": 2}]


def test_row_factory_is_taken_when_the_cursor_is_made(con: db.Connection) -> None:
    cur = con.cursor()
    con.row_factory = db.Row
    assert cur.execute("SELECT 1").fetchone() == (1,)
    assert isinstance(con.execute("SELECT 1").fetchone(), db.Row)
    cur.row_factory = lambda c, r: r[0]
    assert cur.execute("SELECT 5").fetchone() == 5


# --- rowcount, lastrowid ---------------------------------------------------------


def test_rowcount(cur: db.Cursor) -> None:
    cur.execute("SELECT * FROM test")
    assert cur.rowcount == -1
    cur.execute("INSERT INTO test(name) VALUES ('a')")
    assert cur.rowcount == 1
    cur.execute("UPDATE test SET income = 5")
    assert cur.rowcount == 2
    cur.execute("UPDATE test SET income = 5 WHERE id < 0")
    assert cur.rowcount == 0
    cur.executemany("INSERT INTO test(name) VALUES (?)", [("b",), ("c",), ("d",)])
    assert cur.rowcount == 3
    cur.executemany("UPDATE test SET income = ? WHERE name = ?", [(1, "a"), (2, "b"), (3, "z")])
    assert cur.rowcount == 2
    cur.execute("DELETE FROM test")
    assert cur.rowcount == 5
    cur.execute("CREATE TABLE other(x)")
    assert cur.rowcount == -1


def test_rowcount_outside_a_transaction(con: db.Connection) -> None:
    """A write committed on its own: its count, not the journal row's."""
    con.isolation_level = None
    con.execute("CREATE TABLE t(x)")
    assert con.execute("INSERT INTO t VALUES (1), (2), (3)").rowcount == 3
    assert con.execute("UPDATE t SET x = x + 1").rowcount == 3
    assert con.executemany("INSERT INTO t VALUES (?)", [(1,), (2,)]).rowcount == 2


def test_lastrowid(cur: db.Cursor) -> None:
    cur.execute("INSERT INTO test(name) VALUES ('a')")
    first = cur.lastrowid
    assert first == 2
    cur.execute("INSERT OR REPLACE INTO test(id, name) VALUES (10, 'b')")
    assert cur.lastrowid == 10
    with pytest.raises(db.IntegrityError):
        cur.execute("INSERT INTO test(id, name) VALUES (10, 'c')")
    assert cur.lastrowid == 10, "unchanged by a failed insert"
    fresh = cur.connection.cursor()
    fresh.executemany("INSERT INTO test(name) VALUES (?)", [("x",)])
    assert fresh.lastrowid is None, "executemany leaves it alone"


def test_returning(con: db.Connection) -> None:
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, x)")
    con.commit()
    cur = con.execute("INSERT INTO t(x) VALUES ('a'), ('b') RETURNING id, x")
    assert cur.description is not None and [d[0] for d in cur.description] == ["id", "x"]
    assert cur.fetchall() == [(1, "a"), (2, "b")]
    assert cur.rowcount == 2
    cur = con.execute("DELETE FROM t WHERE id < 0 RETURNING id")
    assert cur.description is not None and cur.fetchall() == []
    con.commit()
    con.isolation_level = None  # and a RETURNING statement in a transaction of its own
    cur = con.execute("UPDATE t SET x = upper(x) RETURNING x")
    assert sorted(cur.fetchall()) == [("A",), ("B",)]
    assert cur.description is not None and cur.description[0][0] == "x"


# --- closed objects, threads ---------------------------------------------------


def test_closed_connection(target: str) -> None:
    con = db.connect(target)
    cur = con.cursor()
    con.close()
    con.close()  # twice is fine
    for call in (
        lambda: con.execute("SELECT 1"),
        lambda: con.cursor(),
        lambda: con.commit(),
        lambda: con.rollback(),
        lambda: con.in_transaction,
        lambda: cur.execute("SELECT 1"),
        lambda: cur.fetchone(),
    ):
        with pytest.raises(db.ProgrammingError, match="closed database"):
            call()


def test_closed_cursor(con: db.Connection) -> None:
    cur = con.execute("SELECT 1")
    cur.close()
    cur.close()
    for call in (lambda: cur.execute("SELECT 1"), cur.fetchone, cur.fetchall, cur.fetchmany):
        with pytest.raises(db.ProgrammingError, match="closed cursor"):
            call()
    assert con.execute("SELECT 2").fetchone() == (2,), "the connection is still open"


def test_cursor_factory(con: db.Connection) -> None:
    class MyCursor(db.Cursor):
        pass

    assert isinstance(con.cursor(MyCursor), MyCursor)
    with pytest.raises(TypeError):
        con.cursor(lambda c: object())  # type: ignore[arg-type, return-value]


def test_connection_factory(target: str) -> None:
    class MyConnection(db.Connection):
        pass

    con = db.connect(target, factory=MyConnection)
    try:
        assert isinstance(con, MyConnection)
        assert con.execute("SELECT 1").fetchone() == (1,)
    finally:
        con.close()


def in_thread(f: Any) -> BaseException | None:
    out: list[BaseException | None] = [None]

    def run() -> None:
        try:
            f()
        except BaseException as e:
            out[0] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


def test_check_same_thread(target: str) -> None:
    con = db.connect(target, check_same_thread=True)
    try:
        err = in_thread(lambda: con.execute("SELECT 1"))
        assert isinstance(err, db.ProgrammingError) and "same thread" in str(err)
    finally:
        con.close()
    con = db.connect(target)  # off by default: one thread at a time
    try:
        assert in_thread(lambda: con.execute("SELECT 1").fetchone()) is None
    finally:
        con.close()


# --- transactions ----------------------------------------------------------------


@pytest.fixture
def two(target: str) -> Iterator[tuple[db.Connection, db.Connection]]:
    a = db.connect(target)
    a.execute("CREATE TABLE t(x)")
    b = db.connect(target)
    yield a, b
    a.close()
    b.close()


def count(con: db.Connection) -> int:
    n = con.execute("SELECT count(*) FROM t").fetchone()[0]
    assert isinstance(n, int)
    return n


def test_a_write_begins_a_transaction(two: tuple[db.Connection, db.Connection]) -> None:
    a, b = two
    assert not a.in_transaction
    a.execute("SELECT * FROM t")
    assert not a.in_transaction, "a read does not begin one"
    a.execute("INSERT INTO t VALUES (1)")
    assert a.in_transaction
    assert count(a) == 1 and count(b) == 0, "uncommitted"
    a.commit()
    assert not a.in_transaction
    assert count(b) == 1


def test_rollback(two: tuple[db.Connection, db.Connection]) -> None:
    a, b = two
    a.execute("INSERT INTO t VALUES (1)")
    a.rollback()
    assert not a.in_transaction
    assert count(a) == 0 and count(b) == 0
    a.commit()  # nothing open: nothing happens
    a.rollback()


def test_ddl_does_not_commit(two: tuple[db.Connection, db.Connection]) -> None:
    a, b = two
    a.execute("INSERT INTO t VALUES (1)")
    a.execute("CREATE TABLE u(y)")
    assert a.in_transaction
    a.rollback()
    assert count(b) == 0
    with pytest.raises(db.OperationalError):
        a.execute("SELECT * FROM u")


def test_close_rolls_back(two: tuple[db.Connection, db.Connection]) -> None:
    a, b = two
    a.execute("INSERT INTO t VALUES (1)")
    a.close()
    assert count(b) == 0


def test_context_manager(two: tuple[db.Connection, db.Connection]) -> None:
    a, b = two
    with a:
        a.execute("INSERT INTO t VALUES (1)")
    assert count(b) == 1
    with pytest.raises(ZeroDivisionError), a:
        a.execute("INSERT INTO t VALUES (2)")
        _ = 1 / 0
    assert count(b) == 1 and not a.in_transaction


@pytest.mark.parametrize("level", ["", "DEFERRED", "IMMEDIATE", "EXCLUSIVE", "immediate"])
def test_isolation_levels(target: str, level: str) -> None:
    con = db.connect(target, isolation_level=level)
    try:
        assert con.isolation_level == level
        con.execute("CREATE TABLE t(x)")
        con.execute("INSERT INTO t VALUES (1)")
        assert con.in_transaction
        con.commit()
        assert count(con) == 1
    finally:
        con.close()


def test_isolation_level_none_is_autocommit(two: tuple[db.Connection, db.Connection]) -> None:
    a, b = two
    a.execute("INSERT INTO t VALUES (1)")
    a.isolation_level = None  # commits the open transaction, as sqlite3
    assert not a.in_transaction and count(b) == 1
    a.execute("INSERT INTO t VALUES (2)")
    assert not a.in_transaction and count(b) == 2
    a.execute("BEGIN")
    a.execute("INSERT INTO t VALUES (3)")
    assert a.in_transaction and count(b) == 2
    a.execute("COMMIT")
    assert count(b) == 3


@pytest.mark.parametrize(("value", "error"), [("SERIALIZABLE", ValueError), (1, TypeError)])
def test_invalid_isolation_levels(con: db.Connection, value: Any, error: type) -> None:
    with pytest.raises(error):
        con.isolation_level = value


def test_autocommit_false(target: str) -> None:
    """Python 3.12's PEP 249 mode: every statement in a transaction."""
    a = db.connect(target, autocommit=False)
    b = db.connect(target)
    try:
        a.execute("CREATE TABLE t(x)")
        assert a.in_transaction
        a.commit()
        assert not a.in_transaction
        a.execute("SELECT * FROM t")
        assert a.in_transaction, "reads too"
        a.execute("INSERT INTO t VALUES (1)")
        a.execute("SAVEPOINT s")
        a.execute("INSERT INTO t VALUES (2)")
        a.execute("ROLLBACK TO s")
        a.execute("RELEASE s")
        assert count(b) == 0
        a.commit()
        assert count(b) == 1
        a.execute("INSERT INTO t VALUES (3)")
        a.rollback()
        assert count(b) == 1
        a.execute("INSERT INTO t VALUES (4)")
        a.autocommit = True  # commits
        assert count(b) == 2 and not a.in_transaction
        a.execute("INSERT INTO t VALUES (5)")
        a.rollback()  # does nothing now
        assert count(b) == 3
    finally:
        a.close()
        b.close()
    with pytest.raises(ValueError):
        db.connect(target, autocommit=2)


def test_executescript_commits_first(two: tuple[db.Connection, db.Connection]) -> None:
    a, b = two
    a.execute("INSERT INTO t VALUES (1)")
    a.executescript("INSERT INTO t VALUES (2); INSERT INTO t VALUES (3);")
    assert count(b) == 3 and not a.in_transaction
    a.executescript("BEGIN; INSERT INTO t VALUES (4); -- and a comment\n")
    assert a.in_transaction and count(b) == 3
    a.commit()
    with pytest.raises(db.OperationalError):
        a.executescript("INSERT INTO t VALUES (5); INSERT INTO nope VALUES (6); SELECT 1;")
    assert count(b) == 5, "what ran before the error stays"
    with pytest.raises(ValueError):
        a.executescript(b"SELECT 1")


def test_executemany_runs_dml_only(cur: db.Cursor) -> None:
    with pytest.raises(db.ProgrammingError, match="DML"):
        cur.executemany("SELECT ?", [(1,)])
    cur.executemany("INSERT INTO test(name) VALUES (?)", (("g",) for _ in range(3)))
    assert cur.rowcount == 3
    cur.executemany("INSERT INTO test(name) VALUES (:n)", [{"n": "h"}])
    assert cur.execute("SELECT count(*) FROM test").fetchone() == (5,)


def test_empty_statements(con: db.Connection) -> None:
    cur = con.execute("")
    assert cur.description is None and cur.fetchall() == []
    assert con.execute("-- only a comment").fetchall() == []


def test_duplicate_and_odd_column_names(con: db.Connection) -> None:
    cur = con.execute('SELECT 1 AS a, 2 AS a, 3 AS "x y"')
    assert cur.description is not None
    assert [d[0] for d in cur.description] == ["a", "a", "x y"]


# --- hctserver's extras ------------------------------------------------------------


def test_last_cid_follows_commits(con: db.Connection) -> None:
    con.execute("CREATE TABLE t(x)")
    first = con.last_cid
    assert first > 0
    con.execute("INSERT INTO t VALUES (1)")
    assert con.last_cid == first, "not committed yet"
    con.commit()
    assert con.last_cid == first + 1
    con.rollback()
    assert con.last_cid == first + 1


def test_a_new_file_is_a_journaled_database(local: str) -> None:
    con = db.connect(local)
    try:
        con.execute("CREATE TABLE t(x)")
        con.execute("INSERT INTO t VALUES (1)")
        con.commit()
        cid = con.last_cid
    finally:
        con.close()
    plain = sqlite3.connect(local)
    try:
        assert plain.execute("SELECT max(cid) FROM hct_journal").fetchone() == (cid,)
    finally:
        plain.close()


def test_remote_options_are_refused_for_a_file(local: str) -> None:
    with pytest.raises(db.ProgrammingError, match="token"):
        db.connect(local, token="secret")


@pytest.mark.parametrize("name", [":memory:", ""])
def test_no_in_memory_database(name: str) -> None:
    with pytest.raises(db.NotSupportedError, match="file"):
        db.connect(name)


def test_options_reach_hctserver_connect(local: str) -> None:
    with pytest.raises(db.DatabaseError, match="synchronous"):
        db.connect(local, synchronous="SOMETIMES")


def test_a_backend_object(local: str) -> None:
    backend = LocalBackend(local)
    con = db.connect(backend)
    try:
        con.execute("CREATE TABLE t(x)")
        con.execute("INSERT INTO t VALUES (?)", (1,))
        con.commit()
        res = backend.execute("SELECT x FROM t", None)
        assert res == Result([("x", None)], [(1,)], -1, res.lastrowid, 0)
    finally:
        con.close()


def backend_of(target: str) -> LocalBackend | RemoteBackend:
    return RemoteBackend(target) if "://" in target else LocalBackend(target)


def test_a_backend_reports_each_commit_s_cid(target: str) -> None:
    backend = backend_of(target)
    try:
        created = backend.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, x TEXT)", None)
        assert created.cid > 0 and created.rowcount == -1
        res = backend.execute("INSERT INTO t(x) VALUES (?)", ["a"])
        assert (res.rowcount, res.lastrowid, res.cid) == (1, 1, created.cid + 1)
        assert res.columns == [] and res.rows == []
        assert backend.execute("SELECT * FROM t", None).cid == 0
        assert backend.execute("UPDATE t SET x = 'b' WHERE id < 0", None).cid == 0
        assert backend.last_cid == created.cid + 1
        many = backend.executemany("INSERT INTO t(x) VALUES (?)", [["b"], ["c"]])
        assert (many.rowcount, many.cid) == (2, created.cid + 2), "one transaction"
        assert backend.executemany("INSERT INTO t(x) VALUES (?)", []).cid == 0
        assert backend.execute("SELECT x FROM t WHERE id = :id", {"id": 3}).columns == [
            ("x", "TEXT")
        ]
        assert backend.execute("BEGIN", None).cid == 0
        assert backend.execute("DELETE FROM t WHERE id = 1", None).cid == 0
        assert backend.execute("COMMIT", None).cid == created.cid + 3
    finally:
        backend.close()


def test_lastrowid_as_in_sqlite3(target: str, tmp_path: Path) -> None:
    """The connection's last inserted rowid after every execute(), reads
    included (0 before any insert); an UPDATE or an insert that inserted
    nothing leaves it; executemany() leaves the cursor's alone."""

    def trace(con: Any) -> list[int | None]:
        cur = con.cursor()
        out = [cur.lastrowid]
        for sql in (
            "SELECT 1",
            "CREATE TABLE t(id INTEGER PRIMARY KEY, x UNIQUE)",
            "INSERT INTO t(x) VALUES (1)",
            "INSERT INTO t(id, x) VALUES (7, 2)",
            "SELECT * FROM t",
            "UPDATE t SET x = x + 10",
            "INSERT OR IGNORE INTO t(x) VALUES (11)",
            "INSERT INTO t(x) VALUES (3) RETURNING id",
            "DELETE FROM t WHERE id = 1",
            "COMMIT",
            "WITH v(a) AS (VALUES (4)) INSERT INTO t(x) SELECT a FROM v",
        ):
            cur.execute(sql)
            cur.fetchall()
            out.append(cur.lastrowid)
        cur.executemany("INSERT INTO t(x) VALUES (?)", [(5,), (6,)])
        out.append(cur.lastrowid)
        out.append(con.cursor().execute("SELECT 2").lastrowid)
        con.commit()
        return out

    ref = sqlite3.connect(tmp_path / "sqlite3.db")
    try:
        expected = trace(ref)
    finally:
        ref.close()
    assert expected == [None, 0, 0, 1, 7, 7, 7, 7, 8, 8, 8, 9, 9, 11]
    con = db.connect(target)
    try:
        assert trace(con) == expected
    finally:
        con.close()


def test_executemany_of_nothing(cur: db.Cursor) -> None:
    cur.executemany("INSERT INTO test(name) VALUES (?)", [])
    assert cur.rowcount == 0  # as sqlite3
    assert cur.execute("SELECT count(*) FROM test").fetchone() == (1,)


def test_a_long_executemany(target: str) -> None:
    """Over the network in batches (remote.MANY_STEPS): outside a transaction
    all or nothing, as on a file; inside one, what ran before an error stays."""
    assert remote.MANY_STEPS < 600
    con = db.connect(target, autocommit=True)
    try:
        con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, x UNIQUE)")
        n = 1234
        cur = con.executemany("INSERT INTO t(x) VALUES (?)", ((i,) for i in range(n)))
        assert cur.rowcount == n
        assert con.execute("SELECT count(*), max(id) FROM t").fetchone() == (n, n)
        assert con.execute("SELECT 1").lastrowid == n
        rows = [(i,) for i in range(n, n + 1100)] + [(5,)]  # UNIQUE fails in the third batch
        with pytest.raises(db.IntegrityError, match="UNIQUE"):
            con.executemany("INSERT INTO t(x) VALUES (?)", rows)
        assert not con.in_transaction
        assert con.execute("SELECT count(*) FROM t").fetchone() == (n,), "all or nothing"
        con.autocommit = db.LEGACY_TRANSACTION_CONTROL  # BEGIN first, as sqlite3
        with pytest.raises(db.IntegrityError):
            con.executemany("INSERT INTO t(x) VALUES (?)", rows)
        assert con.in_transaction
        assert con.execute("SELECT count(*) FROM t").fetchone() == (n + 1100,)
        con.rollback()
        assert con.execute("SELECT count(*) FROM t").fetchone() == (n,)
    finally:
        con.close()


def test_a_stream_the_node_dropped(target: str) -> None:
    """A node forgets an idle stream (its baton): with no transaction open
    the driver goes on on a new one; an open transaction is lost, as a
    broken connection (SQLAlchemy then discards the connection)."""
    if "://" not in target:
        pytest.skip("a node's streams only")
    backend = RemoteBackend(target)
    con = db.connect(backend)
    try:
        con.execute("CREATE TABLE t(x)")
        backend.stream._baton = "expired"  # what an idle stream's baton becomes
        assert con.execute("SELECT count(*) FROM t").fetchone() == (0,)
        con.execute("INSERT INTO t VALUES (1)")
        assert con.in_transaction
        backend.stream._baton = "expired"
        with pytest.raises(db.OperationalError, match="rolled back") as info:
            con.execute("INSERT INTO t VALUES (2)")
        assert isinstance(info.value.__cause__, errors.StreamLostError)
        assert not con.in_transaction
        con.rollback()
        assert con.execute("SELECT count(*) FROM t").fetchone() == (0,)
    finally:
        con.close()


# --- through a follower ------------------------------------------------------------


def test_through_a_follower_s_url(tmp_path: Path) -> None:
    """A follower runs reads itself and sends writes and transactions to its
    leader, answering once it applied them: each write is visible on the
    follower (read there with consistency local) when the call returns."""
    with sqlnodes.cluster(tmp_path, followers=1) as (lead, (follower,)):
        url = sqlnodes.url_of(follower)
        con = db.connect(url, isolation_level=None)  # each statement commits on its own
        reader = db.connect(url, consistency="local")
        try:
            con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, x UNIQUE)")
            assert follower.db.snapshot() >= con.last_cid > 0
            for i in range(1, 11):
                cur = con.execute("INSERT INTO t(x) VALUES (?)", (f"v{i}",))
                assert (cur.rowcount, cur.lastrowid) == (1, i)
                assert follower.db.snapshot() >= con.last_cid
                seen = reader.execute("SELECT count(*), max(id) FROM t").fetchone()
                assert seen == (i, i)
            assert con.execute("SELECT 1").lastrowid == 10, "a read here keeps it"
            cur = con.execute("UPDATE t SET x = x || '!' WHERE id <= 3")
            assert (cur.rowcount, cur.lastrowid) == (3, 10)
            assert reader.execute("SELECT count(*) FROM t WHERE x LIKE '%!'").fetchone() == (3,)
            many = con.executemany("INSERT INTO t(x) VALUES (?)", [("m1",), ("m2",)])
            assert many.rowcount == 2
            assert reader.execute("SELECT count(*) FROM t").fetchone() == (12,)
            with pytest.raises(db.IntegrityError) as info:
                con.execute("INSERT INTO t(x) VALUES ('v5')")
            assert info.value.sqlite_errorname == "SQLITE_CONSTRAINT_UNIQUE"

            # an interactive transaction: it stays on the leader until it ends
            before = con.last_cid
            con.execute("BEGIN")
            assert con.in_transaction
            cur = con.execute("INSERT INTO t(x) VALUES ('tx')")
            assert cur.lastrowid == 13
            assert con.execute("SELECT count(*) FROM t").fetchone() == (13,), "sees its insert"
            assert reader.execute("SELECT count(*) FROM t").fetchone() == (12,), "others don't"
            assert con.last_cid == before
            con.execute("COMMIT")
            assert not con.in_transaction and con.last_cid == before + 1
            assert reader.execute("SELECT x FROM t WHERE id = 13").fetchone() == ("tx",)
            con.execute("BEGIN")
            con.execute("DELETE FROM t")
            con.execute("ROLLBACK")
            assert reader.execute("SELECT count(*) FROM t").fetchone() == (13,)

            # the legacy mode's implicit BEGIN, and the leader's snapshot on demand
            legacy = db.connect(url)
            try:
                legacy.execute("INSERT INTO t(x) VALUES ('legacy')")
                assert legacy.in_transaction
                legacy.commit()
                assert reader.execute("SELECT count(*) FROM t").fetchone() == (14,)
            finally:
                legacy.close()
            fresh = db.connect(url, consistency="leader")
            try:
                assert fresh.execute("SELECT count(*) FROM t").fetchone() == (14,)
            finally:
                fresh.close()
        finally:
            con.close()
            reader.close()
        with apsw.Connection(str(lead.db.path), flags=apsw.SQLITE_OPEN_READONLY) as c:
            assert c.execute("SELECT count(*) FROM t").fetchone() == (14,)
