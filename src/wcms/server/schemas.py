"""Request shapes (pydantic): every body is validated here before a domain function sees it.

The same models feed the OpenAPI document, so the document cannot drift from the checks. No
Flask here: the services take these models; reading them from a Flask request is
api/request.py's job.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from wcms import protocol
from wcms.protocol import SHUTDOWN_REASONS, ClientEvent, ErrorCode
from wcms.server.services.errors import Invalid

# The databases' integer ranges: ids of `Integer` columns (PostgreSQL's integer) and of
# `BigInteger` ones. A number outside its column's range is refused before any query sees it.
DB_INT_MAX = 2**31 - 1
DB_BIGINT_MAX = 2**63 - 1
# No request needs more than a few levels; the JSON parser itself fails near 1,000.
MAX_JSON_DEPTH = 32

DbId = Annotated[int, Field(ge=1, le=DB_INT_MAX)]
DbBigId = Annotated[int, Field(ge=1, le=DB_BIGINT_MAX)]
Str255 = Annotated[str, Field(max_length=255)]
MachineId = Annotated[
    str,
    Field(
        min_length=protocol.MACHINE_ID_MIN_LENGTH,
        max_length=protocol.MACHINE_ID_MAX_LENGTH,
        pattern=protocol.MACHINE_ID_PATTERN,
    ),
]
Percent = Annotated[float, Field(ge=0, le=100)]
NonNegInt = Annotated[int, Field(ge=0, le=2**62)]
NonNegFloat = Annotated[float, Field(ge=0, le=1e12)]
Mac = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}$")]

# Characters no request string may carry as they are: C0 controls but tab and line breaks,
# DEL, C1 controls, and the Unicode bidirectional embeddings, overrides and isolates
# (U+202A-U+202E, U+2066-U+2069), which can make a name display as some other text.
UNSAFE_CHARS = re.compile("[\x01-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

BIDI_CONTROLS = re.compile("[\u202a-\u202e\u2066-\u2069]")
# The same characters as JSON escapes them (an even run of backslashes before is not an escape).
_BIDI_ESCAPED = re.compile(r"(?<!\\)((?:\\\\)*)\\u(?:202[a-eA-E]|206[6-9])")


def strip_bidi(text: str) -> str:
    """`text` without bidi embeddings, overrides and isolates (what is shown in the dashboard:
    strings stored before input was checked included)."""
    return BIDI_CONTROLS.sub("", text) if BIDI_CONTROLS.search(text) else text


def strip_bidi_json(text: str) -> str:
    """A JSON document without bidi controls in any of its strings, escaped or not."""
    if "\\u20" in text:
        text = _BIDI_ESCAPED.sub(r"\1", text)
    return strip_bidi(text)


class Strict(BaseModel):
    """The base of every request model: unknown fields refused, no type coercion, and every
    string checked by one validator (`_safe_strings`).

    NUL (\\x00) is refused everywhere (PostgreSQL cannot store it). Other control and bidi
    characters (UNSAFE_CHARS) are refused in what a person types (`controls = "refuse"`, the
    default: they see the 400 and fix it) and stripped from what a PC reports
    (`controls = "strip"`: a PC cannot fix its hostname, and a user naming a process with an
    override must not get the PC's reports refused). A refusal names the field (see parse).
    """

    model_config = ConfigDict(extra="forbid", strict=True)
    controls: ClassVar[Literal["refuse", "strip"]] = "refuse"

    @model_validator(mode="after")
    def _safe_strings(self) -> Self:
        # One call per model (not one per field: a heartbeat is validated thousands of times
        # a second), over the fields that can hold text.
        cls = type(self)
        names = _TEXT_FIELDS.get(cls)
        if names is None:
            names = _TEXT_FIELDS[cls] = tuple(
                n for n, f in cls.model_fields.items() if _holds_text(f.annotation)
            )
        values = self.__dict__
        for name in names:
            value = values[name]
            if value is None:
                continue
            if isinstance(value, str):
                if not _plain(value):
                    values[name] = _clean(value, cls.controls, name)
            elif isinstance(value, list):
                if value and isinstance(value[0], str) and not _plain(" ".join(value)):
                    values[name] = [_clean(v, cls.controls, name) for v in value]
            elif isinstance(value, dict):
                _refuse_nul_within(value, name)
        return self


_TEXT_FIELDS: dict[type[BaseModel], tuple[str, ...]] = {}
_ASCII_UNSAFE = bytes([*range(0, 9), 11, 12, *range(14, 32), 127])
_NUL = "must not contain NUL (\\x00) characters"
_CONTROL = "must not contain control or bidirectional-override characters"


def _holds_text(annotation: Any) -> bool:
    """Whether a field of this type can hold a string (str, list[str], a dict, Any...)."""
    if annotation is str or annotation is Any:
        return True
    if isinstance(annotation, type):
        return issubclass(annotation, dict | list)  # unparametrised: may hold text
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        return False  # one of a few fixed values
    return any(_holds_text(a) for a in args if not isinstance(a, FieldInfo))


def _plain(text: str) -> bool:
    """No NUL and none of UNSAFE_CHARS in `text` (cheap for ASCII: no regex)."""
    if text.isascii():
        raw = text.encode()
        return len(raw.translate(None, _ASCII_UNSAFE)) == len(raw)
    return "\x00" not in text and UNSAFE_CHARS.search(text) is None


def _clean(text: str, controls: str, field: str) -> str:
    if "\x00" in text:
        raise PydanticCustomError("nul_character", _NUL, {"field": field})
    if controls == "strip":
        return UNSAFE_CHARS.sub("", text)
    if UNSAFE_CHARS.search(text) is None:
        return text
    raise PydanticCustomError("control_character", _CONTROL, {"field": field})


def _refuse_nul_within(value: Any, field: str) -> None:
    """A free-form object (a command's `args`): NUL nowhere in its keys or strings. Its other
    characters are checked by the model the object is validated with next."""
    if isinstance(value, str):
        if "\x00" in value:
            raise PydanticCustomError("nul_character", _NUL, {"field": field})
    elif isinstance(value, dict):
        for k, v in value.items():
            _refuse_nul_within(k, field)
            _refuse_nul_within(v, field)
    elif isinstance(value, list):
        for v in value:
            _refuse_nul_within(v, field)


class PcReport(Strict):
    """What a PC reports: unsafe characters are stripped, not refused (see Strict)."""

    controls = "strip"


class Disk(PcReport):
    mount: Str255
    fstype: Annotated[str, Field(max_length=64)] = ""
    total: NonNegInt
    used: NonNegInt


class Hardware(PcReport):
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


class RegisterRequest(PcReport):
    pin: Annotated[str, Field(pattern=protocol.PIN_PATTERN)]
    machine_id: MachineId
    hostname: Annotated[str, Field(min_length=1, max_length=255)]
    client_version: Annotated[str, Field(max_length=32)] | None = None
    hardware: Hardware = Hardware()


class HeartbeatRequest(PcReport):
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


class ShutdownRequest(PcReport):
    machine_id: MachineId
    reason: Literal["shutdown", "restart", "sleep", "agent_stopped"] = "shutdown"


class PollQuery(BaseModel):
    """Query parameters arrive as strings, so this model converts (it is not Strict)."""

    model_config = ConfigDict(extra="forbid")
    machine_id: MachineId
    timeout: Annotated[float, Field(ge=0, le=3600)] | None = None
    boot_time: Annotated[float, Field(ge=0, le=1e11)] | None = None


M = TypeVar("M", bound=BaseModel)


def json_object(raw: bytes) -> dict[str, Any]:
    """`raw` as a JSON object nested at most MAX_JSON_DEPTH deep, or a 400 saying why.

    The one JSON reader of request bodies (api/request.py's read_json_object and the agent
    fast path).
    """
    try:
        data = json.loads(raw)
    except RecursionError:  # the parser's own limit, near 1,000 levels
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Invalid(f"body is not valid JSON: {exc}", code=ErrorCode.INVALID_JSON) from None
    if not isinstance(data, dict):
        raise Invalid("body must be a JSON object", code=ErrorCode.INVALID_JSON)
    # Cheap first: a body with few brackets cannot be deep (every heartbeat is such a body).
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth(data) > MAX_JSON_DEPTH:
        raise _too_deep()
    return data


def _too_deep() -> Invalid:
    return Invalid(f"body nested deeper than {MAX_JSON_DEPTH}", code=ErrorCode.INVALID_JSON)


def _depth(data: Any) -> int:
    """How deep arrays and objects nest in `data` (1: a flat object), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > MAX_JSON_DEPTH:
            break
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, level + 1) for c in children if isinstance(c, dict | list))
    return deepest


def parse(model: type[M], data: Any) -> M:
    """Validate `data` against `model`; errors name every bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields: dict[str, str] = {}
        for err in exc.errors(include_url=False, include_input=False):
            loc = err["loc"]
            if err["type"] in ("nul_character", "control_character"):  # Strict's own check
                loc = (*loc, err["ctx"]["field"])
            where = ".".join(str(p) for p in loc) or "body"
            fields.setdefault(where, err["msg"])
        first = next(iter(fields.items()))
        message = f"{first[0]}: {first[1]}"
        if len(fields) > 1:
            message += f" (and {len(fields) - 1} more)"
        raise Invalid(message, fields=fields) from None
