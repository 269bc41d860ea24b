"""Apply the Alembic migrations shipped inside the package.

Alembic is imported only to migrate: the server's start-up check (`is_current`) reads the
recorded revision with one SELECT and compares it with `HEAD`, which saves every server start
a third of its import time. tests/server/test_migrations.py keeps `HEAD` equal to the newest
migration's revision.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import Engine, inspect, text

if TYPE_CHECKING:
    from alembic.config import Config

HEAD = "0004"  # the newest revision under migrations/versions: the schema the code expects
HEAD_DESCRIPTION = "the schema the code expects"


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", "wcms.server:migrations")
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def script_head(url: str = "sqlite://") -> str | None:
    """The newest revision among the shipped migration scripts (what `HEAD` must name)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


# On PostgreSQL the migration holds this advisory lock (a transaction-scoped one, released at
# its commit): two nodes starting together migrate one after the other, and the second finds
# nothing left to do. SQLite takes its one writer lock at the first DDL statement.
MIGRATION_LOCK = 0x77636D73  # "wcms"


def upgrade(engine: Engine) -> None:
    """Bring the database to the latest revision (a no-op when it is already there)."""
    from alembic import command

    cfg = alembic_config(str(engine.url))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def is_current(engine: Engine) -> bool:
    """True when the database is at the newest revision."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return False
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    return versions == [HEAD]
