"""The agent API: register, heartbeat, shutdown (the seed's endpoint). Thin views."""

from __future__ import annotations

import logging
import math
from typing import Any

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import IntegrityError

from wcms.protocol import CLIENT_PREFIX, ErrorCode, PcState
from wcms.server.api.request import parse_body, runtime
from wcms.server.auth import bearer, client_address, current_pc, db
from wcms.server.db import utcnow
from wcms.server.errors import ApiError
from wcms.server.models import PcInfo
from wcms.server.openapi import documented
from wcms.server.schemas import HeartbeatRequest, RegisterRequest, ShutdownRequest
from wcms.server.services import accounts, agent, audit, pc_service, ratelimit
from wcms.server.services.errors import DomainError, Unauthenticated

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
        attempt = rt.limiters.rates.take_all(ratelimit.pin_rules(addr))
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
    except DomainError:
        s.rollback()
        log.warning("wrong registration PIN from %s (machine %s)", addr, req.machine_id)
        # Every live PIN counts the wrong try, whichever address or node it came from. Committed
        # here, below the 403: the count must outlive the refusal.
        worn = accounts.count_wrong_pin(s, now, rt.settings.pin_wrong_tries)
        for row in worn:
            log.warning("PIN ****%s revoked after %d wrong PINs", row.hint, row.wrong_tries)
            audit.record(
                s, "system", "pin.revoke", now, f"****{row.hint}", {"wrong_tries": row.wrong_tries}
            )
        s.commit()
        raise
    try:
        pc, token, transition = pc_service.register(
            s, req, now, rt.presence.timing.offline_after, token=bearer(), approve=pin.auto_approve
        )
        rt.revoke(s, pc.id)  # its old token dies in the other processes on commit
        s.commit()
    except IntegrityError:  # the same machine registering twice at the same instant
        s.rollback()
        raise ApiError(409, ErrorCode.CONFLICT, "registration raced; try again") from None
    except DomainError:  # a known machine without its token or an admin's leave: the PIN is kept
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
    "Report load and events; keeps the PC online. After the PC's shutdown signal only event "
    "`boot` or `resume` brings it back; other heartbeats answer 409 `signed_off`",
    auth="pc",
    tag="client",
    body=HeartbeatRequest,
    errors=(409,),
)
def heartbeat() -> ResponseReturnValue:
    hb = parse_body(HeartbeatRequest)
    who = current_pc(hb.machine_id)
    rt = runtime()
    if agent.buffered(rt, who, hb):
        return _answer({"state": PcState.ONLINE})
    now = utcnow()
    s = db()
    pc = s.get(PcInfo, who.pc_id)
    if pc is None:
        raise Unauthenticated("this PC was deleted; register again")
    transition = pc_service.apply_heartbeat(s, pc, hb, now, rt.presence.timing.offline_after)
    rt.buffer.set_online(who.pc_id, True)
    rt.publish(transition)
    if transition is None and hb.event is not None:
        rt.broadcast({"type": "pc", "pc_id": who.pc_id, "event": str(hb.event)})
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
    who = agent.shutdown_caller(rt, bearer(), req.machine_id)
    return _answer(agent.going_down(rt, db(), who, req.reason))
