"""What the client tells the server about its PC: hardware at registration, load per heartbeat.

psutil gives what every OS shares; the platform gives the rest (OS edition, CPU model, the user
at the console). The selection rules are pure functions over plain tuples, tested on any OS.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

import psutil

from wcms.client import CLIENT_VERSION
from wcms.client.platform.base import Platform

log = logging.getLogger(__name__)

MAX_LIST = 64  # the server's cap on disks and MAC addresses
MAX_PROCESSES = 2000
MAX_TEXT = 255

# Adapters that are not the PC's own network card: containers, VMs, VPNs, tunnels.
_VIRTUAL_PREFIXES = (
    "lo",
    "docker",
    "veth",
    "br-",
    "virbr",
    "vmnet",
    "vboxnet",
    "tun",
    "tap",
    "wg",
    "tailscale",
    "zt",
    "vethernet",
    "virtualbox",
    "vmware",
    "loopback",
    "isatap",
    "teredo",
    "bluetooth",
)
_SKIPPED_FSTYPES = frozenset({"squashfs", "tmpfs", "devtmpfs", "overlay", "iso9660", "udf"})
_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-][0-9a-f]{2}){5}$")


# ---------------------------------------------------------------------------- pure selections


def is_virtual_adapter(name: str) -> bool:
    return name.lower().startswith(_VIRTUAL_PREFIXES)


def normalise_mac(address: str) -> str | None:
    """aa:bb:cc:dd:ee:ff, or None for what is not a real MAC (all zeros, wrong shape)."""
    value = address.strip().lower()
    if not _MAC_RE.match(value):
        return None
    value = value.replace("-", ":")
    return None if value == "00:00:00:00:00:00" else value


def select_macs(links: Iterable[tuple[str, str]]) -> list[str]:
    """MACs of physical adapters from (adapter, address), unique, in adapter order."""
    found: list[str] = []
    for name, address in links:
        mac = normalise_mac(address)
        if mac and not is_virtual_adapter(name) and mac not in found:
            found.append(mac)
    return found[:MAX_LIST]


def pick_primary_ip(addresses: Iterable[tuple[str, bool, str]]) -> str | None:
    """The IPv4 address of the first physical, up adapter from (adapter, is_up, address)."""
    fallback = None
    for name, is_up, address in addresses:
        if not is_up or address.startswith(("127.", "169.254.")):
            continue
        if not is_virtual_adapter(name):
            return address
        fallback = fallback or address
    return fallback


def select_partitions(partitions: Iterable[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """(mount, fstype) worth reporting from (device, mount, fstype): real, one per device."""
    seen: set[str] = set()
    chosen: list[tuple[str, str]] = []
    for device, mount, fstype in partitions:
        if fstype.lower() in _SKIPPED_FSTYPES or mount.startswith("/snap/") or not fstype:
            continue
        if device in seen:
            continue
        seen.add(device)
        chosen.append((mount, fstype))
    return chosen[:MAX_LIST]


def process_names(processes: Iterable[tuple[int, int, str | None]]) -> list[str]:
    """Unique, sorted names from (pid, ppid, name), without kernel threads and idle pseudo-PIDs."""
    names = {
        name[:MAX_TEXT]
        for pid, ppid, name in processes
        if name and pid not in (0, 2) and ppid != 2  # 2 is Linux's kthreadd
    }
    return sorted(names)[:MAX_PROCESSES]


def clip(text: str | None) -> str | None:
    return text[:MAX_TEXT] if text else None


# ---------------------------------------------------------------------------- the collector


class Collector:
    """Reads the PC through psutil and the platform; each source fails alone."""

    def __init__(self, platform: Platform, clock: Callable[[], float] = time.time) -> None:
        self._platform = platform
        self._clock = clock
        psutil.cpu_percent(interval=None)  # the first reading is meaningless; prime it

    def hardware(self) -> dict[str, Any]:
        """The registration's `hardware` object."""
        info: dict[str, Any] = {}
        try:
            info.update(self._platform.os_info())
        except Exception as exc:  # an OS source failing costs a field, not the call
            log.warning("OS information unavailable: %s", exc)
        info.update(
            cpu_cores=psutil.cpu_count(logical=False) or None,
            cpu_threads=psutil.cpu_count(logical=True) or None,
            ram_total=psutil.virtual_memory().total,
            mac_addresses=self.mac_addresses(),
            ip_address=self.ip_address(),
            disks=self.disks(),
        )
        return {k: v for k, v in info.items() if v is not None}

    def heartbeat(self) -> dict[str, Any]:
        """The measurements of one heartbeat (machine_id and event are added by the caller)."""
        memory = psutil.virtual_memory()
        boot_time = psutil.boot_time()
        body: dict[str, Any] = {
            "hostname": hostname(),
            "ip_address": self.ip_address(),
            "current_user": clip(self.console_user()),
            "client_version": CLIENT_VERSION,
            "cpu_percent": min(100.0, float(psutil.cpu_percent(interval=None))),
            "ram_percent": float(memory.percent),
            "ram_used": int(memory.total - memory.available),
            "ram_total": int(memory.total),
            "uptime": max(0.0, self._clock() - boot_time),
            "boot_time": float(boot_time),
            "disks": self.disks(),
            "processes": self.processes(),
        }
        return {k: v for k, v in body.items() if v is not None}

    def console_user(self) -> str | None:
        try:
            return self._platform.console_user()
        except Exception as exc:  # pywin32/loginctl errors must not stop a heartbeat
            log.debug("console user unavailable: %s", exc)
            return None

    def mac_addresses(self) -> list[str]:
        links = [
            (name, a.address)
            for name, addrs in psutil.net_if_addrs().items()
            for a in addrs
            if a.family == psutil.AF_LINK
        ]
        return select_macs(links)

    def ip_address(self) -> str | None:
        stats = psutil.net_if_stats()
        found = [
            (name, name in stats and stats[name].isup, a.address)
            for name, addrs in psutil.net_if_addrs().items()
            for a in addrs
            if a.family == socket.AF_INET
        ]
        return pick_primary_ip(found)

    def disks(self) -> list[dict[str, Any]]:
        parts = [(p.device, p.mountpoint, p.fstype) for p in psutil.disk_partitions(all=False)]
        chosen = select_partitions(parts) or [(os.path.abspath(os.sep), "")]
        return [d for d in (_disk(mount, fstype) for mount, fstype in chosen) if d]

    def processes(self) -> list[str]:
        entries: list[tuple[int, int, str | None]] = []
        # Asked one process at a time: some systems (Wine) fail the whole attribute-list
        # scan with a plain OSError, and a process may vanish or be private at any moment.
        for proc in psutil.process_iter():
            try:
                entries.append((proc.pid, proc.ppid(), proc.name()))
            except (psutil.Error, OSError):
                continue
        return process_names(entries)


def _disk(mount: str, fstype: str) -> dict[str, Any] | None:
    try:
        usage = psutil.disk_usage(mount)
    except OSError:  # a drive without media, a mount we may not read
        return None
    return {
        "mount": mount[:MAX_TEXT],
        "fstype": fstype[:64],
        "total": usage.total,
        "used": usage.used,
    }


def hostname() -> str:
    return socket.gethostname()[:MAX_TEXT] or "unknown"
