"""Presence of lab PCs: registration, contact, the immediate shutdown signal, and losses.

Every state change is a conditional UPDATE whose row count is checked, plus one PowerEvent row
with its reason, in one transaction: two server processes never double-flip a PC.
Functions take the session and `now`, and own their transaction.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, insert, or_, select, update
from sqlalchemy.orm import Session

from wcms.protocol import (
    COMEBACK_EVENTS,
    SHUTDOWN_REASONS,
    TOKEN_PREFIX_PC,
    ClientEvent,
    ErrorCode,
    PcState,
    PowerReason,
    wire_time,
)
from wcms.server.db import BatchStatement, affected, table
from wcms.server.models import PcCredential, PcInfo, PcMetrics, PowerEvent
from wcms.server.schemas import Hardware, HeartbeatRequest, RegisterRequest
from wcms.server.services.accounts import sha256
from wcms.server.services.errors import Conflict, Unauthenticated

log = logging.getLogger(__name__)


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
            "since": wire_time(self.at),
        }


# The hot statements are built once and run on the session's connection: no ORM load or
# unit-of-work flush, and no cache key rebuilt per request (see bench/shutdown_latency.py).
_PC = table(PcInfo)
_METRICS = table(PcMetrics)
_EV = table(PowerEvent)
_INSERT_EVENT = BatchStatement(
    insert(_EV).values(
        pc_id=bindparam("b_pc", type_=_EV.c.pc_id.type),
        from_state=bindparam("b_from", type_=_EV.c.from_state.type),
        to_state=bindparam("b_to", type_=_EV.c.to_state.type),
        reason=bindparam("b_reason", type_=_EV.c.reason.type),
        at=bindparam("b_at", type_=_EV.c.at.type),
    )
)
_GO_OFFLINE = (
    update(_PC)
    .where(_PC.c.machine_id == bindparam("b_mid"), _PC.c.state == PcState.ONLINE)
    .values(
        state=PcState.OFFLINE,
        is_online=False,
        reason=bindparam("b_reason", type_=_PC.c.reason.type),
        state_since=bindparam("b_now", type_=_PC.c.state_since.type),
        last_seen=bindparam("b_now", type_=_PC.c.last_seen.type),
        offline_after=None,
    )
    .returning(_PC.c.id)
)
_RAW_GO_OFFLINE = BatchStatement(_GO_OFFLINE)


def _event_row(t: Transition) -> dict[str, Any]:
    return {
        "b_pc": t.pc_id,
        "b_from": t.from_state,
        "b_to": t.to_state,
        "b_reason": t.reason,
        "b_at": t.at,
    }


def _event(session: Session, t: Transition) -> Transition:
    """Write the transition's power event, in the caller's transaction."""
    _INSERT_EVENT.execute(session.connection(), [_event_row(t)])
    return t


def set_offline_immediately(
    session: Session, machine_id: str, reason: str, now: dt.datetime
) -> Transition | None:
    """The seed's shutdown signal: the PC is offline now, last_seen is now, the reason kept.

    Returns the transition, or None when the PC was already offline for the same reason.
    Commits: the PC is going down and sends this once; the flip must be durable before the
    answer and before it is published on the bus (the agent fast path has no request
    transaction). The server sends its signals through SignalWriter, which commits many at once.
    """
    t = go_offline(session, machine_id, reason, now)
    session.commit()
    return t


def go_offline(
    session: Session, machine_id: str, reason: str, now: dt.datetime
) -> Transition | None:
    """set_offline_immediately's writes, in the caller's transaction (the caller commits)."""
    # The hot path runs on the driver's cursor (db.BatchStatement): the same SQL and values
    # SQLAlchemy would send, without its per-statement work (bench/shutdown_latency.py).
    conn = session.connection()
    for _ in range(2):  # a second time if it came back online between our two statements
        moved = _RAW_GO_OFFLINE.fetch(conn, {"b_mid": machine_id, "b_reason": reason, "b_now": now})
        if moved:
            return _event(
                session, Transition(moved[0][0], PcState.ONLINE, PcState.OFFLINE, reason, now)
            )
        # Already offline: keep the freshest reason (a late "shutdown" after "lost" is the
        # truth). Both UPDATEs hold to an offline PC: one that came back meanwhile goes off.
        offline = (_PC.c.machine_id == machine_id, _PC.c.state == PcState.OFFLINE)
        other = or_(_PC.c.reason.is_(None), _PC.c.reason != reason)
        changed = conn.execute(
            update(_PC)
            .where(*offline, other)
            .values(reason=reason, state_since=now, last_seen=now)
            .returning(_PC.c.id)
        ).first()
        if changed is not None:
            return _event(
                session, Transition(changed[0], PcState.OFFLINE, PcState.OFFLINE, reason, now)
            )
        same = conn.execute(
            update(_PC).where(*offline).values(last_seen=now).returning(_PC.c.id)
        ).first()
        if same is not None:
            return None
        known = conn.execute(select(_PC.c.id).where(_PC.c.machine_id == machine_id)).first()
        if known is None:
            break
    return None


@dataclass
class _Signal:
    machine_id: str
    reason: str
    at: dt.datetime
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # handed the writing over: write the queue, this one's batch included
    result: Transition | None = None
    error: BaseException | None = None


class SignalWriter:
    """Group commit of shutdown signals: every signal is answered after its own commit, and
    the signals that arrive while one commit waits for the disk share the next one.

    The first caller with no write under way writes; on PostgreSQL it first lets every request
    ready in the process reach this queue (a yield: `gather`), then writes all queued signals
    in one transaction and commits once. Callers that find a write under way wait; when it ends
    the writer hands the writing to the oldest of them (it answers its own PC at once, never
    serving the queue for ever). Each PostgreSQL commit waits for a WAL flush, which blocks the
    whole gevent worker (psycopg's waits are not cooperative here): one commit per signal held
    1,000 signals a second to seconds of queueing (docs/PERFORMANCE.md). SQLite in WAL mode
    does not flush at each commit; it writes one signal per commit, without the yield.

    A failed transaction fails every signal in it (each caller then keeps its signal in the
    journal, as before: services/agent.going_down).
    """

    def __init__(self, gather: bool) -> None:
        self.gather = gather
        self._lock = threading.Lock()
        self._queue: list[_Signal] = []
        self._writing = False
        self.commits = 0  # transactions written, and the signals in them (/healthz, bench)
        self.signals = 0

    def go_offline(
        self, session: Session, machine_id: str, reason: str, now: dt.datetime
    ) -> Transition | None:
        """set_offline_immediately, committed with whatever else is queued."""
        mine = _Signal(machine_id, reason, now)
        with self._lock:
            self._queue.append(mine)
            mine.lead = not self._writing
            self._writing = True
        if not mine.lead:
            mine.done.wait()
        if mine.lead:  # the first, or handed the writing over (mine is in the queue still)
            self._write_queue(session)
        if mine.error is not None:
            raise mine.error
        return mine.result

    def _write_queue(self, session: Session) -> None:
        if self.gather:
            time.sleep(0)  # under gevent: the requests ready to run queue their signals too
        with self._lock:
            batch, self._queue = self._queue, []
        try:
            self._write(session, batch)
            session.commit()
            self.commits += 1
            self.signals += len(batch)
        except BaseException as exc:
            with contextlib.suppress(Exception):  # the connection may be gone: close discards it
                session.rollback()
            for signal in batch:
                signal.result, signal.error = None, exc
        finally:
            with self._lock:
                if self._queue:  # arrived during the write: the oldest writes next
                    self._queue[0].lead = True
                    self._queue[0].done.set()
                else:
                    self._writing = False
            for signal in batch:
                signal.done.set()

    @staticmethod
    def _write(session: Session, batch: list[_Signal]) -> None:
        """go_offline for every signal, in order, with two waits for the database for all the
        ones that flip an online PC (the common case): their UPDATEs, then their events."""
        conn = session.connection()
        rows = [{"b_mid": g.machine_id, "b_reason": g.reason, "b_now": g.at} for g in batch]
        flipped = _RAW_GO_OFFLINE.fetch_each(conn, rows)
        for signal, moved in zip(batch, flipped, strict=True):
            if moved:
                signal.result = Transition(
                    moved[0][0], PcState.ONLINE, PcState.OFFLINE, signal.reason, signal.at
                )
        events = [g.result for g in batch if g.result is not None]
        _INSERT_EVENT.execute(conn, [_event_row(t) for t in events])
        for signal, moved in zip(batch, flipped, strict=True):
            if not moved:  # already offline (or unknown): the careful way, one by one
                signal.result = go_offline(session, signal.machine_id, signal.reason, signal.at)


def back_online_reason(pc: PcInfo, event: ClientEvent | None, boot_time: float | None) -> str:
    """Why an offline PC is in contact again: resume, reconnected (same boot) or boot."""
    if event == ClientEvent.RESUME or pc.reason == PowerReason.SLEEP:
        return PowerReason.RESUME
    same_boot = boot_time is not None and pc.boot_time is not None
    if same_boot and abs((boot_time or 0) - (pc.boot_time or 0)) < 5:
        return PowerReason.RECONNECTED
    return PowerReason.BOOT


class SignedOff(Conflict):
    """Contact from a PC that said it was going, without saying why it is back."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(
            f"this PC signed off ({reason}): only a heartbeat with event boot or resume brings "
            "it back online",
            code=ErrorCode.SIGNED_OFF,
        )


def mark_online(
    session: Session,
    pc: PcInfo,
    reason: str,
    now: dt.datetime,
    offline_after: float,
    *,
    comeback: bool = True,
) -> Transition | None:
    """Flip an offline PC online (conditional UPDATE); None if it already was, or if it signed
    off and this is no `comeback` (protocol.COMEBACK_EVENTS). Caller commits."""
    pc_id = pc.id  # read before expire(): afterwards it would reload the row
    pc_table = table(PcInfo)
    guard = [pc_table.c.id == pc_id, pc_table.c.state == PcState.OFFLINE]
    if not comeback:
        guard.append(pc_table.c.reason.not_in(SHUTDOWN_REASONS))
    result = session.execute(
        update(pc_table)
        .where(*guard)
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
    return _event(session, Transition(pc_id, PcState.OFFLINE, PcState.ONLINE, reason, now))


def apply_heartbeat(
    session: Session, pc: PcInfo, hb: HeartbeatRequest, now: dt.datetime, offline_after: float
) -> Transition | None:
    """Write one heartbeat at once (the slow path: state changes and events).

    Commits: a state change is published on the bus right after, and the command poll that
    revives a PC holds no request transaction while it waits.

    Core UPDATEs of what the heartbeat carries, without loading and flushing ORM objects
    (see bench/shutdown_latency.py); `pc` is expired afterwards, so reading it reloads.

    Raises SignedOff (nothing written) for a poll or plain heartbeat from a PC whose agent sent
    the shutdown signal: it was in flight as the agent signed off, and must not revive the PC.
    """
    pc_id = pc.id
    transition = None
    conn = session.connection()
    contact = _identity_values(hb)
    contact.update(last_seen=now, offline_after=now + dt.timedelta(seconds=offline_after))
    for _ in range(2):  # a second time if the PC went offline between our read and our write
        if pc.state != PcState.ONLINE:
            reason = back_online_reason(pc, hb.event, hb.boot_time)
            comeback = hb.event in COMEBACK_EVENTS
            transition = mark_online(session, pc, reason, now, offline_after, comeback=comeback)
        written = conn.execute(
            update(_PC).where(_PC.c.id == pc_id, _PC.c.state == PcState.ONLINE).values(contact)
        )
        if affected(written):
            break
        fresh = session.execute(
            select(PcInfo).where(PcInfo.id == pc_id).execution_options(populate_existing=True)
        ).scalar_one_or_none()
        if fresh is None:
            raise Unauthenticated("this PC was deleted; register again")
        pc = fresh
    else:
        session.rollback()
        raise SignedOff(pc.reason)
    metrics = metric_values(hb, now)
    done = conn.execute(update(_METRICS).where(_METRICS.c.pc_id == pc_id).values(metrics))
    if affected(done) == 0:
        conn.execute(insert(_METRICS).values(pc_id=pc_id, **metrics))
    session.commit()
    session.expire(pc)
    return transition


def _identity_values(hb: HeartbeatRequest) -> dict[str, Any]:
    """The pc_info columns a heartbeat sets: what it carries, and the user (gone at logoff)."""
    values = {
        name: getattr(hb, name)
        for name in ("hostname", "ip_address", "client_version", "boot_time")
        if getattr(hb, name) is not None
    }
    if "current_user" in hb.model_fields_set:
        values["current_user"] = hb.current_user
    elif hb.event == ClientEvent.LOGOFF:
        values["current_user"] = None
    if hb.hardware is not None:  # sent at boot, so specs never go stale
        values.update(hardware_values(hb.hardware))
    return values


def hardware_values(hw: Hardware) -> dict[str, Any]:
    """The pc_info columns a hardware report sets."""
    return {
        "os_name": hw.os_name,
        "os_version": hw.os_version,
        "os_edition": hw.os_edition,
        "cpu_model": hw.cpu_model,
        "cpu_cores": hw.cpu_cores,
        "cpu_threads": hw.cpu_threads,
        "ram_total": hw.ram_total,
        "ip_address": hw.ip_address,
        "mac_addresses": [m.lower().replace("-", ":") for m in hw.mac_addresses],
        "disks": [d.model_dump() for d in hw.disks],
    }


def metric_values(hb: HeartbeatRequest, now: dt.datetime) -> dict[str, Any]:
    """The pc_metrics columns a heartbeat sets: its time and every reading it carries."""
    values: dict[str, Any] = {
        name: getattr(hb, name)
        for name in ("cpu_percent", "ram_used", "ram_percent", "uptime")
        if getattr(hb, name) is not None
    }
    values["at"] = now
    # The lists with their hashes, which the heartbeat writer compares .
    if hb.processes is not None:
        values["processes"] = hb.processes
        values["processes_hash"] = list_hash(hb.processes)
    if hb.disks is not None:
        values["disks"] = [d.model_dump() for d in hb.disks]
        values["disks_hash"] = list_hash(values["disks"])
    return values


def list_hash(items: list[Any]) -> int:
    """A stable 64-bit hash of a JSON list (the same in every process, unlike hash())."""
    text = json.dumps(items, separators=(",", ":"), sort_keys=True).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big", signed=True)


REREGISTER_WINDOW = dt.timedelta(hours=1)  # an admin's "allow re-registration" lasts this long
_CRED = table(PcCredential)


def register(
    session: Session,
    req: RegisterRequest,
    now: dt.datetime,
    offline_after: float,
    *,
    token: str | None = None,
    approve: bool = False,
) -> tuple[PcInfo, str, Transition | None]:
    """Create or refresh the PC for `req.machine_id` and issue a new token. Caller commits.

    A new machine is approved when `approve` (its PIN auto-approves); otherwise it gets no
    secret-carrying command until an admin approves it. A known machine registers again (a
    re-imaged PC keeps its record, room, seat and history; its old token stops working) only
    with its current `token` (the approval is kept) or while an admin allows it
    (`reregister_until`, used up by this registration; approved only if `approve`). Anything
    else is 409 `machine_registered`: a live PIN alone cannot take over a known machine.
    """
    pc = session.execute(
        select(PcInfo).where(PcInfo.machine_id == req.machine_id)
    ).scalar_one_or_none()
    transition: Transition | None = None
    new_token_value = new_token()
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
            approved=approve,
        )
        session.add(pc)
        session.flush()
        session.add(PcMetrics(pc_id=pc.id))
        session.add(PcCredential(pc_id=pc.id, token_hash=sha256(new_token_value), created_at=now))
        transition = _event(
            session, Transition(pc.id, None, PcState.ONLINE, PowerReason.REGISTERED, now)
        )
    else:
        approved = _authorize_again(session, pc, token, sha256(new_token_value), now)
        if pc.state != PcState.ONLINE:
            transition = mark_online(session, pc, PowerReason.BOOT, now, offline_after)
        pc.approved = approved or approve  # after mark_online(), whose expire() would drop it
    pc.hostname = req.hostname
    pc.client_version = req.client_version
    pc.last_seen = now
    pc.offline_after = now + dt.timedelta(seconds=offline_after)
    for name, value in hardware_values(req.hardware).items():
        setattr(pc, name, value)
    return pc, new_token_value, transition


def _authorize_again(
    session: Session, pc: PcInfo, token: str | None, new_hash: str, now: dt.datetime
) -> bool:
    """Let a known machine register again, and swap in its new token's hash; answers whether
    it stays approved. Both ways in are one conditional UPDATE whose row count is checked, so
    two registrations racing with the same token, or in the same allowed window, cannot both
    win (the loser is refused as if it came second)."""
    pc_id, was_approved = pc.id, pc.approved  # read before any UPDATE expires them
    if token is not None:
        swapped = session.execute(
            update(_CRED)
            .where(_CRED.c.pc_id == pc_id, _CRED.c.token_hash == sha256(token))
            .values(token_hash=new_hash, created_at=now)
        )
        if affected(swapped) == 1:
            return was_approved  # the PC proved who it is: it keeps its approval
    allowed = session.execute(
        update(_PC)
        .where(_PC.c.id == pc_id, _PC.c.reregister_until > now)
        .values(reregister_until=None)
    )
    if affected(allowed) != 1:
        raise Conflict(
            f"machine {pc.machine_id} is already registered (as {pc.hostname}); an admin must "
            "allow re-registration on the PC's page, or delete the PC",
            code=ErrorCode.MACHINE_REGISTERED,
        )
    moved = session.execute(
        update(_CRED).where(_CRED.c.pc_id == pc_id).values(token_hash=new_hash, created_at=now)
    )
    if affected(moved) == 0:
        session.add(PcCredential(pc_id=pc_id, token_hash=new_hash, created_at=now))
    session.expire(pc, ["reregister_until"])
    return False  # whoever came in the window registered with a PIN alone


def allow_reregister(pc: PcInfo, now: dt.datetime) -> dt.datetime:
    """An admin lets this machine register again without its token (a reinstall, a lost
    token), once, within REREGISTER_WINDOW. Answers until when. Caller commits."""
    until = now + REREGISTER_WINDOW
    pc.reregister_until = until
    return until


def approve_pc(pc: PcInfo) -> bool:
    """An admin vouches for the PC: it may now get secret-carrying commands. Answers whether
    it changed. Caller commits."""
    if pc.approved:
        return False
    pc.approved = True
    return True


def mark_overdue_lost(session: Session, now: dt.datetime, retry_in: float) -> list[Transition]:
    """The checker: flip every online PC whose deadline has passed to offline, reason `lost`.

    Commits: each PC is its own transaction, so one failing row cannot undo the others; a
    row that fails gets its deadline pushed forward by `retry_in` seconds and the loop goes
    on.
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
