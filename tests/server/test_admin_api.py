"""Admin JSON API, settings that reach the clients, the audit log, health and OpenAPI."""

from __future__ import annotations

import re

import pytest
from flask import Flask

from tests.conftest import LiveServer, register_pc


@pytest.mark.slow
def test_presence_mode_changes_reach_clients_on_their_next_answer(live_server: LiveServer) -> None:
    pc = register_pc(live_server)
    data = live_server.admin("PUT", "/api/settings", {"presence_mode": "fast"})
    assert data["timing"] == {"heartbeat_interval": 5, "poll_timeout": 5, "offline_after": 12}
    status, body = live_server.api(
        "POST", "/api/client/heartbeat", {"machine_id": pc["machine_id"]}, token=pc["token"]
    )
    assert status == 200 and body["config"]["presence_mode"] == "fast"
    assert body["config"]["heartbeat_interval"] == 5
    # The choice survives a restart.
    live_server.restart()
    assert live_server.admin("GET", "/api/settings")["presence_mode"] == "fast"


def test_admin_actions_are_audited_without_secrets(live_server: LiveServer) -> None:
    pin = live_server.create_pin()
    made = live_server.admin("POST", "/api/admins", {"username": "kim"})
    assert len(made["password"]) >= 16
    live_server.admin("PUT", "/api/settings", {"presence_mode": "conservative"})
    entries = live_server.admin("GET", "/api/audit")["entries"]
    actions = [e["action"] for e in entries]
    assert actions[:3] == ["settings.presence_mode", "admin.create", "pin.create"]
    assert all(e["actor"] == "apikey:tests" and e["ip"] == "127.0.0.1" for e in entries[:3])
    text = str(entries)
    assert pin not in text and made["password"] not in text


def test_revoked_api_key_stops_working(live_server: LiveServer) -> None:
    key = live_server.cli("apikey", "create", "temp")
    assert live_server.api("GET", "/api/me", token=key)[0] == 200
    key_id = next(
        k["id"] for k in live_server.admin("GET", "/api/apikeys")["apikeys"] if k["name"] == "temp"
    )
    revoked = live_server.admin("DELETE", f"/api/apikeys/{key_id}")
    assert revoked["revoked"] is True and revoked["owner"] is None
    status, body = live_server.api("GET", "/api/me", token=key)
    assert status == 401 and body["error"]["code"] == "unauthorized"


def test_healthz_reports_database_and_version(live_server: LiveServer) -> None:
    status, body = live_server.api("GET", "/healthz")
    assert status == 200
    assert body["status"] == "ok" and body["database"] == "ok" and body["api_version"] == 1


def test_openapi_documents_every_api_route(app: Flask) -> None:
    doc = app.test_client().get("/api/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    missing = []
    for rule in app.url_map.iter_rules():
        if not (rule.rule.startswith("/api/") or rule.rule == "/healthz"):
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            if (path, method.lower()) not in documented:
                missing.append((method, rule.rule))
    assert missing == [], f"routes missing from the OpenAPI document: {missing}"
    register = doc["paths"]["/api/client/register"]["post"]
    schema_ref = register["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][schema_ref.rsplit("/", 1)[1]]
    assert set(schema["required"]) == {"pin", "machine_id", "hostname"}
