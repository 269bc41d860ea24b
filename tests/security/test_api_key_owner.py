"""Issue 10, Medium 9: an API key carries its owner's access, and dies with it.

Before: a key kept working after the admin who made it was disabled (31 of 31 admin calls).
Now a key made in the dashboard or the admin API belongs to the admin who made it and is
refused while that admin is disabled (or gone); an organisation key (owner NULL) is made only
on the server's command line, on purpose. A key cannot make keys.
"""

from __future__ import annotations

import sqlalchemy

from tests.conftest import LiveServer
from tests.security.webclient import WebClient
from wcms.server.models import Admin

PASSWORD = "a long test password"
# 31 admin calls, as in the report.
CALLS = ["/api/me", "/api/pcs", "/api/rooms", "/api/pins", "/api/apikeys", "/api/settings"]
CALLS += ["/api/audit", "/api/admins", "/api/batches", "/api/pcs/unassigned"]
CALLS = (CALLS * 4)[:31]


def statuses(server: LiveServer, key: str) -> list[int]:
    return [server.api("GET", path, token=key)[0] for path in CALLS]


def make_admin(server: LiveServer, name: str) -> int:
    body = {"username": name, "password": PASSWORD}
    return int(server.admin("POST", "/api/admins", body)["id"])


def login(server: LiveServer, name: str) -> tuple[WebClient, str]:
    client = WebClient(server)
    answer = client.login(name, PASSWORD)
    assert answer.status == 302, answer.text[:300]
    return client, client.csrf()


def test_a_disabled_admins_key_stops_at_once(live_server: LiveServer) -> None:
    alice_id = make_admin(live_server, "alice")
    make_admin(live_server, "bob")
    alice, alice_csrf = login(live_server, "alice")
    made = alice.api("POST", "/api/apikeys", {"name": "alice's script"}, alice_csrf)
    assert made.status == 201, made.text
    key = made.json()
    assert (key["owner_id"], key["owner"]) == (alice_id, "alice")
    assert statuses(live_server, key["key"]) == [200] * 31

    # Bob disables alice through the API: her key answers 401 on the very next call.
    bob, bob_csrf = login(live_server, "bob")
    off = bob.api("PATCH", f"/api/admins/{alice_id}", {"active": False}, bob_csrf)
    assert off.status == 200, off.text
    status, body = live_server.api("GET", "/api/me", token=key["key"])
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert statuses(live_server, key["key"]) == [401] * 31
    # The organisation's key (the tests' own) is nobody's, so it carries on.
    assert statuses(live_server, live_server.api_key) == [200] * 31

    # Enabled again, her key works again (it is hers, not revoked); the CLI disables too.
    on = bob.api("PATCH", f"/api/admins/{alice_id}", {"active": True}, bob_csrf)
    assert on.status == 200
    assert live_server.api("GET", "/api/me", token=key["key"])[0] == 200
    live_server.cli("admin", "disable", "alice")
    assert statuses(live_server, key["key"]) == [401] * 31


def test_a_key_whose_owner_is_gone_is_refused(live_server: LiveServer) -> None:
    alice_id = make_admin(live_server, "alice")
    alice, csrf = login(live_server, "alice")
    key = alice.api("POST", "/api/apikeys", {"name": "k"}, csrf).json()["key"]
    assert live_server.api("GET", "/api/me", token=key)[0] == 200
    engine = sqlalchemy.create_engine(live_server.database.url)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.delete(Admin).where(Admin.id == alice_id))
    finally:
        engine.dispose()
    assert live_server.api("GET", "/api/me", token=key)[0] == 401


def test_a_key_cannot_make_keys(live_server: LiveServer) -> None:
    make_admin(live_server, "alice")
    alice, csrf = login(live_server, "alice")
    owned = alice.api("POST", "/api/apikeys", {"name": "owned"}, csrf).json()["key"]
    for key in (live_server.api_key, owned):  # the organisation's, and an admin's
        status, body = live_server.api("POST", "/api/apikeys", {"name": "more"}, token=key)
        assert status == 403 and body["error"]["code"] == "forbidden", body
    names = [k["name"] for k in live_server.admin("GET", "/api/apikeys")["apikeys"]]
    assert names == ["tests", "owned"]


def test_the_listing_shows_each_keys_owner(live_server: LiveServer) -> None:
    alice_id = make_admin(live_server, "alice")
    alice, csrf = login(live_server, "alice")
    alice.api("POST", "/api/apikeys", {"name": "alice's"}, csrf)
    live_server.cli("apikey", "create", "backup", "--owner", "alice")
    live_server.cli("apikey", "create", "monitoring")
    keys = live_server.admin("GET", "/api/apikeys")["apikeys"]
    owners = [(k["name"], k["owner_id"], k["owner"]) for k in keys]
    assert owners == [
        ("tests", None, None),
        ("alice's", alice_id, "alice"),
        ("backup", alice_id, "alice"),
        ("monitoring", None, None),
    ]
    # The same through alice's session (the dashboard's administration page reads this).
    listed = alice.get("/api/apikeys").json()["apikeys"]
    assert [(k["name"], k["owner"]) for k in listed] == [(n, o) for n, _, o in owners]
