"""SQLAlchemy 2.0 models. The schema itself is built by the Alembic migrations, never create_all."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    true,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from wcms.server.db import Base, UTCDateTime, utcnow


class Room(Base):
    __tablename__ = "rooms"
    __table_args__ = (
        CheckConstraint("rows >= 1 AND rows <= 50", name="rows_range"),
        CheckConstraint("cols >= 1 AND cols <= 50", name="cols_range"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    rows: Mapped[int] = mapped_column(Integer)
    cols: Mapped[int] = mapped_column(Integer)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    pcs: Mapped[list[PcInfo]] = relationship(back_populates="room")


class PcInfo(Base):
    """One lab PC (the seed's `pc_info`); presence is state, reason, state_since, offline_after."""

    __tablename__ = "pc_info"
    __table_args__ = (
        UniqueConstraint("room_id", "seat_row", "seat_col", name="uq_pc_info_seat"),
        Index("ix_pc_info_offline_after", "offline_after"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    machine_id: Mapped[str] = mapped_column(String(128), unique=True)
    hostname: Mapped[str] = mapped_column(String(255))
    mac_addresses: Mapped[list[str]] = mapped_column(JSON, default=list)
    ip_address: Mapped[str | None] = mapped_column(String(64))
    os_name: Mapped[str | None] = mapped_column(String(255))
    os_version: Mapped[str | None] = mapped_column(String(255))
    os_edition: Mapped[str | None] = mapped_column(String(255))
    cpu_model: Mapped[str | None] = mapped_column(String(255))
    cpu_cores: Mapped[int | None] = mapped_column(Integer)
    cpu_threads: Mapped[int | None] = mapped_column(Integer)
    ram_total: Mapped[int | None] = mapped_column(BigInteger)
    disks: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    client_version: Mapped[str | None] = mapped_column(String(32))
    current_user: Mapped[str | None] = mapped_column(String(255))
    boot_time: Mapped[float | None] = mapped_column(Float)

    is_online: Mapped[bool] = mapped_column(Boolean, default=True)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(32))
    state_since: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    # The next deadline: offline with reason `lost` once it passes; NULL while offline.
    offline_after: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    room_id: Mapped[int | None] = mapped_column(ForeignKey("rooms.id", ondelete="SET NULL"))
    seat_row: Mapped[int | None] = mapped_column(Integer)
    seat_col: Mapped[int | None] = mapped_column(Integer)
    registered_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # A PC registered by PIN alone gets no secret-carrying command until an admin approves it
    # (or its PIN approved it); rows from before approvals existed count as approved.
    approved: Mapped[bool] = mapped_column(Boolean, default=False, server_default=true())
    # Until then, this machine may register again without its current token (an admin allowed
    # it, e.g. after a reinstall); otherwise re-registering a known machine needs its token.
    reregister_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    room: Mapped[Room | None] = relationship(back_populates="pcs")


class PcCredential(Base):
    """The PC's bearer token, kept only as its SHA-256; one live token per PC."""

    __tablename__ = "pc_credentials"

    id: Mapped[int] = mapped_column(primary_key=True)
    pc_id: Mapped[int] = mapped_column(ForeignKey("pc_info.id", ondelete="CASCADE"), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class PcMetrics(Base):
    """The latest reported load of a PC, one row per PC, overwritten in batches."""

    __tablename__ = "pc_metrics"

    pc_id: Mapped[int] = mapped_column(
        ForeignKey("pc_info.id", ondelete="CASCADE"), primary_key=True
    )
    at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    cpu_percent: Mapped[float | None] = mapped_column(Float)
    ram_used: Mapped[int | None] = mapped_column(BigInteger)
    ram_percent: Mapped[float | None] = mapped_column(Float)
    uptime: Mapped[float | None] = mapped_column(Float)
    disks: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    processes: Mapped[list[str]] = mapped_column(JSON, default=list)
    # What the lists above hash to (pc_service.list_hash): every process compares a heartbeat's
    # lists with these, so a list written by another process is never taken for its own.
    disks_hash: Mapped[int | None] = mapped_column(BigInteger)
    processes_hash: Mapped[int | None] = mapped_column(BigInteger)


class MetricSample(Base):
    """A sampled history of load, kept N days: at most one row per PC per sample interval
    (`slot`: its time // the interval), whichever process or node writes it."""

    __tablename__ = "metric_samples"
    __table_args__ = (
        Index("ix_metric_samples_pc_at", "pc_id", "at"),
        Index("ux_metric_samples_pc_slot", "pc_id", "slot", unique=True),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    pc_id: Mapped[int] = mapped_column(ForeignKey("pc_info.id", ondelete="CASCADE"))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    cpu_percent: Mapped[float | None] = mapped_column(Float)
    ram_percent: Mapped[float | None] = mapped_column(Float)
    slot: Mapped[int | None] = mapped_column(BigInteger)  # None: written before 0004


class PowerEvent(Base):
    """One row per presence change of a PC: from, to, reason, at."""

    __tablename__ = "power_events"
    __table_args__ = (Index("ix_power_events_pc_at", "pc_id", "at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    pc_id: Mapped[int] = mapped_column(ForeignKey("pc_info.id", ondelete="CASCADE"))
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(32))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Admin(Base):
    __tablename__ = "admins"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class ApiKey(Base):
    """A key for automation (Bearer on the admin API), kept only as its SHA-256."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # The admin whose access the key carries (it dies with it); NULL: the organisation's key,
    # made explicitly on the server's command line.
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("admins.id", ondelete="CASCADE"))


class AdminSession(Base):
    """A logged-in dashboard session, kept on the server: the cookie holds only a random id,
    stored here as its SHA-256, so logging out (or a password change) really ends it."""

    __tablename__ = "admin_sessions"
    __table_args__ = (Index("ix_admin_sessions_admin_id", "admin_id"),)

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    admin_id: Mapped[int] = mapped_column(ForeignKey("admins.id", ondelete="CASCADE"))
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)  # absolute limit
    ip: Mapped[str | None] = mapped_column(String(64))


class RateLimit(Base):
    """A shared rate limit (GCRA): the key's theoretical arrival time, in epoch seconds.

    Checked and consumed in one conditional UPDATE, so concurrent requests, processes and
    nodes cannot all pass one limit, and a restart forgets nothing."""

    __tablename__ = "rate_limits"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    tat: Mapped[float] = mapped_column(Float)


class RegistrationPin(Base):
    """A 6-digit registration PIN, kept as an HMAC under the server's secret key."""

    __tablename__ = "registration_pins"

    id: Mapped[int] = mapped_column(primary_key=True)
    pin_hmac: Mapped[str] = mapped_column(String(64), index=True)
    hint: Mapped[str] = mapped_column(String(8))  # last two digits, for the admin's list
    multi_use: Mapped[bool] = mapped_column(Boolean, default=False)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # PCs registered with this PIN are approved at once (the admin vouches for where it is used).
    auto_approve: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Wrong PINs tried anywhere while this one was live; at Settings.pin_wrong_tries it is revoked.
    wrong_tries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class AuditLog(Base):
    """Who did what to which PCs, and when. Secrets are never written here."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_at", "at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(255))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    ip: Mapped[str | None] = mapped_column(String(64))


class Setting(Base):
    """Settings an admin changes at run time (e.g. the presence mode)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class CommandBatch(Base):
    """One admin command to one or many PCs: what, by whom, to which target, until when.

    `args` never holds a secret (passwords live sealed on each Command until it is final).
    """

    __tablename__ = "command_batches"
    __table_args__ = (Index("ix_command_batches_created_at", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    created_by: Mapped[str] = mapped_column(String(100))
    type: Mapped[str] = mapped_column(String(32))
    args: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    target: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    run_when_online: Mapped[bool] = mapped_column(Boolean, default=False)
    pc_count: Mapped[int] = mapped_column(Integer, default=0)


class Command(Base):
    """One command for one PC: queued -> delivered -> running -> succeeded / failed, or
    expired / cancelled; each step timestamped."""

    __tablename__ = "commands"
    __table_args__ = (
        Index("ix_commands_pc_status", "pc_id", "status"),
        Index("ix_commands_status_expires_at", "status", "expires_at"),
        Index("ix_commands_batch_id", "batch_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("command_batches.id", ondelete="CASCADE"))
    pc_id: Mapped[int] = mapped_column(ForeignKey("pc_info.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))
    args: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Fernet token of the secret arguments (a password); NULL once final or when there is none.
    secret: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    run_when_online: Mapped[bool] = mapped_column(Boolean, default=False)
    queued_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    stdout: Mapped[str | None] = mapped_column(Text)
    stderr: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
