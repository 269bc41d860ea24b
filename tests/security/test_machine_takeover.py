"""Issue 10, Medium 7: anyone with a live PIN could re-register an existing machine_id; the real
PC's token was revoked and its commands (account passwords, `run`) went to the newcomer.

Now a known machine registers again only with its current token, or once (within an hour)
after an admin allowed it on the PC's page; anything else is 409 `machine_registered` and the
real PC keeps its token. A PC registered by a PIN alone is not approved: `run` and account
commands are refused for it, per PC and with the reason, until an admin approves it (or its PIN
was made with auto_approve). Both ways in are conditional UPDATEs, raced below.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.conftest import LiveServer, register_pc
from tests.server.test_command_queue import _meet_before, _race
from wcms.server.db import utcnow
from wcms.server.models import AuditLog, PcInfo
from wcms.server.runtime import Runtime
from wcms.server.schemas import RegisterRequest
from wcms.server.services import pc_service
from wcms.server.services.errors import DomainError

PASSWORD = "Takeover-Secret-42"


def _register(
    server: LiveServer, machine_id: str, pin: str, token: str | None = None
) -> tuple[int, Any]:
    body = {"pin": pin, "machine_id": machine_id, "hostname": "intruder"}
    return server.api("POST", "/api/client/register", body, token=token)


def _poll(server: LiveServer, pc: dict[str, Any]) -> tuple[int, Any]:
    path = f"/api/client/commands?machine_id={pc['machine_id']}&timeout=0"
    return server.api("GET", path, token=pc["token"])


def _password(server: LiveServer, pc_ids: list[int]) -> Any:
    body = {
        "type": "account_password",
        "args": {"username": "student", "password": PASSWORD},
        "target": {"pc_ids": pc_ids},
    }
    return server.admin("POST", "/api/commands", body)


def test_a_live_pin_cannot_take_over_a_known_machine(shared_server: LiveServer) -> None:
    server = shared_server
    real = register_pc(server)
    other = register_pc(server)
    for pin in (server.create_pin(approve=False), server.create_pin(approve=True)):
        for token in (None, other["token"], "wcms_pc_guessed"):  # none, another PC's, a guess
            status, body = _register(server, real["machine_id"], pin, token)
            assert status == 409, body
            assert body["error"]["code"] == "machine_registered"
            assert "allow re-registration on the PC's page" in body["error"]["message"]
        # The refusal did not use the single-use PIN up: a new PC can still register with it.
        assert _register(server, f"TEST-{uuid.uuid4().hex[:16]}", pin)[0] == 201
    # The real PC kept its token, and its password goes to it.
    [cmd] = _password(server, [real["pc_id"]])["commands"]
    status, body = _poll(server, real)
    assert status == 200 and [c["id"] for c in body["commands"]] == [cmd["id"]]
    assert body["commands"][0]["args"]["password"] == PASSWORD
    pc = server.admin("GET", f"/api/pcs/{real['pc_id']}")
    assert pc["hostname"] == "lab-pc" and pc["approved"] is True


def test_a_pc_registered_by_pin_alone_gets_no_secret_until_approved(
    shared_server: LiveServer,
) -> None:
    server = shared_server
    new = register_pc(server, approve=False)
    vetted = register_pc(server, approve=True)
    listed = {p["id"]: p["approved"] for p in server.pcs()}
    assert (listed[new["pc_id"]], listed[vetted["pc_id"]]) == (False, True)
    for kind, args in (
        ("account_password", {"username": "student", "password": PASSWORD}),
        ("run", {"command": "echo hi"}),
        ("account_delete", {"username": "student"}),
    ):
        batch = server.admin(
            "POST",
            "/api/commands",
            {"type": kind, "args": args, "target": {"pc_ids": [new["pc_id"], vetted["pc_id"]]}},
        )
        by_pc = {c["pc_id"]: c for c in batch["commands"]}
        assert by_pc[vetted["pc_id"]]["status"] == "queued"
        refused = by_pc[new["pc_id"]]
        assert refused["status"] == "failed" and "not approved" in refused["error"], refused
        assert "approve it on its page" in refused["error"]
    status, body = _poll(server, new)
    assert status == 200 and body["commands"] == []
    # Harmless commands still go to it.
    server.admin("POST", "/api/commands", {"type": "lock", "target": {"pc_ids": [new["pc_id"]]}})
    assert [c["type"] for c in _poll(server, new)[1]["commands"]] == ["lock"]

    assert server.admin("POST", f"/api/pcs/{new['pc_id']}/approve") == {
        "id": new["pc_id"],
        "approved": True,
    }
    entry = server.admin("GET", "/api/audit?limit=5")["entries"][0]
    assert (entry["action"], entry["details"]["pc_id"]) == ("pc.approve", new["pc_id"])
    [cmd] = _password(server, [new["pc_id"]])["commands"]
    status, body = _poll(server, new)
    assert [c["id"] for c in body["commands"]] == [cmd["id"]]
    assert body["commands"][0]["args"]["password"] == PASSWORD


def test_an_admin_allows_one_reregistration_and_the_newcomer_starts_unapproved(
    shared_server: LiveServer,
) -> None:
    server = shared_server
    real = register_pc(server)
    [pending] = _password(server, [real["pc_id"]])["commands"]  # queued before the reinstall
    answer = server.admin("POST", f"/api/pcs/{real['pc_id']}/allow-reregister")
    assert answer["reregister_until"] is not None
    assert (
        server.admin("GET", f"/api/pcs/{real['pc_id']}")["reregister_until"]
        == (answer["reregister_until"])
    )
    entry = server.admin("GET", "/api/audit?limit=5")["entries"][0]
    assert entry["action"] == "pc.allow_reregister" and entry["details"]["until"]

    pin = server.create_pin(multi=True, approve=False)
    status, body = _register(server, real["machine_id"], pin)
    assert status == 201 and body["pc_id"] == real["pc_id"], body
    newcomer = {**body, "machine_id": real["machine_id"]}
    # Once: the leave is used up by that registration.
    assert _register(server, real["machine_id"], pin)[0] == 409
    pc = server.admin("GET", f"/api/pcs/{real['pc_id']}")
    assert pc["approved"] is False and pc["reregister_until"] is None
    # The old token is dead, and the password queued for the PC does not go to the newcomer.
    assert _poll(server, real)[0] == 401
    status, body = _poll(server, newcomer)
    assert status == 200 and body["commands"] == [], body
    detail = server.admin("GET", f"/api/batches/{pending['batch_id']}")
    [row] = detail["commands"]
    assert row["status"] == "failed" and "not approved" in row["error"]


def test_registering_again_with_the_current_token_keeps_the_approval(
    shared_server: LiveServer,
) -> None:
    server = shared_server
    approved = register_pc(server, approve=True)
    again = register_pc(
        server, machine_id=approved["machine_id"], token=approved["token"], approve=False
    )
    assert server.admin("GET", f"/api/pcs/{again['pc_id']}")["approved"] is True
    pending = register_pc(server, approve=False)
    # An auto-approving PIN approves a known machine too, when it comes with its token.
    register_pc(server, machine_id=pending["machine_id"], token=pending["token"], approve=True)
    assert server.admin("GET", f"/api/pcs/{pending['pc_id']}")["approved"] is True


def test_pin_create_approve_on_the_command_line(shared_server: LiveServer) -> None:
    server = shared_server
    pin = server.cli("pin", "create", "--approve")
    machine_id = f"TEST-{uuid.uuid4().hex[:16]}"
    status, body = _register(server, machine_id, pin)
    assert status == 201
    assert server.admin("GET", f"/api/pcs/{body['pc_id']}")["approved"] is True
    listed = server.admin("GET", "/api/pins")["pins"]
    assert any(p["auto_approve"] for p in listed)


# ---------------------------------------------------------------------------- races


def _known(s: Session) -> tuple[PcInfo, str]:
    req = RegisterRequest.model_validate(
        {"pin": "000000", "machine_id": f"TEST-{uuid.uuid4().hex[:16]}", "hostname": "lab"}
    )
    pc, token, _ = pc_service.register(s, req, utcnow(), 35, approve=True)
    s.commit()
    return pc, token


def _register_in_thread(runtime: Runtime, machine_id: str, token: str | None) -> Any:
    def call() -> str:
        req = RegisterRequest.model_validate(
            {"pin": "000000", "machine_id": machine_id, "hostname": "racer"}
        )
        with runtime.sessions() as s:
            try:
                pc_service.register(s, req, utcnow(), 35, token=token)
                s.commit()
            except DomainError as err:
                s.rollback()
                return str(err.code)
        return "registered"

    return call


def test_two_registrations_racing_with_the_current_token_cannot_both_win(
    rt: Runtime,
    session: Session,
) -> None:
    pc, token = _known(session)
    done = _meet_before(rt, "UPDATE PC_CREDENTIALS", 2)
    try:
        results = _race(*[_register_in_thread(rt, pc.machine_id, token)] * 2)
    finally:
        done()
    assert sorted(results) == ["machine_registered", "registered"], results


def test_two_registrations_racing_in_one_allowed_window_cannot_both_win(
    rt: Runtime,
    session: Session,
) -> None:
    pc, _token = _known(session)
    pc_service.allow_reregister(pc, utcnow())
    session.commit()
    done = _meet_before(rt, "UPDATE PC_INFO SET REREGISTER_UNTIL", 2)
    try:
        results = _race(*[_register_in_thread(rt, pc.machine_id, None)] * 2)
    finally:
        done()
    assert sorted(results) == ["machine_registered", "registered"], results
    session.expire_all()
    assert session.execute(select(PcInfo.reregister_until)).scalar_one() is None


def test_the_allow_and_approve_actions_are_audited_in_process(
    app: Any,
    rt: Runtime,
    session: Session,
) -> None:
    from wcms.server.services import accounts

    pc, _ = _known(session)
    pc.approved = False
    session.commit()
    _row, key = accounts.create_api_key(session, "t", utcnow())
    session.commit()
    client = app.test_client()
    auth = {"Authorization": f"Bearer {key}"}
    assert client.post(f"/api/pcs/{pc.id}/approve", headers=auth).status_code == 200
    assert client.post(f"/api/pcs/{pc.id}/approve", headers=auth).status_code == 200  # no-op
    assert client.post(f"/api/pcs/{pc.id}/allow-reregister", headers=auth).status_code == 200
    assert client.post("/api/pcs/99999/approve", headers=auth).status_code == 404
    actions = session.execute(select(AuditLog.action).order_by(AuditLog.id)).scalars().all()
    assert actions == ["pc.approve", "pc.allow_reregister"]  # the no-op approval is not logged
