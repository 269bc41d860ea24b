"""The admin JSON API, used by the dashboard and by automation with an API key. Thin views."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from pydantic import Field
from sqlalchemy import select

from wcms.protocol import ErrorCode, PresenceMode
from wcms.server.api.request import parse_body, query_int, runtime
from wcms.server.auth import audit_action, current_admin, db
from wcms.server.db import utcnow
from wcms.server.errors import ApiError
from wcms.server.models import Admin, ApiKey, AuditLog, PcInfo, RegistrationPin, Setting
from wcms.server.openapi import documented
from wcms.server.schemas import Strict
from wcms.server.services import accounts, pc_service, read_models
from wcms.server.services.errors import found

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
    pcs = read_models.list_pcs(db(), room_id)
    return jsonify({"pcs": pcs, "count": len(pcs)})


@bp.get("/pcs/<id:pc_id>")
@documented(
    "One PC with hardware, metrics history and power timeline",
    auth="admin",
    tag="pcs",
    query={"days": "timeline length, 1-90 (default 7)"},
)
def get_pc(pc_id: int) -> ResponseReturnValue:
    days = query_int("days", 7, 1, 90)
    return jsonify(
        read_models.pc_detail(
            db(), found(db().get(PcInfo, pc_id), f"no PC with id {pc_id}"), utcnow(), days
        )
    )


@bp.delete("/pcs/<id:pc_id>")
@documented(
    "Delete a PC and its history; its token stops working and its waiting polls answer 401",
    auth="admin",
    tag="pcs",
)
def delete_pc(pc_id: int) -> ResponseReturnValue:
    pc = found(db().get(PcInfo, pc_id), f"no PC with id {pc_id}")
    s = db()
    audit_action("pc.delete", pc.hostname, pc_id=pc.id, machine_id=pc.machine_id)
    s.delete(pc)
    rt = runtime()
    rt.revoke(s, pc_id)  # the other processes forget its token when this commits
    s.commit()
    rt.forget_tokens(pc_id)
    rt.buffer.set_online(pc_id, False)
    rt.broadcast({"type": "pc_deleted", "pc_id": pc_id})
    return jsonify({"deleted": pc_id})


@bp.post("/pcs/<id:pc_id>/approve")
@documented(
    "Approve a PC: it may now be sent `run` and account commands (audited)",
    auth="admin",
    tag="pcs",
    errors=(404,),
)
def approve_pc(pc_id: int) -> ResponseReturnValue:
    s = db()
    pc = found(s.get(PcInfo, pc_id), f"no PC with id {pc_id}")
    if pc_service.approve_pc(pc):
        audit_action("pc.approve", pc.hostname, pc_id=pc.id, machine_id=pc.machine_id)
    return jsonify({"id": pc.id, "approved": pc.approved})


@bp.post("/pcs/<id:pc_id>/allow-reregister")
@documented(
    "Let this machine register again without its token, once, within the next hour (a "
    "reinstall or a lost token); it is approved again only by an auto-approving PIN (audited)",
    auth="admin",
    tag="pcs",
    errors=(404,),
)
def allow_reregister(pc_id: int) -> ResponseReturnValue:
    s = db()
    pc = found(s.get(PcInfo, pc_id), f"no PC with id {pc_id}")
    until = pc_service.allow_reregister(pc, utcnow())
    audit_action(
        "pc.allow_reregister",
        pc.hostname,
        pc_id=pc.id,
        machine_id=pc.machine_id,
        until=read_models.iso(until),
    )
    return jsonify({"id": pc.id, "reregister_until": read_models.iso(until)})


# ---------------------------------------------------------------- registration PINs


class PinCreate(Strict):
    multi_use: bool = False
    expires_minutes: Annotated[int, Field(ge=1, le=7 * 24 * 60)] = 10
    auto_approve: bool = Field(
        default=False,
        description="PCs registered with this PIN are approved at once (`run` and account "
        "commands may be sent to them); otherwise an admin approves each one",
    )


@bp.get("/pins")
@documented(
    "Registration PINs (the PINs themselves are never shown again)", auth="admin", tag="pins"
)
def list_pins() -> ResponseReturnValue:
    now = utcnow()
    rows = db().execute(select(RegistrationPin).order_by(RegistrationPin.id.desc()).limit(200))
    return jsonify({"pins": [read_models.pin_view(p, now) for p in rows.scalars()]})


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
        auto_approve=req.auto_approve,
    )
    audit_action(
        "pin.create",
        f"****{row.hint}",
        multi_use=req.multi_use,
        minutes=req.expires_minutes,
        auto_approve=req.auto_approve,
    )
    return jsonify({**read_models.pin_view(row, now), "pin": pin}), 201


@bp.delete("/pins/<id:pin_id>")
@documented("Revoke a PIN", auth="admin", tag="pins")
def revoke_pin(pin_id: int) -> ResponseReturnValue:
    s, now = db(), utcnow()
    row = found(s.get(RegistrationPin, pin_id), f"no PIN with id {pin_id}")
    if row.revoked_at is None:
        row.revoked_at = now
        audit_action("pin.revoke", f"****{row.hint}")
    return jsonify(read_models.pin_view(row, now))


# ---------------------------------------------------------------- API keys


class KeyCreate(Strict):
    name: Annotated[str, Field(min_length=1, max_length=100)]


def _key_view(k: ApiKey, owner: str | None) -> dict[str, object]:
    return {
        "id": k.id,
        "name": k.name,
        "prefix": k.prefix,
        "created_at": read_models.iso(k.created_at),
        "last_used_at": read_models.iso(k.last_used_at),
        "revoked": k.revoked_at is not None,
        "owner_id": k.owner_id,  # null: the organisation's key (made with `wcms apikey create`)
        "owner": owner,
    }


@bp.get("/apikeys")
@documented("API keys, each with its owner (null: the organisation's)", auth="admin", tag="admin")
def list_keys() -> ResponseReturnValue:
    rows = accounts.list_api_keys(db())
    return jsonify({"apikeys": [_key_view(k, owner) for k, owner in rows]})


@bp.post("/apikeys")
@documented(
    "Create an API key owned by the calling admin (it stops working while they are disabled); "
    "the answer holds it once. Only a logged-in admin can: an API key gets 403",
    auth="admin",
    tag="admin",
    body=KeyCreate,
    ok=201,
)
def create_key() -> ResponseReturnValue:
    who = current_admin()
    if who.admin_id is None:
        raise ApiError(
            403, ErrorCode.FORBIDDEN, "an API key cannot create keys; log in to the dashboard"
        )
    req = parse_body(KeyCreate)
    s = db()
    try:
        row, key = accounts.create_api_key(s, req.name, utcnow(), owner_id=who.admin_id)
    except accounts.AccountError as exc:
        raise ApiError(400, ErrorCode.VALIDATION, str(exc)) from None
    audit_action("apikey.create", req.name)
    return jsonify({**_key_view(row, who.name), "key": key}), 201


@bp.delete("/apikeys/<id:key_id>")
@documented("Revoke an API key", auth="admin", tag="admin")
def revoke_key(key_id: int) -> ResponseReturnValue:
    s = db()
    row = found(s.get(ApiKey, key_id), f"no API key with id {key_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        audit_action("apikey.revoke", row.name)
    owner = s.get(Admin, row.owner_id) if row.owner_id is not None else None
    return jsonify(_key_view(row, owner.username if owner else None))


# ---------------------------------------------------------------- settings and audit


class SettingsUpdate(Strict):
    presence_mode: Literal["fast", "standard", "conservative"]


@bp.get("/settings")
@documented("Presence mode and its timing", auth="admin", tag="admin")
def get_settings() -> ResponseReturnValue:
    rt = runtime()
    return jsonify({"presence_mode": str(rt.presence.mode), "timing": rt.presence.timing.as_wire()})


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
    rt = runtime()
    rt.settings_changed(s, PresenceMode(req.presence_mode))  # the others, on commit
    s.commit()
    rt.presence.changed(PresenceMode(req.presence_mode))
    return jsonify({"presence_mode": str(rt.presence.mode), "timing": rt.presence.timing.as_wire()})


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
                    "at": read_models.iso(r.at),
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
