"""A server published over https (WCMS_PUBLIC_URL=https://...) behind a proxy that terminates
TLS: every cookie it sets is `Secure` and every answer carries Strict-Transport-Security, even
though the request reaches the process as plain http and the proxy is not trusted
(WCMS_TRUSTED_PROXIES=0). With an http public URL, neither."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from tests.conftest import Database
from wcms.server import create_app
from wcms.server.db import utcnow
from wcms.server.services import accounts

PASSWORD = "a long test password"
HSTS = "max-age=31536000"


@pytest.fixture
def make_app(database: Database) -> Iterator[Any]:
    """conftest's `app`, with a public URL of the test's choosing."""
    database.migrate()
    made: list[Flask] = []

    def make(public_url: str) -> Flask:
        app = create_app(
            {
                "database_url": database.url,
                "data_dir": database.data_dir,
                "background": False,
                "public_url": public_url,
            }
        )
        made.append(app)
        return app

    yield make
    for app in made:
        app.extensions["wcms"].engine.dispose()


def _answers(app: Flask) -> dict[str, Any]:
    """A login page, a login, a language switch and an agent call, all over plain http."""
    with app.extensions["wcms"].sessions() as s:
        accounts.create_admin(s, "alice", PASSWORD, utcnow())
        s.commit()
    client = app.test_client()
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True))
    assert token
    form = {"username": "alice", "password": PASSWORD, "csrf_token": token.group(1)}
    login = client.post("/login", data=form)
    assert login.status_code == 302
    lang = client.get("/lang/ko")
    # Answered by the agent fast path (no token: 401), not by Flask.
    fast = app.wsgi_app.answered  # type: ignore[attr-defined]
    before = fast["/api/client/heartbeat"]
    agent = client.post("/api/client/heartbeat", json={"machine_id": "M-https-0001"})
    assert agent.status_code == 401
    assert fast["/api/client/heartbeat"] == before + 1
    return {"page": page, "login": login, "lang": lang, "agent": agent}


def _cookies(answers: dict[str, Any]) -> list[str]:
    cookies = [c for a in answers.values() for c in a.headers.getlist("Set-Cookie")]
    names = {c.split("=", 1)[0] for c in cookies}
    assert {"wcms_login", "wcms_session", "wcms_lang"} <= names, names
    return cookies


def test_an_https_public_url_makes_every_cookie_secure_and_sends_hsts(make_app: Any) -> None:
    answers = _answers(make_app("https://wcms.example.edu"))
    for cookie in _cookies(answers):
        attributes = [part.strip().lower() for part in cookie.split(";")[1:]]
        assert "secure" in attributes, cookie
    for name, answer in answers.items():
        assert answer.headers.get("Strict-Transport-Security") == HSTS, name


def test_an_http_public_url_sets_no_secure_cookie_and_no_hsts(make_app: Any) -> None:
    answers = _answers(make_app("http://wcms.example.edu:5050"))
    for cookie in _cookies(answers):
        attributes = [part.strip().lower() for part in cookie.split(";")[1:]]
        assert "secure" not in attributes, cookie
    for name, answer in answers.items():
        assert "Strict-Transport-Security" not in answer.headers, name
