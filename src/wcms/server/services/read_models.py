"""Read models: how PCs, events and PINs look in the admin JSON API and the dashboard."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ColumnElement, Row, String, select, type_coerce
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeDecorator

from wcms.protocol import display_status, wire_time
from wcms.server.db import table
from wcms.server.models import (
    MetricSample,
    PcInfo,
    PcMetrics,
    PowerEvent,
    RegistrationPin,
    Room,
)


def iso(value: dt.datetime | None) -> str | None:
    """A time as the wire carries it (protocol.wire_time), or None."""
    return wire_time(value) if value else None


class _StoredTime(TypeDecorator[Any]):
    """A UTC column read as the driver gives it (text on SQLite, a naive datetime on
    PostgreSQL), skipping SQLAlchemy's datetime parsing: _iso_stored() formats it directly."""

    impl = String
    cache_ok = True


def _stored(column: Any) -> Any:
    return type_coerce(column, _StoredTime())


def _iso_stored(value: str | dt.datetime | None) -> str | None:
    """The same text as iso() gives for the datetime, from what _StoredTime read."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return iso(value.replace(tzinfo=dt.UTC))
    text = value.replace(" ", "T", 1)  # SQLite: "2026-11-26 16:35:10.000123"
    return (text[:-7] if text.endswith(".000000") else text) + "Z"


# Only the columns a summary shows, read as plain rows: no ORM objects, none of the JSON lists
# (decoding 80 process names per PC was a third of GET /api/pcs with 2,000 PCs).
_SUMMARY = select(
    PcInfo.id,
    PcInfo.machine_id,
    PcInfo.hostname,
    PcInfo.state,
    PcInfo.is_online,
    PcInfo.reason,
    _stored(PcInfo.state_since).label("state_since"),
    _stored(PcInfo.last_seen).label("last_seen"),
    _stored(PcInfo.offline_after).label("offline_after"),
    PcInfo.ip_address,
    PcInfo.current_user,
    PcInfo.client_version,
    PcInfo.room_id,
    PcInfo.seat_row,
    PcInfo.seat_col,
    Room.name.label("room_name"),
    PcMetrics.cpu_percent,
    PcMetrics.ram_percent,
    _stored(PcMetrics.at).label("metrics_at"),
    PcInfo.approved,
).select_from(
    table(PcInfo)
    .outerjoin(table(PcMetrics), PcMetrics.pc_id == PcInfo.id)
    .outerjoin(table(Room), Room.id == PcInfo.room_id)
)


def summaries(session: Session, *criteria: ColumnElement[bool]) -> list[dict[str, Any]]:
    """PC summaries (state, reason, since, seat, user, load), by hostname, filtered."""
    query = _SUMMARY.where(*criteria).order_by(PcInfo.hostname, PcInfo.id)
    return [_summary(row) for row in session.execute(query)]


def _summary(r: Row[Any, *tuple[Any, ...]]) -> dict[str, Any]:
    # Unpacked by position: thousands of rows per call, and attribute access costs more.
    (pc_id, machine_id, hostname, state, is_online, reason, since, last_seen, offline_after) = r[:9]
    (ip, user, version, room_id, row, col, room, cpu, ram, metrics_at, approved) = r[9:]
    return {
        "id": pc_id,
        "machine_id": machine_id,
        "hostname": hostname,
        "state": state,
        "is_online": is_online,
        "reason": reason,
        "status": display_status(state, reason),
        "since": _iso_stored(since),
        "last_seen": _iso_stored(last_seen),
        "offline_after": _iso_stored(offline_after),
        "ip_address": ip,
        "current_user": user,
        "client_version": version,
        "room_id": room_id,
        "room": room,
        "seat": None if row is None else {"row": row, "col": col},
        "cpu_percent": cpu,
        "ram_percent": ram,
        "metrics_at": _iso_stored(metrics_at),
        "approved": approved,  # false: no `run` or account command until an admin approves
    }


def list_pcs(session: Session, room_id: int | None = None) -> list[dict[str, Any]]:
    return summaries(session, *([] if room_id is None else [PcInfo.room_id == room_id]))


def pc_detail(session: Session, pc: PcInfo, now: dt.datetime, days: int = 7) -> dict[str, Any]:
    metrics = session.get(PcMetrics, pc.id)
    since = now - dt.timedelta(days=days)
    events = session.execute(
        select(PowerEvent)
        .where(PowerEvent.pc_id == pc.id, PowerEvent.at >= since)
        .order_by(PowerEvent.at, PowerEvent.id)
    ).scalars()
    samples = session.execute(
        select(MetricSample)
        .where(MetricSample.pc_id == pc.id, MetricSample.at >= now - dt.timedelta(hours=24))
        .order_by(MetricSample.at)
    ).scalars()
    return {
        **summaries(session, PcInfo.id == pc.id)[0],
        "registered_at": iso(pc.registered_at),
        # Until then the machine may register again without its token (an admin allowed it).
        "reregister_until": iso(pc.reregister_until)
        if pc.reregister_until is not None and pc.reregister_until > now
        else None,
        "hardware": {
            "os_name": pc.os_name,
            "os_version": pc.os_version,
            "os_edition": pc.os_edition,
            "cpu_model": pc.cpu_model,
            "cpu_cores": pc.cpu_cores,
            "cpu_threads": pc.cpu_threads,
            "ram_total": pc.ram_total,
            "mac_addresses": pc.mac_addresses,
            "disks": pc.disks,
        },
        "metrics": None
        if metrics is None
        else {
            "at": iso(metrics.at),
            "cpu_percent": metrics.cpu_percent,
            "ram_used": metrics.ram_used,
            "ram_percent": metrics.ram_percent,
            "uptime": metrics.uptime,
            "disks": metrics.disks,
            "processes": metrics.processes,
        },
        "history": [
            {"at": iso(s.at), "cpu_percent": s.cpu_percent, "ram_percent": s.ram_percent}
            for s in samples
        ],
        "timeline": [
            {"at": iso(e.at), "from": e.from_state, "to": e.to_state, "reason": e.reason}
            for e in events
        ],
    }


def pin_view(pin: RegistrationPin, now: dt.datetime) -> dict[str, Any]:
    live = pin.revoked_at is None and pin.expires_at > now and (pin.multi_use or pin.uses == 0)
    return {
        "id": pin.id,
        "hint": f"****{pin.hint}",
        "multi_use": pin.multi_use,
        "auto_approve": pin.auto_approve,
        "uses": pin.uses,
        "wrong_tries": pin.wrong_tries,
        "created_by": pin.created_by,
        "created_at": iso(pin.created_at),
        "expires_at": iso(pin.expires_at),
        "revoked": pin.revoked_at is not None,
        "live": live,
    }
