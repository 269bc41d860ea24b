"""The agent's calls as steps shared by both ways in: the Flask views (api/client.py,
api/commands.py) and the agent fast path (fastpath.py) parse the request, then call these.

- identify_pc: who is calling (a PC's bearer token, cached per process);
- buffered: a plain heartbeat from a PC known online goes into the heartbeat buffer;
- shutdown_caller and going_down: the shutdown signal, kept on disk while the database is away;
- wait_for_commands: the command long poll, on the PC's doorbell (services/doorbell.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hmac
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from wcms.protocol import ErrorCode, PcState
from wcms.server.db import db_unavailable, table, utcnow
from wcms.server.models import PcCredential, PcInfo
from wcms.server.runtime import Runtime
from wcms.server.schemas import HeartbeatRequest, PollQuery
from wcms.server.services import accounts, command_queue, pc_service
from wcms.server.services.command_queue import Change
from wcms.server.services.errors import Forbidden, Unauthenticated, Unavailable

log = logging.getLogger(__name__)

# Built once, Core only: a token cache miss costs one indexed SELECT and little Python.
_PC, _CRED = table(PcInfo), table(PcCredential)
_TOKEN_LOOKUP = (
    select(_PC.c.id, _PC.c.machine_id)
    .join(_CRED, _CRED.c.pc_id == _PC.c.id)
    .where(_CRED.c.token_hash == bindparam("digest"))
)
_MISMATCH = "this token belongs to another machine; register again"
_DELETED = "this PC was deleted; register again"


@dataclass(frozen=True)
class PcIdentity:
    pc_id: int
    machine_id: str


def identify_pc(rt: Runtime, token: str | None, machine_id: str) -> PcIdentity:
    """The PC `token` belongs to; Unauthenticated without a valid token, Forbidden for another
    PC's machine id.

    The cache miss reads through its own short connection, so no transaction is held while a
    poll waits.
    """
    if token is None:
        raise Unauthenticated("missing bearer token")
    digest = accounts.sha256(token)
    hit = rt.tokens.fresh(digest)
    if hit is None:
        with rt.engine.connect() as conn:
            row = conn.execute(_TOKEN_LOOKUP, {"digest": digest}).first()
        if row is None:
            rt.tokens.forget(digest)
            raise Unauthenticated("unknown or revoked token")
        hit = (row[0], row[1])
        rt.tokens.remember(digest, *hit)
    if not hmac.compare_digest(hit[1], machine_id):
        raise Forbidden(_MISMATCH, code=ErrorCode.MACHINE_MISMATCH)
    return PcIdentity(hit[0], hit[1])


# ------------------------------------------------------------------------------- heartbeats


def buffered(rt: Runtime, who: PcIdentity, hb: HeartbeatRequest) -> bool:
    """The heartbeat hot path: a plain report from a PC this process knows to be online goes
    into the buffer (written in the next batch). False: it changes state, take the slow path."""
    if hb.event is None and hb.hardware is None and rt.buffer.knows_online(who.pc_id):
        rt.buffer.add(who.pc_id, hb, utcnow())
        return True
    return False


# ------------------------------------------------------------------------------- shutdown


def shutdown_caller(rt: Runtime, token: str | None, machine_id: str) -> PcIdentity:
    """The PC sending a shutdown signal (identify_pc), from the token cache even past its TTL
    while the database is away: the signal is sent once, so a PC this process knows must not
    be refused for want of a database. A token the cache does not hold cannot be checked then:
    503 `database_unavailable`."""
    try:
        return identify_pc(rt, token, machine_id)
    except SQLAlchemyError as exc:
        hit = rt.tokens.known(accounts.sha256(token)) if token is not None else None
        if hit is None or not db_unavailable(exc):
            raise
        if not hmac.compare_digest(hit[1], machine_id):
            raise Forbidden(_MISMATCH, code=ErrorCode.MACHINE_MISMATCH) from None
        return PcIdentity(hit[0], hit[1])


def going_down(rt: Runtime, s: Session, who: PcIdentity, reason: str) -> dict[str, Any]:
    """The shutdown signal: offline at once with its reason; answers the body to send.

    While the database is away the signal is kept in the server's journal on disk
    (services/spool.py) and applied, in order and as of now, once it answers: the answer then
    says `"queued": true`. While signals wait there, new ones join them, so none overtakes an
    older one.

    Commits: the flip is committed (with other PCs' signals: pc_service.SignalWriter) before it
    is published on the bus and answered.
    """
    now = utcnow()
    rt.buffer.set_online(who.pc_id, False)  # a buffered heartbeat must not revive it
    if not rt.spool.pending:
        try:
            rt.publish(rt.signals.go_offline(s, who.machine_id, reason, now))
            return {"state": PcState.OFFLINE, "reason": reason}
        except SQLAlchemyError as exc:
            if not db_unavailable(exc):
                raise
            _rollback_quietly(s)
    try:
        entry = rt.spool.append(who.pc_id, who.machine_id, reason, now)
    except OSError:
        log.exception("could not keep the shutdown signal of pc %s on disk", who.pc_id)
        raise Unavailable("the database is away and the signal not kept") from None
    log.warning(
        "database away: shutdown signal of pc %s (%s) kept as #%d", who.pc_id, reason, entry.seq
    )
    return {"state": PcState.OFFLINE, "reason": reason, "queued": True}


def _rollback_quietly(s: Session) -> None:
    with contextlib.suppress(SQLAlchemyError):  # the connection is gone; close discards it
        s.rollback()


# ------------------------------------------------------------------------------- commands


def publish_changes(rt: Runtime, changes: Iterable[Change]) -> None:
    """Tell the dashboards (the live bus) what happened to commands."""
    for change in changes:
        rt.broadcast(change.as_message())


def wait_for_commands(
    rt: Runtime,
    db: Callable[[], Session],
    who: PcIdentity,
    query: PollQuery,
    token: str | None,
) -> list[dict[str, Any]]:
    """The long poll itself (the Flask view and the agent fast path both run it).

    `db` opens the caller's session on first use: most polls never need one. `token` is the
    one the poll was authenticated with: when the PC's token is revoked (it registered again,
    or was deleted) the poll is woken and answers 401 if it was this one, and it is checked
    in the database again right before a secret-carrying command is handed over.
    """
    digest = accounts.sha256(token) if token is not None else None
    try:
        return _wait(rt, db, who, query, digest)
    except Unauthenticated:
        if digest is not None:
            rt.tokens.forget(digest)  # the database says it is gone, wherever it was revoked
        raise


def _wait(
    rt: Runtime,
    db: Callable[[], Session],
    who: PcIdentity,
    query: PollQuery,
    digest: str | None,
) -> list[dict[str, Any]]:
    limit = rt.presence.timing.poll_timeout
    wait = limit if query.timeout is None else min(query.timeout, limit)
    wait *= random.uniform(0.6, 1.0)  # polls that start together end apart (docs/API.md)
    _contact(rt, db, who, utcnow(), query.boot_time)
    deadline = time.monotonic() + wait
    with rt.doorbell.listen(who.pc_id) as bell:
        if digest is not None and digest not in rt.tokens:
            # Revoked here (forget_tokens) after this poll was let in, before it listened: the
            # revocation's ring came too early for it, so it asks the database itself.
            command_queue.may_receive_secrets(db(), who.pc_id, digest)
        # Most polls find nothing: a PC known to have nothing open skips the database.
        idle = rt.doorbell.is_idle(who.pc_id) and rt.notifier.trusted
        found = [] if idle else _deliver(rt, db, who.pc_id, query, digest)
        while not found:
            left = deadline - time.monotonic()
            if left <= 0 or not bell.wait(left) or rt.doorbell.closed:
                break
            bell.clear()
            if bell.revoked:  # a token of this PC was revoked: was it this poll's?
                bell.revoked = False
                command_queue.may_receive_secrets(db(), who.pc_id, digest)
            found = _deliver(rt, db, who.pc_id, query, digest)
    return found


def _contact(
    rt: Runtime,
    db: Callable[[], Session],
    who: PcIdentity,
    now: dt.datetime,
    boot_time: float | None,
) -> None:
    """A poll is contact, exactly like a heartbeat without a report (and it revives a PC)."""
    if rt.buffer.knows_online(who.pc_id):
        rt.buffer.touch(who.pc_id, who.machine_id, now)
        return
    s = db()
    pc = s.get(PcInfo, who.pc_id)
    if pc is None:
        raise Unauthenticated(_DELETED)
    hb = HeartbeatRequest(machine_id=who.machine_id, boot_time=boot_time)
    transition = pc_service.apply_heartbeat(s, pc, hb, now, rt.presence.timing.offline_after)
    rt.buffer.set_online(who.pc_id, True)
    rt.publish(transition)


def _deliver(
    rt: Runtime, db: Callable[[], Session], pc_id: int, query: PollQuery, digest: str | None
) -> list[dict[str, Any]]:
    now = utcnow()

    def vouch() -> bool:  # right before a secret goes out from memory: ask the database
        return command_queue.may_receive_secrets(db(), pc_id, digest)

    staged, handed, left = rt.outbox.take(pc_id, now, query.boot_time, vouch)
    publish_changes(rt, handed)
    if staged and not left:  # a bulk command's fast way: no database read (services/outbox.py)
        rt.doorbell.mark_busy(pc_id)
        return staged
    rings_before = rt.doorbell.rings(pc_id)
    s = db()
    rt.outbox.flush(s)  # marks first, so nothing staged is handed over twice
    wire, changes = command_queue.deliver(
        s,
        pc_id,
        now,
        server_secret=rt.secret_key,
        boot_time=query.boot_time,
        token_digest=digest,
    )
    publish_changes(rt, changes)
    wire = staged + wire
    if wire:
        rt.doorbell.mark_busy(pc_id)
    elif not command_queue.has_open(s, pc_id):
        rt.doorbell.mark_idle(pc_id, rings_before)
    return wire
