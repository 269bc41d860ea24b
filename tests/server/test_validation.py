"""Malformed input on every endpoint: a 4xx JSON error, never a 5xx, nothing half-written."""

from __future__ import annotations

import http.client
import json
import re
import socket
from typing import Any

import pytest

from tests.conftest import LiveServer, register_pc

GOOD_REGISTER = {"pin": "123456", "machine_id": "TEST-VALID-0001", "hostname": "lab-01"}

BAD_BODIES: list[tuple[str, Any]] = [
    ("not json", b"{not json"),
    ("array", [1, 2]),
    ("string", "hello"),
    ("null", None),
    ("wrong types", {"machine_id": 12345678, "pin": 123456, "hostname": ["x"]}),
    ("missing fields", {}),
    ("unknown field", {**GOOD_REGISTER, "is_admin": True}),
    ("oversized field", {**GOOD_REGISTER, "hostname": "h" * 10_000}),
    ("bad machine id", {**GOOD_REGISTER, "machine_id": "../../etc/passwd"}),
    ("negative numbers", {"machine_id": "TEST-VALID-0001", "cpu_percent": -5}),
    ("percent over 100", {"machine_id": "TEST-VALID-0001", "cpu_percent": 250}),
    ("too many processes", {"machine_id": "TEST-VALID-0001", "processes": ["p"] * 5000}),
    ("bad event", {"machine_id": "TEST-VALID-0001", "event": "explode"}),
    ("bad reason", {"machine_id": "TEST-VALID-0001", "reason": "lost"}),
    ("bool as number", {"machine_id": "TEST-VALID-0001", "cpu_percent": True}),
    ("string number", {"machine_id": "TEST-VALID-0001", "uptime": "12"}),
]

ENDPOINTS = ["/api/client/register", "/api/client/heartbeat", "/api/client/shutdown"]


@pytest.fixture
def live_server(shared_server: LiveServer) -> LiveServer:
    """These tests only add PCs of their own: one server serves the module."""
    return shared_server


def post_raw(server: LiveServer, path: str, payload: Any, token: str | None) -> tuple[int, Any]:
    if isinstance(payload, bytes):
        return server.api(
            "POST", path, raw=payload, token=token, headers={"Content-Type": "application/json"}
        )
    return server.api(
        "POST",
        path,
        raw=json.dumps(payload).encode(),
        token=token,
        headers={"Content-Type": "application/json"},
    )


def test_every_malformed_body_gets_a_json_4xx(live_server: LiveServer) -> None:
    pc = register_pc(live_server, machine_id="TEST-VALID-0001")
    before = live_server.pcs()
    for path in ENDPOINTS:
        for name, payload in BAD_BODIES:
            status, body = post_raw(live_server, path, payload, pc["token"])
            assert 400 <= status < 500, (path, name, status, body)
            assert isinstance(body, dict) and set(body["error"]) >= {"code", "message"}, (
                path,
                name,
                body,
            )
            assert body["error"]["message"], (path, name)
    after = live_server.pcs()
    assert [(p["id"], p["state"], p["reason"], p["hostname"]) for p in after] == [
        (p["id"], p["state"], p["reason"], p["hostname"]) for p in before
    ]
    assert "Traceback" not in live_server.log()


def test_validation_errors_name_the_field(live_server: LiveServer) -> None:
    pc = register_pc(live_server)
    status, body = live_server.api(
        "POST",
        "/api/client/heartbeat",
        {"machine_id": pc["machine_id"], "cpu_percent": 250},
        token=pc["token"],
    )
    assert status == 400
    assert body["error"]["code"] == "validation_error"
    assert "cpu_percent" in body["error"]["fields"]
    assert body["error"]["message"].startswith("cpu_percent")


def raw_exchange(server: LiveServer, head: bytes, body: bytes = b"") -> tuple[int, Any]:
    """Send a request by hand and read the answer before the body is complete."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + body)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, json.loads(resp.read())


def test_huge_body_is_refused_before_parsing(live_server: LiveServer) -> None:
    size = 2 * 1024 * 1024
    for path in ENDPOINTS:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n"
        ).encode()
        status, body = raw_exchange(live_server, head, b'{"x": "' + b"a" * 1000)
        assert status == 413 and body["error"]["code"] == "payload_too_large", path


def test_wrong_content_type_and_method(live_server: LiveServer) -> None:
    status, body = live_server.api(
        "POST",
        "/api/client/register",
        raw=b"pin=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 415 and body["error"]["code"] == "invalid_json"
    status, body = live_server.api("GET", "/api/client/shutdown")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    status, body = live_server.api("GET", "/api/no/such/thing")
    assert status == 404 and body["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "path",
    [
        "/api/pcs",
        "/api/pcs/1",
        "/api/pins",
        "/api/apikeys",
        "/api/settings",
        "/api/audit",
        "/api/me",
    ],
)
def test_admin_api_needs_a_key(live_server: LiveServer, path: str) -> None:
    for token in (None, "wcms_ak_wrong", "wcms_pc_not_an_admin"):
        status, body = live_server.api("GET", path, token=token)
        assert status == 401 and body["error"]["code"] == "unauthorized", (path, token)


def test_admin_api_rejects_bad_input(live_server: LiveServer) -> None:
    cases = [
        ("POST", "/api/pins", {"expires_minutes": 0}),
        ("POST", "/api/pins", {"expires_minutes": "ten"}),
        ("POST", "/api/pins", {"multi_use": "yes"}),
        ("POST", "/api/apikeys", {"name": ""}),
        ("PUT", "/api/settings", {"presence_mode": "turbo"}),
        ("GET", "/api/pcs/999999", None),
        ("DELETE", "/api/pins/999999", None),
        ("GET", "/api/audit?limit=abc", None),
        ("GET", "/api/pcs/1?days=1000", None),
    ]
    for method, path, body in cases:
        status, data = live_server.api(method, path, body, token=live_server.api_key)
        assert 400 <= status < 500, (method, path, status, data)
        assert data["error"]["code"], (method, path)


# ---------------------------------------------------------------- the document lists every answer


def operations(server: LiveServer) -> list[tuple[str, str, dict[str, Any]]]:
    status, doc = server.api("GET", "/api/openapi.json")
    assert status == 200
    ops = [(m.upper(), p, op) for p, item in doc["paths"].items() for m, op in item.items()]
    assert len(ops) >= 30
    return ops


def concrete(path: str) -> str:
    return re.sub(r"\{\w+\}", "1", path)


def test_every_operation_documents_the_errors_its_shape_can_answer(
    live_server: LiveServer,
) -> None:
    for method, path, op in operations(live_server):
        documented = set(op["responses"])
        where = (method, path, sorted(documented))
        assert {"400", "408", "503"} <= documented, where
        if "requestBody" in op:
            assert {"413", "415"} <= documented, where
        if "{" in path:
            assert "404" in documented, where
        if op.get("security"):
            assert {"401", "403"} <= documented, where
        for status, answer in op["responses"].items():
            if status.startswith("4") or status.startswith("5"):
                assert answer["description"] != "error", (where, status)
                schema = answer["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (where, status)
    by_key = {(m, p): op for m, p, op in operations(live_server)}
    for key in [
        ("POST", "/api/rooms"),
        ("PATCH", "/api/rooms/{room_id}"),
        ("POST", "/api/commands"),
    ]:
        assert "409" in by_key[key]["responses"], key
    assert "429" in by_key[("POST", "/api/client/register")]["responses"]


def test_what_every_operation_really_answers_is_documented(live_server: LiveServer) -> None:
    """Too large (413), not JSON (415) and no credentials (401), sent to every operation:
    each answer is one its entry in the document lists."""
    big = b'{"x": "' + b"a" * (300 * 1024) + b'"}'
    seen: dict[int, int] = {}
    for method, path, op in operations(live_server):
        if path == "/api/events":
            continue  # the live stream (with credentials) never ends: not a request to wait on
        documented = {int(s) for s in op["responses"]}
        url = concrete(path)
        if "requestBody" in op:
            for raw, ctype, want in (
                (big, "application/json", 413),
                (b"a=1", "application/x-www-form-urlencoded", 415),
            ):
                status, data = live_server.api(
                    method,
                    url,
                    raw=raw,
                    token=live_server.api_key,
                    headers={"Content-Type": ctype},
                )
                assert status in documented, (method, path, status, data)
                if not path.startswith("/api/client/") and status != 403:
                    # (403: an API key may not create API keys, whatever the body)
                    assert status == want, (method, path, status, data)
                seen[status] = seen.get(status, 0) + 1
        if op.get("security"):
            body = {"machine_id": "NO-CREDENTIALS-1"} if method != "GET" else None
            if path.endswith("/result"):
                body = {"machine_id": "NO-CREDENTIALS-1", "status": "failed"}
            query = (
                "?machine_id=NO-CREDENTIALS-1&timeout=0" if path.startswith("/api/client/") else ""
            )
            status, data = live_server.api(method, url + query, body)
            assert status == 401, (method, path, status, data)
            assert status in documented, (method, path)
            seen[401] = seen.get(401, 0) + 1
    assert seen.get(413, 0) >= 10 and seen.get(415, 0) >= 10 and seen[401] >= 25, seen
