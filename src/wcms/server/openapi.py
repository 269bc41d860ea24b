"""The OpenAPI 3.1 document, built from the routes themselves and their pydantic models.

Every API view carries `@documented(...)`; the document walks the app's URL map, so a route
cannot exist without appearing here (a test checks that every /api route is documented).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from flask import current_app
from pydantic import BaseModel

from wcms import __version__
from wcms.server.api.request import ID_CONVERTERS

Auth = Literal["none", "pc", "admin"]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Doc:
    summary: str
    auth: Auth
    tag: str
    body: type[BaseModel] | None = None
    ok: int = 200
    errors: tuple[int, ...] = ()
    query: dict[str, str] = field(default_factory=dict)  # name -> description


def documented(
    summary: str,
    *,
    auth: Auth,
    tag: str,
    body: type[BaseModel] | None = None,
    ok: int = 200,
    errors: tuple[int, ...] = (),
    query: dict[str, str] | None = None,
) -> Callable[[F], F]:
    def mark(fn: F) -> F:
        fn.__openapi__ = Doc(summary, auth, tag, body, ok, errors, query or {})  # type: ignore[attr-defined]
        return fn

    return mark


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "fields": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        }
    },
}

# What each status means here; every error answer has the Error body.
_ERROR_MEANINGS = {
    400: "invalid request: the body, a query parameter or a header (the message names it)",
    401: "no credentials, or ones that are invalid, expired or revoked",
    403: "not allowed: a token for another machine, a missing CSRF token, a refused PIN",
    404: "no such id (an id outside the database's range included)",
    408: "the request's headers or body did not arrive within the server's deadline",
    409: "conflicts with the current state (a name or seat taken, changed meanwhile)",
    413: "body larger than the limit (256 KiB)",
    415: "body is not application/json",
    429: "too many attempts; Retry-After says when to try again",
    503: "the database is not answering, or this address has too many open connections",
}


def errors_of(doc: Doc, has_path_params: bool) -> list[int]:
    """Every error status an operation can answer: its own plus the ones that follow from its
    shape, so the document cannot forget one (a test holds every answer to it)."""
    codes = set(doc.errors)
    codes |= {400, 408, 503}  # any request: the connection's limits, a query holding NUL
    if doc.body is not None:
        codes |= {413, 415}  # read_json_object; 400: the body is not valid for its model
    if has_path_params:
        codes.add(404)
    if doc.auth != "none":
        codes |= {401, 403}  # no or a bad credential; a CSRF failure or another PC's token
    if doc.auth == "admin":
        codes.add(404)
    return sorted(codes)


def _path(rule: str) -> tuple[str, list[dict[str, Any]]]:
    params = []
    for conv, name in re.findall(r"<(?:(\w+):)?(\w+)>", rule):
        schema: dict[str, Any] = {"type": "string"}
        if conv in ID_CONVERTERS:
            schema = {"type": "integer", "minimum": 1, "maximum": ID_CONVERTERS[conv].max_value}
        elif conv == "int":
            schema = {"type": "integer", "minimum": 0}
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
    return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule), params


def openapi_document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {"Error": _ERROR_SCHEMA}
    for rule in current_app.url_map.iter_rules():
        doc: Doc | None = getattr(current_app.view_functions[rule.endpoint], "__openapi__", None)
        if doc is None:
            continue
        path, params = _path(rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation(doc, params, schemas)
    return {
        "openapi": "3.1.0",
        "info": {"title": "WCMS", "version": __version__},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "pcToken": {"type": "http", "scheme": "bearer", "description": "PC token"},
                "apiKey": {"type": "http", "scheme": "bearer", "description": "admin API key"},
                "session": {"type": "apiKey", "in": "cookie", "name": "wcms_session"},
            },
        },
    }


def _operation(doc: Doc, params: list[dict[str, Any]], schemas: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": doc.summary, "tags": [doc.tag]}
    query = [
        {"name": n, "in": "query", "required": False, "description": d, "schema": {}}
        for n, d in doc.query.items()
    ]
    if params or query:
        op["parameters"] = params + query
    if doc.body is not None:
        ref = "#/components/schemas/{model}"
        schema = doc.body.model_json_schema(ref_template=ref)
        for name, sub in schema.pop("$defs", {}).items():
            schemas[name] = sub
        schemas[doc.body.__name__] = schema
        op["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": ref.format(model=doc.body.__name__)}}
            },
        }
    responses: dict[str, Any] = {str(doc.ok): {"description": "OK"}}
    for status in errors_of(doc, bool(params)):
        responses[str(status)] = {
            "description": _ERROR_MEANINGS.get(status, "error"),
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    op["responses"] = responses
    if doc.auth == "pc":
        op["security"] = [{"pcToken": []}]
    elif doc.auth == "admin":
        op["security"] = [{"apiKey": []}, {"session": []}]
    return op
