"""Presence of lab PCs: registration, contact, the immediate shutdown signal, and losses.

Every state change is a conditional UPDATE whose row count is checked, plus one PowerEvent row
with its reason, in one transaction: two server processes never double-flip a PC.
Functions take the session and `now`, and own their transaction.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from wcms.protocol import TOKEN_PREFIX_PC, ClientEvent, PcState, PowerReason
from wcms.server.db import affected, table
from wcms.server.models import PcCredential, PcInfo, PcMetrics, PowerEvent
from wcms.server.schemas import HeartbeatRequest, RegisterRequest

log = logging.getLogger(__name__)


def hash_token(token: str) -> str:
    """Tokens are 256-bit random strings, so one SHA-256 is enough to keep them at rest."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX_PC + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Transition:
    pc_id: int
    from_state: str | None
    to_state: str
    reason: str
    at: dt.datetime

    def as_message(self) -> dict[str, Any]:
        return {
            "type": "presence",
            "pc_id": self.pc_id,
            "state": self.to_state,
            "reason": self.reason,
            "since": self.at.isoformat(),
        }


def _event(session: Session, t: Transition) -> Transition:
    session.add(
        PowerEvent(
            pc_id=t.pc_id, from_state=t.from_state, to_state=t.to_state, reason=t.reason, at=t.at
        )
    )
    return t


def set_offline_immediately(
    session: Session, machine_id: str, reason: str, now: dt.datetime
) -> Transition | None:
    """The seed's shutdown signal: the PC is offline now, last_seen is now, the reason kept.

    Returns the transition, or None when the PC was already offline for the same reason.
    """
    pc_table = table(PcInfo)
    result = session.execute(
        update(pc_table)
        .where(pc_table.c.machine_id == machine_id, pc_table.c.state == PcState.ONLINE)
        .values(
            state=PcState.OFFLINE,
            is_online=False,
            reason=reason,
            state_since=now,
            last_seen=now,
            offline_after=None,
        )
        .returning(pc_table.c.id)
    )
    pc_id = result.scalar_one_or_none()
    if pc_id is not None:
        t = _event(session, Transition(pc_id, PcState.ONLINE, PcState.OFFLINE, reason, now))
        session.commit()
        return t
    # Already offline: keep the freshest reason (a late "shutdown" after "lost" is the truth).
    pc = session.execute(
        select(PcInfo)
        .where(PcInfo.machine_id == machine_id)
        .execution_options(populate_existing=True)  # the UPDATE above bypassed the ORM
    ).scalar_one_or_none()
    if pc is None:
        session.rollback()
        return None
    pc.last_seen = now
    changed = None
    if pc.reason != reason:
        pc.reason = reason
        pc.state_since = now
        changed = _event(session, Transition(pc.id, PcState.OFFLINE, PcState.OFFLINE, reason, now))
    session.commit()
    return changed


def back_online_reason(pc: PcInfo, event: ClientEvent | None, boot_time: float | None) -> str:
    """Why an offline PC is in contact again: resume, reconnected (same boot) or boot."""
    if event == ClientEvent.RESUME or pc.reason == PowerReason.SLEEP:
        return PowerReason.RESUME
    same_boot = boot_time is not None and pc.boot_time is not None
    if same_boot and abs((boot_time or 0) - (pc.boot_time or 0)) < 5:
        return PowerReason.RECONNECTED
    return PowerReason.BOOT


def mark_online(
    session: Session, pc: PcInfo, reason: str, now: dt.datetime, offline_after: float
) -> Transition | None:
    """Flip an offline PC online (conditional UPDATE); None if it already was. Caller commits."""
    pc_table = table(PcInfo)
    result = session.execute(
        update(pc_table)
        .where(pc_table.c.id == pc.id, pc_table.c.state == PcState.OFFLINE)
        .values(
            state=PcState.ONLINE,
            is_online=True,
            reason=reason,
            state_since=now,
            last_seen=now,
            offline_after=now + dt.timedelta(seconds=offline_after),
        )
    )
    if affected(result) != 1:
        return None
    session.expire(pc)
    return _event(session, Transition(pc.id, PcState.OFFLINE, PcState.ONLINE, reason, now))


def apply_heartbeat(
    session: Session, pc: PcInfo, hb: HeartbeatRequest, now: dt.datetime, offline_after: float
) -> Transition | None:
    """Write one heartbeat at once (the slow path: state changes and events); commits."""
    transition = None
    if pc.state != PcState.ONLINE:
        reason = back_online_reason(pc, hb.event, hb.boot_time)
        transition = mark_online(session, pc, reason, now, offline_after)
    pc.last_seen = now
    pc.offline_after = now + dt.timedelta(seconds=offline_after)
    _copy_identity(pc, hb)
    if hb.event in (ClientEvent.LOGOFF,) and hb.current_user is None:
        pc.current_user = None
    metrics = session.get(PcMetrics, pc.id)
    if metrics is None:
        metrics = PcMetrics(pc_id=pc.id)
        session.add(metrics)
    copy_metrics(metrics, hb, now)
    session.commit()
    return transition


def _copy_identity(pc: PcInfo, hb: HeartbeatRequest) -> None:
    for name in ("hostname", "ip_address", "client_version", "boot_time"):
        value = getattr(hb, name)
        if value is not None:
            setattr(pc, name, value)
    if "current_user" in hb.model_fields_set:
        pc.current_user = hb.current_user


def copy_metrics(metrics: PcMetrics, hb: HeartbeatRequest, now: dt.datetime) -> None:
    metrics.at = now
    for name in ("cpu_percent", "ram_used", "ram_percent", "uptime", "processes"):
        value = getattr(hb, name)
        if value is not None:
            setattr(metrics, name, value)
    if hb.disks is not None:
        metrics.disks = [d.model_dump() for d in hb.disks]


def register(
    session: Session, req: RegisterRequest, now: dt.datetime, offline_after: float
) -> tuple[PcInfo, str, Transition | None]:
    """Create or refresh the PC for `req.machine_id` and issue a new token. Caller commits.

    A machine that registers again (a re-imaged PC) keeps its record, room, seat and history;
    its old token stops working.
    """
    pc = session.execute(
        select(PcInfo).where(PcInfo.machine_id == req.machine_id)
    ).scalar_one_or_none()
    transition: Transition | None = None
    if pc is None:
        pc = PcInfo(
            machine_id=req.machine_id,
            hostname=req.hostname,
            state=PcState.ONLINE,
            is_online=True,
            reason=PowerReason.REGISTERED,
            state_since=now,
            last_seen=now,
            offline_after=now + dt.timedelta(seconds=offline_after),
            registered_at=now,
        )
        session.add(pc)
        session.flush()
        session.add(PcMetrics(pc_id=pc.id))
        transition = _event(
            session, Transition(pc.id, None, PcState.ONLINE, PowerReason.REGISTERED, now)
        )
    elif pc.state != PcState.ONLINE:
        transition = mark_online(session, pc, PowerReason.BOOT, now, offline_after)
    pc.hostname = req.hostname
    pc.client_version = req.client_version
    pc.last_seen = now
    pc.offline_after = now + dt.timedelta(seconds=offline_after)
    hw = req.hardware
    for name in ("os_name", "os_version", "os_edition", "cpu_model", "cpu_cores", "cpu_threads"):
        setattr(pc, name, getattr(hw, name))
    pc.ram_total = hw.ram_total
    pc.ip_address = hw.ip_address
    pc.mac_addresses = [m.lower().replace("-", ":") for m in hw.mac_addresses]
    pc.disks = [d.model_dump() for d in hw.disks]
    token = new_token()
    cred = session.execute(
        select(PcCredential).where(PcCredential.pc_id == pc.id)
    ).scalar_one_or_none()
    if cred is None:
        session.add(PcCredential(pc_id=pc.id, token_hash=hash_token(token), created_at=now))
    else:
        cred.token_hash = hash_token(token)
        cred.created_at = now
    return pc, token, transition


def mark_overdue_lost(session: Session, now: dt.datetime, retry_in: float) -> list[Transition]:
    """The checker: flip every online PC whose deadline has passed to offline, reason `lost`.

    Each PC is its own transaction; a row that fails gets its deadline pushed forward by
    `retry_in` seconds and the loop goes on.
    """
    pc_table = table(PcInfo)
    due = (
        session.execute(
            select(pc_table.c.id).where(
                pc_table.c.state == PcState.ONLINE, pc_table.c.offline_after < now
            )
        )
        .scalars()
        .all()
    )
    session.rollback()
    flipped: list[Transition] = []
    for pc_id in due:
        try:
            result = session.execute(
                update(pc_table)
                .where(
                    pc_table.c.id == pc_id,
                    pc_table.c.state == PcState.ONLINE,
                    pc_table.c.offline_after < now,
                )
                .values(
                    state=PcState.OFFLINE,
                    is_online=False,
                    reason=PowerReason.LOST,
                    state_since=now,
                    offline_after=None,
                )
            )
            if affected(result) == 1:
                t = Transition(pc_id, PcState.ONLINE, PcState.OFFLINE, PowerReason.LOST, now)
                flipped.append(_event(session, t))
            session.commit()
        except Exception:  # a bad row must not stop the checker for every other PC
            log.exception("presence checker failed on pc %s; retrying in %ss", pc_id, retry_in)
            session.rollback()
            _push_deadline(session, pc_id, now + dt.timedelta(seconds=retry_in))
    return flipped


def _push_deadline(session: Session, pc_id: int, when: dt.datetime) -> None:
    pc_table = table(PcInfo)
    try:
        session.execute(update(pc_table).where(pc_table.c.id == pc_id).values(offline_after=when))
        session.commit()
    except Exception:
        log.exception("could not push the deadline of pc %s", pc_id)
        session.rollback()
