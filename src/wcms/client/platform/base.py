"""The small contract every platform module fulfils; main.py only ever talks to this.

`wcms.client.platform.current()` picks `windows` or `linux` once. No other module of the client
asks which OS it runs on.

OS events become one call on the agent (`wcms.client.main.Agent`):
- the OS is shutting down / restarting / suspending -> `agent.stop(PowerReason.SHUTDOWN)` (or
  RESTART, SLEEP): one synchronous shutdown signal, bounded by SHUTDOWN_TIMEOUT, then the loop ends
  (for SLEEP the loop pauses instead and resumes on `agent.report(ClientEvent.RESUME)`);
- the service is stopped while the OS keeps running -> `agent.stop(PowerReason.AGENT_STOPPED)`;
- resume, logon, logoff -> `agent.report(ClientEvent.X)`: an immediate heartbeat with that event.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from wcms.protocol import ClientEvent, PowerReason


class ServiceError(Exception):
    """Installing, removing or asking about the client service failed; the message says why."""


class AgentControl(Protocol):
    """What an OS event source may do to the agent (wcms.client.main.Agent implements it)."""

    def stop(
        self, reason: PowerReason, *, deadline: float | None = None, source: str = ""
    ) -> None: ...

    def report(self, event: ClientEvent) -> None: ...


class Platform(Protocol):
    name: str  # "windows" or "linux"

    def default_client_dir(self) -> Path:
        """Where config and token live when WCMS_CLIENT_DIR is unset."""
        ...

    def default_log_dir(self) -> Path:
        """Where client.log lives when WCMS_CLIENT_DIR is unset."""
        ...

    def machine_id(self) -> str:
        """A stable identity: SMBIOS/product UUID, falling back to MachineGuid / machine-id."""
        ...

    def console_user(self) -> str | None:
        """The person logged on at the console, not the service's own account."""
        ...

    def os_info(self) -> dict[str, Any]:
        """os_name, os_version, os_edition, cpu_model (what psutil cannot tell)."""
        ...

    def restrict_to_owner(self, path: Path) -> None:
        """Make a secret file readable by the service account (and admins) only."""
        ...
