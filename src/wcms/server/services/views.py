"""Read models: how PCs, events and PINs look in the admin JSON API and the dashboard."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, defer

from wcms.protocol import display_status
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


def pc_summary(pc: PcInfo, metrics: PcMetrics | None, room: Room | None) -> dict[str, Any]:
    return {
        "id": pc.id,
        "machine_id": pc.machine_id,
        "hostname": pc.hostname,
        "state": pc.state,
        "is_online": pc.is_online,
        "reason": pc.reason,
        "status": display_status(pc.state, pc.reason),
        "since": iso(pc.state_since),
        "last_seen": iso(pc.last_seen),
        "offline_after": iso(pc.offline_after),
        "ip_address": pc.ip_address,
        "current_user": pc.current_user,
        "client_version": pc.client_version,
        "room_id": pc.room_id,
        "room": room.name if room else None,
        "seat": None if pc.seat_row is None else {"row": pc.seat_row, "col": pc.seat_col},
        "cpu_percent": metrics.cpu_percent if metrics else None,
        "ram_percent": metrics.ram_percent if metrics else None,
        "metrics_at": iso(metrics.at) if metrics else None,
    }


# The summary shows none of the JSON lists; decoding them (80 process names per PC) was a third
# of GET /api/pcs with 2,000 PCs (bench/idle_connections.py).
_SUMMARY_SKIPS = (
    defer(PcInfo.disks),
    defer(PcInfo.mac_addresses),
    defer(PcMetrics.disks),
    defer(PcMetrics.processes),
)


def list_pcs(session: Session, room_id: int | None = None) -> list[dict[str, Any]]:
    query = (
        select(PcInfo, PcMetrics, Room)
        .outerjoin(PcMetrics, PcMetrics.pc_id == PcInfo.id)
        .outerjoin(Room, Room.id == PcInfo.room_id)
        .order_by(PcInfo.hostname, PcInfo.id)
        .options(*_SUMMARY_SKIPS)
    )
    if room_id is not None:
        query = query.where(PcInfo.room_id == room_id)
    return [pc_summary(pc, m, r) for pc, m, r in session.execute(query).all()]


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
        **pc_summary(pc, metrics, pc.room),
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
