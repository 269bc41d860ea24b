"""Issue 10, Medium 6: a long poll opened with a token that is then revoked still received the
next command, with its plaintext password.

Now a revocation (the PC registers again, or is deleted) wakes the PC's waiting polls, which
check their own token and answer 401; and right before a secret-carrying command (a sealed
password, `run`, an account command) is handed over, the poll's token is checked in the
database, so a revocation made by another process or by hand in the database is honoured too.

The in-process tests drive the real app (its agent fast path included) from threads, so they
can wait until the poll is really waiting on the server (the doorbell) before revoking; the
live test races the same thing against the production server (gunicorn + gevent), where every
ordering must end the same way.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select, text, update

from tests.conftest import LiveServer, register_pc
from wcms.server.db import utcnow
from wcms.server.models import Command, PcCredential
from wcms.server.runtime import Runtime
from wcms.server.services import accounts

PASSWORD = "Revoked-Poll-Secret-7"


# ---------------------------------------------------------------------------- in-process


class InProcess:
    """An admin and a PC talking to the in-process app, each call from any thread."""

    def __init__(self, flask_app: Flask, runtime: Runtime) -> None:
        self.app, self.rt = flask_app, runtime
        with runtime.sessions() as s:
            _row, self.key = accounts.create_api_key(s, "tests", utcnow())
            _row, self.pin = accounts.create_pin(
                s,
                runtime.secret_key,
                "t",
                utcnow(),
                dt.timedelta(minutes=10),
                True,
                auto_approve=True,
            )
            s.commit()

    def call(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        resp = self.app.test_client().open(path, method=method, json=body, headers=headers)
        return resp.status_code, resp.get_json()

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        status, data = self.call(method, path, body, token=self.key)
        assert status < 400, data
        return data

    def register(self, machine_id: str | None = None, token: str | None = None) -> dict[str, Any]:
        machine_id = machine_id or f"TEST-{uuid.uuid4().hex[:16]}"
        body = {"pin": self.pin, "machine_id": machine_id, "hostname": "lab"}
        status, data = self.call("POST", "/api/client/register", body, token=token)
        assert status == 201, data
        return {**data, "machine_id": machine_id}

    def poll(self, pc: dict[str, Any], timeout: float = 10) -> tuple[int, Any]:
        path = f"/api/client/commands?machine_id={pc['machine_id']}&timeout={timeout}"
        return self.call("GET", path, token=pc["token"])

    def send_password(self, pc: dict[str, Any]) -> dict[str, Any]:
        body = {
            "type": "account_password",
            "args": {"username": "student", "password": PASSWORD},
            "target": {"pc_ids": [pc["pc_id"]]},
        }
        return dict(self.admin("POST", "/api/commands", body))

    def waiting_poll(self, pc: dict[str, Any]) -> Callable[[], tuple[int, Any]]:
        """Open a poll in a thread; return once it waits on the server; the callable joins it."""
        answer: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: answer.update(r=self.poll(pc)), daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not self.rt.doorbell.listening([pc["pc_id"]]):
            assert time.monotonic() < deadline, "the poll never started waiting"
            assert thread.is_alive(), answer
            time.sleep(0.005)

        def result() -> tuple[int, Any]:
            thread.join(timeout=15)
            assert not thread.is_alive(), "the poll did not end"
            return answer["r"]  # type: ignore[no-any-return]

        return result


@pytest.fixture
def inproc(app: Flask, rt: Runtime) -> InProcess:
    return InProcess(app, rt)


def _no_secret(body: Any) -> None:
    assert PASSWORD not in str(body)


def test_reregistering_ends_the_old_tokens_poll_and_the_password_goes_to_the_new_one(
    inproc: InProcess,
) -> None:
    pc = inproc.register()
    old_poll = inproc.waiting_poll(pc)
    started = time.monotonic()
    again = inproc.register(pc["machine_id"], token=pc["token"])  # the allowed way: its token
    batch = inproc.send_password(again)
    status, body = old_poll()
    assert time.monotonic() - started < 5  # woken, not left to its 10 s timeout
    assert status == 401 and body["error"]["code"] == "invalid_token", body
    _no_secret(body)
    [cmd] = batch["commands"]
    status, body = inproc.poll(again, timeout=0)
    assert status == 200 and [c["id"] for c in body["commands"]] == [cmd["id"]]
    assert body["commands"][0]["args"]["password"] == PASSWORD


def test_deleting_the_pc_ends_its_poll(inproc: InProcess) -> None:
    pc = inproc.register()
    waiting = inproc.waiting_poll(pc)
    started = time.monotonic()
    inproc.admin("DELETE", f"/api/pcs/{pc['pc_id']}")
    status, body = waiting()
    assert time.monotonic() - started < 5
    assert status == 401 and body["error"]["code"] == "invalid_token", body


def test_a_revocation_made_in_the_database_is_honoured_by_a_waiting_poll(
    inproc: InProcess,
    rt: Runtime,
) -> None:
    # Another process (or a person with psql) revokes the token: this process's cache still
    # holds it, nothing rings the poll for it, and the command is handed over from memory.
    pc = inproc.register()
    waiting = inproc.waiting_poll(pc)
    with rt.engine.begin() as conn:
        conn.execute(
            update(PcCredential)
            .where(PcCredential.pc_id == pc["pc_id"])
            .values(token_hash="revoked-by-hand")
        )
    batch = inproc.send_password(pc)  # wakes the poll: the staged (in-memory) way
    status, body = waiting()
    assert status == 401 and body["error"]["code"] == "invalid_token", body
    _no_secret(body)
    [cmd] = batch["commands"]
    with rt.sessions() as s:
        row = s.execute(select(Command).where(Command.id == cmd["id"])).scalar_one()
        assert (row.status, row.attempts, row.delivered_at) == ("queued", 0, None)
    rt.tick(utcnow(), check=False)  # a pending `delivered` mark would be written now: none
    with rt.sessions() as s:
        assert s.get(Command, cmd["id"]).status == "queued"  # type: ignore[union-attr]


def test_a_revocation_made_in_the_database_is_honoured_by_the_next_poll(
    inproc: InProcess,
    rt: Runtime,
) -> None:
    # The same, with the command already queued when the poll comes: the database way.
    pc = inproc.register()
    assert inproc.poll(pc, timeout=0)[0] == 200  # the token is in the cache now
    inproc.send_password(pc)
    with rt.engine.begin() as conn:
        conn.execute(text("DELETE FROM pc_credentials WHERE pc_id = :p"), {"p": pc["pc_id"]})
    assert accounts.sha256(pc["token"]) in rt.tokens  # the cache alone would still let it in
    status, body = inproc.poll(pc, timeout=0)
    assert status == 401 and body["error"]["code"] == "invalid_token", body
    _no_secret(body)
    with rt.sessions() as s:
        assert s.execute(select(Command.status)).scalar_one() == "queued"
    assert accounts.sha256(pc["token"]) not in rt.tokens  # and the cache has let it go


def test_a_poll_that_was_let_in_just_before_the_revocation_still_ends(
    inproc: InProcess,
    rt: Runtime,
) -> None:
    # Revoked after the poll was authenticated but before it listened on the doorbell: the
    # revocation's wake-up came too early for it, so it must notice by itself.
    pc = inproc.register()
    digest = accounts.sha256(pc["token"])
    real_listen = rt.doorbell.listen

    def late_listen(pc_id: int) -> Any:
        inproc.register(pc["machine_id"], token=pc["token"])  # revoked right here
        assert digest not in rt.tokens
        return real_listen(pc_id)

    rt.doorbell.listen = late_listen  # type: ignore[method-assign]
    try:
        started = time.monotonic()
        status, body = inproc.poll(pc, timeout=5)
    finally:
        rt.doorbell.listen = real_listen  # type: ignore[method-assign]
    assert status == 401 and time.monotonic() - started < 3, body


def test_a_poll_with_the_current_token_is_not_ended_by_the_revocation_of_the_old_one(
    inproc: InProcess,
) -> None:
    pc = inproc.register()
    old_poll = inproc.waiting_poll(pc)
    again = inproc.register(pc["machine_id"], token=pc["token"])
    assert old_poll()[0] == 401
    new_poll = inproc.waiting_poll(again)
    inproc.register(f"TEST-{uuid.uuid4().hex[:16]}")  # another PC's registration: no effect
    inproc.send_password(again)
    status, body = new_poll()
    assert status == 200 and body["commands"][0]["args"]["password"] == PASSWORD


# ---------------------------------------------------------------------------- the real server


def test_racing_revocation_and_a_password_never_reach_the_old_token(
    live_server: LiveServer,
) -> None:
    """Poll, re-register (the allowed way) and queue a password at once, 8 times: whatever
    the order, the old token's poll ends in 401 without the password, and the new one gets it."""
    pc = register_pc(live_server)
    for _ in range(8):
        barrier = threading.Barrier(2, timeout=10)
        answer: dict[str, Any] = {}

        def poll(
            pc: dict[str, Any] = pc,
            answer: dict[str, Any] = answer,
            barrier: threading.Barrier = barrier,
        ) -> None:
            barrier.wait()
            path = f"/api/client/commands?machine_id={pc['machine_id']}&timeout=5"
            answer["r"] = live_server.api("GET", path, token=pc["token"], timeout=20)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        barrier.wait()
        again = register_pc(live_server, machine_id=pc["machine_id"], token=pc["token"])
        body = {
            "type": "account_password",
            "args": {"username": "student", "password": PASSWORD},
            "target": {"pc_ids": [pc["pc_id"]]},
        }
        [cmd] = live_server.admin("POST", "/api/commands", body)["commands"]
        poller.join(timeout=20)
        status, data = answer["r"]
        assert status == 401 and data["error"]["code"] == "invalid_token", data
        _no_secret(data)
        path = f"/api/client/commands?machine_id={pc['machine_id']}&timeout=0"
        status, data = live_server.api("GET", path, token=again["token"])
        assert status == 200 and [c["id"] for c in data["commands"]] == [cmd["id"]], data
        assert data["commands"][0]["args"]["password"] == PASSWORD
        ack = {"machine_id": pc["machine_id"]}
        path = f"/api/client/commands/{cmd['id']}/ack"
        assert live_server.api("POST", path, ack, token=again["token"])[0] == 200
        pc = again
