"""Read models of commands and batches for the admin API and the dashboard. Never a secret."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from wcms.protocol import FINAL_COMMAND_STATUSES, SECRET_ARGS, CommandStatus, CommandType
from wcms.server.models import Command, CommandBatch, PcInfo
from wcms.server.services import command_args
from wcms.server.services.read_models import iso

_WITH_PASSWORD = frozenset({CommandType.ACCOUNT_CREATE, CommandType.ACCOUNT_PASSWORD})


def command_view(cmd: Command, hostname: str | None, with_output: bool = True) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": cmd.id,
        "batch_id": cmd.batch_id,
        "pc_id": cmd.pc_id,
        "hostname": hostname,
        "type": cmd.type,
        "args": cmd.args,
        "status": cmd.status,
        "queued_at": iso(cmd.queued_at),
        "expires_at": iso(cmd.expires_at),
        "delivered_at": iso(cmd.delivered_at),
        "started_at": iso(cmd.started_at),
        "finished_at": iso(cmd.finished_at),
        "attempts": cmd.attempts,
        "exit_code": cmd.exit_code,
        "error": cmd.error,
    }
    if cmd.type in _WITH_PASSWORD:  # the password was never in args; show that there was one
        view["args"] = command_args.redacted(cmd.args, SECRET_ARGS)
    if with_output:
        view["stdout"] = cmd.stdout
        view["stderr"] = cmd.stderr
    return view


def batch_summary(batch: CommandBatch, counts: dict[str, int]) -> dict[str, Any]:
    done = sum(n for status, n in counts.items() if status in FINAL_COMMAND_STATUSES)
    return {
        "id": batch.id,
        "type": batch.type,
        "args": batch.args,
        "target": batch.target,
        "created_by": batch.created_by,
        "created_at": iso(batch.created_at),
        "expires_at": iso(batch.expires_at),
        "run_when_online": batch.run_when_online,
        "total": batch.pc_count,
        "counts": {str(s): counts.get(s, 0) for s in CommandStatus},
        "finished": done == batch.pc_count,
    }


def batch_detail(session: Session, batch: CommandBatch) -> dict[str, Any]:
    """The batch with per-PC progress and output."""
    rows = session.execute(
        select(Command, PcInfo.hostname)
        .join(PcInfo, PcInfo.id == Command.pc_id)
        .where(Command.batch_id == batch.id)
        .order_by(PcInfo.hostname, Command.id)
    ).all()
    counts = Counter(cmd.status for cmd, _ in rows)
    return {
        **batch_summary(batch, dict(counts)),
        "commands": [command_view(cmd, host) for cmd, host in rows],
    }


def recent_batches(session: Session, limit: int) -> list[dict[str, Any]]:
    batches = list(
        session.execute(select(CommandBatch).order_by(CommandBatch.id.desc()).limit(limit))
        .scalars()
        .all()
    )
    if not batches:
        return []
    counted = session.execute(
        select(Command.batch_id, Command.status, func.count())
        .where(Command.batch_id.in_([b.id for b in batches]))
        .group_by(Command.batch_id, Command.status)
    ).all()
    counts: dict[int, dict[str, int]] = {}
    for batch_id, status, n in counted:
        counts.setdefault(batch_id, {})[status] = n
    return [batch_summary(b, counts.get(b.id, {})) for b in batches]


def pc_history(session: Session, pc: PcInfo, limit: int) -> list[dict[str, Any]]:
    rows = session.execute(
        select(Command).where(Command.pc_id == pc.id).order_by(Command.id.desc()).limit(limit)
    ).scalars()
    return [command_view(cmd, pc.hostname) for cmd in rows]
