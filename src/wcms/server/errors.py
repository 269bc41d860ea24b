"""One error shape for every JSON answer: {"error": {"code", "message"[, "fields"]}}."""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from wcms.protocol import ErrorCode

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

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> Response | HTTPException:
        if not wants_json():
            return err
        status = err.code or 400
        code = _HTTP_CODES.get(status, ErrorCode.BAD_REQUEST)
        return error_response(status, code, err.description or err.name)

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        # The one place a genuine fault is logged with its traceback.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, ErrorCode.INTERNAL, "internal server error")
