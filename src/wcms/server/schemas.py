"""Request shapes (pydantic): every body is validated here before a domain function sees it.

The same models feed the OpenAPI document, so the document cannot drift from the checks.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from flask import request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wcms.protocol import MAX_BODY_BYTES, SHUTDOWN_REASONS, ClientEvent, ErrorCode
from wcms.server.errors import ApiError

Str255 = Annotated[str, Field(max_length=255)]
MachineId = Annotated[str, Field(min_length=8, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]
Percent = Annotated[float, Field(ge=0, le=100)]
NonNegInt = Annotated[int, Field(ge=0, le=2**62)]
NonNegFloat = Annotated[float, Field(ge=0, le=1e12)]
Mac = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Disk(Strict):
    mount: Str255
    fstype: Annotated[str, Field(max_length=64)] = ""
    total: NonNegInt
    used: NonNegInt


class Hardware(Strict):
    os_name: Str255 | None = None
    os_version: Str255 | None = None
    os_edition: Str255 | None = None
    cpu_model: Str255 | None = None
    cpu_cores: Annotated[int, Field(ge=1, le=4096)] | None = None
    cpu_threads: Annotated[int, Field(ge=1, le=8192)] | None = None
    ram_total: NonNegInt | None = None
    mac_addresses: Annotated[list[Mac], Field(max_length=64)] = []
    ip_address: Annotated[str, Field(max_length=64)] | None = None
    disks: Annotated[list[Disk], Field(max_length=64)] = []


class RegisterRequest(Strict):
    pin: Annotated[str, Field(pattern=r"^[0-9]{6}$")]
    machine_id: MachineId
    hostname: Annotated[str, Field(min_length=1, max_length=255)]
    client_version: Annotated[str, Field(max_length=32)] | None = None
    hardware: Hardware = Hardware()


class HeartbeatRequest(Strict):
    machine_id: MachineId
    event: Annotated[ClientEvent, Field(strict=False)] | None = None
    hostname: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    ip_address: Annotated[str, Field(max_length=64)] | None = None
    current_user: Str255 | None = None
    client_version: Annotated[str, Field(max_length=32)] | None = None
    cpu_percent: Percent | None = None
    ram_percent: Percent | None = None
    ram_used: NonNegInt | None = None
    ram_total: NonNegInt | None = None
    uptime: NonNegFloat | None = None
    boot_time: NonNegFloat | None = None
    disks: Annotated[list[Disk], Field(max_length=64)] | None = None
    processes: Annotated[list[Str255], Field(max_length=2000)] | None = None
    hardware: Hardware | None = None  # the client sends it with its boot heartbeat


# Keep the literal above in step with the protocol's set.
assert {"shutdown", "restart", "sleep", "agent_stopped"} == set(SHUTDOWN_REASONS)


class ShutdownRequest(Strict):
    machine_id: MachineId
    reason: Literal["shutdown", "restart", "sleep", "agent_stopped"] = "shutdown"


M = TypeVar("M", bound=BaseModel)


def read_json_object() -> dict[str, Any]:
    """The request body as a JSON object, or an ApiError that says what is wrong with it."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, ErrorCode.TOO_LARGE, f"body larger than {MAX_BODY_BYTES} bytes")
    if not request.is_json:
        raise ApiError(415, ErrorCode.INVALID_JSON, "Content-Type must be application/json")
    raw = request.get_data(cache=True)
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, ErrorCode.TOO_LARGE, f"body larger than {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, ErrorCode.INVALID_JSON, f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, ErrorCode.INVALID_JSON, "body must be a JSON object")
    return data


def parse(model: type[M], data: Any) -> M:
    """Validate `data` against `model`; errors name every bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields: dict[str, str] = {}
        for err in exc.errors(include_url=False, include_input=False):
            where = ".".join(str(p) for p in err["loc"]) or "body"
            fields.setdefault(where, err["msg"])
        first = next(iter(fields.items()))
        message = f"{first[0]}: {first[1]}"
        if len(fields) > 1:
            message += f" (and {len(fields) - 1} more)"
        raise ApiError(400, ErrorCode.VALIDATION, message, fields) from None


def parse_body(model: type[M]) -> M:
    return parse(model, read_json_object())


def query_int(name: str, default: int, lo: int, hi: int) -> int:
    """A whole-number query parameter within [lo, hi], or 400 naming it."""
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise ApiError(400, ErrorCode.VALIDATION, f"{name}: a whole number from {lo} to {hi}")
    return value
