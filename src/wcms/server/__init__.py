"""The WCMS server: `create_app()` builds the Flask application."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from flask import Flask, Request, Response, g
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from werkzeug.middleware.proxy_fix import ProxyFix

from wcms.protocol import MAX_BODY_BYTES
from wcms.server import migrate
from wcms.server.config import Settings, ensure_secret_key, load_settings
from wcms.server.db import make_engine, make_sessionmaker
from wcms.server.errors import register_error_handlers
from wcms.server.fastpath import AgentFastPath
from wcms.server.runtime import Runtime
from wcms.server.services.heartbeats import HeartbeatBuffer

log = logging.getLogger(__name__)


def create_app(config: dict[str, Any] | Settings | None = None) -> Flask:
    """Build the app: defaults, then WCMS_* variables, then `config` (a mapping or Settings)."""
    settings = config if isinstance(config, Settings) else load_settings(config)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = Flask(__name__, static_folder="web/static", template_folder="web/templates")
    secret = ensure_secret_key(settings)
    app.config.update(
        SECRET_KEY=secret,
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_NAME="wcms_session",
        PERMANENT_SESSION_LIFETIME=dt.timedelta(hours=12),
    )
    app.session_interface = _CookieSessions()
    app.json.sort_keys = False  # type: ignore[attr-defined]  # answers keep their order; cheaper
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
    rt.load_mode()
    app.extensions["wcms"] = rt
    register_error_handlers(app)
    _register_blueprints(app)
    if settings.agent_fast_path:
        app.wsgi_app = AgentFastPath(app.wsgi_app, rt)  # type: ignore[method-assign]

    @app.teardown_appcontext
    def _close_session(_exc: BaseException | None) -> None:
        session = g.pop("db", None)
        if session is not None:
            session.close()

    @app.after_request
    def _security_headers(resp: Response) -> Response:
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        return resp

    if settings.background:
        rt.start_background()
    return app


class _CookieSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, minus the signer set-up for requests without a cookie
    (every agent call): a measurable share of a heartbeat's CPU."""

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if not request.cookies.get(self.get_cookie_name(app)):
            return self.session_class()
        return super().open_session(app, request)


def _register_blueprints(app: Flask) -> None:
    from wcms.server.api import admin, client, commands, meta
    from wcms.server.api.install import register_install

    app.register_blueprint(meta.bp)
    app.register_blueprint(client.bp)
    app.register_blueprint(admin.bp)
    from wcms.server.api import admins, events, rooms
    from wcms.server.web import views as web_views

    app.register_blueprint(rooms.bp)
    app.register_blueprint(admins.bp)
    app.register_blueprint(events.bp)
    app.register_blueprint(web_views.bp)
    app.register_blueprint(commands.client_bp)
    app.register_blueprint(commands.bp)
    register_install(app)
