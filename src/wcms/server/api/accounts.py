"""Administrators: list, create, disable or enable, reset a password. Thin views.

A generated password is shown once in the answer and never stored in plain text. No admin can
disable themselves, and the last active admin cannot be disabled, so nobody is locked out.
"""

from __future__ import annotations

from typing import Annotated, Any

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from pydantic import Field
from sqlalchemy import select

from wcms.server.api.request import parse_body
from wcms.server.auth import audit_action, current_admin, db
from wcms.server.db import utcnow
from wcms.server.models import Admin
from wcms.server.openapi import documented
from wcms.server.schemas import Strict
from wcms.server.services import accounts, read_models
from wcms.server.services.errors import found

bp = Blueprint("admins_api", __name__, url_prefix="/api")

Password = Annotated[str, Field(min_length=accounts.MIN_PASSWORD, max_length=1024)]


@bp.before_request
def _require_admin() -> None:
    current_admin()


def _view(a: Admin) -> dict[str, Any]:
    return {
        "id": a.id,
        "username": a.username,
        "active": a.is_active,
        "created_at": read_models.iso(a.created_at),
        "last_login_at": read_models.iso(a.last_login_at),
    }


def _admin(admin_id: int) -> Admin:
    admin = found(db().get(Admin, admin_id), f"no admin with id {admin_id}")
    return admin


class AdminCreate(Strict):
    username: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    password: Password | None = None  # none: the server generates one and answers it once


class AdminUpdate(Strict):
    active: bool


class PasswordReset(Strict):
    password: Password | None = None


@bp.get("/admins")
@documented("Administrators (never their passwords)", auth="admin", tag="admins")
def list_admins() -> ResponseReturnValue:
    rows = db().execute(select(Admin).order_by(Admin.username)).scalars()
    return jsonify({"admins": [_view(a) for a in rows]})


@bp.post("/admins")
@documented(
    "Create an admin; without a password one is generated and answered once",
    auth="admin",
    tag="admins",
    body=AdminCreate,
    ok=201,
    errors=(409,),
)
def create_admin() -> ResponseReturnValue:
    req = parse_body(AdminCreate)
    password = req.password or accounts.generate_password()
    admin = accounts.create_admin(db(), req.username, password, utcnow())  # 400, 409
    audit_action("admin.create", admin.username)
    body = _view(admin)
    if req.password is None:
        body["password"] = password
    return jsonify(body), 201


@bp.patch("/admins/<id:admin_id>")
@documented(
    "Disable (their sessions end at once) or enable an admin",
    auth="admin",
    tag="admins",
    body=AdminUpdate,
    errors=(409,),
)
def update_admin(admin_id: int) -> ResponseReturnValue:
    req = parse_body(AdminUpdate)
    s = db()
    admin = _admin(admin_id)
    acting = current_admin().admin_id
    # Disabling ends their sessions and stops their keys; never oneself nor the last admin.
    if accounts.set_active(s, admin, req.active, acting_admin_id=acting):
        audit_action("admin.enable" if req.active else "admin.disable", admin.username)
    return jsonify(_view(admin))


@bp.post("/admins/<id:admin_id>/password")
@documented(
    "Set an admin's password (their other sessions end); without one, generate and answer it",
    auth="admin",
    tag="admins",
    body=PasswordReset,
)
def reset_password(admin_id: int) -> ResponseReturnValue:
    req = parse_body(PasswordReset)
    admin = _admin(admin_id)
    password = req.password or accounts.generate_password()
    who = current_admin()
    # Every session of the admin ends; an admin changing their own keeps the one in use.
    keep = who.session_hash if admin.id == who.admin_id else None
    accounts.set_password(db(), admin, password, keep_session=keep)  # 400: a weak password
    audit_action("admin.password", admin.username)
    body = _view(admin)
    if req.password is None:
        body["password"] = password
    return jsonify(body)
