"""The Windows service `WCMSClient` (pywin32): the OS's power and session events become agent calls.

Started by the Service Control Manager with no arguments, this module runs the control dispatcher
itself (servicemanager.StartServiceCtrlDispatcher); without it no control, PreShutdown included,
ever reaches the handler (the original's 0.7.0 bug). The service runs
`"<python.exe>" -m wcms.client.service`: the bundle's embeddable Python needs no pythonservice.exe.

`python -m wcms.client.service install|remove` does what `wcms client install|uninstall` does;
other arguments (`debug`, `start`, `stop`) go to pywin32's HandleCommandLine.

This module is the service's composition root: no wcms module imports it. Installing, starting
and removing the service is the service manager's business (platform/windows_scm.py).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback

import psutil
import servicemanager
import win32event
import win32service
import win32serviceutil

from wcms.client import config as client_config
from wcms.client import updater
from wcms.client.config import ClientConfig
from wcms.client.main import Agent, configure_logging
from wcms.client.platform import windows
from wcms.client.platform.base import AgentControl
from wcms.client.platform.windows import Action, WindowsPlatform
from wcms.client.platform.windows_scm import (
    DESCRIPTION,
    DISPLAY_NAME,
    SERVICE_NAME,
    STOP_WAIT_HINT_MS,
    install_service,
    uninstall_service,
)
from wcms.protocol import ClientEvent, PowerReason

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
