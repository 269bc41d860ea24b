"""What several server processes and nodes on one database must agree on before they serve."""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr
from http.client import HTTPConnection
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import sqlalchemy
from sqlalchemy import select

from tests.conftest import MACHINE_PG, PG_URL, Database, LiveServer, http, register_pc
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


# ---- two real server processes on one PostgreSQL database (issue 12)


@contextlib.contextmanager
def nodes(tmp_path: Path, **env: str) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Nodes A and B: two `wcms server run` processes, each with its own port and data dir,
    one PostgreSQL schema, the same secret. Always on PostgreSQL: SQLite serves one process."""
    data = tmp_path / "data"
    data.mkdir()
    database = Database(data, pg_url=PG_URL or MACHINE_PG)
    # The standard mode's timing, with a check every second (the leader's duty).
    env = {
        "WCMS_SECRET_KEY": secrets.token_urlsafe(32),
        "WCMS_CHECK_INTERVAL": "1",
        "WCMS_WORKERS": "1",  # a node is one process here; tests/server/test_workers.py: more
        **env,
    }
    a = LiveServer(tmp_path, database, env)
    other = tmp_path / "data-b"
    other.mkdir(mode=0o700)
    b = LiveServer(tmp_path, database, {**env, "WCMS_DATA_DIR": str(other)})
    try:
        a.start()
        b.api_key = a.api_key  # the schema and the key are made once, by A
        b.start()
        for node in (a, b):
            assert http("GET", node.url + "/healthz")[1]["notifier"] == "connected"
        yield a, b
    finally:
        for node in (a, b):
            node.stop(signal.SIGQUIT)
        database.drop()


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[LiveServer, LiveServer]]:
    with nodes(tmp_path) as both:
        yield both


def health(node: LiveServer) -> dict[str, Any]:
    status, body = http("GET", node.url + "/healthz", timeout=5)
    assert status == 200, body
    return dict(body)


def kill_node(node: LiveServer) -> None:
    """kill -9 the node: its gunicorn master and worker at once, nothing said to anyone."""
    import psutil

    assert node.proc is not None
    master = psutil.Process(node.proc.pid)
    for proc in [*master.children(recursive=True), master]:
        proc.kill()
    node.proc.wait(5)
    node.proc = None


def kill_leader(leader: LiveServer, standby: LiveServer) -> float:
    """kill -9 the leading node; the seconds until the standby leads (at most 3)."""
    killed_at = time.monotonic()
    kill_node(leader)
    while not health(standby)["leader"]:
        assert time.monotonic() - killed_at < 3.0, "the standby did not take the lease"
        time.sleep(0.05)
    return time.monotonic() - killed_at


@pytest.mark.slow
def test_exactly_one_node_leads_and_a_standby_takes_over_when_it_dies(tmp_path: Path) -> None:
    """The leader lease (a PostgreSQL advisory lock per schema): one of the two leads the
    background duties; kill -9 it and the other leads within one check interval (1 s here),
    and does the duties: a PC that falls silent is marked lost by it."""
    with nodes(tmp_path, WCMS_OFFLINE_AFTER="6", WCMS_HEARTBEAT_INTERVAL="2") as (a, b):
        _one_leads_and_the_standby_takes_over(a, b)


def _one_leads_and_the_standby_takes_over(a: LiveServer, b: LiveServer) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        leaders = [node for node in (a, b) if health(node)["leader"]]
        if leaders:
            break
        time.sleep(0.1)
    time.sleep(1.5)  # both have checked at least once more since
    leaders = [node for node in (a, b) if health(node)["leader"]]
    assert len(leaders) == 1, [health(node) for node in (a, b)]
    leader, standby = (a, b) if leaders[0] is a else (b, a)
    pc = register_pc(standby)
    body = {"machine_id": pc["machine_id"], "boot_time": 1.0}
    assert standby.api("POST", "/api/client/heartbeat", body, token=pc["token"])[0] == 200
    took = kill_leader(leader, standby)
    assert took < 2.0, took  # one check interval, plus PostgreSQL seeing the connection close
    # The PC falls silent: only the new leader can mark it lost (6 s after contact here).
    found = standby.wait_pc(pc["machine_id"], timeout=30, state="offline")
    assert found["reason"] == "lost", found


def poll(node: LiveServer, pc: dict[str, Any], timeout: float) -> tuple[int, Any]:
    path = f"/api/client/commands?machine_id={pc['machine_id']}&timeout={timeout}"
    return node.api("GET", path, token=pc["token"], timeout=timeout + 10)


@pytest.mark.slow
def test_a_command_queued_through_one_node_wakes_a_poll_waiting_on_the_other(
    two_nodes: tuple[LiveServer, LiveServer],
) -> None:
    """B knows the PC has nothing open (its idle mark: B would not even look in the database)
    and its poll waits on B's doorbell; the command queued through A rings it within 1 s."""
    a, b = two_nodes
    pc = register_pc(a)
    assert poll(b, pc, timeout=0) == (200, {"commands": [], "config": mock.ANY})  # marks idle
    answer: dict[str, Any] = {}

    def wait() -> None:
        answer["got"] = poll(b, pc, timeout=20)
        answer["at"] = time.monotonic()

    waiter = threading.Thread(target=wait)
    waiter.start()
    b.wait_polls(1)
    sent_at = time.monotonic()
    queued = a.admin(
        "POST",
        "/api/commands",
        {"type": "message", "target": {"pc_ids": [pc["pc_id"]]}, "args": {"text": "hi"}},
    )
    waiter.join(25)
    status, body = answer["got"]
    assert status == 200 and [c["type"] for c in body["commands"]] == ["message"], body
    assert body["commands"][0]["id"] == queued["commands"][0]["id"]
    assert answer["at"] - sent_at < 1.0, answer["at"] - sent_at


@pytest.mark.slow
def test_a_shutdown_signal_through_one_node_reaches_a_dashboard_stream_on_the_other(
    two_nodes: tuple[LiveServer, LiveServer],
) -> None:
    a, b = two_nodes
    pc = register_pc(a)
    with EventStream(b) as stream:
        stream.until(lambda m: m["type"] == "hello", 5)
        sent_at = time.monotonic()
        body = {"machine_id": pc["machine_id"], "reason": "shutdown"}
        assert a.api("POST", "/api/client/shutdown", body, token=pc["token"])[0] == 200
        seen = stream.until(
            lambda m: (
                m["type"] == "presence" and m["pc_id"] == pc["pc_id"] and m["state"] == "offline"
            ),
            5,
        )
        assert time.monotonic() - sent_at < 1.0
    assert seen["reason"] == "shutdown"


@pytest.mark.slow
def test_a_token_revoked_or_a_mode_changed_through_one_node_holds_on_the_other_at_once(
    two_nodes: tuple[LiveServer, LiveServer],
) -> None:
    a, b = two_nodes
    pc, kept = register_pc(a), register_pc(a)
    beat = {"machine_id": pc["machine_id"]}
    assert b.api("POST", "/api/client/heartbeat", beat, token=pc["token"])[0] == 200  # B caches it
    # The same machine registers again through A: its old token dies on B at once.
    again = register_pc(a, machine_id=pc["machine_id"], token=pc["token"])
    status, body = b.api("POST", "/api/client/heartbeat", beat, token=pc["token"])
    assert status == 401, body
    assert b.api("POST", "/api/client/heartbeat", beat, token=again["token"])[0] == 200
    # Deleted through A: refused by B at once.
    a.admin("DELETE", f"/api/pcs/{again['pc_id']}")
    assert b.api("POST", "/api/client/heartbeat", beat, token=again["token"])[0] == 401
    # A presence-mode change through A reaches B's next answer.
    mode = b.api(
        "POST", "/api/client/heartbeat", {"machine_id": kept["machine_id"]}, token=kept["token"]
    )
    before = mode[1]["config"]["presence_mode"]
    new = "fast" if before != "fast" else "conservative"
    a.admin("PUT", "/api/settings", {"presence_mode": new})
    status, body = b.api(
        "POST", "/api/client/heartbeat", {"machine_id": kept["machine_id"]}, token=kept["token"]
    )
    assert status == 200 and body["config"]["presence_mode"] == new, body


@pytest.mark.slow
def test_a_listener_that_lost_its_connection_resyncs_and_hears_again(
    two_nodes: tuple[LiveServer, LiveServer],
) -> None:
    """PostgreSQL ends the nodes' LISTEN connections: each notifier reconnects, its open
    dashboard streams are told to resync (what they missed meanwhile is lost), and a command
    queued through A wakes a poll on B again."""
    a, b = two_nodes
    engine = sqlalchemy.create_engine(a.database.pg_url, isolation_level="AUTOCOMMIT")
    with EventStream(b) as stream:
        stream.until(lambda m: m["type"] == "hello", 5)
        with engine.connect() as conn:
            ended = conn.execute(
                sqlalchemy.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE query LIKE 'LISTEN wcms_%' AND pid <> pg_backend_pid()"
                    " AND query LIKE :channel"
                ),
                {"channel": f"LISTEN {_channel(a)}%"},
            ).scalar()
        assert ended == 2
        stream.until(lambda m: m["type"] == "resync", 10)
    engine.dispose()
    test_a_command_queued_through_one_node_wakes_a_poll_waiting_on_the_other((a, b))


def _channel(node: LiveServer) -> str:
    from wcms.server.notifier import channel_name

    engine = sqlalchemy.create_engine(node.database.url)
    with engine.connect() as conn:
        where = conn.execute(sqlalchemy.text("SELECT current_database(), current_schema()")).one()
    engine.dispose()
    return channel_name(str(where[0]), str(where[1]))


class EventStream:
    """GET /api/events on a node, read frame by frame (the dashboard's live stream)."""

    def __init__(self, node: LiveServer) -> None:
        self.conn = HTTPConnection("127.0.0.1", node.port, timeout=15)
        self.conn.request("GET", "/api/events", headers={"Authorization": f"Bearer {node.api_key}"})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.conn.close()

    def until(self, wanted: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            line = self.resp.readline()
            if line.startswith(b"data: "):
                message = json.loads(line[6:])
                seen.append(message)
                if wanted(message):
                    return message
        raise AssertionError(f"not seen in {timeout} s; saw {seen}")


def test_a_poll_does_not_believe_an_idle_mark_while_the_listener_is_away(
    tmp_path: Path,
) -> None:
    """A command queued through another node wakes this one's polls by NOTIFY. While this
    process's LISTEN connection is down (`trusted` is False) such a wake-up can be lost, so a
    PC's "nothing open" mark must not be believed: the poll looks in the database. (While the
    listener is up the mark is believed, which is what saves the database a query per poll.)"""
    from wcms.protocol import CommandType
    from wcms.server.db import utcnow
    from wcms.server.schemas import PollQuery, RegisterRequest
    from wcms.server.services import agent, command_queue, pc_service

    data = tmp_path / "data"
    data.mkdir()
    database = Database(data, pg_url=PG_URL or MACHINE_PG)
    try:
        database.migrate()
        app = _app(database, tmp_path / "node")
        rt = app.extensions["wcms"]  # type: ignore[attr-defined]
        with rt.sessions() as s:
            req = RegisterRequest.model_validate(
                {"pin": "000000", "machine_id": "TEST-IDLE-MARK-0001", "hostname": "pc1"}
            )
            pc, _token, _t = pc_service.register(s, req, utcnow(), offline_after=35, approve=True)
            s.commit()
            who = agent.PcIdentity(pc.id, pc.machine_id)
        query = PollQuery(machine_id=who.machine_id, timeout=0)

        def poll() -> list[dict[str, Any]]:
            with rt.sessions() as s:
                found = agent.wait_for_commands(rt, lambda: s, who, query, None)
                s.commit()
                return found

        assert poll() == [] and rt.doorbell.is_idle(who.pc_id)
        with rt.sessions() as s:  # as another node would: committed, its NOTIFY lost on the way
            command_queue.queue(
                s,
                actor="alice",
                kind=CommandType.MESSAGE,
                args={"text": "hello"},
                target=command_queue.Target(pc_ids=(who.pc_id,)),
                now=utcnow(),
                server_secret=rt.secret_key,
            )
            s.commit()
        assert rt.notifier.trusted and poll() == []  # the mark believed: no ring came
        rt.notifier.channel = "wcms_listening_but_disconnected"  # started, connection down
        assert not rt.notifier.trusted
        assert [c["type"] for c in poll()] == ["message"]
        rt.engine.dispose()
    finally:
        database.drop()
