"""Issue 10, Medium 4: logging out ends the session, and the cookie carries nothing but an id.

Before: a copied cookie did 36 of 36 admin calls after logout (it slid for 12 h), and the
signed (not encrypted) cookie carried the CSRF token and the tail of the argon2 hash. Now the
session is a row in admin_sessions (SHA-256 of a random id); the cookie holds that id only.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import time

import pytest
import sqlalchemy
from flask import Flask
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tests.conftest import LiveServer, sql_statements
from tests.security.webclient import WebClient
from wcms.server.db import make_engine, make_sessionmaker, utcnow
from wcms.server.models import Admin, AdminSession
from wcms.server.services import accounts, retention

PASSWORD = "a long test password"
T0 = dt.datetime(2030, 1, 1, 8, 0, tzinfo=dt.UTC)

# 36 admin calls, as in the report: reads across the API plus unsafe ones (with CSRF).
READS = ["/api/me", "/api/pcs", "/api/rooms", "/api/pins", "/api/apikeys", "/api/settings"]
READS += ["/api/audit", "/api/admins", "/api/batches"]
OK = ([200] * 9 + [201, 201, 200]) * 3
# After the session ends: API calls answer 401 (unsafe ones too: without a session there is no
# CSRF question), pages send the browser to the login page.
GONE = ([401] * 11 + [302]) * 3


def admin_calls(client: WebClient, csrf: str) -> list[int]:
    statuses = []
    for n in range(3):
        statuses += [client.get(path).status for path in READS]
        room = {"name": f"Lab {n} {len(client.cookies)}", "rows": 1, "cols": 1}
        statuses.append(client.api("POST", "/api/rooms", room, csrf=csrf).status)
        pin = {"expires_minutes": 5}
        statuses.append(client.api("POST", "/api/pins", pin, csrf=csrf).status)
        statuses.append(client.get("/").status)
    return statuses


def make_admins(server: LiveServer, *names: str) -> dict[str, int]:
    ids = {}
    for name in names:
        ids[name] = server.admin("POST", "/api/admins", {"username": name, "password": PASSWORD})[
            "id"
        ]
    return ids


def rows(server: LiveServer, admin_id: int | None = None) -> int:
    engine = make_engine(server.database.url)
    try:
        with make_sessionmaker(engine)() as s:
            stmt = select(func.count()).select_from(AdminSession)
            if admin_id is not None:
                stmt = stmt.where(AdminSession.admin_id == admin_id)
            return int(s.execute(stmt).scalar_one())
    finally:
        engine.dispose()


def logged_in(server: LiveServer, name: str = "alice") -> WebClient:
    client = WebClient(server)
    answer = client.login(name, PASSWORD)
    assert (answer.status, answer.header("Location")) == (302, "/"), answer.text[:300]
    return client


def assert_logged_out(client: WebClient) -> None:
    me = client.get("/api/me")
    assert me.status == 401 and me.json()["error"]["code"] == "unauthorized"
    page = client.get("/layout")
    assert (page.status, page.header("Location")) == (302, "/login?next=/layout")


# ---------------------------------------------------------------- on a real server


def test_logout_then_replay_of_a_copied_cookie(live_server: LiveServer) -> None:
    ids = make_admins(live_server, "alice")
    alice = logged_in(live_server)
    csrf = alice.csrf()
    thief = alice.copy()
    assert admin_calls(thief, csrf) == OK
    assert rows(live_server, ids["alice"]) == 1

    out = alice.request("POST", "/logout", form={"csrf_token": csrf})
    assert (out.status, out.header("Location")) == (302, "/login")
    assert "wcms_session" not in alice.cookies  # the browser was told to forget it
    assert rows(live_server, ids["alice"]) == 0  # and the server forgot it first

    replayed = admin_calls(thief, csrf)
    assert len(replayed) == 36 and replayed == GONE
    assert_logged_out(thief)
    assert_logged_out(alice)


def test_a_forged_logout_without_the_token_ends_nothing(live_server: LiveServer) -> None:
    make_admins(live_server, "alice")
    alice = logged_in(live_server)
    forged = alice.request("POST", "/logout", form={"csrf_token": "not-it"})
    assert (forged.status, forged.header("Location")) == (302, "/")
    assert alice.get("/api/me").status == 200


def test_the_cookie_holds_only_a_random_id(live_server: LiveServer) -> None:
    ids = make_admins(live_server, "alice")
    client = WebClient(live_server)
    answer = client.login("alice", PASSWORD)
    cookie = next(v for k, v in answer.headers if k.lower() == "set-cookie" and "wcms_session" in v)
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # plain http here; https: see test_the_cookie_is_secure...
    sid = client.cookies["wcms_session"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", sid), sid  # 256 random bits, nothing else
    csrf = client.csrf()
    engine = make_engine(live_server.database.url)
    try:
        with make_sessionmaker(engine)() as s:
            row = s.execute(select(AdminSession)).scalar_one()
            password_hash = s.get(Admin, ids["alice"]).password_hash  # type: ignore[union-attr]
    finally:
        engine.dispose()
    assert row.id_hash == hashlib.sha256(sid.encode()).hexdigest()
    assert row.csrf == csrf and row.admin_id == ids["alice"] and row.ip == "127.0.0.1"
    decoded = base64.urlsafe_b64decode(sid + "=")
    for secret in (csrf, password_hash[-16:], password_hash[-8:], "alice"):
        assert secret not in sid and secret.encode() not in decoded
    # Every cookie the browser holds now: the session id and the language choice, at most.
    assert set(client.cookies) <= {"wcms_session", "wcms_lang"}


def test_each_login_gets_a_fresh_id_and_ends_the_one_before(live_server: LiveServer) -> None:
    ids = make_admins(live_server, "alice")
    client = WebClient(live_server)
    # A fixed id planted in the browser (session fixation) is never adopted.
    client.cookies["wcms_session"] = "planted-by-an-attacker-0000000000000000000"
    client.login("alice", PASSWORD)
    first = client.cookies["wcms_session"]
    assert first != "planted-by-an-attacker-0000000000000000000"
    before = client.copy()
    client.login("alice", PASSWORD)
    assert client.cookies["wcms_session"] != first
    assert_logged_out(before)  # the browser's previous session ended with the new login
    assert client.get("/api/me").json()["name"] == "alice"
    assert rows(live_server, ids["alice"]) == 1


@pytest.mark.slow
def test_password_changes_and_disabling_end_sessions(live_server: LiveServer) -> None:
    ids = make_admins(live_server, "alice", "bob")
    alice1, alice2 = logged_in(live_server), logged_in(live_server)
    bob = logged_in(live_server, "bob")
    # Alice changes her own password in one browser: that one stays, the other ends.
    changed = alice1.api(
        "POST", f"/api/admins/{ids['alice']}/password", {"password": PASSWORD}, alice1.csrf()
    )
    assert changed.status == 200, changed.text
    assert alice1.get("/api/me").status == 200
    assert_logged_out(alice2)
    # Bob resets alice's password: every session of hers ends, bob's stays.
    alice2 = logged_in(live_server)
    reset = bob.api("POST", f"/api/admins/{ids['alice']}/password", {}, bob.csrf())
    assert reset.status == 200 and len(reset.json()["password"]) >= 16
    assert_logged_out(alice1)
    assert_logged_out(alice2)
    assert bob.get("/api/me").status == 200
    assert rows(live_server, ids["alice"]) == 0
    # The server's command line does the same (same rule, in services/accounts.py).
    out = live_server.cli("admin", "passwd", "alice", stdin=PASSWORD + "\n")
    assert "0 dashboard session(s) ended" in out
    alice = logged_in(live_server)
    out = live_server.cli("admin", "passwd", "alice", stdin=PASSWORD + "\n")
    assert "1 dashboard session(s) ended" in out
    assert_logged_out(alice)
    alice = logged_in(live_server)
    # Disabling through the API ends them at once, and deletes the rows.
    off = bob.api("PATCH", f"/api/admins/{ids['alice']}", {"active": False}, bob.csrf())
    assert off.status == 200 and off.json()["active"] is False
    assert rows(live_server, ids["alice"]) == 0  # deleted by the disable, not on next sight
    assert_logged_out(alice)
    assert WebClient(live_server).login("alice", PASSWORD).status == 401
    bob.api("PATCH", f"/api/admins/{ids['alice']}", {"active": True}, bob.csrf())
    alice = logged_in(live_server)
    live_server.cli("admin", "disable", "alice")
    assert rows(live_server, ids["alice"]) == 0
    assert_logged_out(alice)
    assert bob.get("/api/me").status == 200


def test_an_admin_disabled_behind_the_servers_back_is_refused(live_server: LiveServer) -> None:
    """The lookup checks the admin is active too, not only that the row exists."""
    ids = make_admins(live_server, "alice")
    alice = logged_in(live_server)
    engine = sqlalchemy.create_engine(live_server.database.url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sqlalchemy.update(Admin).where(Admin.id == ids["alice"]).values(is_active=False)
            )
    finally:
        engine.dispose()
    assert_logged_out(alice)


def test_the_login_form_token_is_bound_to_its_browser(live_server: LiveServer) -> None:
    make_admins(live_server, "alice")
    attacker, victim = WebClient(live_server), WebClient(live_server)
    token = attacker.get("/login").form_csrf
    victim.get("/login")  # the victim's own pre-login cookie
    form = {"username": "alice", "password": PASSWORD, "csrf_token": token}
    # Login CSRF: a token fetched by someone else does not work in the victim's browser...
    assert victim.request("POST", "/login", form=form).status == 400
    # ...nor without any pre-login cookie, nor tampered with.
    assert WebClient(live_server).request("POST", "/login", form=form).status == 400
    issued, _, mac = token.partition(".")
    tampered = {**form, "csrf_token": f"{int(issued) + 1}.{mac}"}
    assert attacker.request("POST", "/login", form=tampered).status == 400
    assert "wcms_session" not in attacker.cookies and "wcms_session" not in victim.cookies
    ok = attacker.request("POST", "/login", form=form)
    assert (ok.status, ok.header("Location")) == (302, "/")
    assert "wcms_login" not in attacker.cookies  # the pre-login cookie is dropped at login


# ---------------------------------------------------------------- in-process, with `now`


def make_session(s: Session, now: dt.datetime = T0) -> tuple[Admin, accounts.LiveSession]:
    admin = accounts.create_admin(s, "alice", PASSWORD, now)
    live, _sid = accounts.start_session(s, admin, now, "10.0.0.1")
    s.commit()
    return admin, live


def last_seen(s: Session, live: accounts.LiveSession) -> dt.datetime | None:
    s.expire_all()
    row = s.get(AdminSession, live.id_hash)
    return None if row is None else row.last_seen_at


def test_idle_timeout_slides_and_last_seen_is_written_once_a_minute(session: Session) -> None:
    _admin, live = make_session(session)
    assert accounts.session_for(session, live.id_hash, T0 + dt.timedelta(seconds=59)) == live
    assert last_seen(session, live) == T0  # not written: less than a minute
    at = T0 + dt.timedelta(seconds=61)
    assert accounts.session_for(session, live.id_hash, at) == live
    assert last_seen(session, live) == at
    # 12 hours idle after the last use: gone, and the row deleted on sight.
    almost = at + accounts.SESSION_IDLE - dt.timedelta(seconds=1)
    assert accounts.session_for(session, live.id_hash, almost) == live
    later = almost + accounts.SESSION_IDLE
    assert accounts.session_for(session, live.id_hash, later) is None
    assert last_seen(session, live) is None


def test_absolute_timeout_ends_even_a_busy_session(session: Session) -> None:
    _admin, live = make_session(session)
    now = T0
    while now + dt.timedelta(hours=11) < T0 + accounts.SESSION_MAX:
        now += dt.timedelta(hours=11)
        assert accounts.session_for(session, live.id_hash, now) == live
    assert accounts.session_for(session, live.id_hash, T0 + accounts.SESSION_MAX) is None
    assert last_seen(session, live) is None


def test_retention_deletes_ended_sessions_and_keeps_live_ones(session: Session) -> None:
    admin, live = make_session(session)
    idle, _ = accounts.start_session(session, admin, T0 - accounts.SESSION_IDLE)
    old, _ = accounts.start_session(session, admin, T0 - accounts.SESSION_MAX)
    row = session.get(AdminSession, old.id_hash)
    assert row is not None
    row.last_seen_at = T0  # used a moment ago, but past its absolute limit
    session.commit()
    counts = retention.prune(session, T0, metrics_days=14, events_days=365)
    assert counts["admin_sessions"] == 2
    left = set(session.execute(select(AdminSession.id_hash)).scalars())
    assert left == {live.id_hash}


def test_one_select_per_admin_request(app: Flask) -> None:
    """Dashboards poll the API: a request with a session costs one indexed SELECT, and a write
    at most once a minute."""
    rt = app.extensions["wcms"]
    with rt.sessions() as s:
        admin = accounts.create_admin(s, "alice", PASSWORD, utcnow())
        _live, sid = accounts.start_session(s, admin, utcnow())
        s.commit()
    with sql_statements(rt.engine) as statements:
        client = app.test_client()
        client.set_cookie("wcms_session", sid)
        for _ in range(5):
            assert client.get("/api/me").status_code == 200
    assert len(statements) == 5, statements
    assert all(
        s.lstrip().upper().startswith("SELECT") and "admin_sessions" in s for s in statements
    )


def test_the_cookie_is_secure_over_https(app: Flask) -> None:
    with app.extensions["wcms"].sessions() as s:
        accounts.create_admin(s, "alice", PASSWORD, utcnow())
        s.commit()
    client = app.test_client()
    page = client.get("/login", base_url="https://wcms.example")
    assert "Secure" in page.headers["Set-Cookie"]  # the pre-login cookie
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True))
    assert token
    form = {"username": "alice", "password": PASSWORD, "csrf_token": token.group(1)}
    answer = client.post("/login", data=form, base_url="https://wcms.example")
    assert answer.status_code == 302
    cookie = next(c for c in answer.headers.getlist("Set-Cookie") if c.startswith("wcms_session="))
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_an_expired_login_form_is_refused(app: Flask) -> None:
    """The pre-login token lives two hours: one issued (signed for this browser) earlier is
    refused, a fresh one works."""
    from wcms.server import auth

    with app.extensions["wcms"].sessions() as s:
        accounts.create_admin(s, "alice", PASSWORD, utcnow())
        s.commit()
    client = app.test_client()
    page = client.get("/login").get_data(as_text=True)
    fresh = re.search(r'name="csrf_token" value="([^"]+)"', page)
    nonce = client.get_cookie("wcms_login")
    assert fresh and nonce
    form = {"username": "alice", "password": PASSWORD}
    for age in (auth.LOGIN_TOKEN_TTL + 5, -600):  # too old, and from the future
        issued = str(int(time.time()) - age)
        with app.test_request_context():
            old = f"{issued}.{auth._login_mac(nonce.value, issued)}"
        assert client.post("/login", data={**form, "csrf_token": old}).status_code == 400
    assert client.post("/login", data={**form, "csrf_token": fresh.group(1)}).status_code == 302
