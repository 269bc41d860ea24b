"""Remote commands: queue a batch, deliver (at least once), acknowledge, record results, expire.

Lifecycle of one command: queued -> delivered -> running -> succeeded | failed, or expired |
cancelled from queued/delivered. Every step is a conditional UPDATE on the current status, so
two requests racing on one command cannot both move it. Functions take the session and `now`,
own their transaction, and answer the changes for the live bus.

Delivery is at least once: a delivered command that is not acknowledged within `ack_timeout` is
delivered again on the PC's next poll (the client runs each id once). The acknowledgement is the
commit point: the client runs a command only when its ack answers `running`, so a command
cancelled or expired before that never runs.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import and_, case, exists, func, insert, not_, or_, select, update
from sqlalchemy.orm import Session

from wcms.protocol import (
    FINAL_COMMAND_STATUSES,
    MAX_OUTPUT_CHARS,
    SECRET_COMMANDS,
    CommandStatus,
    CommandType,
    PcState,
    stale_on_boot,
    wire_time,
)
from wcms.server.db import affected
from wcms.server.models import Command, CommandBatch, PcCredential, PcInfo, Room
from wcms.server.services import audit, command_args, secretbox
from wcms.server.services.errors import Conflict, NotFound, Unauthenticated

log = logging.getLogger(__name__)

ACK_TIMEOUT = 10.0  # seconds a delivered command waits for its ack before it is delivered again
MAX_ATTEMPTS = 5  # deliveries without an ack before the command is failed
DELIVERY_BATCH = 20  # commands handed over in one poll answer
NO_RESULT = "no result from the PC in time"
MAX_TARGET_PCS = 5000
OPEN = (CommandStatus.QUEUED, CommandStatus.DELIVERED)
NOT_APPROVED = (
    "not sent: this PC is not approved (it registered with a PIN alone); approve it on its "
    "page, then send the command again"
)
REVOKED = "this token was revoked (the PC registered again or was deleted); register again"


@dataclass(frozen=True)
class Target:
    """Exactly one of: these PCs, every PC of a room, every online PC."""

    pc_ids: tuple[int, ...] = ()
    room_id: int | None = None
    all_online: bool = False


@dataclass(frozen=True)
class Change:
    command_id: int
    batch_id: int
    pc_id: int
    status: str
    at: dt.datetime

    def as_message(self) -> dict[str, Any]:
        return {
            "type": "command",
            "command_id": self.command_id,
            "batch_id": self.batch_id,
            "pc_id": self.pc_id,
            "status": self.status,
            "at": wire_time(self.at),
        }


@dataclass(frozen=True)
class Report:
    """What a client says about a command it ran."""

    status: CommandStatus
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    error: str | None = None


# ---------------------------------------------------------------------------- queueing


def queue(
    session: Session,
    *,
    actor: str,
    kind: CommandType,
    args: dict[str, Any],
    target: Target,
    now: dt.datetime,
    server_secret: str,
    expires_in: dt.timedelta | None = None,
    run_when_online: bool = False,
    ip: str | None = None,
) -> tuple[CommandBatch, list[int]]:
    """Queue one command for every PC of `target` as one batch; audit it. Flushes; the caller
    commits before it wakes the PCs' polls.

    A secret-carrying command (protocol.SECRET_COMMANDS) is refused for each PC that is not
    approved: its row is `failed` at once with the reason, so the batch shows who did not get
    it, and no secret is stored for it. Answers the batch and the ids of the PCs that got a
    queued command, so the caller can ring their doorbells.
    """
    public, secret = command_args.validate_args(kind, args)
    pc_ids, description = _resolve(session, target)
    refused: set[int] = set()
    if kind in SECRET_COMMANDS:
        refused = set(
            session.execute(
                select(PcInfo.id).where(PcInfo.id.in_(pc_ids), PcInfo.approved.is_(False))
            ).scalars()
        )
    expires_at = now + (expires_in or command_args.default_expiry(kind, run_when_online))
    shown = command_args.redacted(public, set(secret))
    batch = CommandBatch(
        created_by=actor,
        type=str(kind),
        args=shown,
        target=description,
        created_at=now,
        expires_at=expires_at,
        run_when_online=run_when_online,
        pc_count=len(pc_ids),
    )
    session.add(batch)
    session.flush()
    sealed = secretbox.seal(server_secret, secret) if secret else None
    rows = [
        {
            "batch_id": batch.id,
            "pc_id": pc_id,
            "type": str(kind),
            "args": public,
            "secret": None if pc_id in refused else sealed,
            "status": CommandStatus.FAILED if pc_id in refused else CommandStatus.QUEUED,
            "run_when_online": run_when_online,
            "queued_at": now,
            "expires_at": expires_at,
            "attempts": 0,
            "finished_at": now if pc_id in refused else None,
            "error": NOT_APPROVED if pc_id in refused else None,
        }
        for pc_id in pc_ids
    ]
    session.execute(insert(Command), rows)
    details: dict[str, Any] = {
        "batch_id": batch.id,
        "type": str(kind),
        "args": shown,
        "pc_ids": pc_ids,
        "expires_at": expires_at.isoformat(),
        "run_when_online": run_when_online,
    }
    if refused:
        details["not_approved"] = sorted(refused)
    audit.record(session, actor, "command.send", now, description, details, ip)
    session.flush()
    return batch, [pc_id for pc_id in pc_ids if pc_id not in refused]


def _resolve(session: Session, target: Target) -> tuple[list[int], str]:
    """The PC ids a target names and a description of it for people; 4xx when it names none."""
    if target.all_online:
        query = select(PcInfo.id).where(PcInfo.state == PcState.ONLINE).order_by(PcInfo.id)
        ids = list(session.execute(query).scalars())
        if not ids:
            raise Conflict("no PC is online")
        return ids, f"every online PC ({len(ids)})"
    if target.room_id is not None:
        room = session.get(Room, target.room_id)
        if room is None:
            raise NotFound(f"no room with id {target.room_id}")
        query = select(PcInfo.id).where(PcInfo.room_id == room.id).order_by(PcInfo.id)
        ids = list(session.execute(query).scalars())
        if not ids:
            raise Conflict(f"room {room.name!r} has no PCs")
        return ids, f"room {room.name} ({len(ids)} PCs)"
    wanted = sorted(set(target.pc_ids))
    found = set(session.execute(select(PcInfo.id).where(PcInfo.id.in_(wanted))).scalars())
    missing = [i for i in wanted if i not in found]
    if missing:
        raise NotFound(f"no PC with id {', '.join(map(str, missing))}")
    if len(wanted) == 1:
        hostname = session.execute(select(PcInfo.hostname).where(PcInfo.id == wanted[0])).scalar()
        return wanted, f"PC {wanted[0]} ({hostname})"
    return wanted, f"{len(wanted)} selected PCs"


# ---------------------------------------------------------------------------- the PC's side


def has_open(session: Session, pc_id: int) -> bool:
    """Whether the PC has a command queued or delivered but not yet acknowledged."""
    found = session.execute(
        select(Command.id).where(Command.pc_id == pc_id, Command.status.in_(OPEN)).limit(1)
    ).first()
    session.rollback()  # hold no transaction while the poll waits
    return found is not None


def guarded(kind: str, sealed: bool) -> bool:
    """Whether a command may go only to an approved PC whose token was just checked."""
    return sealed or kind in SECRET_COMMANDS


def _vouched(pc_id: int, token_digest: str | None) -> Any:
    """The SQL condition under which `pc_id` may be handed a guarded command: approved, and
    the poll's token is still the PC's, as the database has it now."""
    approved = exists().where(PcInfo.id == pc_id, PcInfo.approved.is_(True))
    return and_(approved, exists().where(_token_matches(pc_id, token_digest)))


def _token_matches(pc_id: int, token_digest: str | None) -> Any:
    """The PC's credential row, and (when given) it holds the poll's token."""
    if token_digest is None:
        return PcCredential.pc_id == pc_id
    return and_(PcCredential.pc_id == pc_id, PcCredential.token_hash == token_digest)


def _standing(session: Session, pc_id: int, token_digest: str | None) -> bool:
    """Whether the PC is approved; 401 (after a rollback: nothing of this transaction is
    kept) when the poll's token is no longer the PC's in the database."""
    row = session.execute(
        select(PcInfo.approved, exists().where(_token_matches(pc_id, token_digest))).where(
            PcInfo.id == pc_id
        )
    ).first()
    if row is None or not row[1]:
        session.rollback()
        raise Unauthenticated(REVOKED)
    return bool(row[0])


def may_receive_secrets(session: Session, pc_id: int, token_digest: str | None) -> bool:
    """Asked right before a guarded command is handed over from memory: 401 when the poll's
    token is no longer the PC's in the database (revoked here, by another process, or by
    hand); False when the PC is not approved. Holds no transaction afterwards."""
    approved = _standing(session, pc_id, token_digest)
    session.rollback()
    return approved


def deliver(
    session: Session,
    pc_id: int,
    now: dt.datetime,
    *,
    server_secret: str,
    ack_timeout: float = ACK_TIMEOUT,
    boot_time: float | None = None,
    token_digest: str | None = None,
) -> tuple[list[dict[str, Any]], list[Change]]:
    """Hand the PC its pending commands (new ones, and unacknowledged ones again).

    Commits: the `delivered` marks must be durable before the commands leave in the answer
    and the changes are published on the bus (the poll holds no request transaction).

    `boot_time` (epoch seconds, from the poll) lets power commands queued before the PC's
    current boot expire instead of shutting down a machine someone just switched on.

    A guarded command (a sealed secret, `run`, an account command) moves to `delivered` only
    if, in the same UPDATE, the PC is approved and `token_digest` (the poll's token) is still
    its token: a token revoked meanwhile, even directly in the database, gets 401 and nothing;
    an unapproved PC's guarded command fails with the reason.
    """
    resend_before = now - dt.timedelta(seconds=ack_timeout)
    rows = session.execute(
        select(Command)
        .where(
            Command.pc_id == pc_id,
            or_(
                Command.status == CommandStatus.QUEUED,
                and_(
                    Command.status == CommandStatus.DELIVERED,
                    Command.delivered_at <= resend_before,
                ),
            ),
        )
        .order_by(Command.id)
        .limit(DELIVERY_BATCH)
    ).scalars()
    handed: list[dict[str, Any]] = []
    changes: list[Change] = []
    for cmd in list(rows):
        refused = refusal(cmd, now, boot_time)
        if refused is not None:
            status, error = refused
            changes += _finish_open(session, cmd, status, now, error)
            continue
        try:
            secret = secretbox.unseal(server_secret, cmd.secret) if cmd.secret else {}
        except secretbox.SecretUnreadable as exc:
            changes += _finish_open(session, cmd, CommandStatus.FAILED, now, str(exc))
            continue
        attempt = cmd.attempts + 1
        wire = wire_form(cmd, secret, now, attempt)
        conditions = [
            Command.id == cmd.id,
            Command.status == cmd.status,
            Command.attempts == cmd.attempts,
        ]
        is_guarded = guarded(cmd.type, cmd.secret is not None)
        if is_guarded:
            conditions.append(_vouched(pc_id, token_digest))
        moved = session.execute(
            update(Command)
            .where(*conditions)
            .values(status=CommandStatus.DELIVERED, delivered_at=now, attempts=attempt)
        )
        if affected(moved) == 1:
            handed.append(wire)
            changes.append(Change(cmd.id, cmd.batch_id, pc_id, CommandStatus.DELIVERED, now))
        elif is_guarded and not _standing(session, pc_id, token_digest):
            changes += _finish_open(session, cmd, CommandStatus.FAILED, now, NOT_APPROVED)
    session.commit()
    return handed, changes


class Deliverable(Protocol):
    """What delivery reads of a command (a Command row, or one staged in the outbox)."""

    @property
    def id(self) -> int: ...
    @property
    def type(self) -> str: ...
    @property
    def args(self) -> dict[str, Any]: ...
    @property
    def queued_at(self) -> dt.datetime: ...
    @property
    def expires_at(self) -> dt.datetime: ...
    @property
    def run_when_online(self) -> bool: ...
    @property
    def attempts(self) -> int: ...


def refusal(
    cmd: Deliverable, now: dt.datetime, boot_time: float | None
) -> tuple[CommandStatus, str] | None:
    """Why `cmd` must not be delivered now, as (final status, error), or None."""
    if cmd.expires_at <= now:
        return CommandStatus.EXPIRED, "not delivered before it expired"
    if cmd.attempts >= MAX_ATTEMPTS:
        return CommandStatus.FAILED, f"delivered {cmd.attempts} times, never acknowledged"
    up_for = None if boot_time is None else now.timestamp() - boot_time
    queued_ago = (now - cmd.queued_at).total_seconds()
    if stale_on_boot(cmd.type, cmd.run_when_online, queued_ago, up_for):
        return CommandStatus.EXPIRED, "the PC started again after the command was queued"
    return None


def wire_form(
    cmd: Deliverable, secret: dict[str, Any], now: dt.datetime, attempt: int
) -> dict[str, Any]:
    """A command as the client receives it."""
    return {
        "id": cmd.id,
        "type": cmd.type,
        "args": {**cmd.args, **secret},
        "queued_at": wire_time(cmd.queued_at),
        "expires_at": wire_time(cmd.expires_at),
        "age": round((now - cmd.queued_at).total_seconds(), 3),
        "run_when_online": cmd.run_when_online,
        "attempt": attempt,
    }


def _finish_open(
    session: Session, cmd: Command, status: CommandStatus, now: dt.datetime, error: str
) -> list[Change]:
    """Move a queued/delivered command to a final status and wipe its secret. Caller commits."""
    moved = session.execute(
        update(Command)
        .where(Command.id == cmd.id, Command.status.in_(OPEN))
        .values(status=status, finished_at=now, error=error, secret=None)
    )
    if affected(moved) != 1:
        return []
    return [Change(cmd.id, cmd.batch_id, cmd.pc_id, status, now)]


def _own(session: Session, pc_id: int, command_id: int) -> Command:
    """The command if it belongs to this PC; 404 otherwise (another PC's looks absent)."""
    cmd = session.get(Command, command_id)
    if cmd is None or cmd.pc_id != pc_id:
        session.rollback()
        raise NotFound(f"no command {command_id} for this PC")
    return cmd


def acknowledge(
    session: Session, pc_id: int, command_id: int, now: dt.datetime
) -> tuple[str, list[Change]]:
    """The PC received the command and starts it: delivered -> running.

    Commits: the PC runs the command on this answer, so `running` must be durable first; the
    change is then published on the bus.

    Idempotent: answers the status the command has now. The client runs the command only when
    this answers `running`; anything else (cancelled, expired) means "do not run it".
    """
    cmd = _own(session, pc_id, command_id)
    changes: list[Change] = []
    if cmd.status in OPEN:
        moved = session.execute(
            update(Command)
            .where(Command.id == cmd.id, Command.status.in_(OPEN))
            .values(status=CommandStatus.RUNNING, started_at=now, **_delivery_marks(now))
        )
        if affected(moved) == 1:
            changes.append(Change(cmd.id, cmd.batch_id, pc_id, CommandStatus.RUNNING, now))
        session.expire(cmd)
    status = cmd.status
    session.commit()
    return status, changes


def _delivery_marks(now: dt.datetime) -> dict[str, Any]:
    """What an ack or a result says about delivery: it happened. A command handed over from
    memory (services/outbox.py) and answered before its `delivered` mark was written (or
    after a crash lost the mark) is still `queued` with attempts 0 and no delivered_at; the
    outbox's mark then moves nothing (it only moves queued commands), so the ack or result
    writes them itself, in its own conditional UPDATE."""
    return {
        "delivered_at": func.coalesce(Command.delivered_at, now),
        "attempts": case((Command.attempts < 1, 1), else_=Command.attempts),
    }


def record_result(
    session: Session,
    pc_id: int,
    command_id: int,
    report: Report,
    now: dt.datetime,
    *,
    server_secret: str,
) -> tuple[Command, list[Change]]:
    """Store the outcome; a duplicate for a final command changes nothing.

    Commits: the outcome (and the wiped secret) must be durable before the PC is told it was
    taken and the change is published on the bus.

    Secrets the command carried are cut out of the output before it is stored, and wiped.
    A non-zero exit code is a failure whatever the client called it.
    """
    cmd = _own(session, pc_id, command_id)
    late_after_timeout = cmd.status == CommandStatus.FAILED and cmd.error == NO_RESULT
    if cmd.status in FINAL_COMMAND_STATUSES and not late_after_timeout:
        session.rollback()
        return cmd, []
    secrets = _secret_values(server_secret, cmd.secret)
    status = report.status
    if status == CommandStatus.SUCCEEDED and report.exit_code not in (None, 0):
        status = CommandStatus.FAILED
    # Conditional: of two copies of one result racing (the client resends until it hears
    # back), one is stored and announced; the other finds the command final and changes nothing.
    moved = session.execute(
        update(Command)
        .where(
            Command.id == cmd.id,
            or_(
                not_(Command.status.in_(FINAL_COMMAND_STATUSES)),
                and_(Command.status == CommandStatus.FAILED, Command.error == NO_RESULT),
            ),
        )
        .values(
            status=status,
            exit_code=report.exit_code,
            stdout=_clean(report.stdout, secrets),
            stderr=_clean(report.stderr, secrets),
            error=_clean(report.error, secrets) if report.error else None,
            started_at=func.coalesce(Command.started_at, now),
            finished_at=now,
            secret=None,
            **_delivery_marks(now),
        )
    )
    session.commit()
    session.refresh(cmd)
    if affected(moved) != 1:
        return cmd, []
    return cmd, [Change(cmd.id, cmd.batch_id, pc_id, status, now)]


def _secret_values(server_secret: str, sealed: str | None) -> list[str]:
    if not sealed:
        return []
    try:
        values = secretbox.unseal(server_secret, sealed)
    except secretbox.SecretUnreadable:
        return []
    return [v for v in values.values() if isinstance(v, str) and v]


def _clean(text: str | None, secrets: list[str]) -> str:
    text = text or ""
    for secret in secrets:
        text = text.replace(secret, command_args.REDACTED)
    if len(text) > MAX_OUTPUT_CHARS:
        text = text[:MAX_OUTPUT_CHARS]
    return text


# ---------------------------------------------------------------------------- the admin's side


def cancel(
    session: Session,
    *,
    actor: str,
    now: dt.datetime,
    batch_id: int | None = None,
    command_id: int | None = None,
    ip: str | None = None,
) -> list[Change]:
    """Cancel what has not started yet (queued or delivered) in a batch or one command. Flushes;
    the caller commits before it publishes the changes.

    Running and finished commands are left alone: a command the PC acknowledged runs to the end.
    """
    query = select(Command).where(Command.status.in_(OPEN))
    if batch_id is not None:
        query = query.where(Command.batch_id == batch_id)
    if command_id is not None:
        query = query.where(Command.id == command_id)
    changes: list[Change] = []
    for cmd in list(session.execute(query).scalars()):
        changes += _finish_open(session, cmd, CommandStatus.CANCELLED, now, f"cancelled by {actor}")
    what = f"batch {batch_id}" if batch_id is not None else f"command {command_id}"
    audit.record(
        session,
        actor,
        "command.cancel",
        now,
        what,
        {
            "batch_id": batch_id,
            "command_id": command_id,
            "cancelled": [c.command_id for c in changes],
        },
        ip,
    )
    session.flush()
    return changes


def expire_overdue(session: Session, now: dt.datetime) -> list[Change]:
    """The sweep: expire undelivered commands past their expiry, fail running ones that never
    reported. Runs in the presence loop (in a unit of work); flushes, the caller commits."""
    changes: list[Change] = []
    overdue = session.execute(
        select(Command).where(Command.status.in_(OPEN), Command.expires_at <= now)
    ).scalars()
    for cmd in list(overdue):
        error = "not delivered before it expired"
        if cmd.status == CommandStatus.DELIVERED:
            error = "delivered but not acknowledged before it expired"
        changes += _finish_open(session, cmd, CommandStatus.EXPIRED, now, error)
    silent = session.execute(
        select(Command).where(
            Command.status == CommandStatus.RUNNING,
            Command.started_at <= now - command_args.RUN_GRACE,
        )
    ).scalars()
    for cmd in list(silent):
        started = cmd.started_at or now
        if started + command_args.run_limit(cmd.type, cmd.args) > now:
            continue
        moved = session.execute(
            update(Command)
            .where(Command.id == cmd.id, Command.status == CommandStatus.RUNNING)
            .values(status=CommandStatus.FAILED, finished_at=now, error=NO_RESULT, secret=None)
        )
        if affected(moved) == 1:
            changes.append(Change(cmd.id, cmd.batch_id, cmd.pc_id, CommandStatus.FAILED, now))
    session.flush()
    return changes
