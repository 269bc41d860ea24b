"""The rooms and layout API, the admins API and the live event stream, in-process."""

from __future__ import annotations

import datetime as dt
import json
import threading
import unicodedata
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select
from sqlalchemy.orm import Session

from wcms.server.db import utcnow
from wcms.server.models import AuditLog, Room
from wcms.server.runtime import Runtime
from wcms.server.services import accounts


class Api:
    """The admin API as an automation script sees it (an API key), plus PC registration."""

    def __init__(self, client: Any, rt: Runtime, key: str) -> None:
        self.client, self.rt, self.key = client, rt, key

    def __call__(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        resp = self.client.open(
            path, method=method, json=body, headers={"Authorization": f"Bearer {self.key}"}
        )
        return resp.status_code, resp.get_json()

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, data = self(method, path, body)
        assert status < 300, (status, data)
        return data

    def room(self, name: str = "Lab 1", rows: int = 3, cols: int = 4) -> int:
        return int(self.ok("POST", "/api/rooms", {"name": name, "rows": rows, "cols": cols})["id"])

    def pc(self, hostname: str) -> int:
        with self.rt.sessions() as s:
            _row, pin = accounts.create_pin(
                s, self.rt.secret_key, "test", utcnow(), dt.timedelta(minutes=5)
            )
            s.commit()
        body = {"pin": pin, "machine_id": f"M-{hostname}-0000", "hostname": hostname}
        resp = self.client.post("/api/client/register", json=body)
        assert resp.status_code == 201, resp.get_json()
        return int(resp.get_json()["pc_id"])

    def seat(self, pc_id: int, room_id: int, row: int | None = None, col: int | None = None,
             swap: bool = False) -> tuple[int, Any]:  # fmt: skip
        body: dict[str, Any] = {"room_id": room_id, "row": row, "col": col}
        if swap:
            body["swap"] = True
        return self("PUT", f"/api/pcs/{pc_id}/seat", body)


@pytest.fixture
def api(client: Any, rt: Runtime, session: Session) -> Api:
    _row, key = accounts.create_api_key(session, "tests", utcnow())
    session.commit()
    return Api(client, rt, key)


def actions(session: Session) -> list[str]:
    session.expire_all()
    return list(session.execute(select(AuditLog.action).order_by(AuditLog.id)).scalars())


# ---------------------------------------------------------------- rooms


def test_create_room_and_list_it_with_counts(api: Api, session: Session) -> None:
    room = api.room("Lab 301", 4, 6)
    a, b = api.pc("a"), api.pc("b")
    assert api.seat(a, room, 1, 1)[0] == 200
    assert api.seat(b, room)[0] == 200  # in the room, without a seat
    api.pc("loose")
    data = api.ok("GET", "/api/rooms")
    assert [r["name"] for r in data["rooms"]] == ["Lab 301"]
    assert data["rooms"][0]["counts"]["online"] == 2
    assert data["rooms"][0]["pc_count"] == 2
    assert data["unassigned"]["online"] == 1
    detail = api.ok("GET", f"/api/rooms/{room}")
    assert {p["hostname"] for p in detail["pcs"]} == {"a", "b"}
    assert [p["hostname"] for p in api.ok("GET", "/api/pcs/unassigned")["pcs"]] == ["loose"]
    assert "room.create" in actions(session)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"name": "", "rows": 2, "cols": 2}, "name"),
        ({"name": "x" * 101, "rows": 2, "cols": 2}, "name"),
        ({"name": "   ", "rows": 2, "cols": 2}, "name"),
        ({"name": "bad\x07name", "rows": 2, "cols": 2}, "name"),
        ({"name": "ok", "rows": 0, "cols": 2}, "rows"),
        ({"name": "ok", "rows": 2, "cols": 51}, "cols"),
        ({"name": "ok", "rows": "2", "cols": 2}, "rows"),
        ({"name": "ok", "rows": 2}, "cols"),
        ({"name": "ok", "rows": 2, "cols": 2, "colour": "red"}, "colour"),
    ],
)
def test_create_room_refuses_bad_input(api: Api, body: dict[str, Any], field: str) -> None:
    status, data = api("POST", "/api/rooms", body)
    assert status == 400
    assert data["error"]["code"] == "validation_error"
    assert field in data["error"]["fields"]


def test_room_names_are_unique_ignoring_case_and_trimmed(api: Api) -> None:
    api.room("Lab 1")
    status, data = api("POST", "/api/rooms", {"name": " lab 1 ", "rows": 1, "cols": 1})
    assert (status, data["error"]["code"]) == (409, "conflict")
    other = api.room("Lab 2")
    status, _ = api("PATCH", f"/api/rooms/{other}", {"name": "LAB 1"})
    assert status == 409
    renamed = api.ok("PATCH", f"/api/rooms/{other}", {"name": "  Lab 2b  "})
    assert renamed["name"] == "Lab 2b"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("Ärzte", "ärzte"),
        ("ärzte", "ÄRZTE"),
        ("Ärzte", "A\u0308rzte"),  # the same letter, decomposed (NFD)
        ("Straße", "STRASSE"),  # full case folding, not lower()
        ("Σίσυφος", "ΣΊΣΥΦΟΣ"),
        ("강의실 1", " 강의실 1 "),
    ],
)
def test_room_names_are_unique_in_every_script(api: Api, first: str, second: str) -> None:
    made = api.ok("POST", "/api/rooms", {"name": first, "rows": 1, "cols": 1})
    status, data = api("POST", "/api/rooms", {"name": second, "rows": 1, "cols": 1})
    assert (status, data["error"]["code"]) == (409, "conflict"), data
    other = api.room("Other")
    status, data = api("PATCH", f"/api/rooms/{other}", {"name": second})
    assert (status, data["error"]["code"]) == (409, "conflict"), data
    # A room may change the case of its own name; it is stored NFC-normalised.
    renamed = api.ok("PATCH", f"/api/rooms/{made['id']}", {"name": second})
    assert renamed["name"] == unicodedata.normalize("NFC", second.strip())


def test_two_admins_naming_rooms_alike_at_once_make_one_room(app: Flask) -> None:
    """Racing creates of one name in different cases: exactly one wins, on either database
    (the name check and the insert are one step: services/rooms.py's lock)."""
    rt: Runtime = app.extensions["wcms"]
    with rt.sessions() as s:
        _row, key = accounts.create_api_key(s, "race", utcnow())
        s.commit()
    variants = ["Ärzte", "ärzte", "ÄRZTE", "A\u0308rzte", "äRZTE", "ÄrZtE"]

    def create(name: str, barrier: threading.Barrier, statuses: list[int]) -> None:
        client = app.test_client()
        barrier.wait(timeout=10)
        resp = client.post(
            "/api/rooms",
            json={"name": name, "rows": 1, "cols": 1},
            headers={"Authorization": f"Bearer {key}"},
        )
        statuses.append(resp.status_code)

    for attempt in range(4):
        barrier = threading.Barrier(len(variants))
        statuses: list[int] = []
        threads = [
            threading.Thread(target=create, args=(f"{v} {attempt}", barrier, statuses))
            for v in variants
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert sorted(statuses) == [201] + [409] * (len(variants) - 1), (attempt, statuses)
    with rt.sessions() as s:
        names = s.execute(select(Room.name)).scalars().all()
    assert len(names) == 4, names


def test_resize_refuses_to_drop_an_occupied_seat(api: Api, session: Session) -> None:
    room = api.room("Lab", 3, 4)
    pc = api.pc("far-corner")
    api.seat(pc, room, 3, 4)
    status, data = api("PATCH", f"/api/rooms/{room}", {"rows": 2, "cols": 4})
    assert status == 409
    assert "far-corner (row 3, col 4)" in data["error"]["message"]
    status, data = api("PATCH", f"/api/rooms/{room}", {"rows": 5})
    assert (status, data["error"]["code"]) == (400, "validation_error")
    grown = api.ok("PATCH", f"/api/rooms/{room}", {"rows": 5, "cols": 6})
    assert (grown["rows"], grown["cols"]) == (5, 6)
    assert actions(session)[-1] == "room.resize"


def test_retire_unassigns_its_pcs_and_restore_brings_the_room_back(
    api: Api, session: Session
) -> None:
    room = api.room("Old lab", 2, 2)
    pc = api.pc("old-01")
    api.seat(pc, room, 1, 1)
    retired = api.ok("PATCH", f"/api/rooms/{room}", {"active": False})
    assert retired["active"] is False
    assert api.ok("GET", f"/api/pcs/{pc}")["room_id"] is None
    assert api.ok("GET", "/api/rooms")["rooms"] == []
    assert [r["name"] for r in api.ok("GET", "/api/rooms?retired=1")["rooms"]] == ["Old lab"]
    status, data = api.seat(pc, room, 1, 1)
    assert (status, data["error"]["code"]) == (409, "conflict")  # no seats in a retired room
    assert api.ok("PATCH", f"/api/rooms/{room}", {"active": True})["active"] is True
    session.expire_all()
    entry = session.execute(select(AuditLog).where(AuditLog.action == "room.retire")).scalar_one()
    assert entry.details["unassigned_pcs"] == [pc]
    assert "room.restore" in actions(session)


def test_unknown_room_or_pc_is_404(api: Api) -> None:
    pc = api.pc("x")
    assert api("GET", "/api/rooms/99")[0] == 404
    assert api("PATCH", "/api/rooms/99", {"name": "y"})[0] == 404
    assert api.seat(pc, 99, 1, 1)[0] == 404
    assert api.seat(9999, api.room(), 1, 1)[0] == 404
    assert api("DELETE", "/api/pcs/9999/seat")[0] == 404


# ---------------------------------------------------------------- seats


@pytest.mark.parametrize(
    "row, col, status, field",
    [(0, 1, 400, "row"), (1, 0, 400, "col"), (4, 1, 400, "row"), (1, 5, 400, "col"),
     (1, None, 400, "col"), (None, 2, 400, "row"), (51, 1, 400, "row")],
)  # fmt: skip
def test_a_seat_must_be_inside_the_grid(
    api: Api, row: int | None, col: int | None, status: int, field: str
) -> None:
    room = api.room("Lab", 3, 4)
    got, data = api.seat(api.pc("p"), room, row, col)
    assert got == status
    assert field in data["error"]["fields"]


def test_one_pc_per_seat_unless_swapping(api: Api, session: Session) -> None:
    room = api.room("Lab", 2, 2)
    a, b = api.pc("a"), api.pc("b")
    api.seat(a, room, 1, 1)
    api.seat(b, room, 2, 2)
    status, data = api.seat(b, room, 1, 1)
    assert status == 409
    assert "taken by a" in data["error"]["message"]
    swapped = api.seat(b, room, 1, 1, swap=True)[1]
    assert swapped["seat"] == {"row": 1, "col": 1}
    assert swapped["swapped"] == {"pc_id": a, "room_id": room, "seat": {"row": 2, "col": 2}}
    assert api.ok("GET", f"/api/pcs/{a}")["seat"] == {"row": 2, "col": 2}
    assert actions(session)[-2:] == ["pc.seat", "pc.seat"]


def test_swap_with_a_pc_from_another_room_moves_the_occupant_there(api: Api) -> None:
    one, two = api.room("One", 1, 2), api.room("Two", 1, 2)
    a, b, c = api.pc("a"), api.pc("b"), api.pc("c")
    api.seat(a, one, 1, 1)
    api.seat(b, two, 1, 2)
    api.seat(a, two, 1, 2, swap=True)
    assert api.ok("GET", f"/api/pcs/{b}")["room_id"] == one
    assert api.ok("GET", f"/api/pcs/{b}")["seat"] == {"row": 1, "col": 1}
    # An unassigned PC swapping in leaves the occupant unassigned.
    api.seat(c, two, 1, 2, swap=True)
    moved = api.ok("GET", f"/api/pcs/{a}")
    assert (moved["room_id"], moved["seat"]) == (None, None)


def test_move_between_rooms_and_unassign_are_audited(api: Api, session: Session) -> None:
    one, two = api.room("One", 1, 2), api.room("Two", 1, 2)
    pc = api.pc("mover")
    api.seat(pc, one, 1, 2)
    api.seat(pc, two, 1, 1)
    moved = api.ok("GET", f"/api/pcs/{pc}")
    assert (moved["room_id"], moved["seat"]) == (two, {"row": 1, "col": 1})
    api.ok("DELETE", f"/api/pcs/{pc}/seat")
    assert api.ok("GET", f"/api/pcs/{pc}")["room_id"] is None
    session.expire_all()
    rows = session.execute(
        select(AuditLog).where(AuditLog.action.in_(["pc.seat", "pc.unassign"]))
    ).scalars().all()  # fmt: skip
    assert [r.action for r in rows] == ["pc.seat", "pc.seat", "pc.unassign"]
    assert rows[1].details["old"] == {"room_id": one, "seat": {"row": 1, "col": 2}}
    assert rows[1].details["new"] == {"room_id": two, "seat": {"row": 1, "col": 1}}


def test_layout_changes_are_announced_on_the_bus(api: Api, rt: Runtime) -> None:
    q = rt.bus.subscribe()
    room = api.room()
    api.seat(api.pc("p"), room, 1, 1)
    kinds = [q.get_nowait()["type"] for _ in range(q.qsize())]
    assert kinds.count("layout") == 2
    rt.bus.unsubscribe(q)


def test_every_new_route_is_in_the_openapi_document(api: Api) -> None:
    paths = api.client.get("/api/openapi.json").get_json()["paths"]
    for path in [
        "/api/rooms",
        "/api/rooms/{room_id}",
        "/api/pcs/{pc_id}/seat",
        "/api/pcs/unassigned",
        "/api/admins",
        "/api/admins/{admin_id}",
        "/api/admins/{admin_id}/password",
        "/api/events",
    ]:
        assert path in paths, path


def test_room_routes_need_an_admin(client: Any) -> None:
    assert client.get("/api/rooms").status_code == 401
    assert client.post("/api/rooms", json={"name": "x", "rows": 1, "cols": 1}).status_code == 401
    assert client.get("/api/events").status_code == 401


# ---------------------------------------------------------------- admins


def test_create_admin_generates_a_password_shown_once(api: Api, session: Session) -> None:
    made = api.ok("POST", "/api/admins", {"username": "bob"})
    assert len(made["password"]) >= accounts.MIN_PASSWORD
    assert accounts.authenticate(session, "bob", made["password"]) is not None
    listed = api.ok("GET", "/api/admins")["admins"]
    assert [a["username"] for a in listed] == ["bob"]
    assert "password" not in listed[0]
    assert api("POST", "/api/admins", {"username": "bob"})[0] == 409
    assert api("POST", "/api/admins", {"username": "x y"})[0] == 400
    assert api("POST", "/api/admins", {"username": "carol", "password": "short"})[0] == 400
    given = api.ok("POST", "/api/admins", {"username": "carol", "password": "a good long one"})
    assert "password" not in given
    assert "admin.create" in actions(session)


def test_disable_enable_and_the_last_active_admin(api: Api, session: Session) -> None:
    bob = api.ok("POST", "/api/admins", {"username": "bob"})["id"]
    status, data = api("PATCH", f"/api/admins/{bob}", {"active": False})
    assert (status, data["error"]["code"]) == (409, "conflict")  # the only active admin
    assert data["error"]["message"] == "the last active admin cannot be disabled"
    api.ok("POST", "/api/admins", {"username": "carol"})
    assert api.ok("PATCH", f"/api/admins/{bob}", {"active": False})["active"] is False
    assert api.ok("PATCH", f"/api/admins/{bob}", {"active": True})["active"] is True
    assert actions(session)[-2:] == ["admin.disable", "admin.enable"]


def test_reset_password(api: Api, session: Session) -> None:
    bob = api.ok("POST", "/api/admins", {"username": "bob"})
    new = api.ok("POST", f"/api/admins/{bob['id']}/password", {})["password"]
    assert new != bob["password"]
    session.expire_all()
    assert accounts.authenticate(session, "bob", new) is not None
    assert accounts.authenticate(session, "bob", bob["password"]) is None
    assert api("POST", "/api/admins/999/password", {})[0] == 404


# ---------------------------------------------------------------- the event stream


def frames(chunks: Any, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for chunk in chunks:
        text = chunk.decode() if isinstance(chunk, bytes) else chunk
        for line in text.splitlines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
        if len(out) >= n:
            return out
    return out


def test_event_stream_says_hello_then_passes_bus_messages(api: Api, app: Flask) -> None:
    rt: Runtime = app.extensions["wcms"]
    resp = api.client.get(
        "/api/events", headers={"Authorization": f"Bearer {api.key}"}, buffered=False
    )
    assert resp.status_code == 200
    assert resp.mimetype == "text/event-stream"
    assert resp.headers["Cache-Control"].startswith("no-cache")
    chunks = iter(resp.response)
    first = next(chunks)
    assert b"retry: 1000" in first
    assert frames([first], 1)[0]["type"] == "hello"
    assert rt.bus.subscriber_count == 1
    rt.bus.publish({"type": "presence", "pc_id": 7, "state": "offline", "reason": "shutdown"})
    assert frames(chunks, 1) == [
        {"type": "presence", "pc_id": 7, "state": "offline", "reason": "shutdown"}
    ]
    resp.close()
    assert rt.bus.subscriber_count == 0
