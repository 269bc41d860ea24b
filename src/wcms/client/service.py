"""The Windows service `WCMSClient` (pywin32): the OS's power and session events become agent calls.

Started by the Service Control Manager with no arguments, this module runs the control dispatcher
itself (servicemanager.StartServiceCtrlDispatcher); without it no control, PreShutdown included,
ever reaches the handler (the original's 0.7.0 bug). The service runs
`"<python.exe>" -m wcms.client.service`: the bundle's embeddable Python needs no pythonservice.exe.

`python -m wcms.client.service install|remove` does what `wcms client install|uninstall` does;
other arguments (`debug`, `start`, `stop`) go to pywin32's HandleCommandLine.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import psutil
import servicemanager
import win32event
import win32service
import win32serviceutil

from wcms.client import config as client_config
from wcms.client import updater
from wcms.client.config import ClientConfig
from wcms.client.main import Agent, configure_logging
from wcms.client.platform import AgentControl, windows
from wcms.client.platform.windows import Action, WindowsPlatform
from wcms.protocol import ClientEvent, PowerReason

SERVICE_NAME = "WCMSClient"
DISPLAY_NAME = "WCMS Client"
DESCRIPTION = "Reports this PC to the WCMS server: presence, shutdown, sleep and logons."

# Windows waits this long for PreShutdown handlers (the default is 10 s on Windows 10 1703+,
# 3 min before); the shutdown report itself never takes more than SHUTDOWN_TIMEOUT (2 s).
PRESHUTDOWN_TIMEOUT_MS = 10_000
STOP_WAIT_HINT_MS = int(client_config.SHUTDOWN_TIMEOUT * 1000) + 3_000
# Recovery: restart after 5 s, 30 s, then every 60 s; the count resets after a quiet day.
FAILURE_RESET_SECONDS = 24 * 3600
FAILURE_RESTART_DELAYS_MS = (5_000, 30_000, 60_000)

log = logging.getLogger("wcms.client.service")


class WCMSClientService(win32serviceutil.ServiceFramework):  # type: ignore[misc]  # untyped base
    """The agent as a Windows service, hosted by python.exe."""

    _svc_name_ = SERVICE_NAME
    _svc_display_name_ = DISPLAY_NAME
    _svc_description_ = DESCRIPTION

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        self.stop_event = win32event.CreateEvent(None, True, False, None)
        self.platform = WindowsPlatform()
        self.test_controls = False
        self._lock = threading.Lock()
        self._final: PowerReason | None = None  # the first of PRESHUTDOWN/SHUTDOWN/STOP wins
        self._asleep = False
        self._source = ""
        self.agent: AgentControl | None = None

    def GetAcceptedControls(self) -> int:
        """STOP, PRESHUTDOWN (SHUTDOWN as the fallback), POWEREVENT and SESSIONCHANGE."""
        return int(
            win32service.SERVICE_ACCEPT_STOP
            | win32service.SERVICE_ACCEPT_SHUTDOWN
            | win32service.SERVICE_ACCEPT_PRESHUTDOWN
            | win32service.SERVICE_ACCEPT_POWEREVENT
            | win32service.SERVICE_ACCEPT_SESSIONCHANGE
        )

    def SvcDoRun(self) -> None:
        """Build the agent and run its loop until a stop, a shutdown or a crash."""
        try:
            config = client_config.load_config(self.platform)
            configure_logging(config, console=False)
            log.info("Service %s starting (pid %d)", SERVICE_NAME, os.getpid())
            self.test_controls = config.test_controls
            if self.test_controls:
                log.warning("Test control %#x is enabled", windows.TEST_CONTROL_PRESHUTDOWN)
            with self._lock:  # a STOP that came first is seen here or by _finish, never lost
                self.agent = agent = Agent(config, self.platform)
                stopped_early = self._final is not None
            if not stopped_early:
                self._start_updater(config)
                agent.run()
        except Exception:
            log.exception("Service %s failed", SERVICE_NAME)
            servicemanager.LogErrorMsg(f"{SERVICE_NAME} failed: {traceback.format_exc()}")
            raise  # pywin32 reports STOPPED with an error code; recovery restarts the service
        # A handler may still be reporting; let it finish before the process ends.
        win32event.WaitForSingleObject(self.stop_event, STOP_WAIT_HINT_MS)
        log.info("Service %s stopped", SERVICE_NAME)

    def _start_updater(self, config: ClientConfig) -> None:
        """Check for signed updates, when running from a bundle (not from a pip install)."""
        target = updater.bundle_install()
        if target is not None:
            updater.UpdateChecker(config, target).start()

    def SvcStop(self) -> None:
        """The service alone stops (sc stop, an upgrade): agent_stopped."""
        self._source = "SERVICE_CONTROL_STOP"
        self._handle(Action.STOP)

    def SvcShutdown(self) -> None:
        """The fallback: SHUTDOWN only matters when PreShutdown did not come."""
        log.info("Shutdown control received")
        self._source = "SERVICE_CONTROL_SHUTDOWN"
        self._handle(Action.POWER_OFF)

    def SvcOtherEx(self, control: int, event_type: int, data: object) -> None:
        """PRESHUTDOWN, POWEREVENT, SESSIONCHANGE and the test control."""
        action = windows.decide_control(control, event_type, test_controls=self.test_controls)
        if action == Action.REPLAY_PRESHUTDOWN:
            log.info("Test control %#x: replaying PreShutdown", control)
            self.ServiceCtrlHandlerEx(win32service.SERVICE_CONTROL_PRESHUTDOWN, 0, None)
            return
        if control == win32service.SERVICE_CONTROL_PRESHUTDOWN:
            log.info("Service control PRESHUTDOWN")
            self._source = "SERVICE_CONTROL_PRESHUTDOWN"
        self._handle(action)

    def _handle(self, action: Action) -> None:
        """Carry out one action; runs on the dispatcher thread, bounded by SHUTDOWN_TIMEOUT."""
        if action in (Action.POWER_OFF, Action.STOP):
            self._finish(PowerReason.AGENT_STOPPED if action == Action.STOP else None)
        elif action == Action.SLEEP:
            self._asleep = True
            self._agent_call("stop", PowerReason.SLEEP, source="PBT_APMSUSPEND")
        elif action == Action.RESUME:
            if self._asleep:  # both resume events come after a wake by a person: report once
                self._asleep = False
                self._agent_call("report", ClientEvent.RESUME)
        elif action in (Action.LOGON, Action.LOGOFF):
            self._agent_call("report", ClientEvent(action.value))

    def _finish(self, reason: PowerReason | None) -> None:
        """Report the final reason once, synchronously, then let SvcDoRun return."""
        # The 2 s budget starts when the control arrives, so telling restart from shutdown
        # (an event-log read) comes out of it rather than on top of it.
        deadline = time.monotonic() + client_config.SHUTDOWN_TIMEOUT
        with self._lock:
            first = self._final is None
            if first:
                self._final = reason or power_off_reason()
        if first:
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING, waitHint=STOP_WAIT_HINT_MS)
            self._agent_call("stop", self._final, source=self._source, deadline=deadline)
        win32event.SetEvent(self.stop_event)

    def _agent_call(self, method: str, arg: object, **kwargs: str | float) -> None:
        """Call agent.stop/report; an error is logged, never raised into the SCM's thread."""
        if self.agent is None:
            log.warning("%s(%s) before the agent started: ignored", method, arg)
            return
        started = time.monotonic()
        try:
            getattr(self.agent, method)(arg, **kwargs)
        except Exception:
            log.exception("agent.%s(%s) failed", method, arg)
        log.debug("agent.%s(%s) took %.3f s", method, arg, time.monotonic() - started)


def power_off_reason() -> PowerReason:
    """Restart or shutdown, as the newest User32 event 1074 since boot says (else shutdown)."""
    try:
        return windows.requested_power_reason(psutil.boot_time())
    except Exception:  # pywin32 raises its own error type; any failure means "shutdown"
        log.warning("Could not tell restart from shutdown", exc_info=True)
        return PowerReason.SHUTDOWN


# ---------------------------------------------------------------------------- install


def service_command_line(python: str) -> str:
    """The binary path the SCM runs: python.exe hosting this module's dispatcher."""
    return f'"{python}" -m wcms.client.service'


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


# ---------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """No arguments: the SCM started us, run the control dispatcher. Else a command."""
    args = list(sys.argv if argv is None else argv)
    if len(args) <= 1:
        servicemanager.Initialize()
        servicemanager.PrepareToHostSingle(WCMSClientService)
        servicemanager.StartServiceCtrlDispatcher()
        return 0
    if args[1] in ("install", "remove", "uninstall"):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        if args[1] == "install":
            install_service(client_config.load_config(WindowsPlatform()))
        else:
            uninstall_service()
        return 0
    win32serviceutil.HandleCommandLine(WCMSClientService, argv=args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
