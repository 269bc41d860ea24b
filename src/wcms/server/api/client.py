"""The agent API: register, heartbeat, shutdown (the seed's endpoint). Thin views."""

from __future__ import annotations

import contextlib
import hmac
import logging
import math
from typing import Any

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from wcms.protocol import CLIENT_PREFIX, ErrorCode, PcState
from wcms.server.auth import PcIdentity, bearer, client_address, current_pc, db, identify_pc
from wcms.server.db import utcnow
from wcms.server.errors import ApiError, db_unavailable
from wcms.server.models import PcInfo
from wcms.server.openapi import documented
from wcms.server.runtime import Runtime, runtime
from wcms.server.schemas import HeartbeatRequest, RegisterRequest, ShutdownRequest, parse_body
from wcms.server.services import accounts, pc_service, ratelimit

log = logging.getLogger(__name__)
bp = Blueprint("client_api", __name__, url_prefix=CLIENT_PREFIX)


def _answer(body: dict[str, Any], status: int = 200) -> ResponseReturnValue:
    return jsonify(runtime().agent_answer(body)), status


@bp.post("/register")
@documented(
    "Register a PC with a PIN; returns its token. A machine already registered must also send "
    "its current token (Authorization: Bearer) or have an admin allow it first, else 409 "
    "`machine_registered`",
    auth="none",
    tag="client",
    body=RegisterRequest,
    ok=201,
    errors=(400, 403, 409, 413, 415, 429),
)
def register() -> ResponseReturnValue:
    rt = runtime()
    addr = client_address()
    req = parse_body(RegisterRequest)
    s = db()
    now = utcnow()
    # One wrong PIN's worth of every limit is taken before the PIN is evaluated, atomically, and
    # given back if it was right: concurrent requests cannot all pass one remaining try.
    try:
        attempt = rt.limits.take_all(ratelimit.pin_rules(addr))
    except ratelimit.Limited as limited:
        wait = math.ceil(limited.retry_after)
        raise ApiError(
            429,
            ErrorCode.RATE_LIMITED,
            f"too many wrong PINs; try again in {wait} s",
            headers={"Retry-After": str(wait)},
        ) from None
    try:
        pin = accounts.consume_pin(s, rt.secret_key, req.pin, now)
    except ApiError:
        s.rollback()
        log.warning("wrong registration PIN from %s (machine %s)", addr, req.machine_id)
        raise
    try:
        pc, token, transition = pc_service.register(
            s, req, now, rt.timing.offline_after, token=bearer(), approve=pin.auto_approve
        )
        s.commit()
    except IntegrityError:  # the same machine registering twice at the same instant
        s.rollback()
        raise ApiError(409, ErrorCode.CONFLICT, "registration raced; try again") from None
    except ApiError:  # a known machine without its token or an admin's leave: the PIN is kept
        s.rollback()
        raise
    finally:  # the PIN was right: not a guess. After the commit: SQLite has one writer
        attempt.give_back()
    rt.forget_tokens(pc.id)  # the PC's old token, wherever cached, is dead; its polls end
    rt.publish(transition)
    rt.buffer.set_online(pc.id, True)
    return _answer({"pc_id": pc.id, "token": token, "state": PcState.ONLINE}, 201)


@bp.post("/heartbeat")
@documented(
    "Report load and events; keeps the PC online", auth="pc", tag="client", body=HeartbeatRequest
)
def heartbeat() -> ResponseReturnValue:
    hb = parse_body(HeartbeatRequest)
    who = current_pc(hb.machine_id)
    rt = runtime()
    if buffered(rt, who, hb):
        return _answer({"state": PcState.ONLINE})
    now = utcnow()
    s = db()
    pc = s.get(PcInfo, who.pc_id)
    if pc is None:
        raise ApiError(401, ErrorCode.INVALID_TOKEN, "this PC was deleted; register again")
    transition = pc_service.apply_heartbeat(s, pc, hb, now, rt.timing.offline_after)
    rt.buffer.set_online(who.pc_id, True)
    rt.publish(transition)
    if transition is None and hb.event is not None:
        rt.bus.publish({"type": "pc", "pc_id": who.pc_id, "event": str(hb.event)})
    return _answer({"state": PcState.ONLINE})


@bp.post("/shutdown")
@documented(
    "The OS is going down: mark the PC offline at once (kept on disk if the database is away)",
    auth="pc",
    tag="client",
    body=ShutdownRequest,
    errors=(503,),
)
def shutdown() -> ResponseReturnValue:
    req = parse_body(ShutdownRequest)
    rt = runtime()
    return _answer(going_down(rt, db(), shutdown_caller(rt, bearer(), req.machine_id), req.reason))


# The two steps the agent fast path (server/fastpath.py) shares with the views above.


def buffered(rt: Runtime, who: PcIdentity, hb: HeartbeatRequest) -> bool:
    """The heartbeat hot path: a plain report from a PC this process knows to be online goes
    into the buffer (written in the next batch). False: it changes state, take the slow path."""
    if hb.event is None and hb.hardware is None and rt.buffer.knows_online(who.pc_id):
        rt.buffer.add(who.pc_id, hb, utcnow())
        return True
    return False


def shutdown_caller(rt: Runtime, token: str | None, machine_id: str) -> PcIdentity:
    """The PC sending a shutdown signal (auth.identify_pc), from the token cache even past its
    TTL while the database is away: the signal is sent once, so a PC this process knows must
    not be refused for want of a database. A token the cache does not hold cannot be checked
    then: 503 `database_unavailable`."""
    try:
        return identify_pc(rt, token, machine_id)
    except SQLAlchemyError as exc:
        hit = rt.tokens.get(accounts.sha256(token)) if token is not None else None
        if hit is None or not db_unavailable(exc):
            raise
        if not hmac.compare_digest(hit[1], machine_id):
            raise ApiError(
                403,
                ErrorCode.MACHINE_MISMATCH,
                "this token belongs to another machine; register again",
            ) from None
        return PcIdentity(hit[0], hit[1])


def going_down(rt: Runtime, s: Session, who: PcIdentity, reason: str) -> dict[str, Any]:
    """The shutdown signal: offline at once with its reason; answers the body to send.

    While the database is away the signal is kept in the server's journal on disk
    (services/spool.py) and applied, in order and as of now, once it answers: the answer then
    says `"queued": true`. While signals wait there, new ones join them, so none overtakes an
    older one.
    """
    now = utcnow()
    rt.buffer.set_online(who.pc_id, False)  # a buffered heartbeat must not revive it
    if not rt.spool.pending:
        try:
            rt.publish(pc_service.set_offline_immediately(s, who.machine_id, reason, now))
            return {"state": PcState.OFFLINE, "reason": reason}
        except SQLAlchemyError as exc:
            if not db_unavailable(exc):
                raise
            _rollback_quietly(s)
    try:
        entry = rt.spool.append(who.pc_id, who.machine_id, reason, now)
    except OSError:
        log.exception("could not keep the shutdown signal of pc %s on disk", who.pc_id)
        raise ApiError(
            503, ErrorCode.DATABASE_UNAVAILABLE, "the database is away and the signal not kept"
        ) from None
    log.warning(
        "database away: shutdown signal of pc %s (%s) kept as #%d", who.pc_id, reason, entry.seq
    )
    return {"state": PcState.OFFLINE, "reason": reason, "queued": True}


def _rollback_quietly(s: Session) -> None:
    with contextlib.suppress(SQLAlchemyError):  # the connection is gone; close discards it
        s.rollback()
