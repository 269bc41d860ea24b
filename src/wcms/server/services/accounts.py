"""Admins (argon2id passwords), their dashboard sessions, API keys and registration PINs.
Secrets are kept only hashed."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.orm import Session

from wcms.protocol import PIN_LENGTH, TOKEN_PREFIX_APIKEY, ErrorCode
from wcms.server.db import affected, table
from wcms.server.models import Admin, AdminSession, ApiKey, RegistrationPin
from wcms.server.services.errors import Conflict, Forbidden, Invalid

if TYPE_CHECKING:
    from wcms.server.config import Settings

_hasher = PasswordHasher()
USERNAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MIN_PASSWORD = 10
# Verified against when the username is unknown, so timing does not tell which names exist:
# the hash of a random password nobody kept, with the hasher's parameters (a test keeps them
# equal). A constant for the default cost, because hashing one at import cost every server
# start and every `wcms` command a quarter of a second; made once, on first need, for another.
DUMMY_HASH = (
    "$argon2id$v=19$m=65536,t=3,p=4$7aHl/kqYEIagEgk+p7MsXA"
    "$JV2PZwdtFRMVvisRJO3ob8zq2xwlMZoxUm7LmQkxtwQ"
)
_dummy: list[str] = [DUMMY_HASH]


def configure_hashing(settings: Settings) -> None:
    """Hash new passwords at the settings' argon2id cost (config.py checks the floor). Logins
    rehash a password kept at another cost."""
    global _hasher
    cost = (settings.argon2_memory_kib, settings.argon2_time_cost, settings.argon2_parallelism)
    if cost == (_hasher.memory_cost, _hasher.time_cost, _hasher.parallelism):
        return
    _hasher = PasswordHasher(memory_cost=cost[0], time_cost=cost[1], parallelism=cost[2])
    _dummy[:] = [DUMMY_HASH] if not _hasher.check_needs_rehash(DUMMY_HASH) else []


def hash_password(password: str) -> str:
    """`password` hashed at the configured cost (pure CPU: 0.03-0.25 s)."""
    return _hasher.hash(password)


def dummy_hash() -> str:
    """A hash at the current cost of a password nobody knows."""
    if not _dummy:
        _dummy.append(_hasher.hash(secrets.token_urlsafe(24)))
    return _dummy[0]


Runner = Callable[..., Any]


def _inline(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


class AccountError(Invalid, ValueError):
    """A readable reason an account operation was refused (a 400 `validation_error`)."""


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
        raise Conflict(f"admin {username!r} already exists")
    admin = Admin(username=username, password_hash=hash_password(password), created_at=now)
    session.add(admin)
    session.flush()
    return admin


def set_password(
    session: Session, admin: Admin, password: str, keep_session: str | None = None
) -> int:
    """A new password; every session of the admin ends but `keep_session` (the id hash of the
    caller's own, when admins change their own password). Answers how many ended. Caller
    commits."""
    validate_new_password(password)
    admin.password_hash = hash_password(password)
    return end_sessions(session, admin.id, keep=keep_session)


def set_active(
    session: Session, admin: Admin, active: bool, *, acting_admin_id: int | None = None
) -> bool:
    """Enable or disable an admin; disabling ends their sessions at once, and their API keys
    stop working (api_key_for checks the owner). Answers whether it changed. Flushes; the
    caller commits.

    Conflict when it would disable the admin acting (`acting_admin_id`) or the last active
    admin: the dashboard would then have no way in but the command line.
    """
    if admin.is_active == active:
        return False
    if not active:
        if admin.id == acting_admin_id:
            raise Conflict("you cannot disable yourself")
        count = select(func.count()).where(Admin.is_active.is_(True))
        if session.execute(count).scalar_one() <= 1:
            raise Conflict("the last active admin cannot be disabled")
    admin.is_active = active
    if not active:
        end_sessions(session, admin.id)
    return True


def password_matches(password_hash: str, password: str) -> bool:
    """argon2's verify: pure CPU (about 0.2 s), so the server runs it off the request path."""
    try:
        return bool(_hasher.verify(password_hash, password))
    except (VerificationError, InvalidHashError):
        return False


def _nobody(password: str) -> bool:
    """The work of checking `password` for an admin who does not exist (always False)."""
    return password_matches(dummy_hash(), password) and False


def authenticate(
    session: Session, username: str, password: str, run: Runner = _inline
) -> Admin | None:
    """The active admin with these credentials, or None (constant work either way).

    `run(fn, *args)` runs the hashing: the server passes its hash pool's runner. The session's
    (read-only) transaction ends before the hash runs, so no database connection is held while
    logins wait for the hashing thread."""
    found = session.execute(select(Admin.id, Admin.password_hash).where(Admin.username == username))
    row = found.first()
    session.rollback()
    checked = run(password_matches, row.password_hash, password) if row else run(_nobody, password)
    if not checked:
        return None
    admin = session.get(Admin, row.id) if row else None
    if admin is None or not admin.is_active:
        return None
    if _hasher.check_needs_rehash(admin.password_hash):
        admin.password_hash = run(hash_password, password)
    return admin


def any_admin(session: Session) -> bool:
    return session.execute(select(Admin.id).limit(1)).first() is not None


def sha256(text: str) -> str:
    """PC tokens and API keys are 256-bit random strings: one SHA-256 keeps them at rest."""
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- dashboard sessions

# The cookie holds only a random id; the row (keyed by its SHA-256) holds the rest.
SESSION_IDLE = dt.timedelta(hours=12)  # sliding: ends after this long unused
SESSION_MAX = dt.timedelta(days=7)  # absolute: ends this long after the login, used or not
SESSION_TOUCH = dt.timedelta(minutes=1)  # last_seen_at is written at most this often

_S, _A = table(AdminSession), table(Admin)
# One indexed SELECT (the session's primary key, joined on the admin's) per admin request.
_SESSION_LOOKUP = (
    select(
        _S.c.admin_id, _S.c.csrf, _S.c.last_seen_at, _S.c.expires_at, _A.c.username, _A.c.is_active
    )
    .join(_A, _A.c.id == _S.c.admin_id)
    .where(_S.c.id_hash == bindparam("h"))
)
_SESSION_TOUCH = (
    update(_S)
    .where(_S.c.id_hash == bindparam("h"), _S.c.last_seen_at < bindparam("stale"))
    .values(last_seen_at=bindparam("now"))
)


@dataclass(frozen=True)
class LiveSession:
    id_hash: str
    admin_id: int
    username: str
    csrf: str


def start_session(
    session: Session,
    admin: Admin,
    now: dt.datetime,
    ip: str | None = None,
    replaces: str | None = None,
) -> tuple[LiveSession, str]:
    """A new session for `admin` (a fresh random id at every login); returns it and the id for
    the cookie, which is kept only hashed. `replaces`: the id hash of the session the browser
    held before, which ends. Caller commits."""
    if replaces:
        end_session(session, replaces)
    sid = secrets.token_urlsafe(32)
    row = AdminSession(
        id_hash=sha256(sid),
        admin_id=admin.id,
        csrf=secrets.token_urlsafe(32),
        created_at=now,
        last_seen_at=now,
        expires_at=now + SESSION_MAX,
        ip=ip[:64] if ip else None,
    )
    session.add(row)
    session.flush()
    return LiveSession(row.id_hash, admin.id, admin.username, row.csrf), sid


def session_for(session: Session, id_hash: str, now: dt.datetime) -> LiveSession | None:
    """The live session with this id hash, or None. An idle or expired session (or one of a
    disabled admin) is deleted on sight; a live one has last_seen_at slid forward, written at
    most once a minute. Flushes what it writes (rarely: a read alone writes nothing); the
    request commits it (an after-request hook), or the caller's unit of work."""
    row = session.execute(_SESSION_LOOKUP, {"h": id_hash}).first()
    if row is None:
        return None
    admin_id, csrf, last_seen, expires, username, active = row
    if not active or now >= expires or now - last_seen >= SESSION_IDLE:
        end_session(session, id_hash)
        session.flush()
        return None
    if now - last_seen >= SESSION_TOUCH:
        session.execute(_SESSION_TOUCH, {"h": id_hash, "stale": now - SESSION_TOUCH, "now": now})
    return LiveSession(id_hash, admin_id, username, csrf)


def end_session(session: Session, id_hash: str) -> int:
    """Log one session out. Caller commits."""
    return affected(session.execute(delete(AdminSession).where(AdminSession.id_hash == id_hash)))


def end_sessions(session: Session, admin_id: int, keep: str | None = None) -> int:
    """End every session of an admin but `keep` (an id hash). Caller commits."""
    stmt = delete(AdminSession).where(AdminSession.admin_id == admin_id)
    if keep:
        stmt = stmt.where(AdminSession.id_hash != keep)
    return affected(session.execute(stmt))


# ---------------------------------------------------------------- API keys


def create_api_key(
    session: Session, name: str, now: dt.datetime, owner_id: int | None = None
) -> tuple[ApiKey, str]:
    """Add a key; returns the row and the key itself, which is shown once. Caller commits.

    `owner_id`: the admin whose access the key carries; it stops working while that admin is
    disabled. None: the organisation's key, made explicitly on the server's command line."""
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise AccountError("name: 1-100 characters")
    key = TOKEN_PREFIX_APIKEY + secrets.token_urlsafe(32)
    row = ApiKey(
        name=name, key_hash=sha256(key), prefix=key[:12], created_at=now, owner_id=owner_id
    )
    session.add(row)
    session.flush()
    return row, key


def api_key_for(session: Session, key: str, now: dt.datetime) -> ApiKey | None:
    """The live key, or None: unknown, revoked, or owned by an admin who is disabled or gone."""
    found = session.execute(
        select(ApiKey, Admin.is_active)
        .outerjoin(Admin, Admin.id == ApiKey.owner_id)
        .where(ApiKey.key_hash == sha256(key), ApiKey.revoked_at.is_(None))
    ).first()
    if found is None:
        return None
    row, owner_active = found
    if row.owner_id is not None and not owner_active:  # None: the owner no longer exists
        return None
    if row.last_used_at is None or now - row.last_used_at > _TOUCH:
        row.last_used_at = now
    return row


def list_api_keys(session: Session) -> list[tuple[ApiKey, str | None]]:
    """Every key with its owner's name (None: an organisation key), oldest first."""
    rows = session.execute(
        select(ApiKey, Admin.username)
        .outerjoin(Admin, Admin.id == ApiKey.owner_id)
        .order_by(ApiKey.id)
    ).all()
    return [(k, name) for k, name in rows]


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
    *,
    auto_approve: bool = False,
) -> tuple[RegistrationPin, str]:
    """A new PIN no live PIN shares; returns the row and the PIN (shown once). Caller commits.

    `auto_approve`: PCs registered with it are approved at once (pc_service.register)."""
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
        auto_approve=auto_approve,
    )
    session.add(row)
    session.flush()
    return row, pin


def consume_pin(session: Session, secret_key: str, pin: str, now: dt.datetime) -> RegistrationPin:
    """Use a PIN for one registration, or refuse (Forbidden, `invalid_pin`) without saying
    why. Caller commits."""
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
    # One answer for wrong, expired and used PINs: the answer must not tell a guesser which
    # PINs exist (the admin's PIN list shows each PIN's state).
    raise Forbidden(
        "wrong, expired or already used PIN; ask for a new one", code=ErrorCode.INVALID_PIN
    )


def count_wrong_pin(session: Session, now: dt.datetime, limit: int) -> list[RegistrationPin]:
    """A wrong PIN was tried (from anywhere): every live PIN counts it, and those that reach
    `limit` are revoked; answers them (to audit). One UPDATE per step, so tries counted at once
    by several processes all count. Flushes; the caller commits."""
    pins = table(RegistrationPin)
    live = (pins.c.revoked_at.is_(None)) & (pins.c.expires_at > now)
    session.execute(update(pins).where(live).values(wrong_tries=pins.c.wrong_tries + 1))
    worn = (
        session.execute(
            select(RegistrationPin).where(
                RegistrationPin.revoked_at.is_(None),
                RegistrationPin.expires_at > now,
                RegistrationPin.wrong_tries >= limit,
            )
        )
        .scalars()
        .all()
    )
    for row in worn:
        row.revoked_at = now
    session.flush()
    return list(worn)


def parse_duration(text: str) -> dt.timedelta:
    """'90s', '10m', '2h', '1d' or plain minutes -> timedelta; AccountError when unreadable."""
    m = re.fullmatch(r"\s*(\d{1,6})\s*([smhd]?)\s*", text)
    if not m:
        raise AccountError(f"cannot read the duration {text!r}; use e.g. 90s, 10m, 2h, 1d")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "": "minutes"}[m.group(2)]
    return dt.timedelta(**{unit: int(m.group(1))})
