"""Remote commands over HTTP: the agent's channel (long poll, ack, result) and the admin API.

The long poll waits on the PC's doorbell (services/doorbell.py), never on a database loop: it
looks once, sleeps until a command is queued for its PC or the timeout passes, looks again.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue
from pydantic import Field, field_validator, model_validator

from wcms.protocol import CLIENT_PREFIX, CommandStatus, CommandType
from wcms.server.api.request import parse_body, query_int, runtime
from wcms.server.auth import bearer, client_address, current_admin, current_pc, db
from wcms.server.db import utcnow
from wcms.server.models import Command, CommandBatch, PcInfo
from wcms.server.openapi import documented
from wcms.server.schemas import MachineId, PollQuery, Strict, parse
from wcms.server.services import (
    agent,
    command_args,
    command_queue,
    command_read_models,
    outbox,
)
from wcms.server.services.agent import publish_changes
from wcms.server.services.errors import found

client_bp = Blueprint("client_commands", __name__, url_prefix=CLIENT_PREFIX)
bp = Blueprint("admin_commands", __name__, url_prefix="/api")


# ---------------------------------------------------------------------------- the agent's side


class AckRequest(Strict):
    machine_id: MachineId


class ResultRequest(Strict):
    controls = "strip"  # a PC's report: unsafe characters stripped, not refused (schemas.py)
    machine_id: MachineId
    status: Literal["succeeded", "failed", "expired"]
    exit_code: Annotated[int, Field(ge=-(2**31), le=2**32 - 1)] | None = None
    stdout: str = ""  # longer than MAX_OUTPUT_CHARS is cut by the server
    stderr: str = ""
    error: Annotated[str, Field(max_length=4000)] | None = None

    @field_validator("stdout", "stderr", mode="before")
    @classmethod
    def _no_nul(cls, value: object) -> object:
        # A program may print NUL; the database cannot keep it, and refusing the report
        # would lose the whole result. (NUL anywhere else in a request is refused.)
        return value.replace("\x00", "") if isinstance(value, str) else value

    @field_validator("exit_code")
    @classmethod
    def _signed(cls, value: int | None) -> int | None:
        # Windows exit codes are unsigned 32-bit (0xC0000005 = 3221225477, an access
        # violation); they are kept as the signed 32-bit value the column holds.
        return value - 2**32 if value is not None and value >= 2**31 else value


def _answer(body: dict[str, Any], status: int = 200) -> ResponseReturnValue:
    return jsonify(runtime().agent_answer(body)), status


@client_bp.get("/commands")
@documented(
    "Long poll: this PC's pending commands, at once or as soon as one is queued",
    auth="pc",
    tag="client",
    query={
        "machine_id": "the token's machine (required)",
        "timeout": "seconds to wait when nothing is pending; at most the server's poll_timeout",
        "boot_time": "the PC's boot time (epoch s): power commands queued before it expire",
    },
    errors=(409,),
)
def poll() -> ResponseReturnValue:
    query = parse(PollQuery, request.args.to_dict())
    who = current_pc(query.machine_id)
    return _answer({"commands": agent.wait_for_commands(runtime(), db, who, query, bearer())})


@client_bp.post("/commands/<bigid:command_id>/ack")
@documented(
    "The PC starts the command; run it only if the answer's status is `running`",
    auth="pc",
    tag="client",
    body=AckRequest,
    errors=(404,),
)
def ack(command_id: int) -> ResponseReturnValue:
    req = parse_body(AckRequest)
    who = current_pc(req.machine_id)
    status, changes = command_queue.acknowledge(db(), who.pc_id, command_id, utcnow())
    publish_changes(runtime(), changes)
    return _answer({"id": command_id, "status": status})


@client_bp.post("/commands/<bigid:command_id>/result")
@documented(
    "The outcome of a command; a repeat for a finished command changes nothing",
    auth="pc",
    tag="client",
    body=ResultRequest,
    errors=(404,),
)
def result(command_id: int) -> ResponseReturnValue:
    req = parse_body(ResultRequest)
    who = current_pc(req.machine_id)
    rt = runtime()
    report = command_queue.Report(
        CommandStatus(req.status), req.exit_code, req.stdout, req.stderr, req.error
    )
    cmd, changes = command_queue.record_result(
        db(), who.pc_id, command_id, report, utcnow(), server_secret=rt.secret_key
    )
    publish_changes(rt, changes)
    return _answer({"id": command_id, "status": cmd.status})


# ---------------------------------------------------------------------------- the admin's side


@bp.before_request
def _require_admin() -> None:
    current_admin()


Id = Annotated[int, Field(ge=1, le=2**31 - 1)]  # schemas.DB_INT_MAX: rooms and PCs ids


class TargetBody(Strict):
    """Exactly one of pc_ids, room_id, all_online."""

    pc_ids: (
        Annotated[list[Id], Field(min_length=1, max_length=command_queue.MAX_TARGET_PCS)] | None
    ) = None
    room_id: Id | None = None
    all_online: Literal[True] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> TargetBody:
        given = [v for v in (self.pc_ids, self.room_id, self.all_online) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of pc_ids, room_id or all_online")
        return self


class SendCommand(Strict):
    type: Annotated[CommandType, Field(strict=False)]
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="per type (docs/API.md): shutdown/restart {delay, message}; message {text, "
        "title}; run {command, timeout}; install/uninstall {package}; kill {name | pid}; "
        "account_create {username, password, full_name, language}; account_delete {username}; "
        "account_password {username, password}; logoff, lock {}",
    )
    target: TargetBody
    expires_in: (
        Annotated[int, Field(ge=5, le=int(command_args.MAX_EXPIRY.total_seconds()))] | None
    ) = None
    run_when_online: bool = False


def _batch(batch_id: int) -> CommandBatch:
    batch = found(db().get(CommandBatch, batch_id), f"no batch with id {batch_id}")
    return batch


@bp.post("/commands")
@documented(
    "Send a command to PCs, a room or every online PC: one batch, audited",
    auth="admin",
    tag="commands",
    body=SendCommand,
    ok=201,
    errors=(409,),
)
def send() -> ResponseReturnValue:
    req = parse_body(SendCommand)
    who = current_admin()
    rt, s = runtime(), db()
    target = command_queue.Target(
        pc_ids=tuple(req.target.pc_ids or ()),
        room_id=req.target.room_id,
        all_online=bool(req.target.all_online),
    )
    expires_in = None if req.expires_in is None else dt.timedelta(seconds=req.expires_in)
    batch, pc_ids = command_queue.queue(
        s,
        actor=who.name,
        kind=req.type,
        args=req.args,
        target=target,
        now=utcnow(),
        server_secret=rt.secret_key,
        expires_in=expires_in,
        run_when_online=req.run_when_online,
        ip=client_address(),
    )
    rt.wake(s, pc_ids)  # the other processes' polls, woken when this commits
    s.commit()  # before the polls are woken: they must find the rows
    waiting = rt.doorbell.listening(pc_ids)
    if waiting and not rt.notifier.shared:
        # One process: its woken polls take the command from memory (services/outbox.py).
        # With several, each poll claims its commands in the database, so none goes twice.
        rt.outbox.stage(outbox.load(s, batch.id, waiting, rt.secret_key))
    rt.doorbell.ring(pc_ids)
    rt.broadcast(
        {"type": "batch", "batch_id": batch.id, "command": batch.type, "total": batch.pc_count}
    )
    return jsonify(command_read_models.batch_detail(s, batch)), 201


@bp.get("/batches")
@documented(
    "Recent command batches with their progress counts, newest first",
    auth="admin",
    tag="commands",
    query={"limit": "1-500 (default 50)"},
)
def list_batches() -> ResponseReturnValue:
    limit = query_int("limit", 50, 1, 500)
    return jsonify({"batches": command_read_models.recent_batches(db(), limit)})


@bp.get("/batches/<id:batch_id>")
@documented("One batch with per-PC status and output", auth="admin", tag="commands")
def get_batch(batch_id: int) -> ResponseReturnValue:
    return jsonify(command_read_models.batch_detail(db(), _batch(batch_id)))


@bp.post("/batches/<id:batch_id>/cancel")
@documented(
    "Cancel the batch's commands that have not started yet (running ones finish)",
    auth="admin",
    tag="commands",
)
def cancel_batch(batch_id: int) -> ResponseReturnValue:
    batch = _batch(batch_id)
    s, rt = db(), runtime()
    rt.outbox.discard(batch_id=batch.id)  # first: nothing staged goes out after the cancel
    changes = command_queue.cancel(
        s, actor=current_admin().name, now=utcnow(), batch_id=batch.id, ip=client_address()
    )
    s.commit()  # before the changes are published
    publish_changes(rt, changes)
    return jsonify(command_read_models.batch_detail(s, batch))


@bp.post("/commands/<bigid:command_id>/cancel")
@documented(
    "Cancel one command if it has not started yet", auth="admin", tag="commands", errors=(404,)
)
def cancel_command(command_id: int) -> ResponseReturnValue:
    s, rt = db(), runtime()
    cmd = found(s.get(Command, command_id), f"no command with id {command_id}")
    rt.outbox.discard(command_ids={command_id})
    changes = command_queue.cancel(
        s, actor=current_admin().name, now=utcnow(), command_id=command_id, ip=client_address()
    )
    s.commit()  # before the changes are published
    publish_changes(rt, changes)
    s.refresh(cmd)
    pc = s.get(PcInfo, cmd.pc_id)
    return jsonify(command_read_models.command_view(cmd, pc.hostname if pc else None))


@bp.get("/pcs/<id:pc_id>/commands")
@documented(
    "A PC's command history, newest first",
    auth="admin",
    tag="commands",
    query={"limit": "1-500 (default 50)"},
)
def pc_commands(pc_id: int) -> ResponseReturnValue:
    limit = query_int("limit", 50, 1, 500)
    pc = found(db().get(PcInfo, pc_id), f"no PC with id {pc_id}")
    return jsonify({"commands": command_read_models.pc_history(db(), pc, limit)})
