"""What each command type accepts: one strict model per type, validated before anything is queued.

The models are built from the protocol's argument specs (protocol.COMMAND_ARGS), which the
client checks again before it runs anything, so a bad argument is refused with a 400 naming
the field instead of failing on 300 PCs.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import BaseModel, Field, create_model, model_validator

from wcms.protocol import COMMAND_ARGS, POWER_COMMANDS, ArgSpec, CommandType, args_rule_problem
from wcms.protocol import SECRET_ARGS as SECRET_ARGS
from wcms.server.schemas import Strict, parse
from wcms.server.services.errors import Invalid

# SECRET_ARGS (protocol): sealed at rest, replaced by "***" in every view and the audit log.
REDACTED = "***"

# Expiry: a shutdown is about now; "when it next comes online" may wait for days.
POWER_EXPIRY = dt.timedelta(minutes=5)
OTHER_EXPIRY = dt.timedelta(minutes=15)
WHEN_ONLINE_EXPIRY = dt.timedelta(days=7)
MAX_EXPIRY = dt.timedelta(days=30)
# A running command with no result after this long (plus its own timeout) is failed.
RUN_GRACE = dt.timedelta(minutes=15)
INSTALL_LIMIT = dt.timedelta(hours=1)


class _Args(Strict):
    """A command's arguments, built from protocol.COMMAND_ARGS; the rules across them too."""

    @model_validator(mode="after")
    def _rules(self) -> _Args:
        problem = args_rule_problem(_KIND_OF[type(self)], self.__dict__)
        if problem is not None:
            raise ValueError(problem)
        return self


def _field(spec: ArgSpec) -> tuple[Any, Any]:
    """(annotation, default) for create_model, from the protocol's spec."""
    limits = Field(
        min_length=spec.min_length,
        max_length=spec.max_length,
        pattern=spec.pattern,
        ge=spec.ge,
        le=spec.le,
        description=spec.description,
    )
    checked: Any = Annotated[spec.type, limits]
    if spec.required:
        return checked, ...
    if spec.default is not None:
        return checked, spec.default
    return checked | None, None


def _model(kind: CommandType) -> type[BaseModel]:
    name = "".join(part.title() for part in kind.split("_")) + "Args"
    fields: dict[str, Any] = {arg: _field(spec) for arg, spec in COMMAND_ARGS[kind].items()}
    model: type[_Args] = create_model(name, __base__=_Args, **fields)
    _KIND_OF[model] = kind
    return model


_KIND_OF: dict[type[BaseModel], CommandType] = {}
ARG_MODELS: dict[CommandType, type[BaseModel]] = {kind: _model(kind) for kind in CommandType}


def validate_args(kind: CommandType, raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check `raw` for `kind`; answer (public args, secret args). 400 naming the bad field."""
    try:
        model = parse(ARG_MODELS[kind], raw)
    except Invalid as exc:  # name the fields as the request has them: args.<field>
        fields = {_under_args(k): v for k, v in (exc.fields or {}).items()}
        where, what = next(iter(fields.items()))
        raise Invalid(f"{where}: {what}", fields=fields) from None
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
