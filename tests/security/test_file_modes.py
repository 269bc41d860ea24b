"""Issue 10, Low: the database and the data dir were world-readable (644, dir 755)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from tests.conftest import PG_URL, register_pc


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_data_dir_and_everything_the_server_writes_are_private(make_server: Any) -> None:
    server = make_server(start=False)
    data = server.database.data_dir
    data.chmod(0o755)  # as a careless `mkdir` would leave it
    old_umask = os.umask(0o022)
    try:
        server.start()
    finally:
        os.umask(old_umask)
    register_pc(server)  # the database has been written to
    assert _mode(data) == 0o700
    assert _mode(data / "secret_key") == 0o600
    if not PG_URL:
        files = [p for p in data.iterdir() if p.name.startswith("wcms.db")]
        assert {p.name for p in files} >= {"wcms.db", "wcms.db-wal", "wcms.db-shm"}
        assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}


def test_an_existing_readable_database_file_is_tightened(tmp_path: Path) -> None:
    from wcms.server.db import make_engine

    db = tmp_path / "old.db"
    db.touch(mode=0o644)
    db.chmod(0o644)
    engine = make_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    engine.dispose()
    assert _mode(db) == 0o600


def test_a_data_dir_every_user_may_write_to_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    """WCMS_DATA_DIR=/tmp once turned /tmp into 0700 (tightening "the data dir"), and every
    other user's program on the machine broke. A shared directory (sticky or world-writable)
    is refused in one line, and left untouched."""
    import io
    from contextlib import redirect_stderr
    from unittest import mock

    from wcms.cli import main

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    err = io.StringIO()
    env = {"WCMS_DATA_DIR": str(shared), "WCMS_DATABASE_URL": ""}
    with mock.patch.dict(os.environ, env), redirect_stderr(err):
        assert main(["db", "upgrade"]) == 1
    assert err.getvalue().startswith(f"wcms: WCMS_DATA_DIR={shared} is a directory every local")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert list(shared.iterdir()) == []
