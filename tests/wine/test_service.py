"""The WCMSClient service for real: Wine's SCM starts it, controls reach its handler, the real
server on 127.0.0.1 sees what it reports.

Wine never sends PRESHUTDOWN itself (see docs/CLIENT.md), so the PreShutdown test sends the
test-only user control, which the service replays through pywin32's own handler as
SERVICE_CONTROL_PRESHUTDOWN: the same SvcOtherEx -> agent.stop -> POST path a real shutdown takes.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.wine.harness import TEST_CONTROL, TIMINGS, WineClient, wait_for

pytestmark = [pytest.mark.wine, pytest.mark.slow, pytest.mark.timeout(300)]

RUNNING, STOPPED = 4, 1
ACCEPT_STOP, ACCEPT_SHUTDOWN, ACCEPT_PRESHUTDOWN = 0x1, 0x4, 0x100
ACCEPT_POWEREVENT, ACCEPT_SESSIONCHANGE = 0x40, 0x80


def start_online(client: WineClient, *, test_controls: bool = True) -> str:
    """Configure, install and start the service; wait for the PC online; its machine_id."""
    client.configure(test_controls=test_controls)
    client.install()
    machine_id = client.machine_id()
    started = time.monotonic()
    client.wine.sc("start", "WCMSClient")
    assert client.wait_state(RUNNING), client.log()
    TIMINGS["service start to RUNNING s"] = time.monotonic() - started
    client.server.wait_pc(machine_id, timeout=30, state="online")
    TIMINGS["service start to online s"] = time.monotonic() - started
    return machine_id


def test_service_runs_and_accepts_preshutdown(wine_client: WineClient) -> None:
    machine_id = start_online(wine_client)
    state, controls = wine_client.status()
    assert state == RUNNING
    wanted = ACCEPT_STOP | ACCEPT_SHUTDOWN | ACCEPT_PRESHUTDOWN | ACCEPT_POWEREVENT
    assert controls & (wanted | ACCEPT_SESSIONCHANGE) == wanted | ACCEPT_SESSIONCHANGE, hex(
        controls
    )
    key = wine_client.wine.run(
        "reg", "query", r"HKLM\System\CurrentControlSet\Services\WCMSClient"
    ).stdout
    assert "PreshutdownTimeout    REG_DWORD    0x2710" in key  # 10 s covers the 2 s report
    assert "Start    REG_DWORD    0x2" in key  # automatic
    assert "-m wcms.client.service" in key
    pc = wine_client.server.get_pc(machine_id)
    assert pc is not None and pc["state"] == "online"


def test_preshutdown_marks_pc_offline_within_one_second(wine_client: WineClient) -> None:
    machine_id = start_online(wine_client)
    server: Any = wine_client.server
    sent, returned, outcome = wine_client.control(TEST_CONTROL)
    assert outcome == "ok"

    def offline() -> dict[str, Any] | None:
        pc = server.get_pc(machine_id)
        return pc if pc and pc["state"] == "offline" else None

    pc = wait_for(offline, timeout=5, interval=0.02)
    seen = time.time()
    assert pc is not None, wine_client.log()
    assert pc["reason"] == "shutdown"
    TIMINGS["control to offline seen by server s"] = seen - sent
    TIMINGS["control handler s"] = returned - sent
    assert seen - sent < 1.0
    assert wine_client.wait_state(STOPPED), wine_client.log()
    log = wine_client.log()
    assert "PreShutdown received" in log
    assert "Shutdown signal sent" in log
    assert "shutdown" in log  # the seed's `findstr "shutdown"` (case-sensitive) finds it


def test_sc_stop_reports_agent_stopped(wine_client: WineClient) -> None:
    machine_id = start_online(wine_client)
    started = time.monotonic()
    wine_client.wine.sc("stop", "WCMSClient")
    pc = wine_client.server.wait_pc(machine_id, timeout=10, state="offline")
    assert pc["reason"] == "agent_stopped"
    TIMINGS["sc stop to offline s"] = time.monotonic() - started
    assert wine_client.wait_state(STOPPED), wine_client.log()


def test_test_control_ignored_unless_enabled(wine_client: WineClient) -> None:
    machine_id = start_online(wine_client, test_controls=False)
    _, _, outcome = wine_client.control(TEST_CONTROL)
    time.sleep(1)
    assert wine_client.status()[0] == RUNNING
    pc = wine_client.server.get_pc(machine_id)
    assert pc is not None and pc["state"] == "online"
    assert "Test control" not in wine_client.log()
    assert outcome == "ok"
