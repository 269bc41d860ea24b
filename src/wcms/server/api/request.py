"""Reading a Flask request: its body as a validated model, its query parameters, its route ids,
and the process's Runtime. The models themselves (no Flask) are in schemas.py."""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from flask import current_app, request
from pydantic import BaseModel
from werkzeug.exceptions import NotFound
from werkzeug.routing import IntegerConverter

from wcms.protocol import MAX_BODY_BYTES, ErrorCode
from wcms.server.errors import ApiError
from wcms.server.runtime import Runtime
from wcms.server.schemas import DB_BIGINT_MAX, DB_INT_MAX, json_object, parse
from wcms.server.services.errors import Invalid

M = TypeVar("M", bound=BaseModel)


def runtime() -> Runtime:
    """The app's Runtime (create_app put it in the app's extensions)."""
    rt: Runtime = current_app.extensions["wcms"]
    return rt


def read_json_object() -> dict[str, Any]:
    """The request body as a JSON object, or an ApiError that says what is wrong with it."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, ErrorCode.TOO_LARGE, f"body larger than {MAX_BODY_BYTES} bytes")
    if not request.is_json:
        raise ApiError(415, ErrorCode.INVALID_JSON, "Content-Type must be application/json")
    raw = request.get_data(cache=True)
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, ErrorCode.TOO_LARGE, f"body larger than {MAX_BODY_BYTES} bytes")
    return json_object(raw)


def parse_body(model: type[M]) -> M:
    """The request body validated against `model` (400 naming every bad field)."""
    return parse(model, read_json_object())


def query_int(name: str, default: int, lo: int, hi: int) -> int:
    """A whole-number query parameter within [lo, hi], or 400 naming it.

    `hi` never exceeds the database's integer range: the value may be compared with a column.
    """
    hi = min(hi, DB_INT_MAX)
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw) if len(raw) <= 12 else lo - 1
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise Invalid(f"{name}: a whole number from {lo} to {hi}")
    return value


class IdConverter(IntegerConverter):
    """`<id:name>` in a route: a row id within the database's integer range (1 to 2^31-1).

    A number outside it (or 0) is a 404 like any unknown id, for every method, and never
    reaches a query whose database would refuse it. (Werkzeug's own min/max would make it a
    "no match", which becomes a 405 wherever another method serves the same path.)
    """

    regex = "[0-9]+"  # ASCII digits only (Python's int() would take any script's)
    max_value: ClassVar[int] = DB_INT_MAX

    def to_python(self, value: str) -> int:
        # Count digits first: int() of a 5,000-digit string raises.
        if len(value) > len(str(self.max_value)) or not 1 <= int(value) <= self.max_value:
            shown = value if len(value) <= 24 else value[:20] + "..."
            raise NotFound(f"no such id: {shown} (ids are 1 to {self.max_value})")
        return int(value)


class BigIdConverter(IdConverter):
    """`<bigid:name>`: the id of a BigInteger column (commands), 1 to 2^63-1."""

    max_value: ClassVar[int] = DB_BIGINT_MAX


# Registered in create_app. `int` is bounded too, so a route written with Flask's usual
# `<int:...>` cannot reach the database with an id out of range either.
ID_CONVERTERS: dict[str, type[IdConverter]] = {
    "id": IdConverter,
    "bigid": BigIdConverter,
    "int": IdConverter,
}
