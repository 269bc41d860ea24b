"""The wire contract shared by the server and the client: versions, enums, limits, presets.

Server and client are built from one commit, so they agree on this module by construction.
Nothing here imports Flask, SQLAlchemy or pywin32: the Windows client bundle ships it as is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum

API_VERSION = 1
CLIENT_PREFIX = "/api/client"

# The seed's constant: the whole shutdown report (DNS, connect, send, read) gets this long.
SHUTDOWN_TIMEOUT = 2.0

TOKEN_PREFIX_PC = "wcms_pc_"
TOKEN_PREFIX_APIKEY = "wcms_ak_"
PIN_LENGTH = 6

# Request bodies larger than this are refused with 413 before they are parsed.
MAX_BODY_BYTES = 256 * 1024


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
    DATABASE_UNAVAILABLE = "database_unavailable"  # 503: the database does not answer
    CLIENT_DISCONNECTED = "client_disconnected"  # 400: the client closed mid-body
    REQUEST_TIMEOUT = "request_timeout"  # 408: headers or body missed their deadline
    TOO_MANY_CONNECTIONS = "too_many_connections"  # 503: over the per-address cap
    INTERNAL = "internal_error"
