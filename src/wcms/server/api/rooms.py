"""Rooms and the seat layout, for the dashboard's layout editor and for automation. Thin views."""

from __future__ import annotations

from typing import Annotated, Any

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue
from pydantic import Field
from sqlalchemy.exc import IntegrityError

from wcms.protocol import ErrorCode
from wcms.server.api.request import parse_body, runtime
from wcms.server.auth import audit_action, current_admin, db
from wcms.server.db import utcnow
from wcms.server.errors import ApiError
from wcms.server.models import PcInfo
from wcms.server.openapi import documented
from wcms.server.schemas import DbId, Strict
from wcms.server.services import read_models
from wcms.server.services import rooms as layout
from wcms.server.services.errors import found

bp = Blueprint("rooms_api", __name__, url_prefix="/api")

Name = Annotated[str, Field(min_length=1, max_length=100)]
GridSize = Annotated[int, Field(ge=1, le=50)]
SeatIndex = Annotated[int, Field(ge=1, le=50)]


@bp.before_request
def _require_admin() -> None:
    current_admin()


def _commit() -> None:
    """Commit; a race with another admin on the same seat or name answers 409."""
    try:
        db().commit()
    except IntegrityError:
        db().rollback()
        raise ApiError(
            409, ErrorCode.CONFLICT, "changed meanwhile by someone else; reload"
        ) from None


def _announce(**message: Any) -> None:
    """Open dashboards reload the layout they show."""
    runtime().broadcast({"type": "layout", **message})


class RoomCreate(Strict):
    name: Name
    rows: GridSize
    cols: GridSize


class RoomUpdate(Strict):
    """Any of: a new name, a new size (rows and cols), retire (active false) or restore."""

    name: Name | None = None
    rows: GridSize | None = None
    cols: GridSize | None = None
    active: bool | None = None


class SeatAssign(Strict):
    room_id: DbId
    row: SeatIndex | None = None
    col: SeatIndex | None = None
    swap: bool = False


@bp.get("/rooms")
@documented(
    "Rooms with their PC counts per display status",
    auth="admin",
    tag="rooms",
    query={"retired": "1 to include retired rooms"},
)
def list_rooms() -> ResponseReturnValue:
    s = db()
    rooms = layout.list_rooms(s, include_retired=request.args.get("retired") == "1")
    unassigned = layout.status_counts(s).get(None, layout.empty_counts())
    return jsonify({"rooms": rooms, "unassigned": unassigned})


@bp.post("/rooms")
@documented(
    "Create a room of rows x cols seats; a name taken already (ignoring case) answers 409",
    auth="admin",
    tag="rooms",
    body=RoomCreate,
    ok=201,
    errors=(409,),
)
def create_room() -> ResponseReturnValue:
    req = parse_body(RoomCreate)
    room = layout.create_room(db(), req.name, req.rows, req.cols, utcnow())
    audit_action("room.create", room.name, room_id=room.id, rows=room.rows, cols=room.cols)
    _commit()
    _announce(room_id=room.id)
    return jsonify(layout.room_view(room)), 201


@bp.get("/rooms/<id:room_id>")
@documented("One room with its PCs (seated or not)", auth="admin", tag="rooms")
def get_room(room_id: int) -> ResponseReturnValue:
    s = db()
    room = layout.get_room(s, room_id)
    counts = layout.status_counts(s).get(room.id)
    return jsonify(
        {"room": layout.room_view(room, counts), "pcs": read_models.list_pcs(s, room.id)}
    )


@bp.patch("/rooms/<id:room_id>")
@documented(
    "Rename, resize, retire (its PCs become unassigned) or restore a room",
    auth="admin",
    tag="rooms",
    body=RoomUpdate,
    errors=(409,),
)
def update_room(room_id: int) -> ResponseReturnValue:
    req = parse_body(RoomUpdate)
    if (req.rows is None) != (req.cols is None):
        field = "cols" if req.cols is None else "rows"
        raise ApiError(400, ErrorCode.VALIDATION, f"{field}: give rows and cols together")
    s = db()
    room = layout.get_room(s, room_id)
    if req.name is not None and layout.clean_name(req.name) != room.name:
        old = layout.rename_room(s, room, req.name)
        audit_action("room.rename", room.name, room_id=room.id, old_name=old)
    if (
        req.rows is not None
        and req.cols is not None
        and (req.rows, req.cols)
        != (
            room.rows,
            room.cols,
        )
    ):
        before = {"rows": room.rows, "cols": room.cols}
        layout.resize_room(s, room, req.rows, req.cols)
        audit_action(
            "room.resize", room.name, room_id=room.id, old=before, rows=req.rows, cols=req.cols
        )
    if req.active is False and room.active:
        unassigned = layout.retire_room(s, room)
        audit_action("room.retire", room.name, room_id=room.id, unassigned_pcs=unassigned)
    elif req.active is True and not room.active:
        room.active = True
        audit_action("room.restore", room.name, room_id=room.id)
    _commit()
    _announce(room_id=room.id)
    return jsonify(layout.room_view(room, layout.status_counts(s).get(room.id)))


@bp.get("/pcs/unassigned")
@documented("PCs in no room", auth="admin", tag="rooms")
def unassigned_pcs() -> ResponseReturnValue:
    pcs = layout.unassigned_pcs(db())
    return jsonify({"pcs": pcs, "count": len(pcs)})


@bp.put("/pcs/<id:pc_id>/seat")
@documented(
    "Put a PC in a room, on a seat or none; moves it between rooms. "
    "A taken seat answers 409 unless swap is true",
    auth="admin",
    tag="rooms",
    body=SeatAssign,
    errors=(409,),
)
def assign_seat(pc_id: int) -> ResponseReturnValue:
    req = parse_body(SeatAssign)
    s = db()
    pc = found(db().get(PcInfo, pc_id), f"no PC with id {pc_id}")
    room = layout.get_room(s, req.room_id)
    old, swapped = layout.place_pc(s, pc, room, req.row, req.col, req.swap)
    new = layout.Place.of(pc)
    audit_action("pc.seat", pc.hostname, pc_id=pc.id, old=old.as_dict(), new=new.as_dict())
    if swapped is not None:
        moved = layout.Place.of(swapped)
        audit_action(
            "pc.seat", swapped.hostname, pc_id=swapped.id, swapped_with=pc.id, new=moved.as_dict()
        )
    _commit()
    _announce(pc_id=pc.id)
    return jsonify(_placed(pc, swapped))


@bp.delete("/pcs/<id:pc_id>/seat")
@documented("Take a PC out of its room (unassigned)", auth="admin", tag="rooms", errors=(409,))
def unassign_seat(pc_id: int) -> ResponseReturnValue:
    pc = found(db().get(PcInfo, pc_id), f"no PC with id {pc_id}")
    old = layout.unassign_pc(db(), pc)
    if old.room_id is not None:
        audit_action("pc.unassign", pc.hostname, pc_id=pc.id, old=old.as_dict())
    _commit()
    _announce(pc_id=pc.id)
    return jsonify(_placed(pc, None))


def _placed(pc: PcInfo, swapped: PcInfo | None) -> dict[str, Any]:
    body: dict[str, Any] = {"pc_id": pc.id, **layout.Place.of(pc).as_dict()}
    if swapped is not None:
        body["swapped"] = {"pc_id": swapped.id, **layout.Place.of(swapped).as_dict()}
    return body
