"""The audit log of admin actions. Adds a row to the caller's transaction; never commits."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy.orm import Session

from wcms.server.models import AuditLog


def record(
    session: Session,
    actor: str,
    action: str,
    now: dt.datetime,
    target: str | None = None,
    details: dict[str, Any] | None = None,
    ip: str | None = None,
) -> None:
    session.add(
        AuditLog(at=now, actor=actor, action=action, target=target, details=details or {}, ip=ip)
    )
