"""Who this PC is to the server: its machine_id, its token, and what it last heard.

The machine_id comes from the hardware (product UUID / SMBIOS), never from a MAC address, so it
survives adapter changes and re-installs. The token is a secret bound to that id by the server:
a cloned disk image carrying another PC's token is refused (403 machine_mismatch), and the
client throws the token away and registers afresh.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wcms.client.config import ClientConfig, write_private
from wcms.client.platform.base import Platform
from wcms.protocol import TOKEN_PREFIX_PC, is_machine_id

log = logging.getLogger(__name__)


class IdentityError(Exception):
    """No usable machine_id; the message says how to provide one."""


@dataclass(frozen=True)
class MachineId:
    value: str
    source: str  # "WCMS_MACHINE_ID" or "platform"


def machine_id(config: ClientConfig, platform: Platform) -> MachineId:
    """The override from WCMS_MACHINE_ID, else the platform's hardware identity."""
    if config.machine_id:
        return MachineId(config.machine_id, "WCMS_MACHINE_ID")
    try:
        value = platform.machine_id()
    except OSError as exc:
        raise IdentityError(
            f"cannot read this PC's identity ({exc}); set WCMS_MACHINE_ID"
        ) from None
    if not is_machine_id(value):
        raise IdentityError(f"the platform's identity {value!r} is not usable; set WCMS_MACHINE_ID")
    return MachineId(value, f"{platform.name} hardware id")


class TokenStore:
    """The token file: one line, readable by the service account only."""

    def __init__(self, path: Path, platform: Platform) -> None:
        self.path = path
        self._platform = platform

    def load(self) -> str | None:
        try:
            token = self.path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        if not token.startswith(TOKEN_PREFIX_PC):
            log.warning("Ignoring %s: it does not hold a PC token", self.path)
            return None
        return token

    def save(self, token: str) -> None:
        write_private(self.path, token + "\n", self._platform)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def read_state(path: Path) -> dict[str, Any]:
    """The last-contact record written by the agent (for `wcms client status`), or {}."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_state(path: Path, state: dict[str, Any], platform: Platform) -> None:
    try:
        write_private(path, json.dumps(state, sort_keys=True) + "\n", platform)
    except OSError as exc:  # status information only: never stop the agent for it
        log.warning("Cannot write %s: %s", path, exc)
