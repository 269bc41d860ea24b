"""Who is calling: a PC (its bearer token) or an admin (session cookie + CSRF, or an API key)."""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

from flask import g, request, session
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from wcms.protocol import TOKEN_PREFIX_APIKEY, ErrorCode
from wcms.server.db import table, utcnow
from wcms.server.errors import ApiError
from wcms.server.models import Admin, PcCredential, PcInfo
from wcms.server.runtime import TOKEN_CACHE_TTL, Runtime, runtime
from wcms.server.services import accounts, audit

UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}

# Built once, Core only: a token cache miss costs one indexed SELECT and little Python.
_PC, _CRED = table(PcInfo), table(PcCredential)
_TOKEN_LOOKUP = (
    select(_PC.c.id, _PC.c.machine_id)
    .join(_CRED, _CRED.c.pc_id == _PC.c.id)
    .where(_CRED.c.token_hash == bindparam("digest"))
)


@dataclass(frozen=True)
class PcIdentity:
    pc_id: int
    machine_id: str


def parse_bearer(header: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, or None."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def bearer() -> str | None:
    return parse_bearer(request.headers.get("Authorization", ""))


def identify_pc(rt: Runtime, token: str | None, machine_id: str) -> PcIdentity:
    """The PC `token` belongs to; 401 without a valid token, 403 for another PC.

    Works without a Flask request (the agent fast path calls it too): the cache miss reads
    through its own short connection, so no transaction is held while a poll waits.
    """
    if token is None:
        raise ApiError(401, ErrorCode.INVALID_TOKEN, "missing bearer token")
    digest = accounts.sha256(token)
    hit = rt.tokens.get(digest)
    if hit is None or time.monotonic() - hit[2] > TOKEN_CACHE_TTL:
        with rt.engine.connect() as conn:
            row = conn.execute(_TOKEN_LOOKUP, {"digest": digest}).first()
        if row is None:
            rt.tokens.pop(digest, None)
            raise ApiError(401, ErrorCode.INVALID_TOKEN, "unknown or revoked token")
        hit = (row[0], row[1], time.monotonic())
        rt.tokens[digest] = hit
    if not hmac.compare_digest(hit[1], machine_id):
        raise ApiError(
            403, ErrorCode.MACHINE_MISMATCH, "this token belongs to another machine; register again"
        )
    return PcIdentity(hit[0], hit[1])


def current_pc(machine_id: str) -> PcIdentity:
    """The calling PC (see identify_pc)."""
    return identify_pc(runtime(), bearer(), machine_id)


def db() -> Session:
    """The request's session, opened on first use and closed at teardown."""
    if "db" not in g:
        g.db = runtime().sessions()
    session: Session = g.db
    return session


# ---------------------------------------------------------------- admins


@dataclass(frozen=True)
class AdminIdentity:
    name: str  # "alice", or "apikey:backup-script"
    admin_id: int | None


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return str(session["csrf"])


def check_csrf() -> None:
    sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token", "")
    expected = session.get("csrf")
    if not expected or not hmac.compare_digest(str(expected), sent):
        raise ApiError(403, ErrorCode.CSRF, "missing or wrong CSRF token; reload the page")


def current_admin() -> AdminIdentity:
    """An API key (no CSRF: not a cookie) or a logged-in admin's session (CSRF checked)."""
    if "admin" in g:
        return g.admin  # type: ignore[no-any-return]
    token = bearer()
    s = db()
    if token is not None:
        if not token.startswith(TOKEN_PREFIX_APIKEY):
            raise ApiError(401, ErrorCode.UNAUTHORIZED, "not an API key")
        key = accounts.api_key_for(s, token, utcnow())
        if key is None:
            raise ApiError(401, ErrorCode.UNAUTHORIZED, "unknown or revoked API key")
        s.commit()
        g.admin = AdminIdentity(f"apikey:{key.name}", None)
        return g.admin  # type: ignore[no-any-return]
    admin_id = session.get("admin_id")
    admin = s.get(Admin, admin_id) if isinstance(admin_id, int) else None
    if admin is None or not admin.is_active or session.get("pw") != admin.password_hash[-16:]:
        session.clear()
        raise ApiError(401, ErrorCode.UNAUTHORIZED, "log in first")
    if request.method in UNSAFE_METHODS:
        check_csrf()
    g.admin = AdminIdentity(admin.username, admin.id)
    return g.admin  # type: ignore[no-any-return]


def login_session(admin: Admin) -> None:
    session.clear()
    session["admin_id"] = admin.id
    session["pw"] = admin.password_hash[-16:]  # a password change ends other sessions
    session.permanent = True
    csrf_token()


def client_address() -> str:
    """The caller's address; X-Forwarded-For only counts behind a configured proxy."""
    return request.remote_addr or "unknown"


def audit_action(action: str, target: str | None = None, **details: Any) -> None:
    """Write the calling admin's action to the audit log, in the request's transaction."""
    audit.record(db(), current_admin().name, action, utcnow(), target, details, client_address())
