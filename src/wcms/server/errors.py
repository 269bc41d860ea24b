"""One error shape for every JSON answer: {"error": {"code", "message"[, "fields"]}}.

The services raise domain errors (services/errors.py); this module alone maps them to HTTP
statuses (`http_status`), for Flask's handler and for the agent fast path (`error_answer`).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import ClientDisconnected, HTTPException

from wcms.protocol import ErrorCode
from wcms.server.connlimits import BodyReadError
from wcms.server.db import db_unavailable
from wcms.server.services.errors import (
    Conflict,
    DomainError,
    Forbidden,
    Invalid,
    NotFound,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    409: ErrorCode.CONFLICT,
    413: ErrorCode.TOO_LARGE,
    415: ErrorCode.BAD_REQUEST,
    429: ErrorCode.RATE_LIMITED,
}


class ApiError(Exception):
    """An expected failure of the HTTP layer itself (a body too large, a missing credential,
    a rate limit with its Retry-After), answered as a 4xx JSON error. The services raise
    domain errors instead (services/errors.py)."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        fields: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields
        self.headers = headers or {}


# The one mapping from a kind of domain error to its HTTP status.
DOMAIN_STATUS: dict[type[DomainError], int] = {
    Invalid: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    Unavailable: 503,
}


def http_status(err: DomainError | ApiError) -> int:
    """The status that answers `err`: an ApiError's own, a domain error's by its kind."""
    if isinstance(err, ApiError):
        return err.status
    for kind in type(err).__mro__:
        if kind in DOMAIN_STATUS:
            return DOMAIN_STATUS[kind]
    return 400


def error_answer(err: DomainError | ApiError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, JSON body and extra headers of an expected failure (Flask's handler and the
    agent fast path answer with this)."""
    headers = err.headers if isinstance(err, ApiError) else {}
    return http_status(err), error_body(err.code, err.message, err.fields), headers


def error_body(code: str, message: str, fields: dict[str, str] | None = None) -> dict[str, Any]:
    """The JSON of every error answer (Flask's handlers and the agent fast path)."""
    body: dict[str, Any] = {"code": str(code), "message": message}
    if fields:
        body["fields"] = fields
    return {"error": body}


DB_UNAVAILABLE_MESSAGE = "the database is not answering; try again shortly"


def unexpected_error(exc: BaseException, where: str) -> tuple[int, dict[str, Any]]:
    """The last resort (Flask's handler and the agent fast path): a database that does not
    answer is a 503 logged in one line; anything else a 500 logged with its traceback."""
    if db_unavailable(exc):
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        log.warning("database unavailable on %s: %s", where, first_line)
        return 503, error_body(ErrorCode.DATABASE_UNAVAILABLE, DB_UNAVAILABLE_MESSAGE)
    log.error("unhandled error on %s", where, exc_info=exc)
    return 500, error_body(ErrorCode.INTERNAL, "internal server error")


def unreadable_body(exc: BaseException, where: str) -> ApiError:
    """The body could not be read: the client closed mid-body (400 `client_disconnected`) or
    missed the body deadline (408, connlimits.py). One INFO line, never a traceback or a 500;
    the answer is written only if the client still listens."""
    cause = exc if isinstance(exc, BodyReadError) else (exc.__cause__ or exc.__context__)
    if isinstance(cause, BodyReadError):
        err = ApiError(cause.status, cause.code, str(cause))
    else:
        err = ApiError(400, ErrorCode.CLIENT_DISCONNECTED, "the client closed the connection")
    log.info("%s: body not read: %s", where, err.message)
    return err


def error_response(
    status: int, code: str, message: str, fields: dict[str, str] | None = None
) -> Response:
    resp = jsonify(error_body(code, message, fields))
    resp.status_code = status
    return resp


def wants_json() -> bool:
    """API paths and non-HTML clients get JSON errors; dashboard pages get HTML."""
    if request.path.startswith("/api/") or request.path in {"/healthz"}:
        return True
    best = request.accept_mimetypes.best_match(["application/json", "text/html"])
    return best == "application/json"


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    @app.errorhandler(DomainError)
    def _expected_error(err: DomainError | ApiError) -> Response:
        status, body, headers = error_answer(err)
        resp = jsonify(body)
        resp.status_code = status
        resp.headers.update(headers)
        return resp

    @app.errorhandler(ClientDisconnected)  # werkzeug's, raised from our BodyReadError
    @app.errorhandler(BodyReadError)
    def _unreadable_body(err: Exception) -> Response:
        api = unreadable_body(err, f"{request.method} {request.path}")
        return error_response(api.status, api.code, api.message)

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> Response | HTTPException:
        if not wants_json():
            return err
        status = err.code or 400
        code = _HTTP_CODES.get(status, ErrorCode.BAD_REQUEST)
        return error_response(status, code, err.description or err.name)

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        # The one place a genuine fault is logged with its traceback (a database outage: 503).
        status, body = unexpected_error(err, f"{request.method} {request.path}")
        resp = jsonify(body)
        resp.status_code = status
        return resp
