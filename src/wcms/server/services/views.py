"""Read models: how PCs, events and PINs look in the admin JSON API and the dashboard."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ColumnElement, Row, select
from sqlalchemy.orm import Session

from wcms.protocol import display_status
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
    return value.isoformat().replace("+00:00", "Z") if value else None


# Only the columns a summary shows, read as plain rows: no ORM objects, none of the JSON lists
# (decoding 80 process names per PC was a third of GET /api/pcs with 2,000 PCs).
_SUMMARY = select(
    PcInfo.id,
    PcInfo.machine_id,
    PcInfo.hostname,
    PcInfo.state,
    PcInfo.is_online,
    PcInfo.reason,
    PcInfo.state_since,
    PcInfo.last_seen,
    PcInfo.offline_after,
    PcInfo.ip_address,
    PcInfo.current_user,
    PcInfo.client_version,
    PcInfo.room_id,
    PcInfo.seat_row,
    PcInfo.seat_col,
    Room.name.label("room_name"),
    PcMetrics.cpu_percent,
    PcMetrics.ram_percent,
    PcMetrics.at.label("metrics_at"),
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
    return {
        "id": r.id,
        "machine_id": r.machine_id,
        "hostname": r.hostname,
        "state": r.state,
        "is_online": r.is_online,
        "reason": r.reason,
        "status": display_status(r.state, r.reason),
        "since": iso(r.state_since),
        "last_seen": iso(r.last_seen),
        "offline_after": iso(r.offline_after),
        "ip_address": r.ip_address,
        "current_user": r.current_user,
        "client_version": r.client_version,
        "room_id": r.room_id,
        "room": r.room_name,
        "seat": None if r.seat_row is None else {"row": r.seat_row, "col": r.seat_col},
        "cpu_percent": r.cpu_percent,
        "ram_percent": r.ram_percent,
        "metrics_at": iso(r.metrics_at),
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
        "uses": pin.uses,
        "created_by": pin.created_by,
        "created_at": iso(pin.created_at),
        "expires_at": iso(pin.expires_at),
        "revoked": pin.revoked_at is not None,
        "live": live,
    }
