"""Linux actions: argument lists for systemd/logind, apt-get and the shadow tools.

Nothing here runs anything: each function answers a plan for `wcms.client.actions` to run.
Passwords go to chpasswd on stdin, never on a command line (other users can read those).
"""

from __future__ import annotations

import math
import pwd
from pathlib import Path

from wcms.client.actions import INSTALL_TIMEOUT, Call, Outcome, Plan, Step
from wcms.client.platform.base import Platform
from wcms.protocol import CommandType

FIRST_REGULAR_UID = 1000  # accounts below are the system's own: never changed remotely
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}


def shutdown_argv(kind: CommandType, delay: int, message: str | None) -> list[str]:
    """`shutdown -h|-r now|+M [message]`; shutdown counts in minutes, so a delay rounds up."""
    when = "now" if delay <= 0 else f"+{math.ceil(delay / 60)}"
    flag = "-r" if kind is CommandType.RESTART else "-h"
    return ["shutdown", flag, when] + ([message] if message else [])


def notify_argv(user: str, uid: int, text: str, title: str) -> list[str]:
    """notify-send inside the user's desktop session (root cannot reach it directly)."""
    bus = f"DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/{uid}/bus"
    return ["runuser", "-u", user, "--", "env", bus, "notify-send", "--", title, text]


def useradd_argv(username: str, full_name: str | None) -> list[str]:
    argv = ["useradd", "--create-home", "--shell", "/bin/bash"]
    if full_name:
        argv += ["--comment", full_name]
    return [*argv, "--", username]


def chpasswd_step(username: str, password: str) -> Step:
    return Step(["chpasswd"], stdin=f"{username}:{password}\n")


def check_regular_account(username: str, uid_of: dict[str, int] | None = None) -> str | None:
    """Why `username` must not be changed (absent, or a system account), or None."""
    try:
        uid = uid_of[username] if uid_of is not None else pwd.getpwnam(username).pw_uid
    except KeyError:
        return f"no account {username!r} on this PC"
    if uid < FIRST_REGULAR_UID:
        return f"{username!r} is a system account (uid {uid}); refusing to change it"
    return None


def _guard(username: str) -> Call:
    def check() -> Outcome:
        problem = check_regular_account(username)
        return Outcome("failed", error=problem) if problem else Outcome("succeeded", 0)

    return Call(f"check that {username} is a regular account", check)


class LinuxActions:
    def __init__(self, platform: Platform) -> None:
        self._platform = platform

    def power(self, kind: CommandType, delay: int, message: str | None) -> Plan:
        return [Step(shutdown_argv(kind, delay, message), timeout=30)]

    def logoff(self) -> Plan:
        user = self._platform.console_user()
        if user is None:
            return [
                Call("nobody is logged on", lambda: Outcome("succeeded", 0, "nobody logged on\n"))
            ]
        return [Step(["loginctl", "terminate-user", user], timeout=30)]

    def lock(self) -> Plan:
        return [Step(["loginctl", "lock-sessions"], timeout=30)]

    def message(self, text: str, title: str) -> Plan:
        user = self._platform.console_user()
        if user is not None:
            try:
                uid = pwd.getpwnam(user).pw_uid
            except KeyError:
                uid = -1
            if uid >= 0 and Path(f"/run/user/{uid}/bus").exists():
                return [Step(notify_argv(user, uid, text, title), timeout=30)]
        # No desktop session to reach: every terminal gets it.
        return [Step(["wall"], stdin=f"{title}: {text}\n", timeout=30)]

    def shell(self, command: str, timeout: float) -> Plan:
        return [Step(command, shell=True, timeout=timeout)]

    def install(self, package: str) -> list[Plan]:
        argv = ["apt-get", "install", "-y", "--no-install-recommends", package]
        return [[Step(argv, env=APT_ENV, timeout=INSTALL_TIMEOUT)]]

    def uninstall(self, package: str) -> list[Plan]:
        return [[Step(["apt-get", "remove", "-y", package], env=APT_ENV, timeout=INSTALL_TIMEOUT)]]

    def account_create(
        self, username: str, password: str, full_name: str | None, language: str | None
    ) -> Plan:
        # `language` is a Windows display language; Linux desktops take it from the user.
        return [Step(useradd_argv(username, full_name)), chpasswd_step(username, password)]

    def account_delete(self, username: str) -> Plan:
        return [_guard(username), Step(["userdel", "--remove", "--", username])]

    def account_password(self, username: str, password: str) -> Plan:
        return [_guard(username), chpasswd_step(username, password)]
