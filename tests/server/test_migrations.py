from __future__ import annotations

import threading
import uuid

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from tests.conftest import MACHINE_PG, PG_URL, Database
from wcms.server import migrate
from wcms.server.db import Base, make_engine

TABLES = {
    "pc_info",
    "rooms",
    "pc_credentials",
    "pc_metrics",
    "metric_samples",
    "power_events",
    "admins",
    "api_keys",
    "registration_pins",
    "audit_log",
    "settings",
    "admin_sessions",
    "rate_limits",
}


def test_migrations_build_the_schema_from_empty_and_match_the_models(database: Database) -> None:
    engine = make_engine(database.url)
    assert not migrate.is_current(engine)
    migrate.upgrade(engine)
    migrate.upgrade(engine)  # a second run changes nothing
    assert migrate.is_current(engine)
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) >= TABLES
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations disagree: {diff}"


def test_head_names_the_newest_migration() -> None:
    """The server's start-up check compares the database with migrate.HEAD (no Alembic import):
    a new migration must move it."""
    assert migrate.script_head() == migrate.HEAD


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: object) -> None:
    from pathlib import Path

    engine = make_engine(f"sqlite:///{Path(str(tmp_path)) / 'x.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_two_nodes_migrating_one_postgresql_database_at_once_both_succeed() -> None:
    """Two nodes start together on an empty PostgreSQL database: the advisory lock makes the
    second wait for the first's commit and find nothing to do. (Without it the second's CREATE
    TABLE waits on the first's and then fails: `relation ... already exists`.) Always on
    PostgreSQL, in a schema of its own: SQLite serves one node."""
    import sqlalchemy

    base = PG_URL or MACHINE_PG
    schema = f"t_mig_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    # A lock waited on for 15 s is an error: without the advisory lock the two nodes' CREATE
    # TABLEs (and Python's import lock around the migration scripts) hold each other for ever.
    url = f"{base}{sep}options=-csearch_path%3D{schema}%20-clock_timeout%3D15000"
    try:
        for _round in range(3):
            engines = [make_engine(url), make_engine(url)]
            start = threading.Barrier(2, timeout=30)
            errors: list[BaseException] = []

            def node(
                engine: Engine,
                start: threading.Barrier = start,
                errors: list[BaseException] = errors,
            ) -> None:
                try:
                    start.wait()
                    migrate.upgrade(engine)
                except BaseException as exc:  # handed to the test
                    errors.append(exc)

            threads = [threading.Thread(target=node, args=(e,)) for e in engines]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads), "a node hung"
            assert errors == []
            assert all(migrate.is_current(e) for e in engines)
            for e in engines:
                e.dispose()
            with admin.connect() as conn:  # empty again for the next round
                conn.execute(sqlalchemy.text(f'DROP SCHEMA "{schema}" CASCADE'))
                conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
