"""One error shape for every JSON answer: {"error": {"code", "message"[, "fields"]}}."""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from flask import Flask, Response, jsonify, request
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from werkzeug.exceptions import ClientDisconnected, HTTPException

from wcms.protocol import ErrorCode
from wcms.server.connlimits import BodyReadError

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


T = TypeVar("T")


class ApiError(Exception):
    """An expected failure, answered as a 4xx JSON error."""

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


def found(row: T | None, message: str) -> T:
    """`row`, or 404 with `message` when it does not exist."""
    if row is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, message)
    return row


def error_body(code: str, message: str, fields: dict[str, str] | None = None) -> dict[str, Any]:
    """The JSON of every error answer (Flask's handlers and the agent fast path)."""
    body: dict[str, Any] = {"code": str(code), "message": message}
    if fields:
        body["fields"] = fields
    return {"error": body}


DB_UNAVAILABLE_MESSAGE = "the database is not answering; try again shortly"


def db_unavailable(exc: BaseException) -> bool:
    """The database did not answer (refused, shut down, the connection dropped): the server
    answers 503 `database_unavailable`, not 500, and the caller may try again later."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


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
    def _api_error(err: ApiError) -> Response:
        resp = error_response(err.status, err.code, err.message, err.fields)
        resp.headers.update(err.headers)
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
