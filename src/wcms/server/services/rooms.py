"""Rooms and seats: create, rename, resize, retire; put a PC on a seat, move it, take it off.

Seats are 1-based (row 1, col 1 is the top-left seat as the room is drawn). A PC may be in a
room without a seat (listed apart in that room) or in no room at all (unassigned). One PC per
seat is the database's own rule (uq_pc_info_seat); the checks here only make its refusal
readable. Functions take the session, flush, and leave the commit to the caller.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from dataclasses import dataclass
from typing import Any

from sqlalchemy import false, func, select, update
from sqlalchemy.orm import Session

from wcms.protocol import DisplayStatus, display_status
from wcms.server.models import PcInfo, Room
from wcms.server.services.errors import Conflict, Invalid, NotFound
from wcms.server.services.read_models import iso, summaries


@dataclass(frozen=True)
class Place:
    """Where a PC is: a room (or none) and a seat in it (or none)."""

    room_id: int | None
    row: int | None
    col: int | None

    @classmethod
    def of(cls, pc: PcInfo) -> Place:
        return cls(pc.room_id, pc.seat_row, pc.seat_col)

    def as_dict(self) -> dict[str, Any]:
        seat = None if self.row is None else {"row": self.row, "col": self.col}
        return {"room_id": self.room_id, "seat": seat}


def empty_counts() -> dict[str, int]:
    return {str(s): 0 for s in DisplayStatus}


def status_counts(session: Session) -> dict[int | None, dict[str, int]]:
    """Counts per display status for every room (key None: PCs in no room)."""
    rows = session.execute(
        select(PcInfo.room_id, PcInfo.state, PcInfo.reason, func.count()).group_by(
            PcInfo.room_id, PcInfo.state, PcInfo.reason
        )
    ).all()
    counts: dict[int | None, dict[str, int]] = {}
    for room_id, state, reason, n in rows:
        bucket = counts.setdefault(room_id, empty_counts())
        bucket[str(display_status(state, reason))] += n
    return counts


def room_view(room: Room, counts: dict[str, int] | None = None) -> dict[str, Any]:
    counts = counts or empty_counts()
    return {
        "id": room.id,
        "name": room.name,
        "rows": room.rows,
        "cols": room.cols,
        "active": room.active,
        "created_at": iso(room.created_at),
        "pc_count": sum(counts.values()),
        "counts": counts,
    }


def list_rooms(session: Session, include_retired: bool = False) -> list[dict[str, Any]]:
    query = select(Room).order_by(Room.name, Room.id)
    if not include_retired:
        query = query.where(Room.active.is_(True))
    counts = status_counts(session)
    return [room_view(r, counts.get(r.id)) for r in session.execute(query).scalars()]


def unassigned_pcs(session: Session) -> list[dict[str, Any]]:
    """PCs in no room, in the same shape as read_models.list_pcs."""
    return summaries(session, PcInfo.room_id.is_(None))


def get_room(session: Session, room_id: int) -> Room:
    room = session.get(Room, room_id)
    if room is None:
        raise NotFound(f"no room with id {room_id}")
    return room


def clean_name(name: str) -> str:
    """Trim and NFC-normalise the name; refuse empty, over-long and control characters (shown
    in every page)."""
    name = unicodedata.normalize("NFC", name.strip())
    if not 1 <= len(name) <= 100:
        raise _invalid("name", "1-100 characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise _invalid("name", "no control characters")
    return name


def name_key(name: str) -> str:
    """What two room names may not share: the name NFC-normalised and case-folded in full
    Unicode ("Ärzte", "ärzte" and "ÄRZTE" are one name; "Straße" and "STRASSE" too)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


# Any fixed 64-bit number: the PostgreSQL advisory lock that serialises room-name changes.
_ROOM_NAMES_LOCK = 0x57434D53_524F4F4D  # "WCMS" "ROOM"


def _lock_room_names(session: Session) -> None:
    """Hold room-name changes back until this transaction ends, so that two admins naming two
    rooms alike at the same instant cannot both pass the check (the database's unique
    constraint compares bytes, not folded names)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(_ROOM_NAMES_LOCK)))
    else:  # SQLite: take the database's write lock now, before the names are read
        session.execute(update(Room).where(false()).values(name=Room.name))


def _check_name_free(session: Session, name: str, room_id: int | None) -> None:
    _lock_room_names(session)
    key = name_key(name)
    for other_id, other_name in session.execute(select(Room.id, Room.name)):
        if other_id != room_id and name_key(other_name) == key:
            raise Conflict(f"a room named {other_name!r} exists already")


def create_room(session: Session, name: str, rows: int, cols: int, now: dt.datetime) -> Room:
    name = clean_name(name)
    _check_name_free(session, name, None)
    room = Room(name=name, rows=rows, cols=cols, active=True, created_at=now)
    session.add(room)
    session.flush()
    return room


def rename_room(session: Session, room: Room, name: str) -> str:
    """Rename; returns the old name."""
    name = clean_name(name)
    _check_name_free(session, name, room.id)
    old, room.name = room.name, name
    return old


def resize_room(session: Session, room: Room, rows: int, cols: int) -> None:
    """Change the grid; refused while a PC sits on a seat the new grid would drop."""
    outside = session.execute(
        select(PcInfo.hostname, PcInfo.seat_row, PcInfo.seat_col)
        .where(PcInfo.room_id == room.id, PcInfo.seat_row.is_not(None))
        .where((PcInfo.seat_row > rows) | (PcInfo.seat_col > cols))
        .order_by(PcInfo.seat_row, PcInfo.seat_col)
    ).all()
    if outside:
        names = ", ".join(f"{h} (row {r}, col {c})" for h, r, c in outside[:5])
        more = f" and {len(outside) - 5} more" if len(outside) > 5 else ""
        raise Conflict(
            f"move these PCs first; their seats are outside {rows} x {cols}: {names}{more}",
        )
    room.rows, room.cols = rows, cols


def retire_room(session: Session, room: Room) -> list[int]:
    """Retire the room; its PCs become unassigned. Returns their ids."""
    pcs = session.execute(select(PcInfo).where(PcInfo.room_id == room.id)).scalars().all()
    for pc in pcs:
        pc.room_id = pc.seat_row = pc.seat_col = None
    room.active = False
    session.flush()
    return [pc.id for pc in pcs]


def place_pc(
    session: Session, pc: PcInfo, room: Room, row: int | None, col: int | None, swap: bool
) -> tuple[Place, PcInfo | None]:
    """Put `pc` in `room` (on a seat, or none); returns its old place and any PC swapped out.

    A taken seat is refused unless `swap`: then its PC takes `pc`'s old place.
    """
    if not room.active:
        raise Conflict(f"room {room.name!r} is retired")
    if (row is None) != (col is None):
        raise _invalid("row" if row is None else "col", "give both row and col, or neither")
    if row is not None and col is not None:
        if not 1 <= row <= room.rows:
            raise _invalid("row", f"the room has rows 1 to {room.rows}")
        if not 1 <= col <= room.cols:
            raise _invalid("col", f"the room has columns 1 to {room.cols}")
    old = Place.of(pc)
    occupant = None
    if row is not None:
        occupant = session.execute(
            select(PcInfo).where(
                PcInfo.room_id == room.id,
                PcInfo.seat_row == row,
                PcInfo.seat_col == col,
                PcInfo.id != pc.id,
            )
        ).scalar_one_or_none()
    if occupant is not None and not swap:
        raise Conflict(
            f"row {row}, col {col} is taken by {occupant.hostname}",
            fields={"seat": f"taken by PC {occupant.id}"},
        )
    # Free both seats before filling them, so the unique constraint never sees two PCs on one.
    pc.seat_row = pc.seat_col = None
    if occupant is not None:
        occupant.seat_row = occupant.seat_col = None
    session.flush()
    if occupant is not None:
        occupant.room_id, occupant.seat_row, occupant.seat_col = old.room_id, old.row, old.col
        if old.room_id is None or old.row is None:
            occupant.seat_row = occupant.seat_col = None
        session.flush()
    pc.room_id, pc.seat_row, pc.seat_col = room.id, row, col
    session.flush()
    return old, occupant


def unassign_pc(session: Session, pc: PcInfo) -> Place:
    """Take `pc` out of its room; returns where it was."""
    old = Place.of(pc)
    pc.room_id = pc.seat_row = pc.seat_col = None
    session.flush()
    return old


def _invalid(field: str, message: str) -> Invalid:
    return Invalid(f"{field}: {message}", fields={field: message})
