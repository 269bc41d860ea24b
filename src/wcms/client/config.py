"""Client settings: the config file `client.json` in the client dir, then `WCMS_*` variables.

Presence intervals are not settings: every server answer carries them (`config`), so an admin
changes them in one place. Only the shutdown deadline is fixed here, as the seed has it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from wcms import protocol
from wcms.client.platform.base import Platform

# The seed's constant: the whole shutdown report (DNS, connect, send, read) gets this long.
SHUTDOWN_TIMEOUT = protocol.SHUTDOWN_TIMEOUT

CONFIG_FILE = "client.json"
TOKEN_FILE = "token"
STATE_FILE = "state.json"
LOG_FILE = "client.log"
UPDATE_KEY_FILE = "update_key.pub"  # the operator's key, pinned at the first install
# Where the Windows bundle is installed (the installer's default, the updater's target).
WINDOWS_INSTALL_DIR = Path(r"C:\Program Files\WCMS")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_FILE_KEYS = frozenset({"server_url", "pin", "log_level", "dry_run_power", "test_controls"})
# Switches: true/false in client.json, 1/0 (true/false, yes/no, on/off) in the environment.
_FLAGS = frozenset({"dry_run_power", "test_controls"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

log = logging.getLogger(__name__)


class ConfigError(Exception):
    """A setting is missing or malformed; the message says which and where."""


@dataclass(frozen=True)
class ClientConfig:
    client_dir: Path
    log_dir: Path
    server_url: str | None = None
    pin: str | None = None
    machine_id: str | None = None  # WCMS_MACHINE_ID: overrides the platform's identity
    log_level: str = "INFO"
    # Record shutdown/restart/logoff/lock instead of doing them (demos, tests).
    dry_run_power: bool = False
    # Windows: honour the test-only control code that replays PreShutdown (tests under Wine).
    test_controls: bool = False

    @property
    def config_file(self) -> Path:
        return self.client_dir / CONFIG_FILE

    @property
    def token_file(self) -> Path:
        return self.client_dir / TOKEN_FILE

    @property
    def state_file(self) -> Path:
        return self.client_dir / STATE_FILE

    @property
    def log_file(self) -> Path:
        return self.log_dir / LOG_FILE

    @property
    def update_key_file(self) -> Path:
        return self.client_dir / UPDATE_KEY_FILE


def pinned_key(config: ClientConfig) -> str | None:
    """The operator's public key this PC pinned at its first install, if any."""
    try:
        return config.update_key_file.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def load_config(
    platform: Platform,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, str | None] | None = None,
) -> ClientConfig:
    """Read settings: platform defaults, then client.json, then WCMS_* variables, then overrides."""
    env = os.environ if env is None else env
    config = _dirs(platform, env)
    config = _apply(config, read_config_file(config.config_file), f"{config.config_file}")
    config = _apply(config, _from_env(env), "the environment")
    return _apply(config, {k: v for k, v in (overrides or {}).items() if v}, "the command line")


def _dirs(platform: Platform, env: Mapping[str, str]) -> ClientConfig:
    """WCMS_CLIENT_DIR moves config, token and logs together; else the platform decides."""
    moved = env.get("WCMS_CLIENT_DIR")
    if moved:
        base = Path(moved)
        return ClientConfig(client_dir=base, log_dir=base / "logs")
    return ClientConfig(
        client_dir=platform.default_client_dir(), log_dir=platform.default_log_dir()
    )


def read_config_file(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when there is no file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        log.warning("Ignoring unknown keys in %s: %s", path, ", ".join(unknown))
    return {k: v for k, v in data.items() if k in _FILE_KEYS}


def _from_env(env: Mapping[str, str]) -> dict[str, str]:
    names = {
        "server_url": "WCMS_SERVER_URL",
        "pin": "WCMS_PIN",
        "machine_id": "WCMS_MACHINE_ID",
        "log_level": "WCMS_LOG_LEVEL",
        "dry_run_power": "WCMS_DRY_RUN_POWER",
        "test_controls": "WCMS_TEST_CONTROLS",
    }
    return {key: env[name] for key, name in names.items() if env.get(name)}


def _apply(config: ClientConfig, values: Mapping[str, Any], source: str) -> ClientConfig:
    """Validate `values` (from `source`, named in errors) and lay them over `config`."""
    changes: dict[str, Any] = {}
    for key, raw in values.items():
        if raw is None:
            continue
        if key in _FLAGS:
            changes[key] = _flag(key, raw, source)
            continue
        if not isinstance(raw, str):
            raise ConfigError(f"{key} in {source} must be a string")
        changes[key] = _validate(key, raw.strip(), source)
    return replace(config, **changes)


def _flag(key: str, raw: object, source: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise ConfigError(f"{key} in {source} must be true or false")


def _validate(key: str, value: str, source: str) -> str:
    if key == "server_url":
        return normalise_server_url(value, source)
    if key == "pin" and not protocol.is_pin(value):
        raise ConfigError(f"pin in {source} must be {protocol.PIN_LENGTH} digits")
    if key == "machine_id" and not protocol.is_machine_id(value):
        lengths = f"{protocol.MACHINE_ID_MIN_LENGTH}-{protocol.MACHINE_ID_MAX_LENGTH}"
        raise ConfigError(
            f"machine_id in {source} must be {lengths} characters of [{protocol.MACHINE_ID_CHARS}]"
        )
    if key == "log_level":
        value = value.upper()
        if value not in LOG_LEVELS:
            raise ConfigError(f"log_level in {source} must be one of {', '.join(LOG_LEVELS)}")
    return value


def normalise_server_url(url: str, source: str = "the settings") -> str:
    """`http(s)://host[:port][/prefix]` without a trailing slash."""
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError(f"server_url in {source} must start with http:// or https://: {url!r}")
    return url


def write_config_file(
    config: ClientConfig, values: Mapping[str, str | None], platform: Platform
) -> None:
    """Merge `values` into client.json (a None value removes the key); the file may hold a PIN."""
    data = read_config_file(config.config_file)
    for key, value in values.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    write_private(config.config_file, json.dumps(data, indent=2, sort_keys=True) + "\n", platform)


def write_private(path: Path, text: str, platform: Platform) -> None:
    """Replace `path` atomically with `text`, readable by its owner only from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    platform.restrict_to_owner(tmp)
    os.replace(tmp, path)
