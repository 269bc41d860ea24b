"""What each command type accepts: one strict model per type, validated before anything is queued.

The same limits bind the client (it re-checks what it receives), so a bad argument is refused
with a 400 naming the field instead of failing on 300 PCs.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import BaseModel, Field, model_validator

from wcms.protocol import POWER_COMMANDS, CommandType, ErrorCode
from wcms.server.errors import ApiError
from wcms.server.schemas import Strict, parse

# Secret arguments: sealed at rest, replaced by "***" in every view and in the audit log.
SECRET_ARGS = frozenset({"password"})
REDACTED = "***"

# Expiry: a shutdown is about now; "when it next comes online" may wait for days.
POWER_EXPIRY = dt.timedelta(minutes=5)
OTHER_EXPIRY = dt.timedelta(minutes=15)
WHEN_ONLINE_EXPIRY = dt.timedelta(days=7)
MAX_EXPIRY = dt.timedelta(days=30)
# A running command with no result after this long (plus its own timeout) is failed.
RUN_GRACE = dt.timedelta(minutes=15)
INSTALL_LIMIT = dt.timedelta(hours=1)

_RESERVED_USERS = frozenset(
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

NoControl = r"^[^\x00-\x1f\x7f]*$"
Username = Annotated[
    str,
    Field(
        min_length=1,
        max_length=20,
        pattern=r"^[A-Za-z_](?:[A-Za-z0-9_.-]{0,18}[A-Za-z0-9_-])?$",
        description="a local account: letters, digits, _ . -; at most 20 (Windows' limit)",
    ),
]
Password = Annotated[str, Field(min_length=1, max_length=127, pattern=NoControl)]
PackageId = Annotated[
    str,
    Field(
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$",
        description="a winget / Chocolatey / apt package id, e.g. Mozilla.Firefox or vlc",
    ),
]
Delay = Annotated[int, Field(ge=0, le=86400, description="seconds before it happens")]
PowerMessage = Annotated[str, Field(max_length=500, pattern=NoControl)]
Language = Annotated[str, Field(pattern=r"^[a-z]{2,3}(-[A-Z][a-z]{3})?(-(?:[A-Z]{2}|[0-9]{3}))?$")]


class NoArgs(Strict):
    pass


class PowerArgs(Strict):
    delay: Delay = 0
    message: PowerMessage | None = None


class MessageArgs(Strict):
    text: Annotated[str, Field(min_length=1, max_length=1000)]
    title: Annotated[str, Field(max_length=100, pattern=NoControl)] | None = None


class RunArgs(Strict):
    command: Annotated[str, Field(min_length=1, max_length=8000)]
    timeout: Annotated[int, Field(ge=1, le=3600)] = 300


class PackageArgs(Strict):
    package: PackageId


class KillArgs(Strict):
    name: (
        Annotated[str, Field(min_length=1, max_length=255, pattern=r'^[^\\/:*?"<>|\x00-\x1f]+$')]
        | None
    ) = None
    pid: Annotated[int, Field(ge=2, le=2**31 - 1)] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> KillArgs:
        if (self.name is None) == (self.pid is None):
            raise ValueError("give exactly one of name (a process name) or pid")
        return self


class _AccountArgs(Strict):
    username: Username

    @model_validator(mode="after")
    def _not_reserved(self) -> _AccountArgs:
        if self.username.lower() in _RESERVED_USERS:
            raise ValueError(f"{self.username!r} is a built-in account and cannot be managed")
        return self


class AccountCreateArgs(_AccountArgs):
    password: Password
    full_name: Annotated[str, Field(max_length=100, pattern=NoControl)] | None = None
    language: Language | None = None  # Windows display language, e.g. ko-KR


class AccountDeleteArgs(_AccountArgs):
    pass


class AccountPasswordArgs(_AccountArgs):
    password: Password


ARG_MODELS: dict[CommandType, type[BaseModel]] = {
    CommandType.SHUTDOWN: PowerArgs,
    CommandType.RESTART: PowerArgs,
    CommandType.LOGOFF: NoArgs,
    CommandType.LOCK: NoArgs,
    CommandType.MESSAGE: MessageArgs,
    CommandType.RUN: RunArgs,
    CommandType.INSTALL: PackageArgs,
    CommandType.UNINSTALL: PackageArgs,
    CommandType.KILL: KillArgs,
    CommandType.ACCOUNT_CREATE: AccountCreateArgs,
    CommandType.ACCOUNT_DELETE: AccountDeleteArgs,
    CommandType.ACCOUNT_PASSWORD: AccountPasswordArgs,
}


def validate_args(kind: CommandType, raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check `raw` for `kind`; answer (public args, secret args). 400 naming the bad field."""
    try:
        model = parse(ARG_MODELS[kind], raw)
    except ApiError as exc:  # name the fields as the request has them: args.<field>
        fields = {_under_args(k): v for k, v in (exc.fields or {}).items()}
        where, what = next(iter(fields.items()))
        raise ApiError(400, ErrorCode.VALIDATION, f"{where}: {what}", fields) from None
    values = model.model_dump(exclude_none=True)
    secret = {k: v for k, v in values.items() if k in SECRET_ARGS}
    public = {k: v for k, v in values.items() if k not in SECRET_ARGS}
    return public, secret


def _under_args(field: str) -> str:
    return "args" if field == "body" else f"args.{field}"


def redacted(public: dict[str, Any], secret_names: set[str] | frozenset[str]) -> dict[str, Any]:
    """The args as an admin sees them: secrets present but never shown."""
    return {**public, **{name: REDACTED for name in secret_names}}


def default_expiry(kind: CommandType, run_when_online: bool) -> dt.timedelta:
    if run_when_online:
        return WHEN_ONLINE_EXPIRY
    return POWER_EXPIRY if kind in POWER_COMMANDS or kind is CommandType.LOCK else OTHER_EXPIRY


def run_limit(kind: str, args: dict[str, Any]) -> dt.timedelta:
    """How long a running command may go without a result before it is failed."""
    if kind in (CommandType.INSTALL, CommandType.UNINSTALL):
        return INSTALL_LIMIT + RUN_GRACE
    timeout = args.get("timeout") if kind == CommandType.RUN else 0
    return dt.timedelta(seconds=timeout if isinstance(timeout, int) else 0) + RUN_GRACE
