"""The performance paths must not change behaviour: the agent fast path answers exactly as the
Flask views do (in-process, its `answered` count saying which path answered; generated requests
in test_fastpath_generated.py), the outbox hands a bulk command over once and marks it, and the
raw batch statements store exactly what SQLAlchemy would."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import select
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session
from werkzeug.test import EnvironBuilder, run_wsgi_app

from tests.conftest import LiveServer, register_pc
from tests.server.test_command_queue import SECRET, T0, add_pc, send
from wcms.protocol import CommandStatus, CommandType
from wcms.server.db import UTCDateTime, sqlite_utc_text, utcnow
from wcms.server.fastpath import AgentFastPath
from wcms.server.headers import SECURITY_HEADERS
from wcms.server.models import Command
from wcms.server.runtime import Runtime
from wcms.server.schemas import RegisterRequest
from wcms.server.services import outbox, pc_service, read_models

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication
    from flask import Flask

# ---------------------------------------------------------------------------- the fast path


def fast_path(app: Flask) -> AgentFastPath:
    """The app's agent fast path, in front of Flask (create_app, when the setting is on)."""
    layer = app.wsgi_app
    assert isinstance(layer, AgentFastPath), "the agent fast path is off"
    return layer


@dataclass(frozen=True)
class Agent:
    pc_id: int
    machine_id: str
    token: str


def add_agent(rt: Runtime, name: str) -> Agent:
    """A registered, approved PC this process knows to be online (as the register view does)."""
    req = RegisterRequest.model_validate(
        {"pin": "000000", "machine_id": f"TEST-{name}-0000", "hostname": name}
    )
    with rt.sessions() as s:
        pc, token, _t = pc_service.register(
            s, req, utcnow(), rt.presence.timing.offline_after, approve=True
        )
        s.commit()
        agent = Agent(pc.id, pc.machine_id, token)
    rt.buffer.set_online(agent.pc_id, True)
    return agent


@dataclass(frozen=True)
class Answer:
    status: int
    headers: tuple[tuple[str, str], ...]  # sorted: their order means nothing
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    wsgi: WSGIApplication,
    method: str,
    path: str,
    *,
    query: str = "",
    body: bytes | None = None,
    content_type: str | None = None,
    authorization: str | None = None,
) -> Answer:
    """One request straight into `wsgi` (the fast path, or Flask behind it), in-process."""
    headers = {} if authorization is None else {"Authorization": authorization}
    if content_type is not None:
        headers["Content-Type"] = content_type
    environ = EnvironBuilder(
        path=path, method=method, query_string=query, headers=list(headers.items()), data=body
    ).get_environ()
    if body is not None:
        environ["CONTENT_LENGTH"] = str(len(body))  # also "0", as a server passes it on
    app_iter, status, response_headers = run_wsgi_app(wsgi, environ, buffered=True)
    try:
        data = b"".join(app_iter)
    finally:
        close = getattr(app_iter, "close", None)
        if close is not None:
            close()
    return Answer(int(status.split()[0]), tuple(sorted(response_headers.items())), data)


def _agent_calls(
    wsgi: WSGIApplication, fp: AgentFastPath, pc: Agent, other: Agent
) -> list[tuple[str, bool, int, Any]]:
    """Every kind of agent answer the fast path gives (or hands to Flask): name, whether the
    fast path answered it, status, and the body without what differs between two PCs."""
    mid = pc.machine_id
    plain: list[tuple[str, str, str, Any]] = [
        ("heartbeat", "POST", "/api/client/heartbeat", {"machine_id": mid, "cpu_percent": 5.0}),
        ("event", "POST", "/api/client/heartbeat", {"machine_id": mid, "event": "logon"}),
        ("bad value", "POST", "/api/client/heartbeat", {"machine_id": mid, "cpu_percent": 101}),
        ("extra field", "POST", "/api/client/heartbeat", {"machine_id": mid, "nope": 1}),
        ("not an object", "POST", "/api/client/heartbeat", [1, 2]),
        ("other PC", "POST", "/api/client/heartbeat", {"machine_id": other.machine_id}),
        ("poll", "GET", f"/api/client/commands?machine_id={mid}&timeout=0", None),
        ("poll bad", "GET", f"/api/client/commands?machine_id={mid}&timeout=x", None),
        ("shutdown", "POST", "/api/client/shutdown", {"machine_id": mid, "reason": "restart"}),
        ("shutdown again", "POST", "/api/client/shutdown", {"machine_id": mid}),
        ("bad reason", "POST", "/api/client/shutdown", {"machine_id": mid, "reason": "x"}),
    ]
    calls: list[tuple[str, str, str, Any, str | None]] = [
        (n, m, p, b, f"Bearer {pc.token}") for n, m, p, b in plain
    ]
    calls.append(("bad token", "POST", "/api/client/heartbeat", {"machine_id": mid}, "Bearer x"))
    calls.append(("no token", "POST", "/api/client/heartbeat", {"machine_id": mid}, None))
    out: list[tuple[str, bool, int, Any]] = []
    for name, method, target, body, authorization in calls:
        path, _, query = target.partition("?")
        data = None if body is None else json.dumps(body).encode()
        before = sum(fp.answered.values())
        answer = call(
            wsgi,
            method,
            path,
            query=query,
            body=data,
            content_type=None if body is None else "application/json",
            authorization=authorization,
        )
        fast = sum(fp.answered.values()) > before
        out.append((name, fast, answer.status, _shape(answer.json())))
        assert ("Content-Type", "application/json") in answer.headers, name
    return out


def _shape(data: Any) -> Any:
    """An answer without what differs between two PCs (ids, times)."""
    if isinstance(data, dict):
        return {k: _shape(v) for k, v in data.items() if k not in {"since", "id"}}
    if isinstance(data, list):
        return [_shape(v) for v in data]
    return data


HANDED_TO_FLASK = {"event", "not an object"}  # a state change; a body that is no object


def test_the_agent_fast_path_answers_exactly_as_flask_does(app: Flask, rt: Runtime) -> None:
    fp = fast_path(app)
    with_fast = _agent_calls(fp, fp, add_agent(rt, "fast-a"), add_agent(rt, "fast-b"))
    # The same calls from two other PCs, to Flask alone: the fast path never answers them.
    with_flask = _agent_calls(fp.app, fp, add_agent(rt, "slow-a"), add_agent(rt, "slow-b"))
    assert not any(fast for _name, fast, _status, _body in with_flask)
    assert {name for name, fast, _s, _b in with_fast if not fast} == HANDED_TO_FLASK
    assert [(n, s, b) for n, _f, s, b in with_fast] == [(n, s, b) for n, _f, s, b in with_flask]
    by_name = {name: (status, body) for name, _fast, status, body in with_fast}
    assert by_name["heartbeat"][0] == 200 and by_name["heartbeat"][1]["state"] == "online"
    assert (
        by_name["bad value"][0] == 400
        and "cpu_percent" in by_name["bad value"][1]["error"]["fields"]
    )
    assert by_name["other PC"][0] == 403
    assert by_name["bad token"][0] == 401 and by_name["no token"][0] == 401
    assert by_name["shutdown"][1]["state"] == "offline"
    assert by_name["shutdown"][1]["reason"] == "restart"
    assert by_name["poll"][1]["commands"] == []


def test_fast_path_answers_carry_the_security_headers_flask_adds(app: Flask, rt: Runtime) -> None:
    fp = fast_path(app)
    pc = add_agent(rt, "headers")
    body = json.dumps({"machine_id": pc.machine_id}).encode()
    answers = {}
    for name, event in (("fast", None), ("flask", "logon")):  # an event goes to Flask
        before = fp.answered["/api/client/heartbeat"]
        answer = call(
            fp,
            "POST",
            "/api/client/heartbeat",
            body=json.dumps({"machine_id": pc.machine_id, "event": event}).encode()
            if event
            else body,
            content_type="application/json",
            authorization=f"Bearer {pc.token}",
        )
        assert answer.status == 200
        assert fp.answered["/api/client/heartbeat"] == before + (name == "fast")
        answers[name] = dict(answer.headers)
    for headers in answers.values():
        assert headers["Content-Type"] == "application/json"
        for key, value in SECURITY_HEADERS:
            assert headers[key] == value
    assert answers["fast"].keys() == answers["flask"].keys()


# ---------------------------------------------------------------------------- the outbox


def _poll(server: LiveServer, pc: dict[str, Any], timeout: float) -> tuple[int, Any]:
    path = f"/api/client/commands?machine_id={pc['machine_id']}&timeout={timeout}"
    return server.api("GET", path, token=pc["token"], timeout=timeout + 10)


def test_a_bulk_command_to_waiting_polls_goes_out_once_and_is_marked_delivered(
    live_server: LiveServer,
) -> None:
    pcs = [register_pc(live_server) for _ in range(3)]
    answers: dict[int, tuple[int, Any]] = {}

    def wait(i: int) -> None:
        answers[i] = _poll(live_server, pcs[i], 10)

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    live_server.wait_polls(3)  # all three polls are waiting on the server's doorbell
    batch = live_server.admin(
        "POST",
        "/api/commands",
        {
            "type": "message",
            "args": {"text": "hi"},
            "target": {"pc_ids": [p["pc_id"] for p in pcs]},
        },
    )
    for t in threads:
        t.join(timeout=10)
    ids = set()
    for i in range(3):
        status, body = answers[i]
        assert status == 200
        [cmd] = body["commands"]
        assert cmd["attempt"] == 1 and cmd["args"] == {"text": "hi"}
        ids.add(cmd["id"])
        # Asking again at once: the command is not handed over a second time.
        assert _poll(live_server, pcs[i], 0)[1]["commands"] == []
    assert len(ids) == 3
    # The first ack may come before the batch writer marked it: it still starts the command.
    status, acked = live_server.api(
        "POST",
        f"/api/client/commands/{answers[0][1]['commands'][0]['id']}/ack",
        {"machine_id": pcs[0]["machine_id"]},
        token=pcs[0]["token"],
    )
    assert status == 200 and acked["status"] == "running"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        detail = live_server.admin("GET", f"/api/batches/{batch['id']}")
        statuses = sorted(c["status"] for c in detail["commands"])
        if statuses == ["delivered", "delivered", "running"]:
            break
        time.sleep(0.1)
    assert statuses == ["delivered", "delivered", "running"]
    assert all(c["attempts"] == 1 for c in detail["commands"])


def test_staged_commands_are_discarded_on_cancel_and_left_to_the_database_when_stale(
    session: Session,
) -> None:
    pcs = [add_pc(session, f"pc{i}") for i in range(2)]
    batch = send(session, pcs, CommandType.MESSAGE, {"text": "hi"})
    box = outbox.Outbox()
    box.stage(outbox.load(session, batch.id, {pcs[0].id, pcs[1].id}, SECRET))
    box.discard(batch_id=batch.id)
    assert box.take(pcs[0].id, T0, None) == ([], [], False)

    power = send(session, pcs, CommandType.SHUTDOWN, {})
    box.stage(outbox.load(session, power.id, {pcs[0].id, pcs[1].id}, SECRET))
    # Expired by now: not handed over, left for the database path to finish.
    wire, changes, left = box.take(pcs[0].id, T0 + dt.timedelta(hours=1), None)
    assert (wire, changes, left) == ([], [], True)
    # Booted since it was queued: a power command is stale (the same rule as deliver()).
    booted = (T0 + dt.timedelta(minutes=1)).timestamp()
    wire, changes, left = box.take(pcs[1].id, T0 + dt.timedelta(minutes=2), booted)
    assert wire == [] and left
    assert not box.has_marks()


def test_staged_secrets_go_out_and_marks_move_only_queued_commands(session: Session) -> None:
    pc = add_pc(session, "acc")
    batch = send(
        session,
        [pc],
        CommandType.ACCOUNT_PASSWORD,
        {"username": "student", "password": "Tr0ub4dor&3-zebra"},
    )
    box = outbox.Outbox()
    box.stage(outbox.load(session, batch.id, {pc.id}, SECRET))
    wire, changes, left = box.take(pc.id, T0, None, vouch=lambda: True)
    assert not left and [c.status for c in changes] == [CommandStatus.DELIVERED]
    assert wire[0]["args"]["password"] == "Tr0ub4dor&3-zebra"
    assert box.flush(session) == 1
    cmd = session.execute(select(Command).where(Command.batch_id == batch.id)).scalar_one()
    session.refresh(cmd)
    assert (cmd.status, cmd.attempts) == (CommandStatus.DELIVERED, 1)
    assert cmd.secret is not None and "Tr0ub4dor" not in cmd.secret  # still sealed at rest


# ---------------------------------------------------------------------------- stored text


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2026, 11, 26, 16, 35, 10, 123, tzinfo=dt.UTC),
        dt.datetime(2026, 11, 26, 16, 35, 10, tzinfo=dt.UTC),
        dt.datetime(2026, 1, 2, 3, 4, 5, 999999, tzinfo=dt.timezone(dt.timedelta(hours=9))),
        dt.datetime(999, 1, 1, tzinfo=dt.UTC),
    ],
)
def test_raw_sqlite_datetimes_are_the_text_sqlalchemy_stores(value: dt.datetime) -> None:
    dialect = sqlite.dialect()
    processor = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    assert processor is not None
    assert sqlite_utc_text(value) == processor(value)
    # And the dashboard's reading of that text is iso() of the same instant.
    utc = value.astimezone(dt.UTC)
    assert read_models._iso_stored(sqlite_utc_text(value)) == read_models.iso(utc)
    assert read_models._iso_stored(utc.replace(tzinfo=None)) == read_models.iso(utc)


def test_a_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        sqlite_utc_text(dt.datetime(2026, 1, 1))
