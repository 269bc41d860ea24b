"""Pick the platform once; this is the only place in the client that asks which OS it runs on.

The contract every platform fulfils is in `base.py`. Installing the client as a service is
platform business too, so the CLI reaches it through the functions below, never by OS checks.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from wcms.client.platform.base import AgentControl, Platform, ServiceError

if TYPE_CHECKING:
    from wcms.client.config import ClientConfig

__all__ = [
    "AgentControl",
    "Platform",
    "ServiceError",
    "current",
    "install_service",
    "service_state",
    "uninstall_service",
]

_current: Platform | None = None


def current() -> Platform:
    """The platform this process runs on, chosen on first use."""
    global _current
    if _current is None:
        _current = _choose()
    return _current


def _choose() -> Platform:
    if sys.platform == "win32":
        from wcms.client.platform.windows import WindowsPlatform

        return WindowsPlatform()
    from wcms.client.platform.linux import LinuxPlatform

    return LinuxPlatform()


def install_service(config: ClientConfig) -> str:
    """Install and start the client as a service; answer a line saying what was done."""
    if sys.platform == "win32":
        from wcms.client.platform import windows_scm

        windows_scm.install_service(config)
        return "installed and started the Windows service WCMSClient"
    from wcms.client.platform import linux

    return linux.install_unit(config)


def uninstall_service() -> str:
    """Stop and remove the client service; answer a line saying what was done."""
    if sys.platform == "win32":
        from wcms.client.platform import windows_scm

        windows_scm.uninstall_service()
        return "stopped and removed the Windows service WCMSClient"
    from wcms.client.platform import linux

    return linux.uninstall_unit()


def service_state() -> str:
    """The service manager's word for the client service: active, inactive, not installed..."""
    if sys.platform == "win32":
        from wcms.client.platform import windows_scm

        return windows_scm.service_status()
    from wcms.client.platform import linux

    return linux.unit_state()
