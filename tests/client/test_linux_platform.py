"""The Linux platform: identity and OS parsers, the console user, and why SIGTERM came."""

from __future__ import annotations

import os
import stat
import time
from importlib import resources
from pathlib import Path

import pytest

from tests.client.clientproc import FAKE_SYSTEMCTL
from wcms.client.platform import linux
from wcms.client.platform.linux import LinuxPlatform, LogindSignal
from wcms.protocol import PowerReason


def test_product_uuid_is_lowercased_and_placeholders_refused() -> None:
    assert linux.usable_uuid("4C4C4544-0042-3510-8052-B4C04F4E4B32\n") == (
        "4c4c4544-0042-3510-8052-b4c04f4e4b32"
    )
    assert linux.usable_uuid("03000200-0400-0500-0006-000700080009") is None
    assert linux.usable_uuid("00000000-0000-0000-0000-000000000000") is None
    assert linux.usable_uuid("Not Settable") is None
    assert linux.usable_uuid("") is None


def test_machine_id_file() -> None:
    assert linux.parse_machine_id("3d1219c7c4c5404aaa1f6d2a48adfda4\n") == (
        "3d1219c7c4c5404aaa1f6d2a48adfda4"
    )
    assert linux.parse_machine_id("uninitialized\n") is None
    assert linux.parse_machine_id("0" * 32) is None


def test_real_machine_id_is_stable_and_not_a_mac() -> None:
    plat = LinuxPlatform()
    first = plat.machine_id()
    assert first == plat.machine_id()
    assert ":" not in first


OS_RELEASE = """PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
# a comment
ID=debian
"""


def test_os_release() -> None:
    values = linux.parse_os_release(OS_RELEASE)
    assert values["ID"] == "debian"
    assert linux.describe_linux(values, "6.1.0-18-amd64") == {
        "os_name": "Linux",
        "os_edition": "Debian GNU/Linux 12 (bookworm)",
        "os_version": "12 (kernel 6.1.0-18-amd64)",
    }
    assert linux.describe_linux({}, "6.1")["os_version"] == "kernel 6.1"


def test_cpu_model() -> None:
    x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel\t\t: 158\n"
    x86 += "model name\t: Intel(R) Core(TM) i7-8700   CPU @ 3.20GHz\n"
    assert linux.parse_cpu_model(x86) == "Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz"
    arm = "processor\t: 0\nBogoMIPS\t: 108.00\n\nHardware\t: BCM2835\nModel\t: Raspberry Pi 4\n"
    assert linux.parse_cpu_model(arm) == "Raspberry Pi 4"
    assert linux.parse_cpu_model("processor\t: 0\n") is None


SESSIONS = """Name=gdm
Seat=seat0
TTY=tty1
Type=wayland
Class=greeter
Active=no
Remote=no
State=online

Name=alice
Seat=seat0
TTY=tty2
Type=wayland
Class=user
Active=yes
Remote=no
State=active

Name=bob
Seat=
TTY=pts/0
Type=tty
Class=user
Active=yes
Remote=yes
State=active
"""


def test_console_user_from_logind_sessions() -> None:
    sessions = linux.parse_loginctl_sessions(SESSIONS)
    assert [s["Name"] for s in sessions] == ["gdm", "alice", "bob"]
    assert linux.pick_console_session(sessions) == "alice"
    # Only the ssh user is logged in: nobody is at the console.
    assert linux.pick_console_session(sessions[2:]) is None
    assert linux.pick_console_session([]) is None


def test_console_user_prefers_the_active_session() -> None:
    tty = {"Name": "carol", "TTY": "tty3", "Class": "user", "Active": "no", "Type": "tty"}
    gui = {"Name": "dave", "Seat": "seat0", "Class": "user", "Active": "yes", "Type": "x11"}
    assert linux.pick_console_session([tty, gui]) == "dave"
    assert linux.pick_console_session([tty]) == "carol"


def test_console_user_from_utmp() -> None:
    assert linux.console_user_from_utmp([("bob", "pts/0", "10.0.0.5"), ("alice", "tty1", "")]) == (
        "alice"
    )
    assert linux.console_user_from_utmp([("carol", "pts/1", ":0")]) == "carol"
    assert linux.console_user_from_utmp([("bob", "pts/0", "10.0.0.5")]) is None


@pytest.mark.parametrize(
    ("preparing", "state", "jobs", "reason"),
    [
        (None, "running\n", None, PowerReason.AGENT_STOPPED),
        (None, "degraded\n", None, PowerReason.AGENT_STOPPED),
        (None, None, None, PowerReason.AGENT_STOPPED),  # no systemctl at all
        (None, "stopping\n", "12 poweroff.target start waiting\n", PowerReason.SHUTDOWN),
        (None, "stopping\n", "12 reboot.target start waiting\n", PowerReason.RESTART),
        (None, "stopping\n", "3 kexec.target start waiting\n", PowerReason.RESTART),
        (None, "stopping\n", "", PowerReason.SHUTDOWN),
        (True, None, "8 reboot.target start running\n", PowerReason.RESTART),
        (False, "running", None, PowerReason.AGENT_STOPPED),
    ],
)
def test_why_sigterm_came(
    preparing: bool | None, state: str | None, jobs: str | None, reason: PowerReason
) -> None:
    assert linux.classify_sigterm(preparing, state, jobs) is reason


def test_logind_signals() -> None:
    assert linux.decide_logind_signal("PrepareForShutdown", (True,)) is LogindSignal.SHUTDOWN
    assert linux.decide_logind_signal("PrepareForShutdown", (False,)) is None
    assert linux.decide_logind_signal("PrepareForSleep", (True,)) is LogindSignal.SLEEP
    assert linux.decide_logind_signal("PrepareForSleep", (False,)) is LogindSignal.RESUME
    assert linux.decide_logind_signal("SessionNew", ("3", "/x")) is None
    assert linux.reason_from_shutdown_type("reboot") is PowerReason.RESTART
    assert linux.reason_from_shutdown_type("soft-reboot") is PowerReason.RESTART
    assert linux.reason_from_shutdown_type("poweroff") is PowerReason.SHUTDOWN


def _fake_systemctl(tmp_path: Path, state: str, jobs: str = "") -> dict[str, str]:
    (tmp_path / "systemctl").write_text(FAKE_SYSTEMCTL)
    (tmp_path / "systemctl").chmod(0o755)
    (tmp_path / "state").write_text(state)
    (tmp_path / "jobs").write_text(jobs)
    return {"PATH": f"{tmp_path}:{os.environ['PATH']}"}


def test_sigterm_reason_asks_systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real lookup, with a fake systemctl first on PATH (the allowed OS boundary)."""
    plat = LinuxPlatform()
    env = _fake_systemctl(tmp_path, "stopping\n", "5 reboot.target start waiting\n")
    monkeypatch.setenv("PATH", env["PATH"])
    started = time.monotonic()
    assert plat.sigterm_reason(started + 2) is PowerReason.RESTART
    assert time.monotonic() - started < linux.DETECT_BUDGET + 0.2
    (tmp_path / "state").write_text("running\n")
    assert plat.sigterm_reason(time.monotonic() + 2) is PowerReason.AGENT_STOPPED


def test_sigterm_reason_is_bounded_when_systemctl_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "systemctl").write_text("#!/bin/sh\nexec sleep 5\n")
    (tmp_path / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    started = time.monotonic()
    assert LinuxPlatform().sigterm_reason(started + 2) is PowerReason.AGENT_STOPPED
    assert time.monotonic() - started < linux.DETECT_BUDGET + 0.3


def test_unit_orders_after_the_network_and_runs_the_client() -> None:
    template = resources.files("wcms.client.platform").joinpath(linux.UNIT_NAME).read_text()
    unit = linux.render_unit(template, "/opt/wcms/bin/wcms client run", {"WCMS_CLIENT_DIR": "/x"})
    lines = unit.splitlines()
    assert "Type=simple" in lines
    assert "After=network-online.target nss-lookup.target" in lines
    assert "Wants=network-online.target" in lines
    assert "Restart=on-failure" in lines
    assert "ExecStart=/opt/wcms/bin/wcms client run" in lines
    assert 'Environment="WCMS_CLIENT_DIR=/x"' in lines
    stop_sec = next(int(x.split("=")[1]) for x in lines if x.startswith("TimeoutStopSec="))
    assert stop_sec > 2
    assert "@" not in unit
    assert "Environment" not in linux.render_unit(template, "wcms client run", {})


def test_restrict_to_owner(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("x")
    secret.chmod(0o644)
    LinuxPlatform().restrict_to_owner(secret)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_os_info_and_defaults() -> None:
    plat = LinuxPlatform()
    info = plat.os_info()
    assert info["os_name"] == "Linux"
    assert "kernel" in info["os_version"]
    assert plat.default_client_dir() == Path("/var/lib/wcms")
    assert plat.default_log_dir() == Path("/var/log/wcms")


def test_logind_absent_answers_none() -> None:
    # No system bus in this container (and none needed): the lookup says "cannot tell".
    if Path("/run/dbus/system_bus_socket").exists():
        pytest.skip("a system bus is present here")
    assert linux.logind_preparing_for_shutdown(0.5) is None
