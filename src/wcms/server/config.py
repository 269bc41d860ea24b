"""Server settings: defaults, then WCMS_* environment variables, then an explicit mapping."""

from __future__ import annotations

import os
import re
import secrets
import stat
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from wcms.protocol import PRESETS, PresenceMode, PresenceTiming

# The one URL install scripts name: a plain host name, nothing a script could misread.
_PUBLIC_URL = re.compile(r"^https?://[A-Za-z0-9.\-]+(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~\-/]*)?$")


# OWASP's least recommended argon2id cost (memory in KiB, passes), with one lane.
ARGON2_FLOOR = (19456, 2)


class ConfigError(ValueError):
    """A setting has a value the server cannot use; the message names it."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("var")
    database_url: str = ""  # empty: a SQLite file in data_dir
    host: str = "0.0.0.0"
    port: int = 5050
    secret_key: str = ""  # empty: generated once and kept in data_dir/secret_key
    presence_mode: PresenceMode = PresenceMode.STANDARD
    # Explicit overrides of the preset (seconds); None keeps the preset's value.
    heartbeat_interval: float | None = None
    poll_timeout: float | None = None
    offline_after: float | None = None
    check_interval: float | None = None
    flush_interval: float = 0.25  # heartbeats are written in batches this often
    metrics_sample_interval: float = 60.0  # one history sample per PC at most this often
    metrics_retention_days: int = 14
    events_retention_days: int = 365
    trusted_proxies: int = 0  # how many X-Forwarded-For hops to trust (0: none)
    public_url: str = ""  # how PCs reach this server (https://host[:port]), for install scripts
    # Connection limits (connlimits.py): open connections one address may hold (a campus NAT
    # with a thousand PCs behind one address needs about two per PC: a long poll and a call),
    # and the deadlines for a request's headers (from its first byte) and its body.
    max_connections_per_address: int = 2000
    # Wrong PINs tried from anywhere that a live PIN outlives: at this many it is revoked, so a
    # guesser spread over many addresses finds a 6-digit PIN with odds of at most 1 in 1,000.
    pin_wrong_tries: int = 1000
    # Password hashing (argon2) runs in a thread this much nicer than request handling, so a
    # login flood cannot slow the shutdown signal (0 to 19; 0: no lower than the requests).
    hash_nice: int = 10
    # argon2id's cost for admin passwords. The default is argon2-cffi's (64 MiB, 3 passes, 4
    # lanes: about 0.2 s of CPU); a small server may go down to OWASP's least recommended
    # setting (19 MiB, 2 passes, 1 lane: about 0.03 s), never below it. A hash keeps its own
    # parameters, so a change applies to passwords set (or logged in with) afterwards.
    argon2_memory_kib: int = 65536
    argon2_time_cost: int = 3
    argon2_parallelism: int = 4
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    # Worker processes of `wcms server run` (0: one per core on PostgreSQL, one on SQLite,
    # which serves one process: more is refused).
    workers: int = 0
    background: bool = True  # run the presence checker and the heartbeat writer
    agent_fast_path: bool = True  # answer ordinary agent calls ahead of Flask (fastpath.py)
    log_level: str = "INFO"

    @property
    def worker_count(self) -> int:
        """The worker processes to run: `workers`, or the default for the database."""
        if self.workers:
            return self.workers
        return 1 if self.on_sqlite else (os.cpu_count() or 1)

    @property
    def on_sqlite(self) -> bool:
        """SQLite serves one process (one writer, and no notifier between processes)."""
        return self.sqlalchemy_url.startswith("sqlite")

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'wcms.db').resolve()}"

    def timing(self, mode: PresenceMode | None = None) -> PresenceTiming:
        """The preset of `mode` (default: the configured one) with explicit overrides applied."""
        base = PRESETS[mode or self.presence_mode]
        overrides = {
            f.name: getattr(self, f.name)
            for f in fields(PresenceTiming)
            if getattr(self, f.name) is not None
        }
        return replace(base, **overrides)


def _convert(name: str, kind: Any, raw: str) -> Any:
    try:
        if kind in (bool, "bool"):
            if raw.lower() not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(raw)
            return raw.lower() in {"1", "true", "yes", "on"}
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float", "float | None"):
            value = float(raw)
            if value <= 0:
                raise ValueError(raw)
            return value
        if kind in (Path, "Path"):
            return Path(raw)
        if kind in (PresenceMode, "PresenceMode"):
            return PresenceMode(raw)
    except ValueError:
        raise ConfigError(f"WCMS_{name.upper()}={raw!r} is not a valid value") from None
    return raw


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Build settings from the environment, then apply `overrides` (tests, CLI flags)."""
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = os.environ.get(f"WCMS_{f.name.upper()}")
        if raw is not None and raw != "":
            values[f.name] = _convert(f.name, f.type, raw)
    values.update(overrides or {})
    settings = Settings(**values)
    if settings.port < 1 or settings.port > 65535:
        raise ConfigError(f"WCMS_PORT={settings.port} is out of range")
    if settings.max_connections_per_address < 1:
        raise ConfigError("WCMS_MAX_CONNECTIONS_PER_ADDRESS must be at least 1")
    if settings.pin_wrong_tries < 1:
        raise ConfigError("WCMS_PIN_WRONG_TRIES must be at least 1")
    if not 0 <= settings.hash_nice <= 19:
        raise ConfigError(f"WCMS_HASH_NICE={settings.hash_nice} is not between 0 and 19")
    if settings.argon2_memory_kib < ARGON2_FLOOR[0] or settings.argon2_time_cost < ARGON2_FLOOR[1]:
        raise ConfigError(
            f"WCMS_ARGON2_MEMORY_KIB={settings.argon2_memory_kib}, WCMS_ARGON2_TIME_COST="
            f"{settings.argon2_time_cost}: below OWASP's least recommended argon2id cost "
            f"({ARGON2_FLOOR[0]} KiB, {ARGON2_FLOOR[1]} passes)"
        )
    if not 1 <= settings.argon2_parallelism <= 16:
        raise ConfigError(
            f"WCMS_ARGON2_PARALLELISM={settings.argon2_parallelism} is not between 1 and 16"
        )
    if settings.workers < 0:
        raise ConfigError(f"WCMS_WORKERS={settings.workers} is not a number of processes")
    if settings.workers > 1 and settings.on_sqlite:
        raise ConfigError(
            f"WCMS_WORKERS={settings.workers}: SQLite serves one process (one writer, and "
            "nothing to tell the others); use 1, or PostgreSQL (WCMS_DATABASE_URL) for more"
        )
    if settings.public_url and not _PUBLIC_URL.match(settings.public_url):
        raise ConfigError(
            f"WCMS_PUBLIC_URL={settings.public_url!r} is not http(s)://host[:port][/path]"
        )
    return replace(settings, public_url=settings.public_url.rstrip("/"))


def ensure_secret_key(settings: Settings) -> str:
    """Return the configured secret, or one generated once and kept (mode 600) in data_dir."""
    if settings.secret_key:
        return settings.secret_key
    path = settings.data_dir / "secret_key"
    if path.exists():
        return path.read_text().strip()
    prepare_data_dir(settings)
    key = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race; use its key
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


def prepare_data_dir(settings: Settings) -> Path:
    """The data dir, made (or tightened) to mode 700: it holds the database, the secret key and
    the signing key, which no other local user may read."""
    path = settings.data_dir
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_mode & (stat.S_ISVTX | stat.S_IWOTH):
        # Shared by every local user (/tmp, say): tightening it would break the machine, and
        # leaving it would leave the database and keys beside strangers' files.
        raise ConfigError(
            f"WCMS_DATA_DIR={path} is a directory every local user may write to; give WCMS a "
            "directory of its own (e.g. /var/lib/wcms)"
        )
    if info.st_mode & 0o077 and info.st_uid == os.getuid():
        path.chmod(0o700)
    return path
