"""The Windows service manager's side of WCMSClient: install, configure, start, stop, remove.

The service itself (its control handler and its run loop) is wcms.client.service, which the SCM
runs as `"<python.exe>" -m wcms.client.service`; this module only names that command line, so
the CLI, the installer and the service can all use it without importing the service.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import win32service
import win32serviceutil

from wcms.client.config import SHUTDOWN_TIMEOUT, ClientConfig
from wcms.client.platform import windows
from wcms.client.platform.windows import WindowsPlatform

SERVICE_NAME = "WCMSClient"
DISPLAY_NAME = "WCMS Client"
DESCRIPTION = "Reports this PC to the WCMS server: presence, shutdown, sleep and logons."

# Windows waits this long for PreShutdown handlers (the default is 10 s on Windows 10 1703+,
# 3 min before); the shutdown report itself never takes more than SHUTDOWN_TIMEOUT (2 s).
PRESHUTDOWN_TIMEOUT_MS = 10_000
STOP_WAIT_HINT_MS = int(SHUTDOWN_TIMEOUT * 1000) + 3_000
# Recovery: restart after 5 s, 30 s, then every 60 s; the count resets after a quiet day.
FAILURE_RESET_SECONDS = 24 * 3600
FAILURE_RESTART_DELAYS_MS = (5_000, 30_000, 60_000)

SERVICE_MODULE = "wcms.client.service"

log = logging.getLogger(__name__)


def service_command_line(python: str) -> str:
    """The binary path the SCM runs: python.exe hosting the service's control dispatcher."""
    return f'"{python}" -m {SERVICE_MODULE}'


def _python_for_service() -> tuple[str, list[str]]:
    """The interpreter to register, and the environment it needs.

    A venv's python.exe is a redirector that starts the real one as a child, which the SCM
    cannot talk to; so a venv registers its base interpreter with PYTHONPATH set instead.
    """
    if sys.prefix == sys.base_prefix:
        return sys.executable, []
    base = str(Path(sys.base_prefix) / "python.exe")
    site = os.pathsep.join(p for p in sys.path if p.endswith("site-packages"))
    return base, [f"PYTHONPATH={site}"]


def install_service(config: ClientConfig, *, python: str | None = None, start: bool = True) -> None:
    """Install (or update in place) WCMSClient: automatic start, recovery, PreShutdown timeout.

    `python` is the interpreter the service runs (the installer passes the installed bundle's);
    by default the one running this.
    """
    python, environment = (python, []) if python else _python_for_service()
    if config.client_dir != WindowsPlatform().default_client_dir():
        environment.append(f"WCMS_CLIENT_DIR={config.client_dir}")
    scm = win32service.OpenSCManager(None, None, win32service.SC_MANAGER_ALL_ACCESS)
    try:
        handle = _create_or_update(scm, service_command_line(python))
        try:
            _configure(handle)
        finally:
            win32service.CloseServiceHandle(handle)
    finally:
        win32service.CloseServiceHandle(scm)
    windows.set_service_environment(SERVICE_NAME, environment)
    log.info("Installed service %s (%s)", SERVICE_NAME, service_command_line(python))
    if start:
        start_service()


def _create_or_update(scm: Any, command_line: str) -> Any:
    """Create the service, or point an existing one at this interpreter (an upgrade)."""
    access = win32service.SERVICE_ALL_ACCESS
    own = win32service.SERVICE_WIN32_OWN_PROCESS
    auto = win32service.SERVICE_AUTO_START
    normal = win32service.SERVICE_ERROR_NORMAL
    try:
        handle = win32service.OpenService(scm, SERVICE_NAME, access)
    except win32service.error:
        return win32service.CreateService(
            scm, SERVICE_NAME, DISPLAY_NAME, access, own, auto, normal, command_line,
            None, False, None, None, None,
        )  # fmt: skip
    win32service.ChangeServiceConfig(
        handle, own, auto, normal, command_line, None, False, None, None, None, DISPLAY_NAME
    )
    return handle


def _configure(handle: Any) -> None:
    """Description, recovery on failure and the PreShutdown timeout."""
    change = win32service.ChangeServiceConfig2
    change(handle, win32service.SERVICE_CONFIG_DESCRIPTION, DESCRIPTION)
    actions = [(win32service.SC_ACTION_RESTART, delay) for delay in FAILURE_RESTART_DELAYS_MS]
    failure = {
        "ResetPeriod": FAILURE_RESET_SECONDS,
        "RebootMsg": None,
        "Command": None,
        "Actions": actions,
    }
    change(handle, win32service.SERVICE_CONFIG_FAILURE_ACTIONS, failure)
    try:  # also restart after a crash that still reported STOPPED with an error code
        change(handle, win32service.SERVICE_CONFIG_FAILURE_ACTIONS_FLAG, True)
    except win32service.error as exc:  # Wine 8 knows no such level (124)
        log.warning("Recovery after a reported failure not set: %s", exc.strerror)
    change(handle, win32service.SERVICE_CONFIG_PRESHUTDOWN_INFO, PRESHUTDOWN_TIMEOUT_MS)


def start_service(timeout: float = 30.0) -> None:
    """Start WCMSClient and wait until the SCM says RUNNING."""
    try:
        win32serviceutil.StartService(SERVICE_NAME)
    except win32service.error as exc:
        if exc.winerror != 1056:  # ERROR_SERVICE_ALREADY_RUNNING
            raise
    win32serviceutil.WaitForServiceStatus(SERVICE_NAME, win32service.SERVICE_RUNNING, int(timeout))


def stop_service(timeout: float = 30.0) -> None:
    """Stop WCMSClient (it reports agent_stopped) and wait until the SCM says STOPPED."""
    try:
        win32serviceutil.StopService(SERVICE_NAME)
    except win32service.error as exc:
        if exc.winerror != 1062:  # ERROR_SERVICE_NOT_ACTIVE
            raise
    win32serviceutil.WaitForServiceStatus(SERVICE_NAME, win32service.SERVICE_STOPPED, int(timeout))


def service_status() -> str:
    """The SCM's word for WCMSClient: running, stopped, ... or not installed."""
    try:
        state = win32serviceutil.QueryServiceStatus(SERVICE_NAME)[1]
    except win32service.error as exc:
        if exc.winerror == 1060:  # ERROR_SERVICE_DOES_NOT_EXIST
            return "not installed"
        raise
    return _STATE_NAMES.get(state, f"state {state}")


_STATE_NAMES = {
    1: "stopped",
    2: "start pending",
    3: "stop pending",
    4: "running",
    5: "continue pending",
    6: "pause pending",
    7: "paused",
}


def uninstall_service(timeout: float = 30.0) -> None:
    """Stop WCMSClient if it runs (reporting agent_stopped), then delete it."""
    try:
        status = win32serviceutil.QueryServiceStatus(SERVICE_NAME)
    except win32service.error as exc:
        if exc.winerror == 1060:  # ERROR_SERVICE_DOES_NOT_EXIST
            return
        raise
    if status[1] != win32service.SERVICE_STOPPED:
        stop_service(timeout)
    win32serviceutil.RemoveService(SERVICE_NAME)
    log.info("Removed service %s", SERVICE_NAME)
