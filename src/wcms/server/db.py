"""Engine and session set-up; the same code serves SQLite files and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy import (
    Connection,
    CursorResult,
    DateTime,
    Engine,
    MetaData,
    Result,
    Table,
    create_engine,
    event,
)
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.types import TypeDecorator

# Named constraints, so the same migrations can alter them on SQLite (batch mode) and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes in Python, naive UTC in the database (SQLite keeps no zone)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC)  # type: ignore[no-any-return]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _private_sqlite_file(url: str) -> None:
    """Create the database file (or tighten it) to mode 600 before SQLite opens it: SQLite
    gives its -wal and -shm files the database file's mode, and the default umask would leave
    all three readable by every local user."""
    path = make_url(url).database
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077 and os.fstat(fd).st_uid == os.getuid():
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def make_engine(url: str) -> Engine:
    """Create the engine; SQLite gets WAL and foreign keys on every connection."""
    if url.startswith("sqlite"):
        _private_sqlite_file(url)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 10}, pool_size=10
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.startswith(("postgresql://", "postgres://")):
        # psycopg 3 picks how it waits when first imported: `wcms server run` imports it in the
        # master, before gevent patches the worker, so the worker's queries wait without
        # yielding (docs/ARCHITECTURE.md says what that costs and why it stays for now).
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    # A database host that drops packets must not hang a request for the kernel's connect
    # timeout (minutes): 2 s (libpq's shortest sensible value) unless the URL names its own.
    timeout = {} if "connect_timeout" in make_url(url).query else {"connect_timeout": 2}
    return create_engine(
        url, pool_size=10, max_overflow=20, pool_pre_ping=True, connect_args=timeout
    )


def make_sessionmaker(engine: Engine) -> sessionmaker[Any]:
    return sessionmaker(engine, expire_on_commit=False)


def table(model: type[Base]) -> Table:
    """The Core table of a model, for conditional UPDATEs whose row count matters."""
    t = model.__table__
    assert isinstance(t, Table)
    return t


class BatchStatement:
    """A statement run on the DBAPI cursor: the heartbeat writer's batches (executemany), the
    shutdown signal's UPDATE and every power event's INSERT.

    SQLAlchemy processes the parameters of every row of an executemany in Python, which was
    most of a batch's cost (bench/heartbeats.py --profile). This compiles the statement once
    for the engine's dialect and keeps each parameter's bind processor (UTCDateTime included),
    so the database sees exactly what SQLAlchemy would have sent, at a fraction of the cost.
    Rows name every parameter that has no fixed value in the statement.
    """

    def __init__(self, stmt: UpdateBase) -> None:
        self._stmt = stmt
        self._compiled: dict[str, tuple[str, list[str] | None, list[tuple[str, Any]]]] = {}

    def _compile(self, dialect: Dialect) -> tuple[str, list[str] | None, list[tuple[str, Any]]]:
        compiled = self._stmt.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        order = list(compiled.positiontup or ()) if compiled.positional else None
        plan = {}  # name -> (processor or None, fixed value or _ROW)
        for bind, name in compiled.bind_names.items():
            proc = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if dialect.name == "sqlite" and isinstance(bind.type, UTCDateTime):
                proc = cast(Any, sqlite_utc_text)  # the same text, several times faster
            if bind.required:
                plan[name] = (proc, _ROW)
            else:  # a literal of the statement: the same, already processed, in every row
                value = bind.effective_value
                plan[name] = (None, value if proc is None or value is None else proc(value))
        return str(compiled), order, list(plan.items())

    def _params(self, conn: Connection, rows: list[dict[str, Any]]) -> tuple[str, list[Any]]:
        dialect = conn.dialect
        key = dialect.name + "+" + str(dialect.driver)
        entry = self._compiled.get(key)
        if entry is None:
            entry = self._compiled[key] = self._compile(dialect)
        sql, order, plan = entry
        params: list[Any] = []
        for row in rows:
            values = {}
            for name, (proc, fixed) in plan:
                value = row[name] if fixed is _ROW else fixed
                values[name] = value if proc is None or value is None else proc(value)
            params.append(values if order is None else tuple(values[n] for n in order))
        return sql, params

    def execute(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Run for every row, in `conn`'s transaction."""
        if not rows:
            return
        sql, params = self._params(conn, rows)
        cursor = conn.connection.cursor()
        try:
            cursor.executemany(sql, params)
        finally:
            cursor.close()

    def fetch(self, conn: Connection, row: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Run once, in `conn`'s transaction, and answer the rows it returns (RETURNING)."""
        sql, params = self._params(conn, [row])
        cursor = conn.connection.cursor()
        try:
            cursor.execute(sql, params[0])
            return [tuple(r) for r in cursor.fetchall()] if cursor.description else []
        finally:
            cursor.close()

    def fetch_each(
        self, conn: Connection, rows: list[dict[str, Any]]
    ) -> list[list[tuple[Any, ...]]]:
        """Run for every row, in `conn`'s transaction, and answer each run's rows (RETURNING).
        psycopg sends them all before reading an answer (its executemany pipelines): one wait
        for the database instead of one per row; sqlite3 runs them one by one."""
        if not rows:
            return []
        sql, params = self._params(conn, rows)
        cursor = conn.connection.cursor()
        try:
            if conn.dialect.driver != "psycopg":
                results = []
                for one in params:
                    cursor.execute(sql, one)
                    results.append([tuple(r) for r in cursor.fetchall()])
                return results
            cursor.executemany(sql, params, returning=True)  # type: ignore[call-arg]
            results = [[tuple(r) for r in cursor.fetchall()]]
            while cursor.nextset():
                results.append([tuple(r) for r in cursor.fetchall()])
            return results
        finally:
            cursor.close()


_ROW = object()  # BatchStatement: the value comes from each row


def sqlite_utc_text(value: dt.datetime) -> str:
    """A UTC datetime as SQLAlchemy stores it in SQLite ("2026-11-26 16:35:10.000123"); the
    text must match exactly, since SQLite compares these columns as text."""
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return value.astimezone(dt.UTC).isoformat(" ", "microseconds")[:26]


def affected(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE touched."""
    return cast(CursorResult[Any], result).rowcount


def db_unavailable(exc: BaseException) -> bool:
    """The database did not answer (refused, shut down, the connection dropped): the server
    answers 503 `database_unavailable`, not 500, and the caller may try again later."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


@contextmanager
def unit_of_work(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session for work outside a request (the background loop, the CLI, a stream's check):
    committed when the block ends normally, rolled back when it raises, closed either way."""
    with sessions() as session:
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        session.commit()
