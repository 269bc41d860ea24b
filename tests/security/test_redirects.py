"""Issue 10, Medium 8: one safe-redirect rule for every `next`.

Before: `/lang/en?next=/%09/host` and the login's `next` answered `Location: //host` (Chromium
followed the first), and CR/LF in `next` gave a 500. Every form below goes through the real
server: the language switch, the login form's POST and its GET, and a page's login redirect;
the Location must be a path on this server every time, and nothing answers 5xx.
"""

from __future__ import annotations

import re
from urllib.parse import quote, urljoin, urlsplit

import pytest

from tests.conftest import LiveServer
from tests.security.webclient import WebClient
from wcms.server.web.pages import NEXT_MAX, safe_next

PASSWORD = "a long test password"

# `next` values as the server receives them (after the query or form is decoded).
HOSTILE = [
    "//host",
    "//host/path",
    "///host",
    "////host",
    "/\\host",
    "\\\\host",
    "\\/host",
    "/\\/host",
    "/\t/host",
    "/%09/host",
    "/%2509/host",
    "\t//host",
    " //host",
    "/ /host",
    "//host\n",
    "/\r\nLocation: //host",
    "/%0D%0ASet-Cookie:%20wcms_session=x",
    "/x\r\nSet-Cookie: wcms_session=x",
    "/\x00/host",
    "/%00/host",
    "https://host",
    "HTTPS://host",
    "http:host",
    "http:/host",
    "https:/\\host",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "java\tscript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "//host@x",
    "//user:pw@host",
    "/.//host",
    "/./host",
    "/..//host",
    "/a/../..//host",
    "/%2F%2Fhost",
    "/%2f/host",
    "/%252F%252Fhost",
    "/%25252F%25252F%25252Fhost",
    "/%5Chost",
    "/%5c%5chost",
    "/%2E%2E//host",
    "\uff0f\uff0fhost",  # full-width solidus
    "/\uff0fhost",
    "/%EF%BC%8Fhost",
    "\u2215\u2215host",  # division slash
    "/\u3000/host",  # ideographic space
    "/\u202e/host",  # right-to-left override
    "/\u200b/host",  # zero-width space
    "host",
    "host/path",
    ".//host",
    "?next=//host",
    "#//host",
    "",
    "/" + "a" * (NEXT_MAX + 1),
    "//" + "a" * 6000,  # the request line stays under the server's 8 KiB limit
]
# Local paths pass through unchanged.
LOCAL = ["/", "/layout", "/rooms/3", "/pcs/12?days=7", "/login?next=/layout", "/admin#pins"]
# Each login runs argon2 (a second on a busy CI core), so the login POST takes 25 forms, one
# or more of every kind above; the rule itself and the other routes take all of them.
POST_FORMS = [HOSTILE[i] for i in (0, 2, 4, 5, 8, 9, 11, 15, 16, 18, 20, 22, 23, 25, 28, 29, 31)]
POST_FORMS += [HOSTILE[i] for i in (35, 37, 39, 42, 44, 47, 53, 56)] + ["/layout", "/pcs/1?x=2"]


def is_local(location: str | None, server: LiveServer) -> bool:
    """A path on this server, whatever a browser makes of it (tab/CR/LF stripped, `\\` read
    as `/`): nothing that could become another host."""
    if location is None or not location.startswith("/") or location.startswith("//"):
        return False
    if "\\" in location or not all("!" <= c <= "~" for c in location):
        return False
    target = urlsplit(urljoin(server.url + "/login", location))
    return (target.scheme, target.netloc) == ("http", f"127.0.0.1:{server.port}")


def refused_before_the_view(value: str, status: int) -> bool:
    """A NUL byte in the query may be refused (400, JSON) before any view runs (issue 10's Low
    items): then there is no Location at all."""
    return "\x00" in value and status == 400


def test_the_rule() -> None:
    for value in HOSTILE:
        assert safe_next(value) == "/", repr(value)
    for value in LOCAL:
        assert safe_next(value) == value
    assert safe_next(None) == "/"


@pytest.fixture(scope="module")
def server(shared_server: LiveServer) -> LiveServer:
    shared_server.admin("POST", "/api/admins", {"username": "alice", "password": PASSWORD})
    return shared_server


def test_language_switch(server: LiveServer) -> None:
    client = WebClient(server)
    for value in HOSTILE + LOCAL:
        answer = client.get(f"/lang/en?next={quote(value, safe='')}")
        if refused_before_the_view(value, answer.status):
            assert answer.header("Location") is None
            continue
        assert answer.status == 302, (value, answer.status)
        location = answer.header("Location")
        assert is_local(location, server), (value, location)
        assert location == (value if value in LOCAL else "/"), (value, location)
        assert "wcms_lang=en" in (answer.header("Set-Cookie") or "")


def test_raw_query_strings_as_an_attacker_types_them(server: LiveServer) -> None:
    """The report's own forms, sent byte for byte (not re-encoded by the test)."""
    client = WebClient(server)
    raws = ["/%09/host", "//host", "/%2F%2Fhost", "%2F%2Fhost", "/%5Chost", "/%0d%0aX:%20y"]
    raws += ["https:%2F%2Fhost", "%09//host", "/%E3%80%80/host", "/%ef%bc%8f/host", "/%C0%AF/h"]
    raws += ["/%ZZ/host", "/%", "%", "/%u002F/host"]
    for raw in raws:
        answer = client.get(f"/lang/en?next={raw}")
        if answer.status == 400:  # a NUL byte, refused before any view
            assert "%00" in raw.lower() and answer.header("Location") is None
            continue
        assert answer.status == 302, (raw, answer.status)
        assert is_local(answer.header("Location"), server), (raw, answer.header("Location"))


@pytest.mark.slow
def test_login_form_get_and_post(server: LiveServer) -> None:
    client = WebClient(server)
    for value in HOSTILE + LOCAL:
        page = client.get(f"/login?next={quote(value, safe='')}")
        if refused_before_the_view(value, page.status):
            assert page.header("Location") is None
            continue
        assert page.status == 200, (value, page.status)
        expected = value if value in LOCAL else "/"
        assert page.form_next == expected, value
        # The page's language links carry it on, and land on a local path too.
        for href in re.findall(r'href="(/lang/[^"]+)"', page.text):
            switched = client.get(href.replace("&amp;", "&"))
            assert switched.status == 302 and is_local(switched.header("Location"), server)
    assert len(set(POST_FORMS)) == 27
    for value in POST_FORMS:
        answer = client.login("alice", PASSWORD, next_=value)
        if refused_before_the_view(value, answer.status):
            assert answer.header("Location") is None
            continue
        assert answer.status == 302, (value, answer.status, answer.text[:200])
        location = answer.header("Location")
        assert is_local(location, server), (value, location)
        assert location == (value if value.startswith(("/layout", "/pcs")) else "/"), value


def test_a_page_sends_a_stranger_to_login_with_a_local_next(server: LiveServer) -> None:
    client = WebClient(server)
    paths = ["/layout", "/layout?x=%0d%0a", "/rooms/1?next=//host", "/admin?%09", "//layout"]
    paths += ["/layout?a=" + "b" * 5000, "/pcs/1?q=%EF%BC%8F%EF%BC%8Fhost"]
    for path in paths:
        answer = client.get(path)
        assert answer.status in (302, 404), (path, answer.status)
        if answer.status == 404:
            continue
        location = answer.header("Location") or ""
        assert location.startswith("/login?next="), location
        assert is_local(location, server), (path, location)
        page = client.get(location)
        assert page.status == 200 and is_local(page.form_next, server), (path, page.form_next)
