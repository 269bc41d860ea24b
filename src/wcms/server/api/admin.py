"""The admin JSON API, used by the dashboard and by automation with an API key. Thin views."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from pydantic import Field
from sqlalchemy import select

from wcms.protocol import ErrorCode, PresenceMode
from wcms.server.auth import audit_action, current_admin, db
from wcms.server.db import utcnow
from wcms.server.errors import ApiError, found
from wcms.server.models import ApiKey, AuditLog, PcInfo, RegistrationPin, Setting
from wcms.server.openapi import documented
from wcms.server.runtime import runtime
from wcms.server.schemas import Strict, parse_body, query_int
from wcms.server.services import accounts, views

bp = Blueprint("admin_api", __name__, url_prefix="/api")


@bp.before_request
def _require_admin() -> None:
    current_admin()


@bp.get("/me")
@documented("Who is calling", auth="admin", tag="admin")
def me() -> ResponseReturnValue:
    who = current_admin()
    return jsonify({"name": who.name, "admin_id": who.admin_id})


# ---------------------------------------------------------------- PCs


@bp.get("/pcs")
@documented(
    "All PCs with state, reason, since, seat, user and load",
    auth="admin",
    tag="pcs",
    query={"room_id": "only this room"},
)
def list_pcs() -> ResponseReturnValue:
    room_id = query_int("room_id", 0, 0, 2**31) or None
    pcs = views.list_pcs(db(), room_id)
    return jsonify({"pcs": pcs, "count": len(pcs)})


@bp.get("/pcs/<int:pc_id>")
@documented(
    "One PC with hardware, metrics history and power timeline",
    auth="admin",
    tag="pcs",
    query={"days": "timeline length, 1-90 (default 7)"},
)
def get_pc(pc_id: int) -> ResponseReturnValue:
    days = query_int("days", 7, 1, 90)
    return jsonify(
        views.pc_detail(
            db(), found(db().get(PcInfo, pc_id), f"no PC with id {pc_id}"), utcnow(), days
        )
    )


@bp.delete("/pcs/<int:pc_id>")
@documented("Delete a PC and its history; its token stops working", auth="admin", tag="pcs")
def delete_pc(pc_id: int) -> ResponseReturnValue:
    pc = found(db().get(PcInfo, pc_id), f"no PC with id {pc_id}")
    s = db()
    audit_action("pc.delete", pc.hostname, pc_id=pc.id, machine_id=pc.machine_id)
    s.delete(pc)
    s.commit()
    rt = runtime()
    rt.forget_tokens(pc_id)
    rt.buffer.set_online(pc_id, False)
    rt.bus.publish({"type": "pc_deleted", "pc_id": pc_id})
    return jsonify({"deleted": pc_id})


# ---------------------------------------------------------------- registration PINs


class PinCreate(Strict):
    multi_use: bool = False
    expires_minutes: Annotated[int, Field(ge=1, le=7 * 24 * 60)] = 10


@bp.get("/pins")
@documented(
    "Registration PINs (the PINs themselves are never shown again)", auth="admin", tag="pins"
)
def list_pins() -> ResponseReturnValue:
    now = utcnow()
    rows = db().execute(select(RegistrationPin).order_by(RegistrationPin.id.desc()).limit(200))
    return jsonify({"pins": [views.pin_view(p, now) for p in rows.scalars()]})


@bp.post("/pins")
@documented(
    "Create a registration PIN; the answer holds it once",
    auth="admin",
    tag="pins",
    body=PinCreate,
    ok=201,
)
def create_pin() -> ResponseReturnValue:
    req = parse_body(PinCreate)
    s, now = db(), utcnow()
    who = current_admin()
    row, pin = accounts.create_pin(
        s,
        runtime().secret_key,
        who.name,
        now,
        dt.timedelta(minutes=req.expires_minutes),
        req.multi_use,
    )
    audit_action(
        "pin.create", f"****{row.hint}", multi_use=req.multi_use, minutes=req.expires_minutes
    )
    s.commit()
    return jsonify({**views.pin_view(row, now), "pin": pin}), 201


@bp.delete("/pins/<int:pin_id>")
@documented("Revoke a PIN", auth="admin", tag="pins")
def revoke_pin(pin_id: int) -> ResponseReturnValue:
    s, now = db(), utcnow()
    row = found(s.get(RegistrationPin, pin_id), f"no PIN with id {pin_id}")
    if row.revoked_at is None:
        row.revoked_at = now
        audit_action("pin.revoke", f"****{row.hint}")
    s.commit()
    return jsonify(views.pin_view(row, now))


# ---------------------------------------------------------------- API keys


class KeyCreate(Strict):
    name: Annotated[str, Field(min_length=1, max_length=100)]


def _key_view(k: ApiKey) -> dict[str, object]:
    return {
        "id": k.id,
        "name": k.name,
        "prefix": k.prefix,
        "created_at": views.iso(k.created_at),
        "last_used_at": views.iso(k.last_used_at),
        "revoked": k.revoked_at is not None,
    }


@bp.get("/apikeys")
@documented("API keys", auth="admin", tag="admin")
def list_keys() -> ResponseReturnValue:
    rows = db().execute(select(ApiKey).order_by(ApiKey.id)).scalars()
    return jsonify({"apikeys": [_key_view(k) for k in rows]})


@bp.post("/apikeys")
@documented(
    "Create an API key; the answer holds it once", auth="admin", tag="admin", body=KeyCreate, ok=201
)
def create_key() -> ResponseReturnValue:
    req = parse_body(KeyCreate)
    s = db()
    try:
        row, key = accounts.create_api_key(s, req.name, utcnow())
    except accounts.AccountError as exc:
        raise ApiError(400, ErrorCode.VALIDATION, str(exc)) from None
    audit_action("apikey.create", req.name)
    s.commit()
    return jsonify({**_key_view(row), "key": key}), 201


@bp.delete("/apikeys/<int:key_id>")
@documented("Revoke an API key", auth="admin", tag="admin")
def revoke_key(key_id: int) -> ResponseReturnValue:
    s = db()
    row = found(s.get(ApiKey, key_id), f"no API key with id {key_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        audit_action("apikey.revoke", row.name)
    s.commit()
    return jsonify(_key_view(row))


# ---------------------------------------------------------------- settings and audit


class SettingsUpdate(Strict):
    presence_mode: Literal["fast", "standard", "conservative"]


@bp.get("/settings")
@documented("Presence mode and its timing", auth="admin", tag="admin")
def get_settings() -> ResponseReturnValue:
    rt = runtime()
    return jsonify({"presence_mode": str(rt.mode), "timing": rt.timing.as_wire()})


@bp.put("/settings")
@documented(
    "Change the presence mode; clients follow on their next answer",
    auth="admin",
    tag="admin",
    body=SettingsUpdate,
)
def put_settings() -> ResponseReturnValue:
    req = parse_body(SettingsUpdate)
    s = db()
    row = s.get(Setting, "presence_mode")
    if row is None:
        s.add(Setting(key="presence_mode", value=req.presence_mode))
    else:
        row.value = req.presence_mode
    audit_action("settings.presence_mode", None, value=req.presence_mode)
    s.commit()
    rt = runtime()
    rt.mode = PresenceMode(req.presence_mode)
    return jsonify({"presence_mode": str(rt.mode), "timing": rt.timing.as_wire()})


@bp.get("/audit")
@documented(
    "The audit log of admin actions, newest first",
    auth="admin",
    tag="admin",
    query={"limit": "1-1000 (default 100)"},
)
def audit_log() -> ResponseReturnValue:
    limit = query_int("limit", 100, 1, 1000)
    rows = db().execute(select(AuditLog).order_by(AuditLog.id.desc()).limit(limit)).scalars()
    return jsonify(
        {
            "entries": [
                {
                    "id": r.id,
                    "at": views.iso(r.at),
                    "actor": r.actor,
                    "action": r.action,
                    "target": r.target,
                    "details": r.details,
                    "ip": r.ip,
                }
                for r in rows
            ]
        }
    )
