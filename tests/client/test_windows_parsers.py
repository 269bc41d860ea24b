"""The Windows platform's pure parts, on Linux: SMBIOS, registry values, control codes."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest

from wcms.client.platform import windows
from wcms.client.platform.windows import Action, decide_control
from wcms.protocol import PowerReason

# GetSystemFirmwareTable('RSMB') as Wine 8.0 answered it on our CI machine (SMBIOS 2.4).
WINE_RSMB = bytes.fromhex(
    "000204007b0000000018000000000000000004000000000000000000ffffffff0000011b0100000000003d"
    "1219c7c4c5404aaa1f6d2a48adfda402000000000315020000020000000202020200000000000000030000"
    "020f03000000000000050002000a000000201404000000000000000000000000000000000000007f0405000000"
)
# A UUID as dmidecode / Linux product_uuid print it.
DELL_UUID = "4c4c4544-0042-3510-8052-b4c04f4e3732"


def raw_smbios(version: tuple[int, int], *structures: bytes) -> bytes:
    """A RawSMBIOSData blob: the 8-byte header, then the structure table."""
    table = b"".join(structures) + bytes([127, 4, 0xFF, 0xFE, 0, 0])
    return struct.pack("<BBBBI", 0, version[0], version[1], 0, len(table)) + table


def system_info(uuid_bytes: bytes, strings: bytes = b"Dell Inc.\0OptiPlex 7090\0\0") -> bytes:
    """A type 1 structure: header, four string indexes, the UUID, wake-up type, strings."""
    formatted = bytes([1, 0x1B, 0x01, 0x00, 1, 2, 0, 0]) + uuid_bytes + bytes([6, 0, 0, 0])
    return formatted[:0x1B].ljust(0x1B, b"\0") + strings


def bios_info() -> bytes:
    """A type 0 structure with strings, to be skipped on the way to type 1."""
    return bytes([0, 0x18, 0x00, 0x00, 1, 2, 0, 0xF0, 3] + [0] * 15) + b"Dell\0 1.2.3\0\0"


def test_smbios_uuid_from_a_modern_table_matches_linux_product_uuid() -> None:
    raw = raw_smbios((3, 4), bios_info(), system_info(uuid.UUID(DELL_UUID).bytes_le))
    assert windows.parse_smbios_uuid(raw) == DELL_UUID


def test_smbios_before_2_6_is_big_endian() -> None:
    raw = raw_smbios((2, 5), system_info(uuid.UUID(DELL_UUID).bytes))
    assert windows.parse_smbios_uuid(raw) == DELL_UUID


def test_smbios_uuid_as_wine_reports_it() -> None:
    assert windows.parse_smbios_uuid(WINE_RSMB) == "3d1219c7-c4c5-404a-aa1f-6d2a48adfda4"


@pytest.mark.parametrize(
    "uuid_bytes",
    [
        b"\0" * 16,  # not present
        b"\xff" * 16,  # present but not set
        uuid.UUID("03000200-0400-0500-0006-000700080009").bytes_le,  # one UUID for a whole model
    ],
)
def test_unset_or_shared_smbios_uuids_are_refused(uuid_bytes: bytes) -> None:
    assert windows.parse_smbios_uuid(raw_smbios((3, 0), system_info(uuid_bytes))) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\0\2\4\0",
        raw_smbios((3, 0), bios_info()),  # no type 1
        raw_smbios((3, 0), bytes([1, 0x08, 0, 0, 1, 2, 0, 0]) + b"\0\0"),  # type 1 too short
        struct.pack("<BBBBI", 0, 3, 0, 0, 500) + bytes([1, 2, 0, 0]),  # length beyond the data
        raw_smbios((3, 0), bytes([4, 0x1B, 0, 0]) + b"\0" * 0x17),  # strings never end
    ],
)
def test_malformed_smbios_gives_none(raw: bytes) -> None:
    assert windows.parse_smbios_uuid(raw) is None


def test_machine_guid_is_normalised() -> None:
    guid = "21F7CC56-4EC0-4F9D-A0B7-13C0209EF335"
    assert windows.normalise_machine_guid(f" {guid}\n") == guid.lower()
    assert windows.normalise_machine_guid("not-a-guid") is None
    assert windows.normalise_machine_guid(1234) is None


def test_wmic_output() -> None:
    out = f"UUID                                  \r\r\n{DELL_UUID.upper()}  \r\r\n\r\r\n"
    assert windows.parse_wmic_uuid(out) == DELL_UUID
    assert windows.parse_wmic_uuid("UUID\r\nFFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF\r\n") is None
    assert windows.parse_wmic_uuid("UUID\r\n00000000-0000-0000-0000-000000000000\r\n") is None
    assert windows.parse_wmic_uuid("") is None


@pytest.mark.parametrize(
    ("user", "domain", "hostname", "expected"),
    [
        ("kim", "LAB-PC-07", "lab-pc-07", "kim"),  # a local account: the PC's own name
        ("kim", "LAB-PC-07", "lab-pc-07.campus.example", "kim"),
        ("kim", "CAMPUS", "lab-pc-07", "CAMPUS\\kim"),
        ("kim", "", "lab-pc-07", "kim"),
        ("", "LAB-PC-07", "lab-pc-07", None),  # the console session has nobody logged on
        (None, None, "lab-pc-07", None),
    ],
)
def test_console_user(user: str | None, domain: str | None, hostname: str, expected: str) -> None:
    assert windows.format_console_user(user, domain, hostname) == expected


def test_windows_11_is_named_by_its_build() -> None:
    values = {
        "ProductName": "Windows 10 Pro",  # what Windows 11 still writes there
        "EditionID": "Professional",
        "DisplayVersion": "23H2",
        "CurrentBuild": "22631",
        "UBR": 4460,
        "CurrentMajorVersionNumber": 10,
        "CurrentMinorVersionNumber": 0,
        "CurrentVersion": "6.3",
    }
    assert windows.describe_windows(values) == {
        "os_name": "Windows",
        "os_edition": "Windows 11 Pro",
        "os_version": "23H2 (10.0.22631.4460)",
    }


def test_windows_10_and_old_registry_layouts() -> None:
    win10 = {"ProductName": "Windows 10 Education", "ReleaseId": "1809", "CurrentBuild": "17763"}
    assert windows.describe_windows(win10)["os_edition"] == "Windows 10 Education"
    assert windows.describe_windows(win10)["os_version"] == "1809 (17763)"
    wine = {"ProductName": "Microsoft Windows 7", "CurrentBuild": "7601", "CurrentVersion": "6.1"}
    assert windows.describe_windows(wine) == {
        "os_name": "Windows",
        "os_edition": "Microsoft Windows 7",
        "os_version": "6.1.7601",
    }
    assert windows.describe_windows({})["os_edition"] == "Windows"


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("restart", PowerReason.RESTART),
        ("Restart", PowerReason.RESTART),
        ("power off", PowerReason.SHUTDOWN),
        ("shutdown", PowerReason.SHUTDOWN),
        ("다시 시작", PowerReason.RESTART),
        ("unbekannt", PowerReason.SHUTDOWN),  # unknown words: the safe reading
    ],
)
def test_event_1074_kind(kind: str, reason: PowerReason) -> None:
    inserts = ["C:\\Windows\\system32\\shutdown.exe", "LAB-PC-07", "Other", "0x0", kind, "", "kim"]
    assert windows.classify_shutdown_request(inserts) == reason


def test_event_1074_without_inserts_is_a_shutdown() -> None:
    assert windows.classify_shutdown_request([]) == PowerReason.SHUTDOWN


@pytest.mark.parametrize(
    ("control", "event_type", "action"),
    [
        (0x0F, 0, Action.POWER_OFF),  # PRESHUTDOWN
        (0x05, 0, Action.POWER_OFF),  # SHUTDOWN, the fallback
        (0x01, 0, Action.STOP),
        (0x0D, 0x04, Action.SLEEP),  # POWEREVENT / PBT_APMSUSPEND
        (0x0D, 0x12, Action.RESUME),  # PBT_APMRESUMEAUTOMATIC
        (0x0D, 0x07, Action.RESUME),  # PBT_APMRESUMESUSPEND
        (0x0D, 0x0A, Action.IGNORE),  # PBT_APMPOWERSTATUSCHANGE (battery)
        (0x0E, 0x05, Action.LOGON),  # SESSIONCHANGE / WTS_SESSION_LOGON
        (0x0E, 0x06, Action.LOGOFF),
        (0x0E, 0x07, Action.IGNORE),  # WTS_SESSION_LOCK
        (0x04, 0, Action.IGNORE),  # INTERROGATE is pywin32's own
        (0x8F, 0, Action.IGNORE),  # the test control, while disabled
    ],
)
def test_control_codes(control: int, event_type: int, action: Action) -> None:
    assert decide_control(control, event_type, test_controls=False) == action


def test_the_test_control_replays_preshutdown_only_when_enabled() -> None:
    code = windows.TEST_CONTROL_PRESHUTDOWN
    assert 128 <= code <= 255  # the range Windows leaves to services
    assert decide_control(code, 0, test_controls=True) == Action.REPLAY_PRESHUTDOWN
    assert decide_control(0x90, 0, test_controls=True) == Action.IGNORE


def test_test_controls_are_off_by_default(tmp_path: Path) -> None:
    from wcms.client.config import load_config
    from wcms.client.platform.linux import LinuxPlatform

    env = {"WCMS_CLIENT_DIR": str(tmp_path)}
    assert load_config(LinuxPlatform(), env=env).test_controls is False
    assert load_config(LinuxPlatform(), env={**env, "WCMS_TEST_CONTROLS": "1"}).test_controls
    (tmp_path / "client.json").write_text('{"test_controls": true}')
    assert load_config(LinuxPlatform(), env=env).test_controls
    assert not load_config(LinuxPlatform(), env={**env, "WCMS_TEST_CONTROLS": "0"}).test_controls


def test_windows_calls_refuse_to_run_elsewhere() -> None:
    with pytest.raises(OSError):
        windows.program_data()
    assert windows.smbios_uuid() is None
    assert windows.machine_guid() is None
