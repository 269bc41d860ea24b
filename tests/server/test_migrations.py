from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from tests.conftest import Database
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
