"""Admins (argon2id passwords), API keys and registration PINs. Secrets are kept only hashed."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from wcms.protocol import PIN_LENGTH, TOKEN_PREFIX_APIKEY, ErrorCode
from wcms.server.db import affected, table
from wcms.server.errors import ApiError
from wcms.server.models import Admin, ApiKey, RegistrationPin

_hasher = PasswordHasher()
USERNAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MIN_PASSWORD = 10
# Verified against when the username is unknown, so timing does not tell which names exist.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class AccountError(ValueError):
    """A readable reason an account operation was refused."""


def generate_password() -> str:
    return secrets.token_urlsafe(15)


def validate_new_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"password must be at least {MIN_PASSWORD} characters")
    if len(password) > 1024:
        raise AccountError("password is too long")


def create_admin(session: Session, username: str, password: str, now: dt.datetime) -> Admin:
    """Add an admin; the caller commits."""
    if not USERNAME_RE.match(username):
        raise AccountError("username: 1-64 letters, digits, '.', '_' or '-'")
    validate_new_password(password)
    if session.execute(select(Admin.id).where(Admin.username == username)).first():
        raise AccountError(f"admin {username!r} already exists")
    admin = Admin(username=username, password_hash=_hasher.hash(password), created_at=now)
    session.add(admin)
    session.flush()
    return admin


def set_password(admin: Admin, password: str) -> None:
    validate_new_password(password)
    admin.password_hash = _hasher.hash(password)


def authenticate(session: Session, username: str, password: str) -> Admin | None:
    """The active admin with these credentials, or None (constant work either way)."""
    admin = session.execute(select(Admin).where(Admin.username == username)).scalar_one_or_none()
    try:
        _hasher.verify(admin.password_hash if admin else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if admin is None or not admin.is_active:
        return None
    if _hasher.check_needs_rehash(admin.password_hash):
        admin.password_hash = _hasher.hash(password)
    return admin


def any_admin(session: Session) -> bool:
    return session.execute(select(Admin.id).limit(1)).first() is not None


def sha256(text: str) -> str:
    """PC tokens and API keys are 256-bit random strings: one SHA-256 keeps them at rest."""
    return hashlib.sha256(text.encode()).hexdigest()


def create_api_key(session: Session, name: str, now: dt.datetime) -> tuple[ApiKey, str]:
    """Add a key; returns the row and the key itself, which is shown once. Caller commits."""
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise AccountError("name: 1-100 characters")
    key = TOKEN_PREFIX_APIKEY + secrets.token_urlsafe(32)
    row = ApiKey(name=name, key_hash=sha256(key), prefix=key[:12], created_at=now)
    session.add(row)
    session.flush()
    return row, key


def api_key_for(session: Session, key: str, now: dt.datetime) -> ApiKey | None:
    row = session.execute(
        select(ApiKey).where(ApiKey.key_hash == sha256(key), ApiKey.revoked_at.is_(None))
    ).scalar_one_or_none()
    if row is not None and (row.last_used_at is None or now - row.last_used_at > _TOUCH):
        row.last_used_at = now
    return row


_TOUCH = dt.timedelta(minutes=1)


# ---------------------------------------------------------------- registration PINs


def pin_hmac(secret_key: str, pin: str) -> str:
    return hmac.new(secret_key.encode(), pin.encode(), hashlib.sha256).hexdigest()


def create_pin(
    session: Session,
    secret_key: str,
    created_by: str,
    now: dt.datetime,
    expires_in: dt.timedelta,
    multi_use: bool = False,
) -> tuple[RegistrationPin, str]:
    """A new PIN no live PIN shares; returns the row and the PIN (shown once). Caller commits."""
    if not dt.timedelta(minutes=1) <= expires_in <= dt.timedelta(days=7):
        raise AccountError("expiry must be between 1 minute and 7 days")
    for _ in range(20):
        pin = f"{secrets.randbelow(10**PIN_LENGTH):0{PIN_LENGTH}d}"
        digest = pin_hmac(secret_key, pin)
        clash = session.execute(
            select(RegistrationPin.id).where(
                RegistrationPin.pin_hmac == digest,
                RegistrationPin.revoked_at.is_(None),
                RegistrationPin.expires_at > now,
            )
        ).first()
        if not clash:
            break
    else:  # pragma: no cover - a million PINs live at once
        raise AccountError("too many live PINs; revoke some first")
    row = RegistrationPin(
        pin_hmac=digest,
        hint=pin[-2:],
        multi_use=multi_use,
        uses=0,
        created_by=created_by,
        created_at=now,
        expires_at=now + expires_in,
    )
    session.add(row)
    session.flush()
    return row, pin


def consume_pin(session: Session, secret_key: str, pin: str, now: dt.datetime) -> RegistrationPin:
    """Use a PIN for one registration, or raise 403 saying why not. Caller commits."""
    rows = (
        session.execute(
            select(RegistrationPin).where(RegistrationPin.pin_hmac == pin_hmac(secret_key, pin))
        )
        .scalars()
        .all()
    )
    live = [r for r in rows if r.revoked_at is None]
    for row in live:
        if row.expires_at <= now:
            continue
        # Conditional: two PCs racing for one single-use PIN cannot both win.
        result = session.execute(
            update(table(RegistrationPin))
            .where(
                table(RegistrationPin).c.id == row.id,
                table(RegistrationPin).c.multi_use | (table(RegistrationPin).c.uses == 0),
            )
            .values(uses=table(RegistrationPin).c.uses + 1)
        )
        if affected(result) == 1:
            return row
    if any(r.expires_at <= now for r in live):
        raise ApiError(403, ErrorCode.PIN_EXPIRED, "this PIN has expired; ask for a new one")
    if live:
        raise ApiError(403, ErrorCode.PIN_USED, "this single-use PIN has already been used")
    raise ApiError(403, ErrorCode.INVALID_PIN, "wrong PIN")


def parse_duration(text: str) -> dt.timedelta:
    """'90s', '10m', '2h', '1d' or plain minutes -> timedelta; AccountError when unreadable."""
    m = re.fullmatch(r"\s*(\d{1,6})\s*([smhd]?)\s*", text)
    if not m:
        raise AccountError(f"cannot read the duration {text!r}; use e.g. 90s, 10m, 2h, 1d")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "": "minutes"}[m.group(2)]
    return dt.timedelta(**{unit: int(m.group(1))})
