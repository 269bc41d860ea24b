"""The collector: pure selection rules, and real readings that the server's schemas accept."""

from __future__ import annotations

from typing import Any

from tests.client.conftest import TmpPlatform
from wcms.client import collector
from wcms.client.collector import Collector
from wcms.client.platform.linux import LinuxPlatform
from wcms.server.schemas import HeartbeatRequest, RegisterRequest


def test_macs_are_normalised_and_virtual_adapters_skipped() -> None:
    links = [
        ("lo", "00:00:00:00:00:00"),
        ("eth0", "AA:BB:CC:DD:EE:01"),
        ("Ethernet 2", "AA-BB-CC-DD-EE-02"),
        ("docker0", "02:42:ac:11:00:02"),
        ("vEthernet (WSL)", "00:15:5d:00:00:01"),
        ("eth0", "aa:bb:cc:dd:ee:01"),  # the same card twice
        ("wlan0", "not-a-mac"),
    ]
    assert collector.select_macs(links) == ["aa:bb:cc:dd:ee:01", "aa:bb:cc:dd:ee:02"]


def test_primary_ip_prefers_a_physical_up_adapter() -> None:
    addrs = [
        ("lo", True, "127.0.0.1"),
        ("docker0", True, "172.17.0.1"),
        ("eth1", False, "10.0.0.9"),
        ("eth0", True, "169.254.3.3"),
        ("enp3s0", True, "192.168.10.21"),
    ]
    assert collector.pick_primary_ip(addrs) == "192.168.10.21"
    assert collector.pick_primary_ip(addrs[:2]) == "172.17.0.1"  # better than nothing
    assert collector.pick_primary_ip([]) is None


def test_partitions_one_per_device_without_pseudo_filesystems() -> None:
    parts = [
        ("/dev/sda2", "/", "ext4"),
        ("/dev/sda2", "/var/lib/docker", "ext4"),  # a bind mount of the same device
        ("/dev/loop3", "/snap/core/1", "squashfs"),
        ("tmpfs", "/run", "tmpfs"),
        ("/dev/sda1", "/boot/efi", "vfat"),
        ("C:\\", "C:\\", "NTFS"),
        ("D:\\", "D:\\", ""),  # an empty DVD drive
    ]
    assert collector.select_partitions(parts) == [
        ("/", "ext4"),
        ("/boot/efi", "vfat"),
        ("C:\\", "NTFS"),
    ]


def test_process_names_without_kernel_threads() -> None:
    procs = [
        (0, 0, "System Idle Process"),
        (1, 0, "systemd"),
        (2, 0, "kthreadd"),
        (57, 2, "kworker/0:1"),
        (900, 1, "firefox"),
        (901, 900, "firefox"),
        (902, 1, None),
        (903, 1, "x" * 300),
    ]
    assert collector.process_names(procs) == ["firefox", "systemd", "x" * 255]


def test_hardware_passes_the_servers_register_schema() -> None:
    hardware = Collector(LinuxPlatform()).hardware()
    assert hardware["os_name"] == "Linux"
    assert hardware["ram_total"] > 0
    assert hardware["cpu_threads"] >= 1
    body: dict[str, Any] = {
        "pin": "123456",
        "machine_id": "TEST-0123456789",
        "hostname": collector.hostname(),
        "hardware": hardware,
    }
    RegisterRequest.model_validate(body)


def test_heartbeat_passes_the_servers_heartbeat_schema(plat: TmpPlatform) -> None:
    reading = Collector(plat, clock=lambda: 2e9).heartbeat()
    assert reading["current_user"] == "alice"  # the platform's console user, not ours
    assert 0 <= reading["cpu_percent"] <= 100
    assert reading["ram_used"] <= reading["ram_total"]
    assert reading["uptime"] > 0
    assert reading["processes"] == sorted(set(reading["processes"]))
    assert reading["disks"]
    HeartbeatRequest.model_validate({"machine_id": "TEST-0123456789", "event": "boot", **reading})


class BrokenPlatform(TmpPlatform):
    def console_user(self) -> str | None:
        raise OSError("no session manager")

    def os_info(self) -> dict[str, Any]:
        raise OSError("no registry")


def test_a_failing_os_source_costs_a_field_not_the_call(plat: TmpPlatform) -> None:
    broken = Collector(BrokenPlatform(plat.root))
    assert "os_name" not in broken.hardware()
    assert "current_user" not in broken.heartbeat()
