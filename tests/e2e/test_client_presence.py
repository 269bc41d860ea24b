"""The real client process against the real server on 127.0.0.1: the seed's test guide, for real.

Test 1 (normal boot): the client registers with a PIN and the PC shows online.
Test 2 (normal shutdown): SIGTERM while systemd says the system is stopping turns the PC offline
with reason `shutdown` within a second. A plain `systemctl stop` gives `agent_stopped`.
Test 3 (the network is gone): covered in tests/client/test_shutdown_deadline.py; here a killed
client is found `lost` by the server's checker once its deadline passes.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.client.clientproc import ClientProcess, new_machine_id

pytestmark = pytest.mark.slow


def online_client(server: Any, tmp_path: Path, **kw: Any) -> ClientProcess:
    client = ClientProcess(tmp_path, server.url, pin=server.create_pin(), **kw).start()
    client.wait_log("Heartbeat sent with event=boot")
    return client


def test_registers_with_a_pin_and_shows_online(live_server: Any, tmp_path: Path) -> None:
    client = online_client(live_server, tmp_path)
    try:
        pc = live_server.wait_pc(client.machine_id, state="online")
        assert pc["hostname"]
        assert pc["client_version"]
        assert client.token_path.stat().st_mode & 0o777 == 0o600
        assert "Registered with" in client.log()
    finally:
        client.kill()


def test_shutdown_path_marks_offline_with_reason_shutdown_within_a_second(
    live_server: Any, tmp_path: Path
) -> None:
    client = online_client(live_server, tmp_path)
    client.system_going_down(True)
    elapsed = client.terminate()
    seen = time.monotonic()
    pc = live_server.wait_pc(client.machine_id, timeout=1, state="offline", reason="shutdown")
    assert time.monotonic() - seen < 1.0
    assert elapsed < 2.0
    log = client.log()
    assert "PreShutdown received" in log
    assert "Shutdown signal sent" in log
    # The seed's check: `findstr "shutdown"` (case-sensitive) finds both lines.
    lines = [line for line in log.splitlines() if "shutdown" in line]
    assert any("PreShutdown received" in line for line in lines)
    assert any("Shutdown signal sent" in line for line in lines)
    assert pc["status"] == "off"


def test_shutdown_path_tells_a_restart(live_server: Any, tmp_path: Path) -> None:
    client = online_client(live_server, tmp_path)
    client.system_going_down(True, jobs="7 reboot.target start waiting\n")
    client.terminate()
    pc = live_server.wait_pc(client.machine_id, timeout=1, state="offline", reason="restart")
    assert pc["status"] == "restarting"


def test_plain_stop_reports_agent_stopped(live_server: Any, tmp_path: Path) -> None:
    client = online_client(live_server, tmp_path)
    client.terminate()
    pc = live_server.wait_pc(client.machine_id, timeout=1, state="offline", reason="agent_stopped")
    assert pc["status"] == "stopped"
    assert client.returncode == 0
    assert "Shutdown signal sent" in client.log()


def test_killed_client_goes_lost_after_the_deadline(make_server: Any, tmp_path: Path) -> None:
    server = make_server(
        WCMS_HEARTBEAT_INTERVAL="1", WCMS_OFFLINE_AFTER="3", WCMS_CHECK_INTERVAL="0.5"
    )
    client = online_client(server, tmp_path)
    client.wait_log("Heartbeat sent", timeout=5)
    client.kill()
    killed = time.monotonic()
    server.wait_pc(client.machine_id, timeout=8, state="offline", reason="lost")
    assert time.monotonic() - killed > 1.5  # not before the deadline


def test_heartbeats_follow_the_server_interval(make_server: Any, tmp_path: Path) -> None:
    server = make_server(WCMS_HEARTBEAT_INTERVAL="1", WCMS_OFFLINE_AFTER="3")
    client = online_client(server, tmp_path, env={"WCMS_LOG_LEVEL": "DEBUG"})
    try:
        deadline = time.monotonic() + 3.5  # three heartbeats at the server's 1 s interval
        while client.log().count("Heartbeat sent") < 3:
            assert time.monotonic() < deadline, client.log()
            time.sleep(0.05)
        server.wait_pc(client.machine_id, state="online")
    finally:
        client.kill()


def test_server_down_at_start_then_up(make_server: Any, tmp_path: Path) -> None:
    server = make_server(start=False)
    pin_server = server.start()
    pin = pin_server.create_pin()
    server.stop()
    client = ClientProcess(tmp_path, server.url, pin=pin).start()
    try:
        client.wait_log("Server unavailable")
        server.start()
        client.wait_log("Registered with", timeout=30)
        server.wait_pc(client.machine_id, timeout=10, state="online")
    finally:
        client.kill()


def test_cloned_token_is_refused_and_the_client_registers_afresh(
    live_server: Any, tmp_path: Path
) -> None:
    original = online_client(live_server, tmp_path)
    original.kill()
    clone = ClientProcess(tmp_path, live_server.url, pin=live_server.create_pin())
    shutil.copy(original.token_path, clone.token_path)  # a disk image taken from `original`
    clone.start()
    try:
        log = clone.wait_log("Registered with")
        assert "machine_mismatch" in log
        live_server.wait_pc(clone.machine_id, state="online")
        assert clone.token_path.read_text() != original.token_path.read_text()
    finally:
        clone.kill()


def test_rejected_token_without_a_pin_is_logged_clearly(live_server: Any, tmp_path: Path) -> None:
    client = ClientProcess(tmp_path, live_server.url, machine_id=new_machine_id())
    client.token_path.write_text("wcms_pc_not-a-real-token\n")
    client.start()
    try:
        log = client.wait_log("no PIN configured")
        assert "invalid_token" in log
        assert not client.token_path.exists()
    finally:
        client.kill()


def test_status_command(live_server: Any, tmp_path: Path) -> None:
    import subprocess
    import sys

    client = online_client(live_server, tmp_path)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "wcms", "client", "status"],
            env={**client.env, "WCMS_SERVER_URL": live_server.url},
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        client.kill()
    assert out.returncode == 0, out.stdout + out.stderr
    assert client.machine_id in out.stdout
    assert "registered:     yes" in out.stdout
    assert "ok (server" in out.stdout
