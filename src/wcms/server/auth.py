"""Who is calling: a PC (its bearer token) or an admin (a server-side session named by a cookie,
with CSRF, or an API key)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from flask import Response, g, request
from sqlalchemy.orm import Session

from wcms.protocol import TOKEN_PREFIX_APIKEY, ErrorCode
from wcms.server.api.request import runtime
from wcms.server.db import utcnow
from wcms.server.errors import ApiError
from wcms.server.headers import public_https
from wcms.server.models import Admin
from wcms.server.services import accounts, audit
from wcms.server.services.agent import PcIdentity, identify_pc

UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def parse_bearer(header: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, or None."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def bearer() -> str | None:
    return parse_bearer(request.headers.get("Authorization", ""))


def current_pc(machine_id: str) -> PcIdentity:
    """The calling PC (services/agent.py, identify_pc)."""
    return identify_pc(runtime(), bearer(), machine_id)


def db() -> Session:
    """The request's session, opened on first use and closed at teardown."""
    if "db" not in g:
        g.db = runtime().sessions()
    session: Session = g.db
    return session


# ---------------------------------------------------------------- admins

# The dashboard's session cookie holds one random id and nothing else; the session itself
# (admin, CSRF token, times) is a row in admin_sessions keyed by the id's SHA-256, so logging
# out, a password change or disabling the admin ends it on the server at once.
SESSION_COOKIE = "wcms_session"
# Before there is a session, the login form's CSRF token is an HMAC (under the server secret)
# of a random nonce held in this short-lived cookie and the time it was issued.
LOGIN_COOKIE = "wcms_login"
LOGIN_TOKEN_TTL = 2 * 3600  # seconds a login form stays usable
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{32}")
_ISSUED_RE = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True)
class AdminIdentity:
    name: str  # "alice", or "apikey:backup-script"
    admin_id: int | None  # None for an API key
    session_hash: str | None = None  # the dashboard session's id hash (None for an API key)


def _live_session() -> accounts.LiveSession | None:
    """The session the request's cookie names, looked up once per request."""
    if "live_session" in g:
        return g.live_session  # type: ignore[no-any-return]
    sid = request.cookies.get(SESSION_COOKIE)
    live = None
    if sid:
        if len(sid) <= 128:
            live = accounts.session_for(db(), accounts.sha256(sid), utcnow())
        if live is None:
            g.drop_session_cookie = True  # a dead session: the browser forgets it
    g.live_session = live
    return live


def _login_mac(nonce: str, issued: str) -> str:
    message = f"login-csrf|{nonce}|{issued}".encode()
    return hmac.new(runtime().secret_key.encode(), message, hashlib.sha256).hexdigest()


def _login_token() -> str:
    """The login form's CSRF token, bound to this browser's pre-login nonce cookie."""
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not _NONCE_RE.fullmatch(nonce):
        nonce = secrets.token_urlsafe(24)
        g.new_login_nonce = nonce
    issued = str(int(time.time()))
    return f"{issued}.{_login_mac(nonce, issued)}"


def csrf_token() -> str:
    """The token unsafe requests must carry: the session's own, or before a login (on a page
    that has not identified an admin) the pre-login token. Templates call it."""
    if "csrf" not in g:
        live = g.get("live_session")
        g.csrf = live.csrf if live is not None else _login_token()
    return str(g.csrf)


def _sent_csrf() -> str:
    return request.headers.get("X-CSRF-Token") or request.form.get("csrf_token", "")


def _same(expected: str, sent: str) -> bool:
    """Constant-time equality that takes any text (compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(expected.encode(), sent.encode("utf-8", "replace"))


def check_csrf() -> None:
    """The logged-in session's CSRF token, from the header or the form field."""
    live = _live_session()
    if live is None or not _same(live.csrf, _sent_csrf()):
        raise ApiError(403, ErrorCode.CSRF, "missing or wrong CSRF token; reload the page")


def check_login_csrf() -> None:
    """The login form's token: issued to this browser (its nonce cookie) in the last 2 hours."""
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    issued, _, mac = _sent_csrf().partition(".")
    if not (
        _NONCE_RE.fullmatch(nonce)
        and _ISSUED_RE.fullmatch(issued)
        and 0 <= time.time() - int(issued) <= LOGIN_TOKEN_TTL
        and _same(mac, _login_mac(nonce, issued))
    ):
        raise ApiError(403, ErrorCode.CSRF, "missing or expired login form; reload the page")


def current_admin() -> AdminIdentity:
    """An API key (no CSRF: not a cookie) or a logged-in admin's session (CSRF checked).

    Commits nothing: what it writes (a key's last use, a session's sliding last_seen) is
    committed with the request (create_app's after-request hook)."""
    if "admin" in g:
        return g.admin  # type: ignore[no-any-return]
    token = bearer()
    if token is not None:
        if not token.startswith(TOKEN_PREFIX_APIKEY):
            raise ApiError(401, ErrorCode.UNAUTHORIZED, "not an API key")
        s = db()
        key = accounts.api_key_for(s, token, utcnow())
        if key is None:
            raise ApiError(401, ErrorCode.UNAUTHORIZED, "unknown or revoked API key")
        g.admin = AdminIdentity(f"apikey:{key.name}", None)
        return g.admin  # type: ignore[no-any-return]
    live = _live_session()
    if live is None:
        raise ApiError(401, ErrorCode.UNAUTHORIZED, "log in first")
    if request.method in UNSAFE_METHODS:
        check_csrf()
    g.admin = AdminIdentity(live.username, live.admin_id, session_hash=live.id_hash)
    return g.admin  # type: ignore[no-any-return]


def login_session(admin: Admin) -> None:
    """Start a fresh session for `admin` (the browser's old one, if any, ends) and commit; the
    answer sets the cookie."""
    s = db()
    old = request.cookies.get(SESSION_COOKIE)
    live, sid = accounts.start_session(
        s,
        admin,
        utcnow(),
        ip=client_address(),
        replaces=accounts.sha256(old) if old and len(old) <= 128 else None,
    )
    s.commit()
    g.live_session = live
    g.new_session_id = sid
    g.pop("csrf", None)


def logout_session() -> None:
    """End the request's session on the server and tell the browser to forget the cookie."""
    live = _live_session()
    if live is not None:
        s = db()
        accounts.end_session(s, live.id_hash)
        s.commit()
    g.live_session = None
    g.drop_session_cookie = True


def write_cookies(resp: Response) -> Response:
    """Set or drop the session and pre-login cookies this request decided on (an after-request
    hook; cheap when there is nothing to do, as on every agent call)."""
    sid, drop, nonce = (
        g.get("new_session_id"),
        g.get("drop_session_cookie"),
        g.get("new_login_nonce"),
    )
    if sid is None and not drop and nonce is None:
        return resp
    secure = secure_cookies()
    if sid is not None:
        resp.set_cookie(
            SESSION_COOKIE,
            sid,
            max_age=int(accounts.SESSION_MAX.total_seconds()),
            httponly=True,
            samesite="Lax",
            secure=secure,
            path="/",
        )
        resp.delete_cookie(LOGIN_COOKIE, path="/", httponly=True, samesite="Lax", secure=secure)
        return resp
    if drop:
        resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="Lax", secure=secure)
    if nonce is not None:
        resp.set_cookie(
            LOGIN_COOKIE,
            nonce,
            max_age=LOGIN_TOKEN_TTL,
            httponly=True,
            samesite="Lax",
            secure=secure,
            path="/",
        )
    return resp


def secure_cookies() -> bool:
    """Whether the cookies this answer sets are `Secure`: the request came over https (directly,
    or through a trusted proxy's X-Forwarded-Proto), or the server is published over https
    (WCMS_PUBLIC_URL), which covers a proxy that terminates TLS without being trusted."""
    return request.is_secure or public_https(runtime().settings)


def client_address() -> str:
    """The caller's address; X-Forwarded-For only counts behind a configured proxy."""
    return request.remote_addr or "unknown"


def audit_action(action: str, target: str | None = None, **details: Any) -> None:
    """Write the calling admin's action to the audit log, in the request's transaction."""
    audit.record(db(), current_admin().name, action, utcnow(), target, details, client_address())
