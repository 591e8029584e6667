"""The SQLAlchemy dialect (hctserver.client.sqlalchemy): URLs, Core, the ORM,
transactions and savepoints, reflection, on real database files."""

from __future__ import annotations

import datetime
import sqlite3
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import apsw
import pytest

import sqlnodes

sqlalchemy = pytest.importorskip("sqlalchemy")

from sqlalchemy import (  # noqa: E402 - after the skip
    Engine,
    ForeignKey,
    String,
    create_engine,
    event,
    exc,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.orm import (  # noqa: E402
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
)

from hctserver.client import dbapi  # noqa: E402
from hctserver.client.sqlalchemy import HctDialect  # noqa: E402

from helpers import wait_until  # noqa: E402

# Where the tests run. "local": a new file in tmp_path, as
# sqlite+hctserver:///path. "network": a leader node in this process serving a
# new database over HTTP, as sqlite+hctserver://127.0.0.1:PORT.
TARGETS = ["local", "network"]


@pytest.fixture(params=TARGETS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield f"sqlite+hctserver:///{tmp_path / 'db.sqlite'}"
        return
    assert request.param == "network", request.param
    with sqlnodes.leader(tmp_path / "leader.db") as node:
        yield "sqlite+hctserver://" + sqlnodes.url_of(node).removeprefix("http://")


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    e = create_engine(url)
    yield e
    e.dispose()


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)
    born: Mapped[datetime.date | None]
    books: Mapped[list[Book]] = relationship(back_populates="author")


class Book(Base):
    __tablename__ = "books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    added: Mapped[datetime.datetime | None]
    author_id: Mapped[int] = mapped_column(ForeignKey("authors.id"))
    author: Mapped[Author] = relationship(back_populates="books")


@pytest.fixture
def orm(engine: Engine) -> Engine:
    Base.metadata.create_all(engine)
    return engine


def names(engine: Engine) -> list[str]:
    with Session(engine) as s:
        return list(s.scalars(select(Author.name).order_by(Author.name)))


# --- URLs and the dialect -------------------------------------------------------


def test_both_names_load_the_dialect(tmp_path: Path) -> None:
    for scheme in ("sqlite+hctserver", "hctserver"):
        e = create_engine(f"{scheme}:///{tmp_path / 'x.db'}")
        try:
            assert isinstance(e.dialect, HctDialect)
            assert e.dialect.driver == "hctserver" and e.dialect.name == "sqlite"
            assert e.dialect.dbapi is dbapi
            with e.connect() as c:
                assert c.execute(text("SELECT 1 + 1")).scalar() == 2
        finally:
            e.dispose()


def test_connect_args_of_a_file(tmp_path: Path) -> None:
    d = HctDialect()
    args, opts = d.create_connect_args(make_url(f"sqlite+hctserver:///{tmp_path}/a.db?timeout=2"))
    assert args == [f"{tmp_path}/a.db"]
    assert opts == {"autocommit": False, "check_same_thread": False, "timeout": 2.0}
    args, _ = d.create_connect_args(make_url("sqlite+hctserver:///rel.db"))
    assert args == [str(Path("rel.db").resolve())]


def test_connect_args_of_a_node() -> None:
    d = HctDialect()
    args, opts = d.create_connect_args(
        make_url("sqlite+hctserver://db1:8080?tls=1&ca=/etc/ca.pem&token_file=/run/tok")
    )
    assert args == ["https://db1:8080"]
    assert opts["ca"] == "/etc/ca.pem" and opts["token_file"] == "/run/tok"
    args, opts = d.create_connect_args(
        make_url("sqlite+hctserver://:s3cret@db1?consistency=leader")
    )
    assert args == ["http://db1"]
    assert opts["token"] == "s3cret" and opts["consistency"] == "leader"


@pytest.mark.parametrize(
    "bad", ["sqlite+hctserver://", "sqlite+hctserver:///:memory:", "sqlite+hctserver:///a.db?x=1"]
)
def test_bad_urls(bad: str) -> None:
    with pytest.raises(exc.ArgumentError):
        HctDialect().create_connect_args(make_url(bad))


def test_no_pragma_on_connect(engine: Engine) -> None:
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]), named=False)
    with engine.connect() as c:
        c.execute(text("SELECT 1"))
        assert c.get_isolation_level() == "SERIALIZABLE"
    assert not [s for s in seen if "PRAGMA" in s.upper()], seen


def test_server_version(engine: Engine) -> None:
    with engine.connect():
        pass
    assert engine.dialect.server_version_info is not None
    assert engine.dialect.server_version_info >= (3, 35)


# --- Core ----------------------------------------------------------------------


def test_core_round_trip(engine: Engine) -> None:
    with engine.begin() as c:
        c.execute(text("CREATE TABLE t(id INTEGER PRIMARY KEY, x TEXT)"))
        c.execute(text("INSERT INTO t(x) VALUES (:x)"), [{"x": "a"}, {"x": "b"}])
    with engine.connect() as c:
        assert c.execute(text("SELECT x FROM t ORDER BY id")).scalars().all() == ["a", "b"]
        assert c.execute(text("SELECT x FROM t WHERE id < 0")).all() == []
        r = c.execute(text("UPDATE t SET x = 'c'"))
        assert r.rowcount == 2
        c.rollback()
        assert c.execute(text("SELECT count(*) FROM t WHERE x = 'c'")).scalar() == 0


def test_reads_are_repeatable_within_a_transaction(engine: Engine) -> None:
    """Reads run in the transaction too (not sqlite3's legacy mode, which
    leaves them outside): one snapshot until commit or rollback."""
    with engine.begin() as c:
        c.execute(text("CREATE TABLE t(x)"))
    with engine.connect() as reader:
        assert reader.execute(text("SELECT count(*) FROM t")).scalar() == 0
        with engine.begin() as writer:
            writer.execute(text("INSERT INTO t VALUES (1)"))
        assert reader.execute(text("SELECT count(*) FROM t")).scalar() == 0
        reader.rollback()
        assert reader.execute(text("SELECT count(*) FROM t")).scalar() == 1


def test_autocommit_isolation_level(engine: Engine) -> None:
    with engine.begin() as c:
        c.execute(text("CREATE TABLE t(x)"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        assert c.get_isolation_level() == "AUTOCOMMIT"
        c.execute(text("INSERT INTO t VALUES (1)"))
        with engine.connect() as other:  # seen at once, without a commit
            assert other.execute(text("SELECT count(*) FROM t")).scalar() == 1
    with engine.connect() as c:  # the pool gives it back in its default mode
        assert c.get_isolation_level() == "SERIALIZABLE"
    with engine.connect() as c, pytest.raises(exc.ArgumentError):
        c.execution_options(isolation_level="READ UNCOMMITTED")


# --- the ORM -----------------------------------------------------------------------


def test_orm_insert_query_update(orm: Engine) -> None:
    with Session(orm) as s:
        ann = Author(name="Ann", born=datetime.date(1970, 1, 2))
        s.add_all([ann, Author(name="Bob")])
        s.add_all([Book(title=f"B{i}", author=ann) for i in range(5)])
        s.commit()
        assert ann.id is not None and all(b.id for b in ann.books)
    with Session(orm) as s:
        ann = s.scalars(select(Author).where(Author.name == "Ann")).one()
        assert ann.born == datetime.date(1970, 1, 2)
        assert sorted(b.title for b in ann.books) == ["B0", "B1", "B2", "B3", "B4"]
        ann.name = "Anne"
        s.commit()
        assert s.scalars(select(Author).where(Author.name == "nobody")).all() == []
    assert names(orm) == ["Anne", "Bob"]


def test_orm_rollback(orm: Engine) -> None:
    with Session(orm) as s:
        s.add(Author(name="Kept"))
        s.commit()
        s.add(Author(name="Dropped"))
        s.flush()
        assert names(orm) == ["Kept"], "not visible to others before commit"
        s.rollback()
    assert names(orm) == ["Kept"]


def test_orm_savepoint(orm: Engine) -> None:
    with Session(orm) as s:
        s.add(Author(name="Outer"))
        nested = s.begin_nested()
        s.add(Author(name="Inner"))
        s.flush()
        nested.rollback()
        s.commit()
    assert names(orm) == ["Outer"]


def test_orm_integrity_error(orm: Engine) -> None:
    with Session(orm) as s:
        s.add(Author(name="Same"))
        s.commit()
        s.add(Author(name="Same"))
        with pytest.raises(exc.IntegrityError) as info:
            s.commit()
        assert isinstance(info.value.orig, sqlite3.IntegrityError)
        assert isinstance(info.value.orig, dbapi.IntegrityError)
        s.rollback()
        s.add(Author(name="Other"))
        s.commit()
    assert names(orm) == ["Other", "Same"]


def test_orm_datetimes_and_delete(orm: Engine) -> None:
    when = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456)
    with Session(orm) as s:
        a = Author(name="A")
        s.add(Book(title="T", added=when, author=a))
        s.commit()
        book = s.scalars(select(Book)).one()
        assert book.added == when
        s.delete(book)
        s.commit()
        assert s.scalars(select(Book)).all() == []


# --- a node's streams ---------------------------------------------------------------


def forget_stream(c: Any) -> None:
    """Make the node forget the stream of a pooled connection (as it does
    after 30 s idle): its baton becomes one the node never gave."""
    c.connection.dbapi_connection._backend.stream._baton = "forgotten"


def test_a_stream_the_node_forgot(url: str, engine: Engine) -> None:
    """Idle in the pool: the next use goes on on a new stream. In a
    transaction: the transaction is lost, and the pool discards the connection."""
    if "///" in url:
        pytest.skip("a node's streams only")
    with engine.connect() as c:
        c.execute(text("CREATE TABLE t(x)"))
        c.commit()
        forget_stream(c)  # given back to the pool with no transaction open
    with engine.begin() as c:
        c.execute(text("INSERT INTO t VALUES (1)"))
    with engine.connect() as c:
        c.execute(text("INSERT INTO t VALUES (2)"))
        forget_stream(c)
        with pytest.raises(exc.OperationalError, match="rolled back") as info:
            c.execute(text("INSERT INTO t VALUES (3)"))
        assert info.value.connection_invalidated
    with engine.connect() as c:
        assert c.execute(text("SELECT x FROM t")).scalars().all() == [1]


# --- reflection ----------------------------------------------------------------


def test_reflection_hides_hctservers_tables(orm: Engine) -> None:
    insp = inspect(orm)
    assert sorted(insp.get_table_names()) == ["authors", "books"]
    assert "hct_journal" in insp.get_table_names(sqlite_include_internal=True)
    assert [c["name"] for c in insp.get_columns("authors")] == ["id", "name", "born"]
    assert insp.has_table("books") and not insp.has_table("nope")
    fks = insp.get_foreign_keys("books")
    assert fks[0]["referred_table"] == "authors"


# --- a cluster: through a follower -----------------------------------------------


def address(node: Any) -> str:
    return sqlnodes.url_of(node).removeprefix("http://")


def test_orm_through_a_follower_reaches_every_node(tmp_path: Path) -> None:
    """Issue #24: the ORM against a follower's address (it sends writes and
    transactions to its leader), then the rows on every node."""
    with sqlnodes.cluster(tmp_path, followers=2) as (lead, followers):
        engine = create_engine(f"sqlite+hctserver://{address(followers[0])}")
        try:
            Base.metadata.create_all(engine)
            with Session(engine) as s:
                ann = Author(name="Ann", born=datetime.date(1970, 1, 2))
                s.add_all([ann, Author(name="Bob")])
                s.add_all([Book(title=f"B{i}", author=ann) for i in range(5)])
                s.commit()
                assert ann.id is not None and sorted(b.id for b in ann.books) == [1, 2, 3, 4, 5]
            with Session(engine) as s:
                ann = s.scalars(select(Author).where(Author.name == "Ann")).one()
                assert ann.born == datetime.date(1970, 1, 2)
                assert sorted(b.title for b in ann.books) == ["B0", "B1", "B2", "B3", "B4"]
                ann.name = "Anne"
                ann.books[0].title = "First"
                s.commit()
            assert names(engine) == ["Anne", "Bob"], "read on the follower, at once"
            with Session(engine) as s, pytest.raises(exc.IntegrityError):
                s.add(Author(name="Bob"))
                s.commit()
        finally:
            engine.dispose()

        expected_authors = [(1, "Anne", "1970-01-02"), (2, "Bob", None)]
        expected_titles = ["B1", "B2", "B3", "B4", "First"]
        for node in (lead, *followers):  # through each node's address, as fresh as the leader
            e = create_engine(f"sqlite+hctserver://{address(node)}?consistency=leader")
            try:
                with e.connect() as conn:
                    found = conn.execute(text("SELECT id, name, born FROM authors ORDER BY id"))
                    assert [tuple(r) for r in found] == expected_authors
                    titles = conn.execute(text("SELECT title FROM books ORDER BY title"))
                    assert titles.scalars().all() == expected_titles
            finally:
                e.dispose()
        for node in followers:
            wait_until(partial(sqlnodes.caught_up, node, lead), 10, "the follower to catch up")
        for node in (lead, *followers):  # and in each node's file
            with apsw.Connection(str(node.db.path), flags=apsw.SQLITE_OPEN_READONLY) as c:
                authors = c.execute("SELECT id, name, born FROM authors ORDER BY id").fetchall()
                assert authors == expected_authors
                books = c.execute("SELECT title, author_id FROM books ORDER BY title").fetchall()
                assert books == [(t, 1) for t in expected_titles]
