"""The WCMS server: `create_app()` builds the Flask application."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Request, Response, g, request
from flask.json.provider import DefaultJSONProvider
from flask.sessions import NullSession, SessionInterface, SessionMixin
from werkzeug.middleware.proxy_fix import ProxyFix

from wcms.protocol import MAX_BODY_BYTES, ErrorCode
from wcms.server import migrate
from wcms.server.api.request import ID_CONVERTERS
from wcms.server.config import Settings, ensure_secret_key, load_settings, prepare_data_dir
from wcms.server.db import make_engine, make_sessionmaker
from wcms.server.errors import ApiError, register_error_handlers
from wcms.server.fastpath import AgentFastPath
from wcms.server.headers import security_headers
from wcms.server.runtime import Runtime
from wcms.server.schemas import BIDI_CONTROLS, strip_bidi, strip_bidi_json
from wcms.server.services import accounts as account_rules
from wcms.server.services import secretbox
from wcms.server.services.heartbeats import HeartbeatBuffer

log = logging.getLogger(__name__)


def create_app(config: dict[str, Any] | Settings | None = None) -> Flask:
    """Build the app: defaults, then WCMS_* variables, then `config` (a mapping or Settings)."""
    settings = config if isinstance(config, Settings) else load_settings(config)
    prepare_data_dir(settings)
    account_rules.configure_hashing(settings)
    app = Flask(__name__, static_folder="web/static", template_folder="web/templates")
    secret = ensure_secret_key(settings)
    app.config.update(
        SECRET_KEY=secret,
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
    )
    app.session_interface = _NoFlaskSessions()
    app.json = _Json(app)
    app.jinja_env.finalize = _displayed  # every {{ value }} of every page
    if settings.trusted_proxies:
        # The one place forwarded headers are trusted (gunicorn's own trust is off: runner.py).
        hops = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]
    engine = make_engine(settings.sqlalchemy_url)
    if not migrate.is_current(engine):
        raise RuntimeError("the database schema is not current: run `wcms db upgrade` first")
    rt = Runtime(
        settings=settings,
        secret_key=secret,
        engine=engine,
        sessions=make_sessionmaker(engine),
        buffer=HeartbeatBuffer(settings.metrics_sample_interval),
    )
    try:
        with rt.sessions() as s:
            secretbox.agree_on_secret(s, secret)
    except secretbox.SecretMismatch:
        engine.dispose()  # refused: nothing of this app stays open
        raise
    rt.load_mode()
    app.extensions["wcms"] = rt
    register_error_handlers(app)
    app.url_map.converters.update(ID_CONVERTERS)  # <id:...>, <bigid:...>, <int:...>: in range
    app.before_request(_refuse_nul_in_query)
    _register_blueprints(app)
    if settings.agent_fast_path:
        app.wsgi_app = AgentFastPath(app.wsgi_app, rt)  # type: ignore[method-assign]

    @app.after_request
    def _commit_request(resp: Response) -> Response:
        # The transaction rule (docs/ARCHITECTURE.md): the request commits what its services
        # flushed when it succeeds; a refused or failed request is rolled back at teardown.
        session = g.get("db")
        if session is not None and resp.status_code < 400:
            session.commit()
        return resp

    @app.teardown_appcontext
    def _close_session(_exc: BaseException | None) -> None:
        session = g.pop("db", None)
        if session is not None:
            session.close()

    headers = security_headers(settings)  # the fast path writes the same (headers.py)

    @app.after_request
    def _security_headers(resp: Response) -> Response:
        for name, value in headers:
            resp.headers.setdefault(name, value)
        return resp

    if settings.background:
        rt.start_background()
    return app


class _Json(DefaultJSONProvider):
    """Flask's JSON with two changes: answers keep their keys' order (cheaper), and no string
    in an answer carries bidi controls, so a PC string stored before input was checked cannot
    spoof the dashboard's text either (input strips or refuses them: schemas.Strict)."""

    sort_keys = False

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return strip_bidi_json(super().dumps(obj, **kwargs))


def _displayed(value: Any) -> Any:
    """What a template shows: strings without bidi controls, markup kept markup."""
    if isinstance(value, str) and BIDI_CONTROLS.search(value):
        return type(value)(strip_bidi(value))
    return value


def _refuse_nul_in_query() -> None:
    """No query parameter (name or value) may hold NUL: PostgreSQL cannot store or compare it."""
    if b"%00" in request.query_string or b"\x00" in request.query_string:
        for name, value in request.args.items(multi=True):
            if "\x00" in name or "\x00" in value:
                field = name.replace("\x00", "\\x00")
                message = "must not contain NUL (\\x00) characters"
                raise ApiError(400, ErrorCode.VALIDATION, f"{field}: {message}", {field: message})


class _NoFlaskSessions(SessionInterface):
    """Flask's own (signed-cookie) session is not used: dashboard sessions live on the server
    (admin_sessions, see auth.py) and their cookie holds only a random id. Every request gets
    Flask's read-only null session, which also keeps a signer off every agent call."""

    def open_session(self, app: Flask, request: Request) -> NullSession:
        return self.make_null_session(app)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        return None


def _register_blueprints(app: Flask) -> None:
    from wcms.server.api import client, commands, management, meta
    from wcms.server.api.install import register_install

    app.register_blueprint(meta.bp)
    app.register_blueprint(client.bp)
    app.register_blueprint(management.bp)
    from wcms.server.api import accounts, events, rooms
    from wcms.server.web import pages

    app.register_blueprint(rooms.bp)
    app.register_blueprint(accounts.bp)
    app.register_blueprint(events.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(commands.client_bp)
    app.register_blueprint(commands.bp)
    register_install(app)
