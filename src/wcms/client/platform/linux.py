"""The Linux platform: product_uuid identity, the seat0 user, logind and SIGTERM as OS events.

Shutdown and sleep arrive two ways. logind announces them on D-Bus (PrepareForShutdown /
PrepareForSleep) and waits for our delay inhibitor lock, which is the clean path. When the
system bus is absent (containers, minimal installs) or logind is not running, systemd's SIGTERM
at shutdown is the fallback: the handler asks whether the system is going down and reports
shutdown or restart, while a plain `systemctl stop` is reported as agent_stopped.
"""

from __future__ import annotations

import logging
import os
import platform as stdlib_platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import psutil

from wcms.client.config import SHUTDOWN_TIMEOUT
from wcms.client.platform.base import ServiceError
from wcms.protocol import ClientEvent, PowerReason

if TYPE_CHECKING:
    from wcms.client.config import ClientConfig
    from wcms.client.platform.base import AgentControl

log = logging.getLogger(__name__)

PRODUCT_UUID = Path("/sys/class/dmi/id/product_uuid")
MACHINE_ID = Path("/etc/machine-id")
OS_RELEASE = Path("/etc/os-release")
CPUINFO = Path("/proc/cpuinfo")
UNIT_NAME = "wcms-client.service"
UNIT_PATH = Path("/etc/systemd/system") / UNIT_NAME

# Share of the shutdown budget that finding the reason may spend; the signal gets the rest.
DETECT_BUDGET = 0.5
# Kept back from the budget on SIGTERM for the process to exit: the promise is that the whole
# stop, exit included, takes at most SHUTDOWN_TIMEOUT.
EXIT_RESERVE = 0.1

# Boards that ship one UUID for every unit: sixty PCs of one model would become one PC.
_PLACEHOLDER_UUIDS = frozenset(
    {
        "00000000-0000-0000-0000-000000000000",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
        "03000200-0400-0500-0006-000700080009",
        "00020003-0004-0005-0006-000700080009",
        "12345678-1234-5678-90ab-cddeefaabbcc",
    }
)
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_RESTART_TARGETS = ("reboot.target", "kexec.target", "soft-reboot.target")
_GRAPHICAL_TYPES = ("x11", "wayland", "mir")


# ---------------------------------------------------------------------------- pure parsers


def usable_uuid(text: str) -> str | None:
    """product_uuid, lower-cased, or None when unset or a vendor placeholder."""
    value = text.strip().lower()
    if not _UUID_RE.match(value) or value in _PLACEHOLDER_UUIDS:
        return None
    return value


def parse_machine_id(text: str) -> str | None:
    """/etc/machine-id: 32 hex digits (empty or 'uninitialized' on a fresh image)."""
    value = text.strip().lower()
    return value if re.fullmatch(r"[0-9a-f]{32}", value) and set(value) != {"0"} else None


def parse_os_release(text: str) -> dict[str, str]:
    """KEY=value lines of os-release(5), quotes removed."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            values[key] = value.strip().strip("'\"")
    return values


def describe_linux(os_release: Mapping[str, str], kernel: str) -> dict[str, str]:
    """os_name, os_edition and os_version from os-release and the kernel release."""
    edition = os_release.get("PRETTY_NAME") or os_release.get("NAME") or "Linux"
    version = os_release.get("VERSION_ID") or os_release.get("VERSION") or ""
    full = f"{version} (kernel {kernel})" if version else f"kernel {kernel}"
    return {"os_name": "Linux", "os_edition": edition[:255], "os_version": full[:255]}


def parse_cpu_model(cpuinfo: str) -> str | None:
    """The CPU's marketing name from /proc/cpuinfo (x86 'model name'; ARM 'Model'/'Hardware')."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip().lower(), " ".join(value.split()))
    for key in ("model name", "model", "hardware", "cpu model", "processor"):
        found = fields.get(key)
        if found and not found.isdigit():
            return found
    return None


def parse_loginctl_sessions(output: str) -> list[dict[str, str]]:
    """`loginctl show-session ID... -p ...` output: one KEY=value block per session."""
    sessions: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in output.splitlines() + [""]:
        key, sep, value = line.partition("=")
        if sep:
            current[key.strip()] = value.strip()
        elif current:
            sessions.append(current)
            current = {}
    return sessions


def pick_console_session(sessions: Iterable[Mapping[str, str]]) -> str | None:
    """The user of the local seat0/tty session, active and graphical sessions first."""
    best: tuple[int, str] | None = None
    for s in sessions:
        local = s.get("Remote", "no") != "yes"
        on_console = s.get("Seat") == "seat0" or s.get("TTY", "").startswith("tty")
        alive = s.get("State", "active") in ("active", "online")
        if not (s.get("Name") and local and on_console and alive and s.get("Class") == "user"):
            continue
        rank = (s.get("Active") == "yes") * 2 + (s.get("Type") in _GRAPHICAL_TYPES)
        if best is None or rank > best[0]:
            best = (rank, s["Name"])
    return best[1] if best else None


def console_user_from_utmp(entries: Iterable[tuple[str, str | None, str | None]]) -> str | None:
    """From utmp (name, terminal, host): a tty or local X display login, never ssh's pts."""
    for name, terminal, host in entries:
        term, where = terminal or "", host or ""
        if re.match(r"^(tty\d+|:\d+)", term) or re.match(r"^:\d+", where):
            return name
    return None


def reason_from_jobs(list_jobs_output: str | None) -> PowerReason:
    """Restart if systemd has a reboot-like target queued, else shutdown."""
    units = {word for line in (list_jobs_output or "").splitlines() for word in line.split()}
    return PowerReason.RESTART if units & set(_RESTART_TARGETS) else PowerReason.SHUTDOWN


def reason_from_shutdown_type(kind: str) -> PowerReason:
    """logind's PrepareForShutdownWithMetadata 'type': reboot, kexec, poweroff, halt..."""
    return PowerReason.RESTART if "reboot" in kind or kind == "kexec" else PowerReason.SHUTDOWN


def classify_sigterm(
    preparing_for_shutdown: bool | None, system_state: str | None, list_jobs: str | None
) -> PowerReason:
    """Why SIGTERM came: the system going down (shutdown/restart) or a plain stop."""
    going_down = preparing_for_shutdown is True or (system_state or "").strip() == "stopping"
    if not going_down:
        return PowerReason.AGENT_STOPPED
    return reason_from_jobs(list_jobs)


class LogindSignal(StrEnum):
    SHUTDOWN = "shutdown"
    SLEEP = "sleep"
    RESUME = "resume"


def decide_logind_signal(member: str, body: Sequence[Any]) -> LogindSignal | None:
    """What a logind Manager signal means for us; None for the ones we ignore."""
    active = bool(body[0]) if body else False
    if member in ("PrepareForShutdown", "PrepareForShutdownWithMetadata") and active:
        return LogindSignal.SHUTDOWN
    if member == "PrepareForSleep":
        return LogindSignal.SLEEP if active else LogindSignal.RESUME
    return None


def render_unit(template: str, exec_start: str, environment: Mapping[str, str]) -> str:
    """Fill the unit template: the command line and Environment= lines."""
    env_lines = "".join(f'Environment="{k}={v}"\n' for k, v in sorted(environment.items()))
    return template.replace("@EXEC_START@", exec_start).replace("@ENVIRONMENT@\n", env_lines)


# ---------------------------------------------------------------------------- OS calls


def run_command(args: Sequence[str], timeout: float) -> str | None:
    """stdout of a short command, or None if it is missing, fails to start or overruns."""
    try:
        done = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            timeout=max(timeout, 0.01),
            check=False,
            env={**os.environ, "LC_ALL": "C", "SYSTEMD_PAGER": ""},
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("%s: %s", " ".join(args), exc)
        return None
    return done.stdout


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _systemctl(*args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["systemctl", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ServiceError(f"systemctl {' '.join(args)}: {exc}") from None


def _checked_systemctl(*args: str) -> None:
    done = _systemctl(*args)
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip() or f"exit code {done.returncode}"
        raise ServiceError(f"systemctl {' '.join(args)} failed: {why}")


def wcms_command() -> str:
    """The command that starts `wcms`, as an absolute path systemd can run."""
    beside = Path(sys.executable).parent / "wcms"
    if beside.is_file():
        return str(beside)
    found = shutil.which("wcms")
    return found if found else f"{sys.executable} -m wcms"


def install_unit(config: ClientConfig) -> str:
    """Write the systemd unit, reload systemd, enable and start it."""
    if os.geteuid() != 0:
        raise ServiceError("installing the service needs root: run it with sudo")
    template = resources.files("wcms.client.platform").joinpath(UNIT_NAME).read_text("utf-8")
    env = {}
    if os.environ.get("WCMS_CLIENT_DIR"):
        env["WCMS_CLIENT_DIR"] = str(config.client_dir)
    UNIT_PATH.write_text(render_unit(template, f"{wcms_command()} client run", env), "utf-8")
    _checked_systemctl("daemon-reload")
    _checked_systemctl("enable", "--now", UNIT_NAME)
    return f"installed {UNIT_PATH}, enabled and started {UNIT_NAME}"


def uninstall_unit() -> str:
    """Stop and disable the unit (the agent reports agent_stopped) and remove it."""
    if os.geteuid() != 0:
        raise ServiceError("removing the service needs root: run it with sudo")
    if not UNIT_PATH.exists():
        return f"{UNIT_NAME} is not installed; nothing to do"
    _checked_systemctl("disable", "--now", UNIT_NAME)
    UNIT_PATH.unlink()
    _checked_systemctl("daemon-reload")
    return f"stopped, disabled and removed {UNIT_NAME}"


def unit_state() -> str:
    """systemd's word for the unit (active, inactive, failed...) or 'not installed'."""
    if not UNIT_PATH.exists():
        return "not installed"
    try:
        done = _systemctl("is-active", UNIT_NAME, timeout=5)
    except ServiceError as exc:
        return f"unknown ({exc})"
    return done.stdout.strip() or "unknown"


# ---------------------------------------------------------------------------- the platform


class LinuxPlatform:
    """The Platform contract (platform/base.py) on Linux, plus its OS event sources."""

    name = "linux"

    def __init__(self) -> None:
        self._agent: AgentControl | None = None
        self._logind: LogindWatcher | None = None

    def default_client_dir(self) -> Path:
        return Path("/var/lib/wcms")

    def default_log_dir(self) -> Path:
        return Path("/var/log/wcms")

    def machine_id(self) -> str:
        """product_uuid (the board's, readable by root), else /etc/machine-id; never a MAC."""
        found = usable_uuid(_read_text(PRODUCT_UUID) or "")
        found = found or parse_machine_id(_read_text(MACHINE_ID) or "")
        if found is None:
            raise OSError(f"neither {PRODUCT_UUID} nor {MACHINE_ID} holds an identity")
        return found

    def console_user(self) -> str | None:
        """The owner of the seat0 (or tty) session, from logind, else from utmp."""
        listed = run_command(["loginctl", "list-sessions", "--no-legend"], timeout=2)
        ids = [line.split()[0] for line in (listed or "").splitlines() if line.strip()]
        if ids:
            props = "Name,Seat,TTY,Type,Class,Active,Remote,State"
            shown = run_command(["loginctl", "show-session", *ids, "-p", props], timeout=2)
            return pick_console_session(parse_loginctl_sessions(shown or ""))
        users = [(u.name, u.terminal, u.host) for u in psutil.users()]
        return console_user_from_utmp(users)

    def os_info(self) -> dict[str, Any]:
        info: dict[str, Any] = describe_linux(
            parse_os_release(_read_text(OS_RELEASE) or ""), stdlib_platform.release()
        )
        model = parse_cpu_model(_read_text(CPUINFO) or "")
        if model:
            info["cpu_model"] = model[:255]
        return info

    def restrict_to_owner(self, path: Path) -> None:
        os.chmod(path, 0o600)

    # -- OS events -------------------------------------------------------------------------

    def watch_events(self, agent: AgentControl) -> None:
        """Turn SIGTERM/SIGINT and logind's signals into agent.stop()/report(). Main thread."""
        self._agent = agent
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, self._on_sigint)
        self._logind = LogindWatcher(agent)
        self._logind.start()

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT - EXIT_RESERVE
        reason = self.sigterm_reason(deadline)
        log.info("SIGTERM received: %s", reason.value)
        if self._agent is not None:
            self._agent.stop(reason, deadline=deadline, source="SIGTERM")

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._agent is not None:
            self._agent.stop(PowerReason.AGENT_STOPPED, source="SIGINT")

    def sigterm_reason(self, deadline: float) -> PowerReason:
        """Ask logind, then systemd, whether the system is going down; spend little time."""
        budget_end = min(deadline, time.monotonic() + DETECT_BUDGET)
        preparing = logind_preparing_for_shutdown(budget_end - time.monotonic())
        state = None
        if not preparing:
            state = run_command(["systemctl", "is-system-running"], budget_end - time.monotonic())
        jobs = None
        if preparing or (state or "").strip() == "stopping":
            jobs = run_command(
                ["systemctl", "list-jobs", "--no-legend", "--no-pager"],
                budget_end - time.monotonic(),
            )
        return classify_sigterm(preparing, state, jobs)


# ---------------------------------------------------------------------------- logind over D-Bus

_LOGIND_PATH = "/org/freedesktop/login1"
_LOGIND_NAME = "org.freedesktop.login1"
_LOGIND_IFACE = "org.freedesktop.login1.Manager"


def _jeepney() -> Any:
    """The jeepney modules, or None when the package is not installed."""
    try:
        import jeepney  # type: ignore[import-untyped]  # jeepney ships no type information
        import jeepney.io.blocking  # type: ignore[import-untyped]  # same package
    except ImportError:
        return None
    return jeepney


def logind_preparing_for_shutdown(timeout: float) -> bool | None:
    """logind's PreparingForShutdown property; None if the bus or logind cannot say in time.

    jeepney bounds the bus handshake but not its Hello call, so the query runs in a daemon
    thread that is abandoned when the time is up.
    """
    jeepney = _jeepney()
    if jeepney is None or timeout <= 0:
        return None
    answer: list[bool | None] = []
    worker = threading.Thread(
        target=lambda: answer.append(_ask_preparing(jeepney, timeout)), daemon=True
    )
    worker.start()
    worker.join(timeout)
    return answer[0] if answer else None


def _ask_preparing(jeepney: Any, timeout: float) -> bool | None:
    address = jeepney.DBusAddress(_LOGIND_PATH, bus_name=_LOGIND_NAME, interface=_LOGIND_IFACE)
    try:
        with jeepney.io.blocking.open_dbus_connection(bus="SYSTEM", auth_timeout=timeout) as conn:
            msg = jeepney.Properties(address).get("PreparingForShutdown")
            body = jeepney.wrappers.unwrap_msg(conn.send_and_get_reply(msg, timeout=timeout))
    except Exception as exc:  # any bus failure just means "logind cannot say"
        log.debug("PreparingForShutdown unavailable: %s", exc)
        return None
    return bool(body[0][1])


class LogindWatcher:
    """A daemon thread holding a delay inhibitor lock and listening for logind's signals."""

    def __init__(self, agent: AgentControl) -> None:
        self._agent = agent
        self._lock_fd: Any = None
        self._thread = threading.Thread(target=self._run, name="logind", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        jeepney = _jeepney()
        if jeepney is None:
            log.info("jeepney is not installed; shutdown is detected through SIGTERM only")
            return
        try:
            self._listen(jeepney)
        except Exception as exc:  # no bus (containers) is normal, not fatal
            log.info("logind not reachable over D-Bus (%s); relying on SIGTERM at shutdown", exc)

    def _listen(self, jeepney: Any) -> None:
        blocking = jeepney.io.blocking
        address = jeepney.DBusAddress(_LOGIND_PATH, bus_name=_LOGIND_NAME, interface=_LOGIND_IFACE)
        rule = jeepney.MatchRule(
            type="signal", sender=_LOGIND_NAME, interface=_LOGIND_IFACE, path=_LOGIND_PATH
        )
        with blocking.open_dbus_connection(bus="SYSTEM", enable_fds=True, auth_timeout=5) as conn:
            conn.send_and_get_reply(jeepney.bus_messages.message_bus.AddMatch(rule), timeout=5)
            self._take_lock(jeepney, conn, address)
            log.info("Watching logind for shutdown and sleep (delay inhibitor lock held)")
            with conn.filter(rule, bufsize=16) as queue:
                while True:
                    msg = conn.recv_until_filtered(queue)
                    member = msg.header.fields.get(jeepney.HeaderFields.member, "")
                    self._handle(jeepney, conn, address, member, msg.body)

    def _take_lock(self, jeepney: Any, conn: Any, address: Any) -> None:
        why = "Report shutdown and sleep to the WCMS server"
        msg = jeepney.new_method_call(
            address, "Inhibit", "ssss", ("shutdown:sleep", "WCMS client", why, "delay")
        )
        self._lock_fd = jeepney.wrappers.unwrap_msg(conn.send_and_get_reply(msg, timeout=5))[0]

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            self._lock_fd.close()
            self._lock_fd = None

    def _handle(self, jeepney: Any, conn: Any, address: Any, member: str, body: Any) -> None:
        decision = decide_logind_signal(member, body)
        if decision is LogindSignal.SHUTDOWN:
            deadline = time.monotonic() + SHUTDOWN_TIMEOUT
            if member == "PrepareForShutdownWithMetadata" and len(body) > 1:
                kind = body[1].get("type", ("s", ""))[1]
                reason = reason_from_shutdown_type(str(kind))
            else:
                jobs = ["systemctl", "list-jobs", "--no-legend", "--no-pager"]
                reason = reason_from_jobs(run_command(jobs, DETECT_BUDGET))
            self._agent.stop(reason, deadline=deadline, source=f"logind {member}")
            self._release_lock()
        elif decision is LogindSignal.SLEEP:
            self._agent.stop(PowerReason.SLEEP, source="logind PrepareForSleep")
            self._release_lock()
        elif decision is LogindSignal.RESUME:
            self._take_lock(jeepney, conn, address)
            self._agent.report(ClientEvent.RESUME)
