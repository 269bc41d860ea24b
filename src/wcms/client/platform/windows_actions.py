"""Windows actions: shutdown.exe, the WTS API, winget (falling back to Chocolatey), PowerShell.

The client runs as a service in session 0, so anything meant for the person at the keyboard
(a message, log off, lock) goes through the WTS API to the console session: it works on Home
editions, which have no msg.exe. Account commands use the LocalAccounts PowerShell module with
the password on stdin and every name in an environment variable, never spliced into a script,
and groups by well-known SID, so they work whatever the display language.
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
from typing import Any

from wcms.client.actions import INSTALL_TIMEOUT, Call, Outcome, Plan, Step
from wcms.client.platform.base import Platform
from wcms.protocol import CommandType

WTS_CURRENT_SERVER_HANDLE = 0
WTS_NO_SESSION = 0xFFFFFFFF
MB_OK_INFO_TOPMOST = 0x00000040 | 0x00010000 | 0x00040000  # ICONINFORMATION|SETFOREGROUND|TOPMOST
MAX_SHUTDOWN_COMMENT = 512

_POWERSHELL = ["powershell.exe", "-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass"]
_READ_PASSWORD = "$pw = ConvertTo-SecureString ([Console]::In.ReadLine()) -AsPlainText -Force; "
_NOT_BUILTIN = (
    "$u = Get-LocalUser -Name $env:WCMS_USER; "
    "if ($u.SID.Value -match '-50[0-4]$') { throw 'refusing to change a built-in account' }; "
)
CREATE_SCRIPT = (
    "$ErrorActionPreference = 'Stop'; "
    + _READ_PASSWORD
    + "$p = @{ Name = $env:WCMS_USER; Password = $pw; PasswordNeverExpires = $true }; "
    "if ($env:WCMS_FULL_NAME) { $p.FullName = $env:WCMS_FULL_NAME }; "
    "New-LocalUser @p | Out-Null; "
    "Add-LocalGroupMember -SID 'S-1-5-32-545' -Member $env:WCMS_USER; "
    "'created ' + $env:WCMS_USER"
)
# Windows sets a user's display language from inside their own session: a logon task does it.
LANGUAGE_SCRIPT = (
    "$ErrorActionPreference = 'Stop'; "
    '$cmd = "Set-WinUILanguageOverride -Language $env:WCMS_LANGUAGE; '
    'Set-WinUserLanguageList $env:WCMS_LANGUAGE -Force; Set-Culture $env:WCMS_LANGUAGE"; '
    "$a = New-ScheduledTaskAction -Execute 'powershell.exe' "
    '-Argument "-NoProfile -WindowStyle Hidden -Command $cmd"; '
    "$t = New-ScheduledTaskTrigger -AtLogOn -User $env:WCMS_USER; "
    "$pr = New-ScheduledTaskPrincipal -UserId $env:WCMS_USER -LogonType Interactive; "
    "Register-ScheduledTask -TaskName ('WCMS language ' + $env:WCMS_USER) -Action $a "
    "-Trigger $t -Principal $pr -Force | Out-Null; "
    "'display language ' + $env:WCMS_LANGUAGE + ' at next logon'"
)
DELETE_SCRIPT = (
    "$ErrorActionPreference = 'Stop'; " + _NOT_BUILTIN + "Remove-LocalUser -Name $env:WCMS_USER; "
    "Get-CimInstance Win32_UserProfile | Where-Object { $_.SID -eq $u.SID.Value } | "
    "Remove-CimInstance; "
    "'deleted ' + $env:WCMS_USER"
)
PASSWORD_SCRIPT = (
    "$ErrorActionPreference = 'Stop'; "
    + _NOT_BUILTIN
    + _READ_PASSWORD
    + "Set-LocalUser -Name $env:WCMS_USER -Password $pw; "
    "'password set for ' + $env:WCMS_USER"
)


def shutdown_argv(kind: CommandType, delay: int, message: str | None) -> list[str]:
    flag = "/r" if kind is CommandType.RESTART else "/s"
    argv = ["shutdown.exe", flag, "/t", str(max(0, delay))]
    if message:
        argv += ["/c", message[:MAX_SHUTDOWN_COMMENT]]
    return argv


def winget_argv(winget: str, verb: str, package: str) -> list[str]:
    argv = [winget, verb, "--id", package, "--exact", "--silent"]
    argv += ["--accept-source-agreements", "--disable-interactivity"]
    if verb == "install":
        argv += ["--accept-package-agreements", "--scope", "machine"]
    return argv


def choco_argv(choco: str, verb: str, package: str) -> list[str]:
    return [choco, verb, package, "-y", "--no-progress"]


def find_winget(program_files: str | None = None) -> str | None:
    """winget.exe: on PATH for a user, but the service (SYSTEM) must look in WindowsApps."""
    found = shutil.which("winget")
    if found:
        return found
    root = program_files or os.environ.get("PROGRAMFILES", r"C:\Program Files")
    pattern = os.path.join(
        root, "WindowsApps", "Microsoft.DesktopAppInstaller_*_x64__8wekyb3d8bbwe", "winget.exe"
    )
    matches = sorted(glob.glob(pattern))
    return matches[-1] if matches else None


def find_choco() -> str | None:
    found = shutil.which("choco")
    if found:
        return found
    root = os.environ.get("CHOCOLATEYINSTALL", r"C:\ProgramData\chocolatey")
    path = os.path.join(root, "bin", "choco.exe")
    return path if os.path.exists(path) else None


def powershell(script: str, env: dict[str, str], stdin: str | None = None) -> Step:
    return Step([*_POWERSHELL, "-Command", script], stdin=stdin, env=env)


# ---------------------------------------------------------------------------- the WTS API


def _wtsapi() -> Any:
    return getattr(ctypes, "WinDLL")("wtsapi32", use_last_error=True)  # noqa: B009  (Windows-only name)


def _console_session() -> int | None:
    session = getattr(ctypes, "windll").kernel32.WTSGetActiveConsoleSessionId()  # noqa: B009
    return None if session == WTS_NO_SESSION else int(session)


def _wts_call(what: str, call: Any) -> Outcome:
    session = _console_session()
    if session is None:
        return Outcome("succeeded", 0, "nobody is at the console\n")
    if not call(session):
        code = ctypes.get_last_error()  # type: ignore[attr-defined]  # Windows-only
        return Outcome("failed", code, error=f"{what} failed (error {code})")
    return Outcome("succeeded", 0, f"{what}: console session {session}\n")


def _send_message(text: str, title: str) -> Outcome:
    def call(session: int) -> bool:
        response = ctypes.c_uint32()
        return bool(
            _wtsapi().WTSSendMessageW(
                WTS_CURRENT_SERVER_HANDLE,
                session,
                ctypes.c_wchar_p(title),
                len(title.encode("utf-16-le")),  # lengths in bytes
                ctypes.c_wchar_p(text),
                len(text.encode("utf-16-le")),
                MB_OK_INFO_TOPMOST,
                0,
                ctypes.byref(response),
                False,
            )
        )

    return _wts_call("message shown", call)


class WindowsActions:
    def __init__(self, platform: Platform) -> None:
        self._platform = platform

    def power(self, kind: CommandType, delay: int, message: str | None) -> Plan:
        return [Step(shutdown_argv(kind, delay, message), timeout=30)]

    def logoff(self) -> Plan:
        def call() -> Outcome:
            return _wts_call(
                "logged off",
                lambda s: _wtsapi().WTSLogoffSession(WTS_CURRENT_SERVER_HANDLE, s, False),
            )

        return [Call("WTSLogoffSession(console session)", call)]

    def lock(self) -> Plan:
        # A service cannot call LockWorkStation for the user; disconnecting the console
        # session shows the lock screen, with the user's programs still running.
        def call() -> Outcome:
            return _wts_call(
                "locked",
                lambda s: _wtsapi().WTSDisconnectSession(WTS_CURRENT_SERVER_HANDLE, s, False),
            )

        return [Call("WTSDisconnectSession(console session)", call)]

    def message(self, text: str, title: str) -> Plan:
        return [
            Call(f"WTSSendMessage(console session, {title!r})", lambda: _send_message(text, title))
        ]

    def shell(self, command: str, timeout: float) -> Plan:
        return [Step(command, shell=True, timeout=timeout)]  # cmd.exe /c, via COMSPEC

    def install(self, package: str) -> list[Plan]:
        return self._packages("install", package)

    def uninstall(self, package: str) -> list[Plan]:
        return self._packages("uninstall", package)

    def _packages(self, verb: str, package: str) -> list[Plan]:
        choices: list[Plan] = []
        winget = find_winget()
        if winget:
            choices.append([Step(winget_argv(winget, verb, package), timeout=INSTALL_TIMEOUT)])
        choco = find_choco()
        if choco:
            choices.append([Step(choco_argv(choco, verb, package), timeout=INSTALL_TIMEOUT)])
        return choices

    def account_create(
        self, username: str, password: str, full_name: str | None, language: str | None
    ) -> Plan:
        env = {"WCMS_USER": username, "WCMS_FULL_NAME": full_name or ""}
        plan: Plan = [powershell(CREATE_SCRIPT, env, stdin=password + "\n")]
        if language:
            plan.append(powershell(LANGUAGE_SCRIPT, {**env, "WCMS_LANGUAGE": language}))
        return plan

    def account_delete(self, username: str) -> Plan:
        return [powershell(DELETE_SCRIPT, {"WCMS_USER": username})]

    def account_password(self, username: str, password: str) -> Plan:
        return [powershell(PASSWORD_SCRIPT, {"WCMS_USER": username}, stdin=password + "\n")]
