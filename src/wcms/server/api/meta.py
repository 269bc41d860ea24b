"""Unauthenticated endpoints: the health check and the OpenAPI document."""

from __future__ import annotations

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from wcms import __version__
from wcms.protocol import API_VERSION
from wcms.server.api.request import runtime
from wcms.server.auth import db
from wcms.server.openapi import documented, openapi_document

bp = Blueprint("meta", __name__)


@bp.get("/healthz")
@documented(
    "200 when the server and its database work, else 503", auth="none", tag="meta", errors=(503,)
)
def healthz() -> ResponseReturnValue:
    try:
        db().execute(text("SELECT 1"))
        database = "ok"
    except SQLAlchemyError as exc:
        database = f"error: {type(exc).__name__}"
    rt = runtime()
    body = {
        "status": "ok" if database == "ok" else "degraded",
        "database": database,
        "version": __version__,
        "api_version": API_VERSION,
        "presence_mode": str(rt.presence.mode),
        "buffered_heartbeats": rt.buffer.pending_count(),
        # Shutdown signals kept on disk while the database was away, not yet applied.
        "kept_shutdown_signals": rt.spool.pending,
        # Command long polls waiting in this process (tests wait on it instead of sleeping).
        "waiting_polls": rt.doorbell.waiting,
        # Shutdown signals this process wrote, and the commits they took (group commit).
        "shutdown_signals": {"signals": rt.signals.signals, "commits": rt.signals.commits},
        # Whether this process runs the background duties for all (server/lease.py).
        "leader": rt.lease.leading,
        # How this process hears of the others' changes (server/notifier.py).
        "notifier": (
            ("connected" if rt.notifier.trusted else "disconnected")
            if rt.notifier.shared
            else "in-process"
        ),
    }
    return jsonify(body), 200 if database == "ok" else 503


@bp.get("/api/openapi.json")
@documented("This document", auth="none", tag="meta")
def openapi() -> ResponseReturnValue:
    return jsonify(openapi_document())
