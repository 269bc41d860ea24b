"""Input the database or the dashboard cannot take, refused or cleaned at the edge.

- Ids beyond the database's integer range, in a path, a query or a body: a 404 or a 400,
  never a 500 (PostgreSQL's integer is 32-bit; SQLite's and BigInteger ids stop at 2^63-1).
- JSON nested deeper than a request ever needs (1,000 levels broke the parser): a 400
  `invalid_json`, and no traceback in the log, on the unauthenticated register too.
- NUL characters (PostgreSQL cannot store them) in any string of any request model or query
  parameter: a 400 naming the field, nothing stored.
- Bidi overrides and other control characters: stripped from what PCs report, refused in what
  admins type, and never in an answer or a page even if they were stored before.

Each runs on SQLite, and on PostgreSQL with WCMS_TEST_DATABASE_URL.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
import sqlalchemy
from markupsafe import Markup

from tests.conftest import LiveServer, register_pc
from wcms.server import create_app, schemas
from wcms.server.api import events

INT_MAX = 2**31 - 1
BIG_MAX = 2**63 - 1
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
RLO = "\u202e"


@pytest.fixture
def live_server(shared_server: LiveServer) -> LiveServer:
    """These tests add only PCs and rows of their own: one server serves the module."""
    return shared_server


def admin(server: LiveServer, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    return server.api(method, path, body, token=server.api_key)


def json_post(server: LiveServer, path: str, raw: bytes, token: str | None) -> tuple[int, Any]:
    return server.api(
        "POST", path, raw=raw, token=token, headers={"Content-Type": "application/json"}
    )


# ---------------------------------------------------------------- ids beyond the range

# Every route with an id in its path (method, path with {id}), and the id's range.
ID_ROUTES = [
    ("GET", "/api/pcs/{}", INT_MAX),
    ("DELETE", "/api/pcs/{}", INT_MAX),
    ("GET", "/api/pcs/{}/commands", INT_MAX),
    ("PUT", "/api/pcs/{}/seat", INT_MAX),
    ("DELETE", "/api/pcs/{}/seat", INT_MAX),
    ("DELETE", "/api/pins/{}", INT_MAX),
    ("DELETE", "/api/apikeys/{}", INT_MAX),
    ("GET", "/api/rooms/{}", INT_MAX),
    ("PATCH", "/api/rooms/{}", INT_MAX),
    ("PATCH", "/api/admins/{}", INT_MAX),
    ("POST", "/api/admins/{}/password", INT_MAX),
    ("GET", "/api/batches/{}", INT_MAX),
    ("POST", "/api/batches/{}/cancel", INT_MAX),
    ("POST", "/api/commands/{}/cancel", BIG_MAX),
    ("POST", "/api/client/commands/{}/ack", BIG_MAX),
    ("POST", "/api/client/commands/{}/result", BIG_MAX),
]


def test_every_id_route_is_listed_here(live_server: LiveServer) -> None:
    """The served document's id parameters all carry the database's range, and the list
    above covers every route that has one (a new route must join it)."""
    status, doc = live_server.api("GET", "/api/openapi.json")
    assert status == 200
    with_ids = set()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            params = [p for p in op.get("parameters", []) if p["in"] == "path"]
            for p in params:
                if p["name"].endswith("_id"):
                    assert p["schema"]["type"] == "integer", (path, p)
                    assert p["schema"]["minimum"] == 1, (path, p)
                    assert p["schema"]["maximum"] in (INT_MAX, BIG_MAX), (path, p)
                    with_ids.add((method.upper(), re.sub(r"\{\w+\}", "{}", path)))
    listed = {(m, p) for m, p, _ in ID_ROUTES}
    assert with_ids - listed <= {
        ("POST", "/api/pcs/{}/approve"),
        ("POST", "/api/pcs/{}/allow-reregister"),
    }, sorted(with_ids - listed)
    assert listed <= with_ids, sorted(listed - with_ids)


def test_an_id_beyond_the_database_range_is_a_404_on_every_route(
    live_server: LiveServer,
) -> None:
    pc = register_pc(live_server)
    status, doc = live_server.api("GET", "/api/openapi.json")
    routes = [(m, p.replace("{}", "{id}"), top) for m, p, top in ID_ROUTES]
    for path, ops in doc["paths"].items():  # and routes added since, with their own ranges
        for method, op in ops.items():
            for p in op.get("parameters", []):
                if p["in"] == "path" and "maximum" in p["schema"]:
                    routes.append((method.upper(), path, p["schema"]["maximum"]))
    agent = {"machine_id": pc["machine_id"]}
    bodies = {  # a valid body where the route reads one, so only the id is wrong
        "/api/pcs/{}/seat": {"room_id": 1},
        "/api/rooms/{}": {"active": True},
        "/api/admins/{}": {"active": True},
        "/api/admins/{}/password": {},
        "/api/client/commands/{}/ack": agent,
        "/api/client/commands/{}/result": {**agent, "status": "succeeded"},
    }
    for method, template, top in routes:
        path = re.sub(r"\{\w+\}", "{}", template)
        token = pc["token"] if path.startswith("/api/client/") else live_server.api_key
        body = bodies.get(path) if method in ("PUT", "PATCH", "POST") else None
        for bad in (top + 1, 2**63, 2**64 + 5, 10**40, 0):
            status, data = live_server.api(method, path.format(bad), body, token=token)
            assert status == 404, (method, path, bad, status, data)
            assert data["error"]["code"] == "not_found", (method, path, bad, data)
        # The largest id in range is an ordinary unknown id: a 404 from the view itself.
        status, data = live_server.api(method, path.format(top), body, token=token)
        assert status == 404 and "ids are" not in data["error"]["message"], (method, path, data)
    for page in ("/pcs/{}", "/rooms/{}"):  # the dashboard's pages with an id
        status, _ = live_server.api("GET", page.format(2**40), headers={"Accept": "text/html"})
        assert status == 404, page
    assert "Traceback" not in live_server.log()


def test_query_and_body_ids_beyond_the_range_are_a_400(live_server: LiveServer) -> None:
    pc = register_pc(live_server)
    cases: list[tuple[str, str, Any, str]] = [
        ("GET", f"/api/pcs?room_id={INT_MAX + 1}", None, "room_id"),
        ("GET", f"/api/pcs?room_id={10**40}", None, "room_id"),
        ("PUT", f"/api/pcs/{pc['pc_id']}/seat", {"room_id": INT_MAX + 1}, "room_id"),
        (
            "POST",
            "/api/commands",
            {"type": "lock", "target": {"pc_ids": [pc["pc_id"], INT_MAX + 1]}},
            "target.pc_ids.1",
        ),
        ("POST", "/api/commands", {"type": "lock", "target": {"room_id": 2**40}}, "target.room_id"),
    ]
    for method, path, body, field in cases:
        status, data = admin(live_server, method, path, body)
        assert status == 400, (path, body, status, data)
        assert data["error"]["code"] == "validation_error", (path, data)
        assert data["error"]["message"].startswith(field), (path, data)
    status, data = admin(live_server, "GET", f"/api/pcs?room_id={INT_MAX}")
    assert (status, data["count"]) == (200, 0)
    assert "Traceback" not in live_server.log()


# ---------------------------------------------------------------- JSON nested deep


def nested(depth: int, inner: str = "1") -> str:
    return '{"a":' * depth + inner + "}" * depth


def test_json_nested_deep_is_a_400_everywhere_without_a_traceback(
    live_server: LiveServer,
) -> None:
    pc = register_pc(live_server)
    mid = pc["machine_id"]
    targets = [
        ("/api/client/register", None, '{"pin": "123456", "hardware": %s}'),
        ("/api/client/heartbeat", pc["token"], f'{{"machine_id": "{mid}", "hardware": %s}}'),
        ("/api/client/shutdown", pc["token"], f'{{"machine_id": "{mid}", "x": %s}}'),
        ("/api/rooms", live_server.api_key, '{"name": %s}'),
        ("/api/commands", live_server.api_key, '{"type": "run", "args": %s}'),
    ]
    before = len(live_server.log().splitlines())
    for path, token, shape in targets:
        for depth in (schemas.MAX_JSON_DEPTH, 1_000, 40_000):  # 40,000: 240 KB, in the limit
            raw = (shape % nested(depth)).encode()
            status, data = json_post(live_server, path, raw, token)
            assert status == 400, (path, depth, status, data)
            assert data["error"]["code"] == "invalid_json", (path, depth, data)
            assert "nested deeper than" in data["error"]["message"], (path, depth, data)
        # Arrays count as much as objects.
        raw = (shape % ("[" * 100_000 + "]" * 100_000)).encode()
        status, data = json_post(live_server, path, raw, token)
        assert (status, data["error"]["code"]) == (400, "invalid_json"), (path, data)
    # Nested exactly as deep as the limit: only a matter for the model (a validation error).
    raw = b'{"pin": "123456", "hardware": ' + nested(schemas.MAX_JSON_DEPTH - 1).encode() + b"}"
    status, data = json_post(live_server, "/api/client/register", raw, None)
    assert (status, data["error"]["code"]) == (400, "validation_error"), data
    log = "\n".join(live_server.log().splitlines()[before:])
    assert "Traceback" not in log and "RecursionError" not in log, log[-3000:]


def test_brackets_inside_strings_are_not_depth(live_server: LiveServer) -> None:
    """Many brackets in a value (a process name) cost a walk, never a refusal."""
    pc = register_pc(live_server)
    names = ["[" * 50 + "proc{" * 20 for _ in range(3)]
    status, data = live_server.api(
        "POST",
        "/api/client/heartbeat",
        {"machine_id": pc["machine_id"], "processes": names},
        token=pc["token"],
    )
    assert status == 200, data


# ---------------------------------------------------------------- NUL characters


def test_nul_in_any_string_field_is_a_400_naming_it(live_server: LiveServer) -> None:
    pc = register_pc(live_server)
    mid, token = pc["machine_id"], pc["token"]
    key = live_server.api_key
    disk = {"mount": "C:\\", "total": 1, "used": 0}
    reg = {"pin": "000000", "machine_id": "NUL-0000-0001", "hostname": "a"}
    everyone = {"all_online": True}
    beat = "/api/client/heartbeat"
    cases: list[tuple[str, Any, str | None, str]] = [
        # The agent's calls: register (no token), heartbeat (fast path and Flask), shutdown.
        ("/api/client/register", {**reg, "hostname": "a\x00"}, None, "hostname"),
        (
            "/api/client/register",
            {**reg, "hardware": {"os_name": "W\x00"}},
            None,
            "hardware.os_name",
        ),
        (beat, {"machine_id": mid, "current_user": "bob\x00"}, token, "current_user"),
        (beat, {"machine_id": mid, "processes": ["a", "b\x00"]}, token, "processes"),
        (beat, {"machine_id": mid, "disks": [{**disk, "fstype": "\x00"}]}, token, "disks.0.fstype"),
        (beat, {"machine_id": mid, "event": "logon", "hostname": "h\x00"}, token, "hostname"),
        (
            beat,
            {"machine_id": mid, "hardware": {"disks": [{**disk, "mount": "\x00"}]}},
            token,
            "hardware.disks.0.mount",
        ),
        ("/api/client/shutdown", {"machine_id": mid + "\x00"}, token, "machine_id"),
        # What admins send.
        ("/api/rooms", {"name": "Lab\x00", "rows": 1, "cols": 1}, key, "name"),
        ("/api/admins", {"username": "x\x00"}, key, "username"),
        (
            "/api/commands",
            {"type": "message", "args": {"text": "hi\x00"}, "target": everyone},
            key,
            "args",
        ),
        (
            "/api/commands",
            {"type": "message", "args": {"t\x00": "hi"}, "target": everyone},
            key,
            "args",
        ),
    ]
    for path, body, tok, field in cases:
        status, data = live_server.api("POST", path, body, token=tok)
        assert status == 400, (path, field, status, data)
        assert data["error"]["code"] == "validation_error", (path, field, data)
        assert field in data["error"]["fields"], (path, field, data)
        assert data["error"]["message"].startswith(field), (path, field, data)
    status, data = live_server.api("GET", "/api/pcs?room_id=1%00", token=key)
    assert status == 400 and "room_id" in data["error"]["fields"], data
    status, data = live_server.api("GET", "/api/rooms?ret%00ired=1", token=key)
    assert status == 400 and data["error"]["code"] == "validation_error", data
    status, data = live_server.api(
        "GET", f"/api/client/commands?machine_id={mid}%00&timeout=0", token=token
    )
    assert status == 400, data
    # Nothing of it was stored.
    names = [r["name"] for r in admin(live_server, "GET", "/api/rooms")[1]["rooms"]]
    assert not any("\x00" in n for n in names)
    status, got = admin(live_server, "GET", f"/api/pcs/{pc['pc_id']}")
    assert status == 200 and got["current_user"] is None, got
    assert "Traceback" not in live_server.log()


def test_every_request_model_is_checked_by_the_one_validator() -> None:
    """Every model a route validates its body with derives from schemas.Strict, whose one
    validator applies to every string field of every subclass."""
    from wcms.server.api import accounts, client, commands, management, rooms
    from wcms.server.services import command_args

    modules = [management, accounts, client, commands, rooms, command_args, schemas]
    models = [
        obj
        for m in modules
        for obj in vars(m).values()
        if isinstance(obj, type)
        and issubclass(obj, schemas.BaseModel)
        and obj.__module__ == m.__name__
    ]
    loose = [m.__name__ for m in models if not issubclass(m, schemas.Strict)]
    # PollQuery reads the query string (strings by nature, so not strict): the app-wide check
    # refuses NUL in any query parameter, and its one string field has a strict pattern.
    assert loose == ["PollQuery"], loose
    assert len(models) > 15
    for model in models:
        if issubclass(model, schemas.Strict):
            assert "_safe_strings" in model.__pydantic_decorators__.model_validators, model


# ---------------------------------------------------------------- bidi and control characters


def test_pc_strings_lose_bidi_and_control_characters(live_server: LiveServer) -> None:
    """Real payloads through the API: what a PC reports is stored without them."""
    machine = f"BIDI-{uuid.uuid4().hex[:12]}"
    spoof = f"lab-{RLO}gpj.exe"
    hardware = {
        "os_name": f"Windows{BIDI} 11",
        "os_version": "10.0\x1b[31m",
        "cpu_model": "Intel\u2066 i5\u2069",
        "disks": [{"mount": f"C:{RLO}\\", "fstype": "NT\x07FS", "total": 10, "used": 1}],
    }
    body = {"pin": live_server.create_pin(), "machine_id": machine, "hostname": spoof}
    status, reg = live_server.api("POST", "/api/client/register", {**body, "hardware": hardware})
    assert status == 201, reg
    token = reg["token"]
    beat = {
        "machine_id": machine,
        "event": "logon",
        "current_user": f"eve{RLO}nimda",
        "hostname": f"{RLO}lab-07",
        "processes": [f"chrome{RLO}.exe", "explorer.exe", "\u202atab\tok\u202c"],
        "disks": [{"mount": f"D:{BIDI}", "total": 5, "used": 2}],
    }
    status, data = live_server.api("POST", "/api/client/heartbeat", beat, token=token)
    assert status == 200, data
    status, pc = admin(live_server, "GET", f"/api/pcs/{reg['pc_id']}")
    assert status == 200
    assert pc["hostname"] == "lab-07"
    assert pc["current_user"] == "evenimda"
    hw = pc["hardware"]
    assert (hw["os_name"], hw["os_version"], hw["cpu_model"]) == (
        "Windows 11",
        "10.0[31m",
        "Intel i5",
    ), hw
    assert "chrome.exe" in json.dumps(pc) and "tab\\tok" in json.dumps(pc)
    unsafe = "[\u202a-\u202e\u2066-\u2069\x00-\x08\x0b-\x1f\x7f-\x9f]"
    assert not re.search(unsafe, json.dumps(pc, ensure_ascii=False)), pc
    # Stored so, not only answered so (answers strip bidi controls on their own as well).
    engine = sqlalchemy.create_engine(live_server.database.url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                sqlalchemy.text(
                    'SELECT hostname, "current_user", os_name, cpu_model FROM pc_info WHERE id = :i'
                ),
                {"i": reg["pc_id"]},
            ).one()
    finally:
        engine.dispose()
    assert tuple(row) == ("lab-07", "evenimda", "Windows 11", "Intel i5"), row


def test_admin_strings_with_bidi_or_control_characters_are_refused(
    live_server: LiveServer,
) -> None:
    everyone = {"all_online": True}
    cases = [
        ("/api/rooms", {"name": f"Lab {RLO}1", "rows": 1, "cols": 1}, "name"),
        ("/api/rooms", {"name": "Lab\u20661", "rows": 1, "cols": 1}, "name"),
        ("/api/rooms", {"name": "Lab\x85", "rows": 1, "cols": 1}, "name"),
        (
            "/api/commands",
            {"type": "message", "args": {"text": f"hi{RLO}"}, "target": everyone},
            "args.text",
        ),
    ]
    for path, body, field in cases:
        status, data = admin(live_server, "POST", path, body)
        assert status == 400, (path, body, status, data)
        assert field in data["error"]["fields"], (path, data)
        assert "bidirectional" in data["error"]["fields"][field], (path, data)
    status, room = admin(
        live_server, "POST", "/api/rooms", {"name": "Bidi lab", "rows": 1, "cols": 1}
    )
    assert status == 201, room
    status, data = admin(live_server, "PATCH", f"/api/rooms/{room['id']}", {"name": f"{RLO}bal"})
    assert status == 400 and "name" in data["error"]["fields"], data
    # Line breaks and tabs stay allowed where a text has lines (a message).
    status, data = admin(
        live_server,
        "POST",
        "/api/commands",
        {
            "type": "message",
            "args": {"text": "line 1\nline 2\tend"},
            "target": {"all_online": True},
        },
    )
    assert status in (201, 409), data  # 409: no PC online in this module right now


def test_strings_stored_before_the_check_never_reach_a_page(live_server: LiveServer) -> None:
    """A hostname written straight into the database (as before this check existed) comes out
    of the JSON API, the HTML pages and the live stream without its bidi controls."""
    pc = register_pc(live_server)
    spoofed = f"lab-{RLO}gpj.exe{BIDI}"
    engine = sqlalchemy.create_engine(live_server.database.url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sqlalchemy.text(
                    'UPDATE pc_info SET hostname = :h, "current_user" = :u WHERE id = :i'
                ),
                {"h": spoofed, "u": f"\\{RLO}x", "i": pc["pc_id"]},
            )
    finally:
        engine.dispose()
    status, one = admin(live_server, "GET", f"/api/pcs/{pc['pc_id']}")
    assert status == 200
    assert one["hostname"] == "lab-gpj.exe", one["hostname"]
    assert one["current_user"] == "\\x", one["current_user"]  # a real backslash is kept
    status, listing = admin(live_server, "GET", "/api/pcs")
    assert "lab-gpj.exe" in [p["hostname"] for p in listing["pcs"]]
    raw = live_server.api("GET", "/api/pcs", token=live_server.api_key)
    assert not any(c in json.dumps(raw[1], ensure_ascii=False) for c in BIDI)
    # The pages rendered on the server (the PC page's title and heading are its hostname).
    app = create_app(
        {
            "database_url": live_server.database.url,
            "data_dir": live_server.database.data_dir,
            "background": False,
        }
    )
    try:
        page = app.jinja_env.from_string("<h1>{{ h }}</h1>{{ m }}").render(
            h=spoofed, m=Markup(f"<b>{RLO}x</b>")
        )
    finally:
        app.extensions["wcms"].engine.dispose()
    assert page == "<h1>lab-gpj.exe</h1><b>x</b>", page
    frame = events.frame({"type": "metrics", "pcs": [{"hostname": spoofed}]})
    assert not any(c in frame for c in BIDI) and "\\u202e" not in frame, frame
    assert json.loads(frame[len("data: ") :])["pcs"][0]["hostname"] == "lab-gpj.exe"


def test_json_bidi_escapes_are_stripped_exactly() -> None:
    cases = {
        "a\u202eb": "ab",
        "a\\u202eb": "a\\u202eb",  # a backslash and the letters u202e: kept
        "a\\\u202eb": "a\\b",
        "\u2066\u2067\u2068\u2069\u202a\u202b\u202c\u202d": "",
        "plain \u200f text": "plain \u200f text",  # marks are not overrides: kept
    }
    for given, want in cases.items():
        out = schemas.strip_bidi_json(json.dumps({"k": given}))
        assert json.loads(out) == {"k": want}, (given, out)
        out = schemas.strip_bidi_json(json.dumps({"k": given}, ensure_ascii=False))
        assert json.loads(out) == {"k": want}, (given, out)
