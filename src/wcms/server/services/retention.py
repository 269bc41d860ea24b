"""Old rows are deleted, so the database stays small: metric samples, power events, dead PINs,
ended admin sessions."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, or_
from sqlalchemy.orm import Session

from wcms.server.db import affected
from wcms.server.models import AdminSession, MetricSample, PowerEvent, RegistrationPin
from wcms.server.services.accounts import SESSION_IDLE

PIN_KEEP = dt.timedelta(days=7)  # expired or revoked PINs stay listed this long


def prune(
    session: Session, now: dt.datetime, metrics_days: int, events_days: int
) -> dict[str, int]:
    """Delete what is past its retention; answers how many rows of each kind went."""
    counts = {
        "metric_samples": affected(
            session.execute(
                delete(MetricSample).where(MetricSample.at < now - dt.timedelta(days=metrics_days))
            )
        ),
        "power_events": affected(
            session.execute(
                delete(PowerEvent).where(PowerEvent.at < now - dt.timedelta(days=events_days))
            )
        ),
        "registration_pins": affected(
            session.execute(
                delete(RegistrationPin).where(
                    or_(
                        RegistrationPin.expires_at < now - PIN_KEEP,
                        RegistrationPin.revoked_at < now - PIN_KEEP,
                    )
                )
            )
        ),
        "admin_sessions": affected(
            session.execute(
                delete(AdminSession).where(
                    or_(
                        AdminSession.expires_at <= now,
                        AdminSession.last_seen_at <= now - SESSION_IDLE,
                    )
                )
            )
        ),
    }
    session.flush()
    return counts
