"""The Windows platform: SMBIOS identity, the console user, the edition, owner-only ACLs.

Only stdlib modules are imported at the top so that the parsers below run (and are tested) on
Linux; pywin32 and winreg are imported where they are used, which is on Windows only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

from wcms.protocol import PowerReason

log = logging.getLogger(__name__)

_RSMB = int.from_bytes(b"RSMB", "big")  # GetSystemFirmwareTable provider: raw SMBIOS
_SMBIOS_SYSTEM_INFO = 1  # structure type 1 holds the system UUID at offset 8
_SMBIOS_END = 127

# Boards that ship one UUID for every unit; sixty PCs of one model would become one PC.
_PLACEHOLDER_UUIDS = frozenset(
    {
        "03000200-0400-0500-0006-000700080009",
        "00020003-0004-0005-0006-000700080009",
        "12345678-1234-5678-90ab-cddeefaabbcc",
    }
)

_CURRENT_VERSION_KEY = r"SOFTWARE\Microsoft\Windows NT\CurrentVersion"
_CPU_KEY = r"HARDWARE\DESCRIPTION\System\CentralProcessor\0"
_CRYPTOGRAPHY_KEY = r"SOFTWARE\Microsoft\Cryptography"
_FIRST_WINDOWS_11_BUILD = 22000

# Event 1074 (User32) is written when a process asks Windows to power off or restart; its
# fifth insert string names the kind. Unrecognised text (another language) counts as shutdown.
_SHUTDOWN_REQUEST_EVENT = 1074
_RESTART_WORDS = ("restart", "reboot", "다시 시작", "neustart", "neu starten", "redémarrer")
_EVENT_SCAN_LIMIT = 2000  # newest System log records looked at, to keep PreShutdown fast

_CSIDL_COMMON_APPDATA = 0x23
_MAX_PATH = 260
_FILE_ALL_ACCESS = 0x1F01FF  # ntsecuritycon.FILE_ALL_ACCESS
_WTS_NO_SESSION = 0xFFFFFFFF  # WTSGetActiveConsoleSessionId when nobody is attached


# ---------------------------------------------------------------------------- pure parsers


def iter_smbios_structures(table: bytes) -> Iterator[tuple[int, bytes]]:
    """Yield (type, formatted area) for each structure of an SMBIOS structure table."""
    pos = 0
    while pos + 4 <= len(table):
        kind, length = table[pos], table[pos + 1]
        if length < 4 or pos + length > len(table):
            return
        yield kind, table[pos : pos + length]
        if kind == _SMBIOS_END:
            return
        # The string set after the formatted area ends with two NULs.
        end = table.find(b"\0\0", pos + length)
        if end < 0:
            return
        pos = end + 2


def format_smbios_uuid(raw: bytes, version: tuple[int, int]) -> str | None:
    """Return the UUID as Linux's product_uuid spells it, or None when it is unset or shared."""
    if len(raw) != 16 or raw in (b"\0" * 16, b"\xff" * 16):
        return None
    # SMBIOS 2.6 fixed the first three fields as little-endian; older tables are big-endian.
    value = uuid.UUID(bytes_le=raw) if version >= (2, 6) else uuid.UUID(bytes=raw)
    text = str(value)
    return None if text in _PLACEHOLDER_UUIDS else text


def parse_smbios_uuid(raw_smbios: bytes) -> str | None:
    """Read the system UUID from GetSystemFirmwareTable('RSMB') output (RawSMBIOSData)."""
    if len(raw_smbios) < 8:
        return None
    _, major, minor, _, length = struct.unpack_from("<BBBBI", raw_smbios)
    table = raw_smbios[8 : 8 + length]
    for kind, formatted in iter_smbios_structures(table):
        if kind == _SMBIOS_SYSTEM_INFO and len(formatted) >= 0x18:
            return format_smbios_uuid(formatted[8:0x18], (major, minor))
    return None


def normalise_machine_guid(value: object) -> str | None:
    """Return MachineGuid as a lowercase UUID, or None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        return None


def parse_wmic_uuid(output: str) -> str | None:
    """Read `wmic csproduct get uuid` output (a header line, then the UUID)."""
    for line in output.splitlines()[1:]:
        text = line.strip()
        if text:
            guid = normalise_machine_guid(text)
            if guid is None or guid.upper() == "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF":
                return None
            return None if guid in _PLACEHOLDER_UUIDS or guid == str(uuid.UUID(int=0)) else guid
    return None


def format_console_user(user: str | None, domain: str | None, hostname: str) -> str | None:
    """Name the console user, with the domain only when it is not the PC itself."""
    if not user:
        return None
    if not domain or domain.casefold() == hostname.split(".")[0].casefold():
        return user
    return f"{domain}\\{user}"


def describe_windows(values: Mapping[str, object]) -> dict[str, str]:
    """Turn the CurrentVersion registry values into os_edition and os_version."""
    build = str(values.get("CurrentBuild") or values.get("CurrentBuildNumber") or "")
    edition = str(values.get("ProductName") or "Windows")
    # Windows 11 still says "Windows 10" in ProductName; the build number tells them apart.
    if build.isdigit() and int(build) >= _FIRST_WINDOWS_11_BUILD:
        edition = edition.replace("Windows 10", "Windows 11")
    major = values.get("CurrentMajorVersionNumber")
    minor = values.get("CurrentMinorVersionNumber")
    number = f"{major}.{minor}" if major is not None else str(values.get("CurrentVersion") or "")
    full = ".".join(p for p in (number, build, _str_or_empty(values.get("UBR"))) if p)
    release = str(values.get("DisplayVersion") or values.get("ReleaseId") or "")
    version = f"{release} ({full})" if release and full else release or full
    return {"os_name": "Windows", "os_edition": edition, "os_version": version}


def classify_shutdown_request(inserts: Sequence[str]) -> PowerReason:
    """Tell a restart from a power-off by the type string of a User32 event 1074."""
    kind = inserts[4].casefold() if len(inserts) > 4 else ""
    if any(word in kind for word in _RESTART_WORDS):
        return PowerReason.RESTART
    return PowerReason.SHUTDOWN


def _str_or_empty(value: object) -> str:
    return "" if value is None else str(value)


# ---------------------------------------------------------------------------- Windows calls


def _read_registry(path: str, names: Sequence[str]) -> dict[str, object]:
    """Read the named values under HKLM\\path (64-bit view); missing ones are left out."""
    if sys.platform != "win32":
        raise OSError("the registry exists on Windows only")
    import winreg

    found: dict[str, object] = {}
    access = winreg.KEY_READ | winreg.KEY_WOW64_64KEY
    with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, path, 0, access) as key:
        for name in names:
            try:
                found[name] = winreg.QueryValueEx(key, name)[0]
            except FileNotFoundError:
                continue
    return found


def _firmware_smbios() -> bytes:
    """Return the raw SMBIOS table through GetSystemFirmwareTable."""
    if sys.platform != "win32":
        raise OSError("GetSystemFirmwareTable exists on Windows only")
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    size = kernel32.GetSystemFirmwareTable(_RSMB, 0, None, 0)
    if size <= 0:
        raise ctypes.WinError(ctypes.get_last_error())
    buffer = ctypes.create_string_buffer(size)
    got = kernel32.GetSystemFirmwareTable(_RSMB, 0, buffer, size)
    if got <= 0 or got > size:
        raise ctypes.WinError(ctypes.get_last_error())
    return buffer.raw[:got]


def program_data() -> Path:
    """The common application data folder (C:\\ProgramData), asked of the shell.

    %PROGRAMDATA% is not trusted: a service's environment may differ from a person's (under
    Wine, services see C:\\users\\Public), and the installer and service must agree.
    """
    if sys.platform != "win32":
        raise OSError("ProgramData exists on Windows only")
    import ctypes

    buffer = ctypes.create_unicode_buffer(_MAX_PATH)
    if ctypes.windll.shell32.SHGetFolderPathW(None, _CSIDL_COMMON_APPDATA, None, 0, buffer) == 0:
        return Path(buffer.value)
    return Path(os.environ.get("PROGRAMDATA") or r"C:\ProgramData")


def set_service_environment(service: str, environment: Sequence[str]) -> None:
    """Set (or clear) a service's own variables: REG_MULTI_SZ `Environment` under its key.

    Windows passes them to the service process; Wine 8 ignores them.
    """
    if sys.platform != "win32":
        raise OSError("services exist on Windows only")
    import winreg

    path = rf"SYSTEM\CurrentControlSet\Services\{service}"
    with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, path, 0, winreg.KEY_SET_VALUE) as key:
        if environment:
            winreg.SetValueEx(key, "Environment", 0, winreg.REG_MULTI_SZ, list(environment))
            return
        with contextlib.suppress(FileNotFoundError):
            winreg.DeleteValue(key, "Environment")


def smbios_uuid() -> str | None:
    """The SMBIOS system UUID, or None when the firmware gives none worth using."""
    try:
        return parse_smbios_uuid(_firmware_smbios())
    except OSError as exc:
        log.warning("SMBIOS UUID unavailable: %s", exc)
        return None


def machine_guid() -> str | None:
    """HKLM\\SOFTWARE\\Microsoft\\Cryptography\\MachineGuid (new per Windows install/sysprep)."""
    try:
        values = _read_registry(_CRYPTOGRAPHY_KEY, ["MachineGuid"])
    except OSError as exc:
        log.warning("MachineGuid unavailable: %s", exc)
        return None
    return normalise_machine_guid(values.get("MachineGuid"))


def requested_power_reason(boot_time: float) -> PowerReason:
    """Restart or shutdown, from the newest event 1074 since boot (shutdown if none)."""
    import win32evtlog  # type: ignore[import-untyped]  # not in the pywin32 override list

    flags = win32evtlog.EVENTLOG_BACKWARDS_READ | win32evtlog.EVENTLOG_SEQUENTIAL_READ
    handle = win32evtlog.OpenEventLog(None, "System")
    try:
        seen = 0
        while seen < _EVENT_SCAN_LIMIT:
            records = win32evtlog.ReadEventLog(handle, flags, 0)
            if not records:
                break
            for record in records:
                seen += 1
                if record.TimeGenerated.timestamp() < boot_time:
                    return PowerReason.SHUTDOWN
                if record.EventID & 0xFFFF == _SHUTDOWN_REQUEST_EVENT:
                    return classify_shutdown_request(list(record.StringInserts or ()))
    finally:
        win32evtlog.CloseEventLog(handle)
    return PowerReason.SHUTDOWN


# ---------------------------------------------------------------------------- the platform


class WindowsPlatform:
    """The Platform contract (platform/base.py) on Windows."""

    name = "windows"

    def default_client_dir(self) -> Path:
        """C:\\ProgramData\\WCMS (config and token)."""
        return program_data() / "WCMS"

    def default_log_dir(self) -> Path:
        """C:\\ProgramData\\WCMS\\logs (client.log, rotated)."""
        return self.default_client_dir() / "logs"

    def machine_id(self) -> str:
        """The SMBIOS system UUID, else MachineGuid; never a MAC address."""
        found = smbios_uuid() or machine_guid()
        if found is None:
            raise OSError("neither an SMBIOS UUID nor a MachineGuid; set WCMS_MACHINE_ID")
        return found

    def console_user(self) -> str | None:
        """The user of the session attached to the physical console, or None."""
        import win32api
        import win32ts

        session = win32ts.WTSGetActiveConsoleSessionId()
        if session == _WTS_NO_SESSION:
            return None
        server = win32ts.WTS_CURRENT_SERVER_HANDLE
        user = win32ts.WTSQuerySessionInformation(server, session, win32ts.WTSUserName)
        domain = win32ts.WTSQuerySessionInformation(server, session, win32ts.WTSDomainName)
        return format_console_user(user, domain, win32api.GetComputerName())

    def os_info(self) -> dict[str, Any]:
        """Edition and version from the registry, CPU model from the processor key."""
        names = [
            "ProductName",
            "EditionID",
            "DisplayVersion",
            "ReleaseId",
            "CurrentBuild",
            "CurrentBuildNumber",
            "UBR",
            "CurrentMajorVersionNumber",
            "CurrentMinorVersionNumber",
            "CurrentVersion",
        ]
        info: dict[str, Any] = describe_windows(_read_registry(_CURRENT_VERSION_KEY, names))
        cpu = _read_registry(_CPU_KEY, ["ProcessorNameString"]).get("ProcessorNameString")
        if isinstance(cpu, str) and cpu.strip():
            info["cpu_model"] = " ".join(cpu.split())
        return info

    def restrict_to_owner(self, path: Path) -> None:
        """Replace the DACL with full control for SYSTEM and Administrators, nothing inherited."""
        import win32security

        dacl = win32security.ACL()
        inherit = 0
        if path.is_dir():
            inherit = win32security.OBJECT_INHERIT_ACE | win32security.CONTAINER_INHERIT_ACE
        for sid_text in ("S-1-5-18", "S-1-5-32-544"):  # LocalSystem, BUILTIN\Administrators
            sid = win32security.ConvertStringSidToSid(sid_text)
            dacl.AddAccessAllowedAceEx(win32security.ACL_REVISION, inherit, _FILE_ALL_ACCESS, sid)
        win32security.SetNamedSecurityInfo(
            str(path),
            win32security.SE_FILE_OBJECT,
            win32security.DACL_SECURITY_INFORMATION
            | win32security.PROTECTED_DACL_SECURITY_INFORMATION,
            None,
            None,
            dacl,
            None,
        )


# ---------------------------------------------------------------------------- service controls

# The SCM's numbers (winsvc.h, pbt.h, wtsapi32.h), kept here so that decide_control() is pure.
SERVICE_CONTROL_STOP = 0x01
SERVICE_CONTROL_SHUTDOWN = 0x05
SERVICE_CONTROL_POWEREVENT = 0x0D
SERVICE_CONTROL_SESSIONCHANGE = 0x0E
SERVICE_CONTROL_PRESHUTDOWN = 0x0F
PBT_APMSUSPEND = 0x04
PBT_APMRESUMESUSPEND = 0x07
PBT_APMRESUMEAUTOMATIC = 0x12
WTS_SESSION_LOGON = 0x05
WTS_SESSION_LOGOFF = 0x06

# A user-defined control code (128-255) that replays PRESHUTDOWN through the real handler.
# Wine never sends PRESHUTDOWN and Windows refuses it from a client (error 87), so tests use
# this; it is honoured only when WCMS_TEST_CONTROLS=1 is in the service's environment.
TEST_CONTROL_PRESHUTDOWN = 0x8F


class Action(StrEnum):
    """What the service does with one control code."""

    POWER_OFF = "power_off"  # the OS is going down: report shutdown or restart, then stop
    STOP = "stop"  # the service alone stops: agent_stopped
    SLEEP = "sleep"
    RESUME = "resume"
    LOGON = "logon"
    LOGOFF = "logoff"
    REPLAY_PRESHUTDOWN = "replay_preshutdown"
    IGNORE = "ignore"


def decide_control(control: int, event_type: int, *, test_controls: bool) -> Action:
    """Map a control code (and its event type) to the service's action."""
    if control in (SERVICE_CONTROL_PRESHUTDOWN, SERVICE_CONTROL_SHUTDOWN):
        return Action.POWER_OFF
    if control == SERVICE_CONTROL_STOP:
        return Action.STOP
    if control == SERVICE_CONTROL_POWEREVENT:
        return _POWER_EVENTS.get(event_type, Action.IGNORE)
    if control == SERVICE_CONTROL_SESSIONCHANGE:
        return _SESSION_EVENTS.get(event_type, Action.IGNORE)
    if control == TEST_CONTROL_PRESHUTDOWN and test_controls:
        return Action.REPLAY_PRESHUTDOWN
    return Action.IGNORE


_POWER_EVENTS = {
    PBT_APMSUSPEND: Action.SLEEP,
    # A wake by a person sends RESUMEAUTOMATIC then RESUMESUSPEND; the service reports once.
    PBT_APMRESUMEAUTOMATIC: Action.RESUME,
    PBT_APMRESUMESUSPEND: Action.RESUME,
}
_SESSION_EVENTS = {WTS_SESSION_LOGON: Action.LOGON, WTS_SESSION_LOGOFF: Action.LOGOFF}
