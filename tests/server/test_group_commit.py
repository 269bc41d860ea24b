"""Group commit of shutdown signals on PostgreSQL (issue 12): signals that arrive together
share a commit, and each is answered only once its own flip is committed.

Runs on PostgreSQL on every run (the machine's, or WCMS_TEST_DATABASE_URL's): on SQLite each
signal is its own commit (WAL mode does not wait for the disk at a commit)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy

from tests.conftest import (
    MACHINE_PG,
    PG_URL,
    Database,
    LiveServer,
    http,
    read_status,
    register_pc,
)

SIGNALS = 40


@pytest.fixture
def pg_server(tmp_path: Path) -> Iterator[LiveServer]:
    data = tmp_path / "data"
    data.mkdir()
    database = Database(data, pg_url=PG_URL or MACHINE_PG)
    server = LiveServer(tmp_path, database, {"WCMS_OFFLINE_AFTER": "3600"}).start()
    yield server
    server.stop()
    database.drop()


def _signal(pc: dict[str, str]) -> tuple[bytes, bytes]:
    body = json.dumps({"machine_id": pc["machine_id"], "reason": "shutdown"}).encode()
    head = (
        "POST /api/client/shutdown HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nAuthorization: Bearer {pc['token']}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head + body[:-1], body[-1:]


@pytest.mark.slow
def test_signals_that_arrive_together_share_commits_and_each_answer_follows_its_commit(
    pg_server: LiveServer,
) -> None:
    server = pg_server
    pcs = [register_pc(server, machine_id=f"TEST-GROUP-{n:04d}") for n in range(SIGNALS)]
    for pc in pcs:  # online, and known to the server's token cache
        status, _ = server.api(
            "POST", "/api/client/heartbeat", {"machine_id": pc["machine_id"]}, token=pc["token"]
        )
        assert status == 200
    before = http("GET", server.url + "/healthz")[1]["shutdown_signals"]

    pending = []
    for pc in pcs:  # every signal sent but for its last byte...
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        start, last = _signal(pc)
        sock.sendall(start)
        pending.append((sock, last, pc))
    for sock, last, _pc in pending:  # ...then all complete at once
        sock.sendall(last)
    engine = sqlalchemy.create_engine(server.database.url)
    try:
        for sock, _last, pc in pending:
            assert read_status(sock) == 200
            # Answered: its flip is committed, seen from another connection at once.
            with engine.connect() as conn:
                state = conn.execute(
                    sqlalchemy.text("SELECT state, reason FROM pc_info WHERE machine_id = :m"),
                    {"m": pc["machine_id"]},
                ).one()
            assert tuple(state) == ("offline", "shutdown"), pc["machine_id"]
        with engine.connect() as conn:
            events = conn.execute(
                sqlalchemy.text(
                    "SELECT count(*) FROM power_events WHERE to_state = 'offline' "
                    "AND reason = 'shutdown'"
                )
            ).scalar()
    finally:
        engine.dispose()
    assert events == SIGNALS

    after = http("GET", server.url + "/healthz")[1]["shutdown_signals"]
    signals = after["signals"] - before["signals"]
    commits = after["commits"] - before["commits"]
    print(f"\n{signals} signals in {commits} commits")
    assert signals == SIGNALS
    assert commits <= SIGNALS // 2, f"{signals} signals took {commits} commits"
