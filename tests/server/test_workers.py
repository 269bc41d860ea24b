"""`wcms server run --workers N`: several processes of one node (issue 12)."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import sqlalchemy

from tests.conftest import MACHINE_PG, PG_URL, Database, LiveServer, register_pc
from wcms.cli import main
from wcms.server.lease import LEADER_LOCK


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_more_than_one_worker_on_sqlite_is_refused_in_one_line(tmp_path: Path, how: str) -> None:
    env = {"WCMS_DATA_DIR": str(tmp_path), "WCMS_DATABASE_URL": ""}
    args = ["server", "run", "--port", "1"]
    if how == "flag":
        args += ["--workers", "2"]
    else:
        env["WCMS_WORKERS"] = "2"
    err = io.StringIO()
    serve = mock.Mock(side_effect=AssertionError("it would serve"))  # were it not refused
    with (
        mock.patch.dict(os.environ, env),
        redirect_stderr(err),
        mock.patch("wcms.server.runner.serve", serve),
    ):
        assert main(args) == 1
    assert err.getvalue().startswith("wcms: WCMS_WORKERS=2: SQLite serves one process"), err
    assert err.getvalue().count("\n") == 1 and "Traceback" not in err.getvalue()


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[LiveServer]:
    data = tmp_path / "data"
    data.mkdir()
    database = Database(data, pg_url=PG_URL or MACHINE_PG)
    server = LiveServer(tmp_path, database, {"WCMS_WORKERS": "2", "WCMS_CHECK_INTERVAL": "1"})
    try:
        yield server.start()
    finally:
        server.stop(signal.SIGQUIT)
        database.drop()


def test_two_workers_deliver_a_bulk_command_once_to_polls_held_by_either(
    two_workers: LiveServer,
) -> None:
    """Twelve PCs long-poll one node of two worker processes (the kernel spreads their
    connections over both); a command to all reaches every one within 1 s, each exactly once
    (`attempts` 1), and exactly one of the processes holds the leader lease."""
    server = two_workers
    pcs = [register_pc(server) for _ in range(12)]
    got: dict[str, tuple[float, list[dict[str, Any]]]] = {}

    def wait(pc: dict[str, Any]) -> None:
        path = f"/api/client/commands?machine_id={pc['machine_id']}&timeout=20"
        status, body = server.api("GET", path, token=pc["token"], timeout=30)
        assert status == 200, body
        got[pc["machine_id"]] = (time.monotonic(), body["commands"])

    threads = [threading.Thread(target=wait, args=(pc,)) for pc in pcs]
    for t in threads:
        t.start()
    time.sleep(1.0)  # /healthz counts one process's polls only: give all time to be waiting
    sent_at = time.monotonic()
    server.admin(
        "POST",
        "/api/commands",
        {"type": "message", "target": {"pc_ids": [p["pc_id"] for p in pcs]}, "args": {"text": "x"}},
    )
    for t in threads:
        t.join(30)
    late = {m: at - sent_at for m, (at, _) in got.items() if at - sent_at >= 1.0}
    assert len(got) == len(pcs) and not late, late
    assert all(len(commands) == 1 for _, commands in got.values()), got
    engine = sqlalchemy.create_engine(server.database.url)
    with engine.connect() as conn:
        attempts = conn.execute(sqlalchemy.text("SELECT attempts FROM commands")).scalars().all()
        leaders = conn.execute(
            sqlalchemy.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND classid::bigint = :k"
                " AND objid::bigint = (hashtext(current_schema())::bigint & 4294967295)"
            ),
            {"k": LEADER_LOCK},
        ).scalar()
    engine.dispose()
    assert sorted(attempts) == [1] * len(pcs)
    assert leaders == 1
