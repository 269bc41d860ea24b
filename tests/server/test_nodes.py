"""What several server processes and nodes on one database must agree on before they serve."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr
from pathlib import Path
from unittest import mock

import pytest
from sqlalchemy import select

from tests.conftest import Database
from wcms.cli import main
from wcms.server import create_app
from wcms.server.models import Setting
from wcms.server.services import secretbox


def _app(database: Database, data_dir: Path, **config: object) -> object:
    data_dir.mkdir(exist_ok=True)
    return create_app(
        {"database_url": database.url, "data_dir": data_dir, "background": False, **config}
    )


def test_a_node_with_another_secret_is_refused_before_it_serves(
    database: Database, tmp_path: Path
) -> None:
    """The first node records its secret's fingerprint (never the secret); a second node with
    its own generated secret is refused, and one given the first's secret serves."""
    database.migrate()
    first = _app(database, tmp_path / "a")
    rt = first.extensions["wcms"]  # type: ignore[attr-defined]
    with rt.sessions() as s:
        kept = s.execute(
            select(Setting.value).where(Setting.key == secretbox.FINGERPRINT_SETTING)
        ).scalar_one()
    assert kept == secretbox.fingerprint(rt.secret_key) and rt.secret_key not in kept
    rt.engine.dispose()
    with pytest.raises(secretbox.SecretMismatch, match="same WCMS_SECRET_KEY"):
        _app(database, tmp_path / "b")
    same = _app(database, tmp_path / "c", secret_key=rt.secret_key)
    same.extensions["wcms"].engine.dispose()  # type: ignore[attr-defined]
    # `wcms server run` on the second node says so in one line and exits 1, serving nothing.
    env = {"WCMS_DATABASE_URL": database.url, "WCMS_DATA_DIR": str(tmp_path / "b")}
    err = io.StringIO()
    with mock.patch.dict(os.environ, env), redirect_stderr(err):
        assert main(["server", "run", "--port", "1"]) == 1
    assert err.getvalue().startswith("wcms: this server's secret key is not the one")
    assert "Traceback" not in err.getvalue()
