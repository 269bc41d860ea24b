"""The agent API: register, heartbeat, shutdown (the seed's endpoint). Thin views."""

from __future__ import annotations

import math
import time
from typing import Any

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from wcms.protocol import CLIENT_PREFIX, ErrorCode, PcState
from wcms.server.auth import PcIdentity, client_address, current_pc, db
from wcms.server.db import utcnow
from wcms.server.errors import ApiError
from wcms.server.models import PcInfo
from wcms.server.openapi import documented
from wcms.server.runtime import Runtime, runtime
from wcms.server.schemas import HeartbeatRequest, RegisterRequest, ShutdownRequest, parse_body
from wcms.server.services import accounts, pc_service

bp = Blueprint("client_api", __name__, url_prefix=CLIENT_PREFIX)


def _answer(body: dict[str, Any], status: int = 200) -> ResponseReturnValue:
    return jsonify(runtime().agent_answer(body)), status


@bp.post("/register")
@documented(
    "Register a PC with a PIN; returns its token",
    auth="none",
    tag="client",
    body=RegisterRequest,
    ok=201,
    errors=(400, 403, 409, 413, 415, 429),
)
def register() -> ResponseReturnValue:
    rt = runtime()
    addr = client_address()
    wait = rt.pin_limiter.retry_after(addr, time.monotonic())
    if wait > 0:
        raise ApiError(
            429,
            ErrorCode.RATE_LIMITED,
            f"too many wrong PINs from {addr}; try again in {math.ceil(wait)} s",
            headers={"Retry-After": str(math.ceil(wait))},
        )
    req = parse_body(RegisterRequest)
    s = db()
    now = utcnow()
    try:
        accounts.consume_pin(s, rt.secret_key, req.pin, now)
    except ApiError:
        s.rollback()
        rt.pin_limiter.failed(addr, time.monotonic())
        raise
    try:
        pc, token, transition = pc_service.register(s, req, now, rt.timing.offline_after)
        s.commit()
    except IntegrityError:  # the same machine registering twice at the same instant
        s.rollback()
        raise ApiError(409, ErrorCode.CONFLICT, "registration raced; try again") from None
    rt.forget_tokens(pc.id)  # the PC's old token, wherever cached, is dead
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
    "The OS is going down: mark the PC offline at once",
    auth="pc",
    tag="client",
    body=ShutdownRequest,
)
def shutdown() -> ResponseReturnValue:
    req = parse_body(ShutdownRequest)
    return _answer(going_down(runtime(), db(), current_pc(req.machine_id), req.reason))


# The two steps the agent fast path (server/fastpath.py) shares with the views above.


def buffered(rt: Runtime, who: PcIdentity, hb: HeartbeatRequest) -> bool:
    """The heartbeat hot path: a plain report from a PC this process knows to be online goes
    into the buffer (written in the next batch). False: it changes state, take the slow path."""
    if hb.event is None and hb.hardware is None and rt.buffer.knows_online(who.pc_id):
        rt.buffer.add(who.pc_id, hb, utcnow())
        return True
    return False


def going_down(rt: Runtime, s: Session, who: PcIdentity, reason: str) -> dict[str, Any]:
    """The shutdown signal: offline at once with its reason; answers the body to send."""
    rt.buffer.set_online(who.pc_id, False)  # a buffered heartbeat must not revive it
    rt.publish(pc_service.set_offline_immediately(s, who.machine_id, reason, utcnow()))
    return {"state": PcState.OFFLINE, "reason": reason}
