"""Screenshots of the dashboard for docs/screenshots/, taken from a lab with every status in it.

The server here marks a silent PC lost after 3 s, so one PC that never reports shows `lost`
while a keep-alive thread heartbeats the online ones.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from tests.browser.conftest import (
    Dashboard,
    FakeAgent,
    add_pc,
    heartbeat,
    make_room,
    seat,
    shutdown,
)
from tests.conftest import LiveServer

USERS = ["kim.minji", "lee.jun", "park.sora", None, "choi.hana", "jung.woo", None, "kang.yuna"]
PROCESSES = ["explorer.exe", "chrome.exe", "code.exe", "python.exe", "hwp.exe", "Teams.exe"]
PROCESSES += ["svchost.exe", "OneDrive.exe", "notepad.exe", "cmd.exe", "excel.exe"]
DISKS = [{"mount": "C:\\", "fstype": "NTFS", "total": 256 * 2**30, "used": 141 * 2**30}]
HARDWARE = {
    "os_name": "Windows",
    "os_edition": "11 Education",
    "os_version": "10.0.22631",
    "cpu_model": "Intel(R) Core(TM) i5-12500",
    "cpu_cores": 6,
    "cpu_threads": 12,
    "ram_total": 16 * 2**30,
    "mac_addresses": ["3c:52:82:11:22:33"],
    "ip_address": "10.30.1.21",
    "disks": DISKS,
}


@pytest.fixture
def live_server(make_server: Any) -> LiveServer:
    server: LiveServer = make_server(WCMS_OFFLINE_AFTER="3", WCMS_CHECK_INTERVAL="1")
    return server


class KeepAlive(threading.Thread):
    def __init__(
        self, server: LiveServer, pcs: list[tuple[dict[str, Any], dict[str, Any]]]
    ) -> None:
        super().__init__(daemon=True)
        self.server, self.pcs = server, pcs
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.8):
            for pc, fields in self.pcs:
                heartbeat(self.server, pc, **fields)


@pytest.fixture
def lab(live_server: LiveServer) -> Iterator[dict[str, Any]]:
    server = live_server
    room = make_room(server, "Lab 301", 4, 6)
    other = make_room(server, "Lab 302", 3, 5)
    online: list[tuple[dict[str, Any], dict[str, Any]]] = []
    special: dict[str, dict[str, Any]] = {}
    n = 0
    for row in range(1, 5):
        for col in range(1, 7):
            if (row, col) in {(2, 4), (4, 1), (4, 6)}:
                continue  # empty seats
            n += 1
            pc = add_pc(server, f"lab301-{n:02d}", **HARDWARE)
            seat(server, pc["pc_id"], room, row, col)
            kind = {
                3: "shutdown",
                8: "restart",
                11: "sleep",
                15: "agent_stopped",
                18: "lost",
                19: "shutdown",
            }
            if n in kind:
                special[kind[n] + str(n)] = pc
                continue
            load = 8 + (n * 37) % 90
            fields = {
                "cpu_percent": float(load),
                "ram_percent": float(30 + (n * 23) % 65),
                "current_user": USERS[n % len(USERS)],
                "processes": PROCESSES,
                "disks": DISKS,
            }
            online.append((pc, fields))
    for i in (1, 2):
        pc = add_pc(server, f"lab302-{i:02d}")
        seat(server, pc["pc_id"], other, 1, i)
        online.append((pc, {"cpu_percent": 12.0, "ram_percent": 40.0}))
    spare = add_pc(server, "spare-laptop")
    online.append((spare, {"cpu_percent": 3.0, "ram_percent": 22.0}))
    for pc, fields in online:
        heartbeat(server, pc, **fields)
    for name, pc in special.items():
        if not name.startswith("lost"):
            shutdown(server, pc, reason=name.rstrip("0123456789"))
    keep = KeepAlive(server, online)
    keep.start()
    yield {"room": room, "online": online, "special": special}
    keep.stop.set()
    keep.join(timeout=5)


def add_history(server: LiveServer, pc_id: int) -> None:
    """A day of load samples and a week of power events, as if the PC had been in use."""
    from wcms.server.db import make_engine, make_sessionmaker, utcnow
    from wcms.server.models import MetricSample, PowerEvent

    now = utcnow()
    engine = make_engine(server.database.url)
    try:
        with make_sessionmaker(engine)() as s:
            for i in range(24 * 4):
                at = now - dt.timedelta(minutes=15 * (24 * 4 - i))
                cpu = 35 + 30 * math.sin(i / 6) + (i * 7) % 13
                ram = 45 + 10 * math.sin(i / 17)
                s.add(MetricSample(pc_id=pc_id, at=at, cpu_percent=cpu, ram_percent=ram))
            for day in range(6, 0, -1):
                base = (now - dt.timedelta(days=day)).replace(hour=0, minute=0, second=0)
                on = base + dt.timedelta(hours=8, minutes=40)
                off = base + dt.timedelta(hours=18, minutes=5)
                reason = "sleep" if day == 3 else "shutdown"
                s.add(
                    PowerEvent(
                        pc_id=pc_id, from_state="offline", to_state="online", reason="boot", at=on
                    )
                )
                s.add(
                    PowerEvent(
                        pc_id=pc_id, from_state="online", to_state="offline", reason=reason, at=off
                    )
                )
            s.commit()
    finally:
        engine.dispose()


@pytest.mark.slow
def test_screenshots_of_overview_room_pc_and_layout(dash: Dashboard, lab: dict[str, Any]) -> None:
    server = dash.server
    page = dash.page
    dash.login()
    # The lost PC turns lost by itself once its 3 s deadline passes.
    lost = next(pc for name, pc in lab["special"].items() if name.startswith("lost"))
    server.wait_pc(lost["machine_id"], timeout=15, status="lost")

    dash.open("/")
    page.wait_for_selector(".tile")
    dash.screenshot("overview.png")

    dash.open(f"/rooms/{lab['room']}")
    page.wait_for_function(
        "() => document.querySelectorAll('#grid .seat[data-status=online] .user').length > 5"
    )
    for i in (0, 1, 5, 6):  # a selection, as an admin would make before acting
        page.click(f"#grid .seat[data-pc='{lab['online'][i][0]['pc_id']}'] .loads")
    assert page.locator("#grid .seat[data-status=lost]").count() == 1
    for status in ("online", "off", "restarting", "asleep", "lost", "stopped"):
        assert page.locator(f"#grid .seat[data-status={status}]").count() >= 1, status
    dash.screenshot("room.png")

    pc, _fields = lab["online"][1]
    add_history(server, pc["pc_id"])
    agent = FakeAgent(server, pc)
    agent.start()
    try:
        server.admin(
            "POST",
            "/api/commands",
            {
                "type": "message",
                "args": {"text": "Class ends in 10 minutes"},
                "target": {"pc_ids": [pc["pc_id"]]},
            },
        )
        server.admin(
            "POST",
            "/api/commands",
            {
                "type": "install",
                "args": {"package": "VideoLAN.VLC"},
                "target": {"pc_ids": [pc["pc_id"]]},
            },
        )
        dash.open(f"/pcs/{pc['pc_id']}")
        page.wait_for_selector("#pc-commands .cmd-status.cs-succeeded")
        page.wait_for_selector("#pc-chart polyline")
    finally:
        agent.stop.set()
        agent.join(timeout=5)
    dash.screenshot("pc.png")

    dash.open(f"/layout?room={lab['room']}")
    dash.screenshot("layout.png")

    page.set_viewport_size({"width": 820, "height": 1180})  # a tablet, upright
    dash.open(f"/rooms/{lab['room']}")
    dash.screenshot("room-tablet.png")
