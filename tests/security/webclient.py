"""A browser's HTTP behaviour in miniature, for the session, redirect and API-key tests: it
keeps cookies by name (honouring deletion), never follows a redirect, and can log in through
the real login form. Copying its cookies into another WebClient is how a test "steals" one."""

from __future__ import annotations

import html
import http.client
import json
import re
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlencode

from tests.conftest import LiveServer

_FORM_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_META_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]+)"')
_NEXT = re.compile(r'name="next" value="([^"]*)"')


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    text: str

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def set_cookies(self) -> dict[str, SimpleCookie]:
        out = {}
        for k, v in self.headers:
            if k.lower() == "set-cookie":
                jar: SimpleCookie = SimpleCookie()
                jar.load(v)
                for name in jar:
                    out[name] = jar
        return out

    def json(self) -> Any:
        return json.loads(self.text)

    @property
    def form_csrf(self) -> str:
        match = _FORM_CSRF.search(self.text)
        assert match, f"no CSRF field in: {self.text[:300]}"
        return html.unescape(match.group(1))

    @property
    def meta_csrf(self) -> str:
        match = _META_CSRF.search(self.text)
        assert match, f"no CSRF meta in: {self.text[:300]}"
        return html.unescape(match.group(1))

    @property
    def form_next(self) -> str:
        match = _NEXT.search(self.text)
        assert match, f"no next field in: {self.text[:300]}"
        return html.unescape(match.group(1))


@dataclass
class WebClient:
    server: LiveServer
    cookies: dict[str, str] = field(default_factory=dict)

    def request(
        self,
        method: str,
        path: str,
        form: dict[str, str] | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        all_headers = dict(headers or {})
        data: bytes | None = None
        if form is not None:
            data = urlencode(form).encode()
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        if self.cookies:
            all_headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=20)
        try:
            conn.request(method, path, data, all_headers)
            resp = conn.getresponse()
            answer = Answer(resp.status, resp.getheaders(), resp.read().decode(errors="replace"))
        finally:
            conn.close()
        for name, jar in answer.set_cookies().items():
            morsel = jar[name]
            if morsel["max-age"] == "0" or morsel.value == "":
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = morsel.value
        return answer

    def get(self, path: str) -> Answer:
        return self.request("GET", path)

    def login(self, name: str, password: str, next_: str | None = None) -> Answer:
        page = self.get("/login")
        assert page.status == 200, page.status
        form = {"username": name, "password": password, "csrf_token": page.form_csrf}
        if next_ is not None:
            form["next"] = next_
        return self.request("POST", "/login", form=form)

    def csrf(self) -> str:
        """The session's CSRF token, as a page carries it."""
        page = self.get("/")
        assert page.status == 200, (page.status, page.header("Location"))
        return page.meta_csrf

    def api(self, method: str, path: str, body: Any = None, csrf: str | None = None) -> Answer:
        headers = {"X-CSRF-Token": csrf} if csrf is not None else {}
        return self.request(method, path, body=body, headers=headers)

    def copy(self) -> WebClient:
        """Another browser holding the same cookies (a stolen or copied cookie)."""
        return WebClient(self.server, dict(self.cookies))
