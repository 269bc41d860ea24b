"""The command channel and the admin command API over HTTP: the real server process for the
long poll (gunicorn + gevent), the in-process app where a test must look inside."""

from __future__ import annotations

import datetime as dt
import statistics
import threading
import time
from typing import Any

from flask import Flask

from tests.conftest import LiveServer, register_pc, sql_statements
from wcms.server.db import utcnow
from wcms.server.runtime import Runtime
from wcms.server.services import accounts

PASSWORD = "Corr3ct-Horse-Battery"


def poll(server: LiveServer, pc: dict[str, Any], timeout: float = 5, **q: Any) -> tuple[int, Any]:
    query = "&".join(f"{k}={v}" for k, v in {"machine_id": pc["machine_id"], **q}.items())
    path = f"/api/client/commands?{query}&timeout={timeout}"
    return server.api("GET", path, token=pc["token"], timeout=timeout + 10)


def send(server: LiveServer, pcs: list[dict[str, Any]], type_: str, **body: Any) -> Any:
    target = body.pop("target", {"pc_ids": [p["pc_id"] for p in pcs]})
    return server.admin("POST", "/api/commands", {"type": type_, "target": target, **body})


def ack(server: LiveServer, pc: dict[str, Any], command_id: int) -> tuple[int, Any]:
    body = {"machine_id": pc["machine_id"]}
    return server.api("POST", f"/api/client/commands/{command_id}/ack", body, token=pc["token"])


def result(server: LiveServer, pc: dict[str, Any], command_id: int, **body: Any) -> tuple[int, Any]:
    body = {"machine_id": pc["machine_id"], **body}
    return server.api("POST", f"/api/client/commands/{command_id}/result", body, token=pc["token"])


def test_a_waiting_poll_is_woken_the_moment_a_command_is_queued(live_server: LiveServer) -> None:
    pc = register_pc(live_server)
    latencies = []
    for i in range(20):
        answer: dict[str, Any] = {}

        def wait(answer: dict[str, Any] = answer) -> None:
            answer["resp"] = poll(live_server, pc, timeout=10)
            answer["at"] = time.monotonic()

        waiter = threading.Thread(target=wait)
        waiter.start()
        live_server.wait_polls(1)  # the poll is waiting on the server's doorbell
        sent = time.monotonic()
        send(live_server, [pc], "message", args={"text": f"hello {i}"})
        waiter.join(timeout=10)
        status, body = answer["resp"]
        assert status == 200 and [c["args"]["text"] for c in body["commands"]] == [f"hello {i}"]
        latencies.append(answer["at"] - sent)
        assert ack(live_server, pc, body["commands"][0]["id"])[0] == 200
    latencies.sort()
    print(
        f"\nwake-up latency (send -> poll answered, n=20): median "
        f"{statistics.median(latencies) * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
    )
    assert latencies[-1] < 0.5


def test_an_idle_poll_answers_empty_at_the_servers_poll_timeout(make_server: Any) -> None:
    server = make_server(WCMS_POLL_TIMEOUT="1")
    pc = register_pc(server)
    started = time.monotonic()
    status, body = poll(server, pc, timeout=30)  # asks for more than the server allows
    elapsed = time.monotonic() - started
    assert status == 200 and body["commands"] == [] and body["config"]["poll_timeout"] == 1
    assert 0.55 < elapsed < 3  # a uniform 0.6-1.0 of the poll timeout (docs/API.md)


def test_a_poll_is_contact_but_not_a_return_after_the_shutdown_signal(
    live_server: LiveServer,
) -> None:
    pc = register_pc(live_server)
    before = live_server.get_pc(pc["machine_id"])
    assert before is not None
    time.sleep(0.05)  # a time to pass: the poll's contact must get a later last_seen
    assert poll(live_server, pc, timeout=0)[0] == 200
    deadline = time.monotonic() + 5  # written by the heartbeat writer within a second
    while live_server.get_pc(pc["machine_id"])["last_seen"] == before["last_seen"]:  # type: ignore[index]
        assert time.monotonic() < deadline, "a poll did not count as contact"
        time.sleep(0.05)
    body = {"machine_id": pc["machine_id"], "reason": "shutdown"}
    assert live_server.api("POST", "/api/client/shutdown", body, token=pc["token"])[0] == 200
    # A poll the agent had in flight as it signed off: refused, and the PC stays off.
    status, answer = poll(live_server, pc, timeout=0)
    assert status == 409 and answer["error"]["code"] == "signed_off"
    after = live_server.get_pc(pc["machine_id"])
    assert after is not None and (after["state"], after["reason"]) == ("offline", "shutdown")
    # The next boot's heartbeat brings it back; its polls are contact again.
    body = {"machine_id": pc["machine_id"], "event": "boot", "boot_time": 2000.0}
    assert live_server.api("POST", "/api/client/heartbeat", body, token=pc["token"])[0] == 200
    assert poll(live_server, pc, timeout=0)[0] == 200
    after = live_server.get_pc(pc["machine_id"])
    assert after is not None and (after["state"], after["reason"]) == ("online", "boot")


def test_lifecycle_over_http_with_per_pc_progress(live_server: LiveServer) -> None:
    a, b = register_pc(live_server), register_pc(live_server)
    batch = send(live_server, [a, b], "run", args={"command": "hostname", "timeout": 20})
    assert batch["total"] == 2 and batch["counts"]["queued"] == 2
    [cmd] = poll(live_server, a, timeout=0)[1]["commands"]
    assert ack(live_server, a, cmd["id"])[1]["status"] == "running"
    status, body = ack(live_server, a, cmd["id"])  # idempotent
    assert status == 200 and body["status"] == "running"
    status, body = result(live_server, a, cmd["id"], status="failed", exit_code=2, stderr="no")
    assert status == 200 and body["status"] == "failed"
    status, body = result(live_server, a, cmd["id"], status="succeeded", exit_code=0)
    assert status == 200 and body["status"] == "failed"  # a duplicate changes nothing
    # b may not touch a's command
    assert ack(live_server, b, cmd["id"])[0] == 404
    assert result(live_server, b, cmd["id"], status="succeeded")[0] == 404
    detail = live_server.admin("GET", f"/api/batches/{batch['id']}")
    by_pc = {c["pc_id"]: c for c in detail["commands"]}
    assert by_pc[a["pc_id"]]["status"] == "failed" and by_pc[a["pc_id"]]["stderr"] == "no"
    assert by_pc[b["pc_id"]]["status"] == "queued"
    assert detail["counts"]["failed"] == 1 and detail["finished"] is False
    listed = live_server.admin("GET", "/api/batches")["batches"]
    assert listed[0]["id"] == batch["id"] and listed[0]["counts"]["queued"] == 1
    history = live_server.admin("GET", f"/api/pcs/{a['pc_id']}/commands")["commands"]
    assert [c["id"] for c in history] == [cmd["id"]]
    cancelled = live_server.admin("POST", f"/api/batches/{batch['id']}/cancel")
    assert cancelled["counts"]["cancelled"] == 1 and cancelled["finished"] is True
    assert poll(live_server, b, timeout=0)[1]["commands"] == []


def test_admin_api_validates_and_names_the_field(live_server: LiveServer) -> None:
    pc = register_pc(live_server)
    cases = [
        ({"type": "reboot", "target": {"pc_ids": [pc["pc_id"]]}}, "type"),
        ({"type": "lock", "target": {}}, "target"),
        ({"type": "lock", "target": {"pc_ids": [1], "all_online": True}}, "target"),
        ({"type": "lock", "target": {"pc_ids": []}}, "target.pc_ids"),
        ({"type": "lock", "target": {"pc_ids": [pc["pc_id"]]}, "expires_in": 1}, "expires_in"),
        (
            {"type": "shutdown", "args": {"delay": "10"}, "target": {"all_online": True}},
            "args.delay",
        ),
        (
            {
                "type": "account_create",
                "args": {"username": "a b", "password": "x"},
                "target": {"all_online": True},
            },
            "args.username",
        ),
    ]
    for body, field in cases:
        status, answer = live_server.api("POST", "/api/commands", body, token=live_server.api_key)
        assert status == 400, (body, answer)
        assert field in answer["error"]["fields"], (body, answer)
    status, answer = live_server.api(
        "POST",
        "/api/commands",
        {"type": "lock", "target": {"pc_ids": [99999]}},
        token=live_server.api_key,
    )
    assert status == 404
    assert live_server.api("POST", "/api/commands", {"type": "lock"})[0] == 401


def test_passwords_never_reach_views_or_the_audit_log(live_server: LiveServer) -> None:
    pc = register_pc(live_server)
    args = {"username": "student07", "password": PASSWORD, "language": "ko-KR"}
    batch = send(live_server, [pc], "account_create", args=args)
    assert batch["args"]["password"] == "***"
    [cmd] = poll(live_server, pc, timeout=0)[1]["commands"]
    assert cmd["args"]["password"] == PASSWORD
    ack(live_server, pc, cmd["id"])
    result(live_server, pc, cmd["id"], status="succeeded", exit_code=0, stdout=f"pw={PASSWORD}")
    for path in (
        f"/api/batches/{batch['id']}",
        "/api/batches",
        "/api/audit",
        f"/api/pcs/{pc['pc_id']}/commands",
    ):
        text = repr(live_server.admin("GET", path))
        assert PASSWORD not in text, path
    assert "pw=***" in repr(live_server.admin("GET", f"/api/batches/{batch['id']}"))
    entry = live_server.admin("GET", "/api/audit")["entries"][0]
    assert entry["action"] == "command.send" and entry["details"]["pc_ids"] == [pc["pc_id"]]


# ---------------------------------------------------------------------------- in-process


def _admin_token(rt: Runtime) -> str:
    with rt.sessions() as s:
        _row, key = accounts.create_api_key(s, "tests", utcnow())
        s.commit()
    return key


def _register(client: Any, rt: Runtime) -> dict[str, Any]:
    with rt.sessions() as s:
        _row, pin = accounts.create_pin(
            s, rt.secret_key, "t", utcnow(), dt.timedelta(minutes=5), False
        )
        s.commit()
    body = {"pin": pin, "machine_id": "TEST-inproc-0001", "hostname": "lab"}
    answer = client.post("/api/client/register", json=body).get_json()
    return {**answer, "machine_id": body["machine_id"]}


def test_a_waiting_poll_does_not_touch_the_database(app: Flask, rt: Runtime) -> None:
    client = app.test_client()
    pc = _register(client, rt)
    auth = {"Authorization": f"Bearer {pc['token']}"}

    def statements_of_a_poll(timeout: float) -> tuple[int, float]:
        """How many SQL statements an idle poll ran, and how long it took to answer."""
        with sql_statements(rt.engine) as statements:
            started = time.monotonic()
            resp = client.get(
                f"/api/client/commands?machine_id={pc['machine_id']}&timeout={timeout}",
                headers=auth,
            )
            took = time.monotonic() - started
        assert resp.status_code == 200 and resp.get_json()["commands"] == []
        return len(statements), took

    statements_of_a_poll(0.1)  # the first contact writes; the polls below are alike
    short, _ = statements_of_a_poll(0.1)
    long, took = statements_of_a_poll(2.0)
    # The wait is jittered to 0.6-1.0 of the timeout (api/commands.py): at least 1.2 s here.
    assert took >= 1.1, f"the poll answered after {took:.2f} s: it never waited"
    # A database-polling wait would run more statements the longer it waited.
    assert long == short, f"{long} statements in a 2 s poll, {short} in a 0.1 s one"


def test_progress_is_published_on_the_live_bus(app: Flask, rt: Runtime) -> None:
    client = app.test_client()
    pc = _register(client, rt)
    key = _admin_token(rt)
    q = rt.bus.subscribe()
    resp = client.post(
        "/api/commands",
        json={"type": "lock", "target": {"pc_ids": [pc["pc_id"]]}},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert resp.status_code == 201
    auth = {"Authorization": f"Bearer {pc['token']}"}
    [cmd] = client.get(
        f"/api/client/commands?machine_id={pc['machine_id']}&timeout=0", headers=auth
    ).get_json()["commands"]
    mid = {"machine_id": pc["machine_id"]}
    client.post(f"/api/client/commands/{cmd['id']}/ack", json=mid, headers=auth)
    client.post(
        f"/api/client/commands/{cmd['id']}/result",
        json={**mid, "status": "succeeded", "exit_code": 0},
        headers=auth,
    )
    seen = []
    while not q.empty():
        m = q.get_nowait()
        if m["type"] in ("batch", "command"):
            seen.append((m["type"], m.get("status")))
    assert seen == [
        ("batch", None),
        ("command", "delivered"),
        ("command", "running"),
        ("command", "succeeded"),
    ]


def test_doorbell_idle_mark_is_ignored_when_a_command_raced_the_check() -> None:
    from wcms.server.services.doorbell import Doorbell

    bell = Doorbell()
    assert not bell.is_idle(7)
    before = bell.rings(7)
    bell.ring([7])  # a command is queued while the poll was looking in the database
    bell.mark_idle(7, before)
    assert not bell.is_idle(7)  # so the next poll still looks
    bell.mark_idle(7, bell.rings(7))
    assert bell.is_idle(7)
    bell.ring([7])
    assert not bell.is_idle(7)
    bell.mark_idle(7, bell.rings(7))
    bell.mark_busy(7)
    assert not bell.is_idle(7)


def test_an_idle_mark_is_believed_for_idle_ttl_seconds_at_most(monkeypatch: Any) -> None:
    """A lost wake-up from another process delays a command by IDLE_TTL at most."""
    from wcms.server.services import doorbell

    clock = [1000.0]
    monkeypatch.setattr(doorbell.time, "monotonic", lambda: clock[0])
    bell = doorbell.Doorbell()
    bell.mark_idle(7, bell.rings(7))
    clock[0] += doorbell.IDLE_TTL - 1
    assert bell.is_idle(7)
    clock[0] += 2
    assert not bell.is_idle(7)


def test_a_windows_crash_code_and_nul_in_output_are_kept_not_refused(
    live_server: LiveServer,
) -> None:
    pc = register_pc(live_server)
    batch = send(live_server, [pc], "run", args={"command": "crash.exe", "timeout": 20})
    [cmd] = poll(live_server, pc, timeout=0)[1]["commands"]
    assert ack(live_server, pc, cmd["id"])[0] == 200
    # 0xC0000005 (an access violation) as Windows reports it: unsigned 32-bit.
    status, body = result(
        live_server, pc, cmd["id"], status="failed", exit_code=3221225477, stdout="a\x00b"
    )
    assert status == 200, body
    [row] = live_server.admin("GET", f"/api/batches/{batch['id']}")["commands"]
    assert row["exit_code"] == 3221225477 - 2**32 and row["stdout"] == "ab"
