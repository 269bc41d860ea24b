"""In-process fixtures for domain tests: the real app on a real database, no background loop."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from sqlalchemy.orm import Session

from tests.conftest import Database
from wcms.server import create_app, migrate
from wcms.server.db import make_engine
from wcms.server.runtime import Runtime


@pytest.fixture
def app(database: Database) -> Iterator[Flask]:
    engine = make_engine(database.url)
    migrate.upgrade(engine)
    engine.dispose()
    app = create_app(
        {"database_url": database.url, "data_dir": database.data_dir, "background": False}
    )
    yield app
    app.extensions["wcms"].engine.dispose()


@pytest.fixture
def rt(app: Flask) -> Runtime:
    runtime: Runtime = app.extensions["wcms"]
    return runtime


@pytest.fixture
def session(rt: Runtime) -> Iterator[Session]:
    with rt.sessions() as s:
        yield s


@pytest.fixture
def client(app: Flask) -> Any:
    return app.test_client()
