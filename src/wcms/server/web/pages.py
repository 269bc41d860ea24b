"""The dashboard's HTML pages: login, overview, room, PC, layout editor, administration.

Pages are thin shells: Jinja (autoescaped) renders the frame and the names it knows; the page's
script fetches the admin JSON API and keeps itself live with GET /api/events. Every HTML answer
carries a Content-Security-Policy that allows scripts and styles from this server only.
"""

from __future__ import annotations

import logging
import math
import unicodedata
from collections.abc import Callable
from functools import partial, wraps
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

from flask import (
    Blueprint,
    Response,
    abort,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue

from wcms import __version__
from wcms.protocol import (
    PIN_LENGTH,
    DisplayStatus,
    PcState,
    PowerReason,
    PresenceMode,
    display_status,
)
from wcms.server.api.request import runtime
from wcms.server.auth import (
    AdminIdentity,
    check_csrf,
    check_login_csrf,
    client_address,
    csrf_token,
    current_admin,
    db,
    login_session,
    logout_session,
    secure_cookies,
    write_cookies,
)
from wcms.server.db import utcnow
from wcms.server.errors import ApiError
from wcms.server.hashpool import Busy
from wcms.server.models import PcInfo, Room
from wcms.server.services import accounts, audit, ratelimit
from wcms.server.web import i18n

bp = Blueprint("web", __name__)
log = logging.getLogger(__name__)

CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
ICONS = {
    DisplayStatus.ONLINE: "●",
    DisplayStatus.OFF: "○",
    DisplayStatus.RESTARTING: "↻",
    DisplayStatus.ASLEEP: "☾",
    DisplayStatus.LOST: "⚠",
    DisplayStatus.STOPPED: "■",
}

BUSY_RETRY = 2  # seconds a login refused for a full hashing queue is asked to wait
F = TypeVar("F", bound=Callable[..., ResponseReturnValue])


@bp.after_app_request
def _html_headers(resp: Response) -> Response:
    if resp.mimetype == "text/html":
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers.setdefault("Cache-Control", "no-store")
    return resp


@bp.after_app_request
def _session_cookies(resp: Response) -> Response:
    return write_cookies(resp)


@bp.app_context_processor
def _template_globals() -> dict[str, Any]:
    return {
        "_": i18n.gettext,
        "lang": i18n.current_language(),
        "languages": i18n.LANGUAGES,
        "csrf_token": csrf_token,
        "static_url": static_url,
        "pin_length": PIN_LENGTH,
    }


def static_url(filename: str) -> str:
    return url_for("static", filename=filename, v=__version__)


NEXT_MAX = 2048  # characters; longer `next` values go home


def safe_next(value: str | None) -> str:
    """The one rule for every `next` (login, language switch, pages): a local absolute path on
    this server, or "/" for anything else. Never raises.

    The value as sent must be printable ASCII (no whitespace, no control characters, no
    backslash), and it and each percent-decoding of it (and their NFKC forms, so full-width
    slashes count as slashes) must start with a single "/", hold no "//" and no "." or ".."
    segment in the path, and parse with an empty scheme and host.
    """
    if not value or len(value) > NEXT_MAX or not all("!" <= c <= "~" for c in value):
        return "/"
    form = value
    for _ in range(4):  # as sent, then decoded up to three times
        normal = unicodedata.normalize("NFKC", form)
        if not (_local_path(form) and _local_path(normal)):
            return "/"
        decoded = unquote(form)
        if decoded == form:
            return value
        form = decoded
    return "/"  # still encoded after three decodings: no path this server makes


def _local_path(text: str) -> bool:
    if not text.startswith("/") or "\\" in text:
        return False
    if any(c.isspace() or unicodedata.category(c)[0] in "CZ" for c in text):
        return False
    path = text.split("?", 1)[0].split("#", 1)[0]
    if "//" in path or any(seg in (".", "..") for seg in path.split("/")):
        return False
    try:
        parts = urlsplit(text)
    except ValueError:
        return False
    return parts.scheme == "" and parts.netloc == ""


def page(fn: F) -> F:
    """A page for logged-in admins; others are sent to the login page and brought back."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> ResponseReturnValue:
        try:
            current_admin()
        except ApiError as exc:
            if exc.status != 401:
                raise
            return redirect(url_for("web.login", next=safe_next(request.full_path.rstrip("?"))))
        return fn(*args, **kwargs)

    return cast(F, wrapper)


def _boot() -> dict[str, Any]:
    """What every page script needs: the catalog and how a stored state shows."""
    return {
        "i18n": i18n.catalog(),
        "statuses": [str(s) for s in DisplayStatus],
        "offline_status": {str(r): str(display_status(PcState.OFFLINE, r)) for r in PowerReason},
    }


def _render(template: str, nav: str, script: str, **context: Any) -> str:
    admin: AdminIdentity = current_admin()
    return render_template(
        template,
        admin=admin,
        nav=nav,
        page=nav,
        page_script=script,
        extra_scripts=context.pop("extra_scripts", []),
        boot=_boot(),
        statuses=[str(s) for s in DisplayStatus],
        icons={str(k): v for k, v in ICONS.items()},
        **context,
    )


# ---------------------------------------------------------------- pages


@bp.get("/")
@page
def overview() -> ResponseReturnValue:
    return _render("overview.html", "overview", "overview.js")


@bp.get("/rooms/<id:room_id>")
@page
def room(room_id: int) -> ResponseReturnValue:
    row = db().get(Room, room_id)
    if row is None:
        abort(404)
    return _render(
        "room.html",
        "overview",
        "room.js",
        extra_scripts=["actions.js"],
        room=row,
        body_data={"room-id": row.id},
    )


@bp.get("/pcs/<id:pc_id>")
@page
def pc(pc_id: int) -> ResponseReturnValue:
    row = db().get(PcInfo, pc_id)
    if row is None:
        abort(404)
    return _render(
        "pc.html",
        "overview",
        "pc.js",
        extra_scripts=["actions.js"],
        pc=row,
        body_data={"pc-id": row.id},
    )


@bp.get("/layout")
@page
def layout() -> ResponseReturnValue:
    return _render("layout.html", "layout", "layout.js")


@bp.get("/admin")
@page
def administration() -> ResponseReturnValue:
    who = current_admin()
    return _render(
        "admin.html",
        "admin",
        "admin.js",
        presence_modes=[str(m) for m in PresenceMode],
        body_data={"admin-id": who.admin_id or ""},
    )


# ---------------------------------------------------------------- login, logout, language


def _login_page(error: str | None = None, status: int = 200, **extra: Any) -> ResponseReturnValue:
    no_admin = not accounts.any_admin(db())
    body = render_template(
        "login.html",
        admin=None,
        page="login",
        error=error,
        no_admin=no_admin,
        next=safe_next(request.values.get("next")),
        username=request.form.get("username", "")[:64],
    )
    resp = make_response(body, status)
    resp.headers.update(extra)
    return resp


@bp.get("/login")
def login() -> ResponseReturnValue:
    return _login_page()


@bp.post("/login")
def login_post() -> ResponseReturnValue:
    try:
        check_login_csrf()
    except ApiError:
        return _login_page(i18n.gettext("login.expired"), 400)
    username = request.form.get("username", "").strip()[:64]
    password = request.form.get("password", "")[:1024]
    rt = runtime()
    address = client_address()
    s = db()
    # Taken before the password is checked, in one atomic step per limit (per address, per
    # user name, global), and given back when the login succeeds: only failures count.
    try:
        attempt = rt.limiters.rates.take_all(ratelimit.login_rules(username, address))
    except ratelimit.Limited as limited:
        seconds = math.ceil(limited.retry_after)
        message = i18n.gettext("login.too_many", n=seconds)
        return _login_page(message, 429, **{"Retry-After": str(seconds)})
    try:
        admin = (
            accounts.authenticate(s, username, password, partial(rt.limiters.hashing.run, address))
            if username and password
            else None
        )
    except Busy:
        attempt.give_back()  # nothing was checked: it does not count as a failure
        message = i18n.gettext("login.busy")
        return _login_page(message, 429, **{"Retry-After": str(BUSY_RETRY)})
    now = utcnow()
    if admin is None:
        s.rollback()
        # Logged, not audited: anyone can fail a login, and the audit log is for admins' acts.
        log.warning("failed login for %r from %s", username, client_address())
        return _login_page(i18n.gettext("login.failed"), 401)
    admin.last_login_at = now
    audit.record(s, admin.username, "login", now, None, {}, address)
    s.commit()
    attempt.give_back()  # a success is not a failure; after the commit (one SQLite writer)
    login_session(admin)
    return redirect(safe_next(request.form.get("next")))


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    try:
        check_csrf()
    except ApiError:
        return redirect(url_for("web.overview"))
    logout_session()  # the row is deleted: a copy of the cookie is dead too
    return redirect(url_for("web.login"))


@bp.get("/lang/<code>")
def language(code: str) -> ResponseReturnValue:
    """Switch the language and remember it in a cookie for a year."""
    resp = redirect(safe_next(request.args.get("next")))
    if code in i18n.LANGUAGES:
        resp.set_cookie(
            i18n.COOKIE,
            code,
            max_age=365 * 86400,
            httponly=True,
            samesite="Lax",
            secure=secure_cookies(),
            path="/",
        )
    return resp
