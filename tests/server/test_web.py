"""The dashboard's pages, in-process: login, CSRF, rate limits, escaping, CSP, languages."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from wcms.protocol import PIN_LENGTH
from wcms.server.config import ConfigError, Settings, load_settings
from wcms.server.db import utcnow
from wcms.server.runtime import Runtime
from wcms.server.services import accounts
from wcms.server.web import i18n

PASSWORD = "a long test password"
WEB = Path(__file__).resolve().parents[2] / "src" / "wcms" / "server" / "web"


@pytest.fixture
def alice(session: Session) -> None:
    accounts.create_admin(session, "alice", PASSWORD, utcnow())
    session.commit()


def form_token(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF field in the form"
    return match.group(1)


def meta_token(html: str) -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]+)"', html)
    assert match
    return match.group(1)


def login(client: Any, password: str = PASSWORD, name: str = "alice", **extra: str) -> Any:
    token = form_token(client.get("/login").get_data(as_text=True))
    data = {"username": name, "password": password, "csrf_token": token, **extra}
    return client.post("/login", data=data)


def register(client: Any, rt: Runtime, hostname: str) -> int:
    with rt.sessions() as s:
        _row, pin = accounts.create_pin(s, rt.secret_key, "t", utcnow(), dt.timedelta(minutes=5))
        s.commit()
    body = {"pin": pin, "machine_id": "M-web-test-0001", "hostname": hostname}
    resp = client.post("/api/client/register", json=body)
    assert resp.status_code == 201
    return int(resp.get_json()["pc_id"])


# ---------------------------------------------------------------- login and sessions


def test_pages_send_anonymous_visitors_to_login_and_back(client: Any, alice: None) -> None:
    resp = client.get("/layout")
    assert resp.status_code == 302
    assert resp.headers["Location"] == "/login?next=/layout"
    resp = login(client, next="/layout")
    assert (resp.status_code, resp.headers["Location"]) == (302, "/layout")
    assert client.get("/layout").status_code == 200


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example", "/\\evil", "x"])
def test_login_never_redirects_off_site(client: Any, alice: None, target: str) -> None:
    resp = login(client, next=target)
    assert resp.headers["Location"] == "/"


def test_wrong_password_and_unknown_user_get_the_same_answer(client: Any, alice: None) -> None:
    wrong = login(client, password="not it at all")
    unknown = login(client, name="mallory", password="not it at all")
    assert wrong.status_code == unknown.status_code == 401
    for resp in (wrong, unknown):
        assert "Wrong user name or password." in resp.get_data(as_text=True)
    assert client.get("/").status_code == 302  # still not logged in


def test_login_without_the_csrf_token_is_refused(client: Any, alice: None) -> None:
    client.get("/login")
    resp = client.post("/login", data={"username": "alice", "password": PASSWORD})
    assert resp.status_code == 400
    assert client.get("/").status_code == 302


def test_login_is_rate_limited_and_the_right_password_waits_too(client: Any, alice: None) -> None:
    statuses = [login(client, password="wrong password!").status_code for _ in range(11)]
    assert statuses[:10] == [401] * 10
    assert statuses[10] == 429
    limited = login(client)  # even the right password waits now
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) > 0
    # Per address and per user name (tests/security/test_login_flood.py): bob, from another
    # address, is not held up by alice's attacker.
    other = client.post(
        "/login",
        data={
            "username": "bob",
            "password": "whatever it is",
            "csrf_token": form_token(client.get("/login").get_data(as_text=True)),
        },
        environ_base={"REMOTE_ADDR": "192.0.2.7"},
    )
    assert other.status_code == 401


def test_disabled_admin_cannot_log_in(client: Any, session: Session, alice: None) -> None:
    accounts.create_admin(session, "bob", PASSWORD, utcnow()).is_active = False
    session.commit()
    assert login(client, name="bob").status_code == 401


def test_session_cookie_is_httponly_and_samesite_lax(client: Any, alice: None) -> None:
    resp = login(client)
    cookie = resp.headers["Set-Cookie"]
    assert "wcms_session=" in cookie
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie


def test_logout_needs_the_csrf_token(client: Any, alice: None) -> None:
    login(client)
    html = client.get("/").get_data(as_text=True)
    client.post("/logout", data={})
    assert client.get("/").status_code == 200  # a forged logout did nothing
    client.post("/logout", data={"csrf_token": form_token(html)})
    assert client.get("/").status_code == 302


def test_unsafe_api_calls_from_a_session_need_the_csrf_header(client: Any, alice: None) -> None:
    login(client)
    token = meta_token(client.get("/").get_data(as_text=True))
    body = {"name": "Lab", "rows": 2, "cols": 2}
    refused = client.post("/api/rooms", json=body)
    assert refused.status_code == 403
    assert refused.get_json()["error"]["code"] == "csrf_failed"
    wrong = client.post("/api/rooms", json=body, headers={"X-CSRF-Token": "x" + token})
    assert wrong.status_code == 403
    ok = client.post("/api/rooms", json=body, headers={"X-CSRF-Token": token})
    assert ok.status_code == 201
    assert client.get("/api/rooms").status_code == 200  # reads need no token


def test_no_admin_means_no_way_in_but_a_hint(client: Any) -> None:
    html = client.get("/login").get_data(as_text=True)
    assert "wcms admin bootstrap" in html
    for name, password in [("admin", "admin"), ("admin", ""), ("root", "root")]:
        assert login(client, name=name, password=password).status_code == 401


# ---------------------------------------------------------------- what every page carries


def test_every_page_has_a_csp_without_inline_scripts(client: Any, alice: None) -> None:
    login(client)
    for path in ["/", "/layout", "/admin", "/login"]:
        resp = client.get(path)
        assert resp.status_code == 200, path
        csp = resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert "frame-ancestors 'none'" in csp
        assert resp.headers["Cache-Control"] == "no-store"
        html = resp.get_data(as_text=True)
        # The only inline script blocks are JSON data, which never runs.
        for attrs in re.findall(r"<script([^>]*)>", html):
            assert 'type="application/json"' in attrs or "src=" in attrs, attrs
        assert not re.search(r"<[^>]+\son[a-z]+\s*=", html), "an inline event handler"


def test_json_answers_carry_no_csp_and_still_nosniff(client: Any, alice: None) -> None:
    resp = client.get("/healthz")
    assert "Content-Security-Policy" not in resp.headers
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


def test_hostnames_and_room_names_are_escaped(
    client: Any, rt: Runtime, session: Session, alice: None
) -> None:
    pc_id = register(client, rt, "<img src=x onerror=alert(1)>")
    login(client)
    token = meta_token(client.get("/").get_data(as_text=True))
    room = client.post(
        "/api/rooms",
        json={"name": '<script>alert("r")</script>', "rows": 1, "cols": 1},
        headers={"X-CSRF-Token": token},
    ).get_json()["id"]
    pc_page = client.get(f"/pcs/{pc_id}").get_data(as_text=True)
    assert "&lt;img src=x onerror=alert(1)&gt;" in pc_page
    assert "<img src=x" not in pc_page
    room_page = client.get(f"/rooms/{room}").get_data(as_text=True)
    assert "&lt;script&gt;alert(&#34;r&#34;)&lt;/script&gt;" in room_page
    assert '<script>alert("r")' not in room_page


def test_unknown_room_or_pc_page_is_404(client: Any, alice: None) -> None:
    login(client)
    assert client.get("/rooms/42").status_code == 404
    assert client.get("/pcs/42").status_code == 404


def test_static_files_are_served(client: Any) -> None:
    for name in ["common.js", "room.js", "pc.js", "actions.js", "layout.js", "admin.js", "app.css"]:
        resp = client.get(f"/static/{name}")
        assert resp.status_code == 200, name
        resp.close()


def test_scripts_never_write_html() -> None:
    """Data reaches the page through textContent and DOM building only."""
    for path in (WEB / "static").glob("*.js"):
        code = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in code, f"{path.name} uses {sink}"
        assert 'setAttribute("on' not in code and "new Function" not in code


# ---------------------------------------------------------------- languages


def test_language_comes_from_the_browser_then_the_cookie(client: Any) -> None:
    ko = client.get("/login", headers={"Accept-Language": "ko-KR,ko;q=0.9,en;q=0.5"})
    assert '<html lang="ko">' in ko.get_data(as_text=True)
    assert "WCMS 로그인" in ko.get_data(as_text=True)
    en = client.get("/login", headers={"Accept-Language": "de-DE,en;q=0.3"})
    assert '<html lang="en">' in en.get_data(as_text=True)
    switch = client.get("/lang/en?next=/login", headers={"Accept-Language": "ko"})
    assert switch.headers["Location"] == "/login"
    assert "wcms_lang=en" in switch.headers["Set-Cookie"]
    again = client.get("/login", headers={"Accept-Language": "ko"})
    assert '<html lang="en">' in again.get_data(as_text=True)
    bad = client.get("/lang/xx?next=//evil.example")
    assert bad.headers["Location"] == "/" and "Set-Cookie" not in bad.headers


@pytest.mark.parametrize(
    "cookie, header, expected",
    [
        (None, None, "en"),
        (None, "ko", "ko"),
        (None, "fr-CA, ko-KR;q=0.8", "ko"),
        (None, "ko;q=0, en", "en"),
        ("ko", "en", "ko"),
        ("zz", "ko", "ko"),
        (None, "garbage;q=x", "en"),
    ],
)
def test_pick_language(cookie: str | None, header: str | None, expected: str) -> None:
    assert i18n.pick_language(cookie, header) == expected


def test_both_catalogs_have_the_same_keys_and_placeholders() -> None:
    assert set(i18n.EN) == set(i18n.KO)
    for key, text in i18n.EN.items():
        names = set(re.findall(r"\{(\w+)\}", text))
        assert names == set(re.findall(r"\{(\w+)\}", i18n.KO[key])), key


def test_every_key_the_pages_use_is_in_the_catalog() -> None:
    used: set[str] = set()
    for path in (WEB / "templates").glob("*.html"):
        used |= set(re.findall(r"_\('([a-z_.]+)'\)", path.read_text()))
    for path in (WEB / "static").glob("*.js"):
        used |= set(re.findall(r'\bt\("([a-z_]+\.[a-z_.]+)"', path.read_text()))
    used |= set(re.findall(r'gettext\("([a-z_.]+)"', (WEB / "pages.py").read_text()))
    missing = sorted(k for k in used if k not in i18n.EN)
    assert not missing


def test_an_unknown_name_costs_a_hash_with_the_real_parameters() -> None:
    """The hash verified for an unknown user name must cost what a real admin's hash costs (the
    same argon2 parameters), or timing would tell which names exist: at the default cost (a
    constant) and at another one (made on first need)."""
    from argon2 import PasswordHasher

    assert not PasswordHasher().check_needs_rehash(accounts.DUMMY_HASH)
    try:
        for cost in [(65536, 3, 4), (19456, 2, 1), (32768, 2, 2)]:
            m, t, p = cost
            accounts.configure_hashing(
                Settings(argon2_memory_kib=m, argon2_time_cost=t, argon2_parallelism=p)
            )
            hasher = PasswordHasher(memory_cost=cost[0], time_cost=cost[1], parallelism=cost[2])
            assert not hasher.check_needs_rehash(accounts.dummy_hash()), cost
            assert not hasher.check_needs_rehash(accounts.hash_password("a long password")), cost
            assert not accounts.password_matches(accounts.dummy_hash(), "a long test password")
    finally:
        accounts.configure_hashing(load_settings())


def test_argon2_cost_below_owasps_least_is_refused() -> None:
    floor = {"argon2_memory_kib": 19456, "argon2_time_cost": 2, "argon2_parallelism": 1}
    assert load_settings(floor).argon2_memory_kib == 19456
    for name, value, message in [
        ("argon2_memory_kib", 19455, "WCMS_ARGON2_MEMORY_KIB=19455"),
        ("argon2_time_cost", 1, "WCMS_ARGON2_TIME_COST=1"),
        ("argon2_parallelism", 0, "WCMS_ARGON2_PARALLELISM=0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_settings({**floor, name: value})


def test_the_pin_help_names_the_protocols_pin_length(client: Any, alice: None) -> None:
    login(client)
    html = client.get("/admin").get_data(as_text=True)
    assert f"registers once with a {PIN_LENGTH}-digit PIN." in html
