"""The wire contract shared by the server and the client: versions, enums, limits, presets.

Server and client are built from one commit, so they agree on this module by construction.
Nothing here imports Flask, SQLAlchemy or pywin32: the Windows client bundle ships it as is.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

API_VERSION = 1
CLIENT_PREFIX = "/api/client"

# The seed's constant: the whole shutdown report (DNS, connect, send, read) gets this long.
SHUTDOWN_TIMEOUT = 2.0

TOKEN_PREFIX_PC = "wcms_pc_"
TOKEN_PREFIX_APIKEY = "wcms_ak_"
PIN_LENGTH = 6
PIN_PATTERN = rf"^[0-9]{{{PIN_LENGTH}}}$"

# What a PC may call itself: a SMBIOS UUID, /etc/machine-id, or an operator's override.
MACHINE_ID_MIN_LENGTH = 8
MACHINE_ID_MAX_LENGTH = 128
MACHINE_ID_CHARS = "A-Za-z0-9._:-"
MACHINE_ID_PATTERN = rf"^[{MACHINE_ID_CHARS}]{{{MACHINE_ID_MIN_LENGTH},{MACHINE_ID_MAX_LENGTH}}}$"

# Request bodies larger than this are refused with 413 before they are parsed.
MAX_BODY_BYTES = 256 * 1024


def is_pin(value: str) -> bool:
    return re.fullmatch(PIN_PATTERN, value) is not None


def is_machine_id(value: str) -> bool:
    return re.fullmatch(MACHINE_ID_PATTERN, value) is not None


def wire_time(value: dt.datetime) -> str:
    """A time as every message on the wire carries it (REST, live feed): ISO 8601 UTC with Z.

    A naive datetime is taken as UTC (what the database gives back on PostgreSQL).
    """
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    elif value.utcoffset():
        value = value.astimezone(dt.UTC)
    return value.isoformat().replace("+00:00", "Z")


class PcState(StrEnum):
    """What the server stores about a PC's presence; the display status is derived."""

    ONLINE = "online"
    OFFLINE = "offline"


class PowerReason(StrEnum):
    """Why a PC's state last changed; one power event row per change carries one of these."""

    REGISTERED = "registered"  # first contact, with a PIN
    BOOT = "boot"  # back after a shutdown, a restart or a crash
    RESUME = "resume"  # back from sleep or hibernation
    RECONNECTED = "reconnected"  # contact again after a loss, without a reboot
    SHUTDOWN = "shutdown"  # the OS is powering off (PreShutdown / logind)
    RESTART = "restart"  # the OS is rebooting
    SLEEP = "sleep"  # the OS is suspending or hibernating
    AGENT_STOPPED = "agent_stopped"  # the client service was stopped, the PC stays on
    LOST = "lost"  # no contact before the deadline (cable pulled, crash, power cut)


# Reasons a client may give in POST /api/client/shutdown.
SHUTDOWN_REASONS = frozenset(
    {PowerReason.SHUTDOWN, PowerReason.RESTART, PowerReason.SLEEP, PowerReason.AGENT_STOPPED}
)


class ClientEvent(StrEnum):
    """Events a client may attach to a heartbeat, reported the moment they happen."""

    BOOT = "boot"  # the client started with the OS
    RESUME = "resume"  # the OS woke from sleep
    LOGON = "logon"
    LOGOFF = "logoff"


# After a PC sent the shutdown signal (any of SHUTDOWN_REASONS), the agent that sent it has
# ended or is asleep, so only a heartbeat carrying one of these brings the PC back online. A
# poll or plain heartbeat that agent had in flight as it signed off is late, not a return: the
# server answers it 409 `signed_off`, and the PC stays off.
COMEBACK_EVENTS = frozenset({ClientEvent.BOOT, ClientEvent.RESUME})


class DisplayStatus(StrEnum):
    """What the dashboard shows, derived from (state, reason)."""

    ONLINE = "online"
    OFF = "off"  # offline after a clean shutdown
    RESTARTING = "restarting"
    ASLEEP = "asleep"
    LOST = "lost"
    STOPPED = "stopped"  # the client service was stopped


@functools.cache  # a handful of (state, reason) pairs; PC lists ask thousands of times
def display_status(state: str, reason: str | None) -> DisplayStatus:
    """Derive the status a person sees from the stored state and reason."""
    if state == PcState.ONLINE:
        return DisplayStatus.ONLINE
    return _OFFLINE_STATUS.get(reason or "", DisplayStatus.OFF)


_OFFLINE_STATUS: dict[str, DisplayStatus] = {
    PowerReason.RESTART: DisplayStatus.RESTARTING,
    PowerReason.SLEEP: DisplayStatus.ASLEEP,
    PowerReason.LOST: DisplayStatus.LOST,
    PowerReason.AGENT_STOPPED: DisplayStatus.STOPPED,
}


class PresenceMode(StrEnum):
    FAST = "fast"
    STANDARD = "standard"
    CONSERVATIVE = "conservative"


@dataclass(frozen=True)
class PresenceTiming:
    """Intervals in seconds. A loss shows within offline_after + check_interval of last contact.

    The client never waits longer than heartbeat_interval between heartbeats (its jitter only
    shortens the wait), so offline_after > heartbeat_interval + network slack means a healthy PC
    never flaps offline between heartbeats (the original's 0.7.0 did).
    """

    heartbeat_interval: float
    poll_timeout: float
    offline_after: float
    check_interval: float

    def as_wire(self) -> dict[str, float]:
        return {
            "heartbeat_interval": self.heartbeat_interval,
            "poll_timeout": self.poll_timeout,
            "offline_after": self.offline_after,
        }


PRESETS: dict[PresenceMode, PresenceTiming] = {
    # Loss visible within 13 s.
    PresenceMode.FAST: PresenceTiming(5, 5, 12, 1),
    # The default. Loss visible within 40 s.
    PresenceMode.STANDARD: PresenceTiming(15, 15, 35, 5),
    # The seed's choice: a 5-minute heartbeat, minimum server load (a command poll is renewed
    # every 2 minutes: 5,000 idle PCs cost under a tenth of a core). Loss visible within 6 min.
    PresenceMode.CONSERVATIVE: PresenceTiming(300, 120, 330, 30),
}


class CommandType(StrEnum):
    SHUTDOWN = "shutdown"
    RESTART = "restart"
    LOGOFF = "logoff"
    MESSAGE = "message"
    RUN = "run"
    INSTALL = "install"
    UNINSTALL = "uninstall"
    KILL = "kill"
    ACCOUNT_CREATE = "account_create"
    ACCOUNT_DELETE = "account_delete"
    ACCOUNT_PASSWORD = "account_password"
    LOCK = "lock"


POWER_COMMANDS = frozenset({CommandType.SHUTDOWN, CommandType.RESTART, CommandType.LOGOFF})

# Commands whose content is confidential or that manage the PC's accounts: `run` (its command
# line may hold credentials and it runs arbitrary code) and every account command (passwords,
# account names). The server queues them only for approved PCs and hands them over only to a
# poll whose token it has just re-checked in the database (docs/API.md, "Approval").
SECRET_COMMANDS = frozenset(
    {
        CommandType.RUN,
        CommandType.ACCOUNT_CREATE,
        CommandType.ACCOUNT_DELETE,
        CommandType.ACCOUNT_PASSWORD,
    }
)


# Commands about the boot they were queued in: queued before the PC's current boot, they expire
# instead of shutting down (or locking) a machine someone has just switched on.
STALE_ON_BOOT = POWER_COMMANDS | {CommandType.LOCK}
BOOT_SLACK = 5.0  # seconds of clock disagreement tolerated by the "booted since" check


def stale_on_boot(
    kind: str, run_when_online: bool, queued_ago: float, up_for: float | None
) -> bool:
    """Whether a command queued `queued_ago` s ago must not run on a PC up for `up_for` s.

    The server asks with its clock (now minus the boot time the poll gave), the client with
    its uptime and the age the server sent: the same rule from either side.
    """
    if kind not in STALE_ON_BOOT or run_when_online or up_for is None:
        return False
    return queued_ago > up_for + BOOT_SLACK


# ---------------------------------------------------------------------------- command arguments


@dataclass(frozen=True)
class ArgSpec:
    """One argument of a command: its JSON type and limits.

    The server builds its request models from these (a 400 names the field); the client checks
    what it receives against the same specs before it runs anything (args_problem).
    """

    type: type[str] | type[int]
    required: bool = False
    default: int | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    ge: int | None = None
    le: int | None = None
    description: str | None = None


NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"
_USERNAME = ArgSpec(
    str,
    required=True,
    min_length=1,
    max_length=20,
    pattern=r"^[A-Za-z_](?:[A-Za-z0-9_.-]{0,18}[A-Za-z0-9_-])?$",
    description="a local account: letters, digits, _ . -; at most 20 (Windows' limit)",
)
_PASSWORD = ArgSpec(str, required=True, min_length=1, max_length=127, pattern=NO_CONTROL)
_PACKAGE = ArgSpec(
    str,
    required=True,
    max_length=128,
    pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$",
    description="a winget / Chocolatey / apt package id, e.g. Mozilla.Firefox or vlc",
)
_POWER = {
    "delay": ArgSpec(int, default=0, ge=0, le=86400, description="seconds before it happens"),
    "message": ArgSpec(str, max_length=500, pattern=NO_CONTROL),
}

COMMAND_ARGS: dict[CommandType, dict[str, ArgSpec]] = {
    CommandType.SHUTDOWN: _POWER,
    CommandType.RESTART: _POWER,
    CommandType.LOGOFF: {},
    CommandType.LOCK: {},
    CommandType.MESSAGE: {
        "text": ArgSpec(str, required=True, min_length=1, max_length=1000),
        "title": ArgSpec(str, max_length=100, pattern=NO_CONTROL),
    },
    CommandType.RUN: {
        "command": ArgSpec(str, required=True, min_length=1, max_length=8000),
        "timeout": ArgSpec(int, default=300, ge=1, le=3600),
    },
    CommandType.INSTALL: {"package": _PACKAGE},
    CommandType.UNINSTALL: {"package": _PACKAGE},
    CommandType.KILL: {
        "name": ArgSpec(str, min_length=1, max_length=255, pattern=r'^[^\\/:*?"<>|\x00-\x1f]+$'),
        "pid": ArgSpec(int, ge=2, le=2**31 - 1),
    },
    CommandType.ACCOUNT_CREATE: {
        "username": _USERNAME,
        "password": _PASSWORD,
        "full_name": ArgSpec(str, max_length=100, pattern=NO_CONTROL),
        # Windows display language, e.g. ko-KR
        "language": ArgSpec(str, pattern=r"^[a-z]{2,3}(-[A-Z][a-z]{3})?(-(?:[A-Z]{2}|[0-9]{3}))?$"),
    },
    CommandType.ACCOUNT_DELETE: {"username": _USERNAME},
    CommandType.ACCOUNT_PASSWORD: {"username": _USERNAME, "password": _PASSWORD},
}

# Arguments sealed at rest and shown as "***" everywhere but on the wire to their PC.
SECRET_ARGS = frozenset({"password"})

RESERVED_USERS = frozenset(
    {
        "root",
        "administrator",
        "administrators",
        "guest",
        "defaultaccount",
        "wdagutilityaccount",
        "system",
        "daemon",
        "bin",
        "sys",
        "sync",
        "nobody",
        "sshd",
        "www-data",
    }
)


def args_rule_problem(kind: CommandType, args: Mapping[str, Any]) -> str | None:
    """What breaks a rule across the arguments (beyond each one's spec), or None."""
    if kind is CommandType.KILL and (args.get("name") is None) == (args.get("pid") is None):
        return "give exactly one of name (a process name) or pid"
    username = args.get("username")
    if isinstance(username, str) and username.lower() in RESERVED_USERS:
        return f"{username!r} is a built-in account and cannot be managed"
    return None


def args_problem(kind: CommandType, args: Mapping[str, Any]) -> str | None:
    """What is wrong with `args` for `kind` by the specs and the rules above, or None."""
    specs = COMMAND_ARGS[kind]
    for name, value in args.items():
        spec = specs.get(name)
        if spec is None:
            return f"{name} is not an argument of {kind}"
        if value is not None:
            problem = _value_problem(spec, value)
            if problem is not None:
                return f"{name} {problem}"
    for name, spec in specs.items():
        if spec.required and args.get(name) is None:
            return f"{name} is missing"
    return args_rule_problem(kind, args)


def _value_problem(spec: ArgSpec, value: Any) -> str | None:
    if spec.type is int:
        if not isinstance(value, int) or isinstance(value, bool):
            return "is not a whole number"
        if (spec.ge is not None and value < spec.ge) or (spec.le is not None and value > spec.le):
            return f"is not between {spec.ge} and {spec.le}"
        return None
    if not isinstance(value, str):
        return "is not a string"
    if spec.min_length is not None and len(value) < spec.min_length:
        return f"is shorter than {spec.min_length}"
    if spec.max_length is not None and len(value) > spec.max_length:
        return f"is longer than {spec.max_length}"
    if spec.pattern is not None and re.fullmatch(spec.pattern, value) is None:
        return f"{value[:40]!r} has characters or a form that is not allowed"
    return None


class CommandStatus(StrEnum):
    QUEUED = "queued"
    DELIVERED = "delivered"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


FINAL_COMMAND_STATUSES = frozenset(
    {CommandStatus.SUCCEEDED, CommandStatus.FAILED, CommandStatus.EXPIRED, CommandStatus.CANCELLED}
)

# Caps on what a client sends back; larger output is truncated by the client and the server.
MAX_OUTPUT_CHARS = 64 * 1024


class ErrorCode(StrEnum):
    """The `code` of every JSON error body: {"error": {"code": ..., "message": ...}}."""

    BAD_REQUEST = "bad_request"
    INVALID_JSON = "invalid_json"
    VALIDATION = "validation_error"
    TOO_LARGE = "payload_too_large"
    UNAUTHORIZED = "unauthorized"
    INVALID_TOKEN = "invalid_token"
    MACHINE_MISMATCH = "machine_mismatch"
    FORBIDDEN = "forbidden"
    CSRF = "csrf_failed"
    INVALID_PIN = "invalid_pin"
    RATE_LIMITED = "rate_limited"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CONFLICT = "conflict"
    MACHINE_REGISTERED = "machine_registered"  # re-registration needs the token or an admin
    SIGNED_OFF = "signed_off"  # 409: this PC said it was going; boot or resume brings it back
    DATABASE_UNAVAILABLE = "database_unavailable"  # 503: the database does not answer
    CLIENT_DISCONNECTED = "client_disconnected"  # 400: the client closed mid-body
    REQUEST_TIMEOUT = "request_timeout"  # 408: headers or body missed their deadline
    TOO_MANY_CONNECTIONS = "too_many_connections"  # 503: over the per-address cap
    INTERNAL = "internal_error"
