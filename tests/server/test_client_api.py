"""The agent API over real HTTP against the real server process."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest

from tests.conftest import LiveServer, register_pc


@pytest.fixture
def live_server(shared_server: LiveServer) -> LiveServer:
    """These tests only add PCs of their own: one server serves the module."""
    return shared_server


def hb(server: LiveServer, pc: dict[str, Any], **fields: Any) -> tuple[int, Any]:
    body = {"machine_id": pc["machine_id"], **fields}
    return server.api("POST", "/api/client/heartbeat", body, token=pc["token"])


def shutdown(server: LiveServer, pc: dict[str, Any], **fields: Any) -> tuple[int, Any]:
    body = {"machine_id": pc["machine_id"], **fields}
    return server.api("POST", "/api/client/shutdown", body, token=pc["token"])


def parse(ts: str) -> dt.datetime:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))


def test_register_answers_a_token_and_the_presence_config(live_server: LiveServer) -> None:
    pc = register_pc(
        live_server,
        hardware={"cpu_cores": 8, "ram_total": 16 * 2**30, "mac_addresses": ["AA-BB-CC-DD-EE-01"]},
    )
    assert pc["token"].startswith("wcms_pc_") and len(pc["token"]) > 40
    assert pc["state"] == "online"
    assert pc["config"] == {
        "heartbeat_interval": 15,
        "poll_timeout": 15,
        "offline_after": 35,
        "presence_mode": "standard",
    }
    detail = live_server.admin("GET", f"/api/pcs/{pc['pc_id']}")
    assert detail["hardware"]["cpu_cores"] == 8
    assert detail["hardware"]["mac_addresses"] == ["aa:bb:cc:dd:ee:01"]
    assert [e["reason"] for e in detail["timeline"]] == ["registered"]


def test_token_is_bound_to_its_machine(live_server: LiveServer) -> None:
    a, b = register_pc(live_server), register_pc(live_server)
    status, body = live_server.api(
        "POST", "/api/client/shutdown", {"machine_id": b["machine_id"]}, token=a["token"]
    )
    assert status == 403 and body["error"]["code"] == "machine_mismatch"
    assert live_server.get_pc(b["machine_id"])["state"] == "online"  # untouched
    for token in (None, "wcms_pc_forged", b["token"] + "x"):
        status, body = live_server.api(
            "POST", "/api/client/heartbeat", {"machine_id": b["machine_id"]}, token=token
        )
        assert status == 401 and body["error"]["code"] == "invalid_token", token


def test_shutdown_signal_marks_offline_at_once_with_reason(live_server: LiveServer) -> None:
    pc = register_pc(live_server)
    before = live_server.get_pc(pc["machine_id"])
    time.sleep(0.05)  # a time to pass: the signal's last_seen must be later than registration
    t0 = time.monotonic()
    status, body = shutdown(live_server, pc)
    elapsed = time.monotonic() - t0
    assert status == 200 and body["state"] == "offline" and body["reason"] == "shutdown"
    assert elapsed < 0.5
    after = live_server.get_pc(pc["machine_id"])  # no wait: it is already offline
    assert after["state"] == "offline" and after["is_online"] is False
    assert after["reason"] == "shutdown" and after["status"] == "off"
    assert parse(after["last_seen"]) > parse(before["last_seen"])
    assert after["offline_after"] is None
    timeline = live_server.admin("GET", f"/api/pcs/{pc['pc_id']}")["timeline"]
    assert [(e["from"], e["to"], e["reason"]) for e in timeline][-1] == (
        "online",
        "offline",
        "shutdown",
    )


def test_each_shutdown_reason_shows_its_own_status(live_server: LiveServer) -> None:
    expected = {"restart": "restarting", "sleep": "asleep", "agent_stopped": "stopped"}
    for reason, status_name in expected.items():
        pc = register_pc(live_server)
        status, _ = shutdown(live_server, pc, reason=reason)
        assert status == 200
        got = live_server.get_pc(pc["machine_id"])
        assert (got["reason"], got["status"]) == (reason, status_name)
    pc = register_pc(live_server)
    status, body = shutdown(live_server, pc, reason="lost")
    assert status == 400 and body["error"]["code"] == "validation_error"
    assert live_server.get_pc(pc["machine_id"])["state"] == "online"


def test_coming_back_records_boot_resume_or_reconnect(live_server: LiveServer) -> None:
    pc = register_pc(live_server)
    assert hb(live_server, pc, boot_time=1000.0)[0] == 200
    shutdown(live_server, pc, reason="sleep")
    assert hb(live_server, pc, event="resume", boot_time=1000.0)[0] == 200
    assert live_server.get_pc(pc["machine_id"])["reason"] == "resume"
    shutdown(live_server, pc, reason="shutdown")
    assert hb(live_server, pc, event="boot", boot_time=5000.0)[0] == 200
    got = live_server.get_pc(pc["machine_id"])
    assert (got["state"], got["reason"]) == ("online", "boot")
    shutdown(live_server, pc, reason="agent_stopped")
    assert hb(live_server, pc, event="boot", boot_time=5000.0)[0] == 200
    assert live_server.get_pc(pc["machine_id"])["reason"] == "reconnected"
    reasons = [e["reason"] for e in live_server.admin("GET", f"/api/pcs/{pc['pc_id']}")["timeline"]]
    assert reasons == [
        "registered",
        "sleep",
        "resume",
        "shutdown",
        "boot",
        "agent_stopped",
        "reconnected",
    ]


def test_a_late_heartbeat_or_poll_of_an_agent_that_signed_off_does_not_revive_it(
    live_server: LiveServer,
) -> None:
    """What an agent had in flight as it sent the shutdown signal arrives after it: a plain
    heartbeat, a logon, a poll. None of them is a return (409 `signed_off`, nothing written);
    only a heartbeat saying boot or resume is."""
    comeback = {"shutdown": "boot", "restart": "boot", "agent_stopped": "boot", "sleep": "resume"}
    for reason, event in comeback.items():
        pc = register_pc(live_server)
        assert hb(live_server, pc, boot_time=1000.0)[0] == 200
        assert shutdown(live_server, pc, reason=reason)[0] == 200
        signed = live_server.get_pc(pc["machine_id"])
        late = [
            hb(live_server, pc, cpu_percent=5.0, boot_time=1000.0),
            hb(live_server, pc, event="logon", current_user="kim"),
            live_server.api(
                "GET",
                f"/api/client/commands?machine_id={pc['machine_id']}&timeout=0&boot_time=1000",
                token=pc["token"],
            ),
        ]
        for status, body in late:
            assert status == 409 and body["error"]["code"] == "signed_off", (reason, body)
        assert live_server.get_pc(pc["machine_id"]) == signed, reason  # nothing written
        assert hb(live_server, pc, event=event, boot_time=5000.0)[0] == 200
        back = live_server.get_pc(pc["machine_id"])
        assert (back["state"], back["reason"]) == ("online", event), reason


def test_heartbeat_metrics_reach_the_admin_api(live_server: LiveServer) -> None:
    pc = register_pc(live_server)
    status, body = hb(
        live_server,
        pc,
        cpu_percent=42.5,
        ram_percent=61.0,
        ram_used=5 * 2**30,
        current_user="kim",
        processes=["chrome.exe", "code.exe"],
        disks=[{"mount": "C:\\", "fstype": "NTFS", "total": 100, "used": 40}],
        ip_address="10.1.2.3",
        uptime=3600.0,
    )
    assert status == 200 and body["state"] == "online"
    got = live_server.wait_pc(pc["machine_id"], timeout=5, cpu_percent=42.5)  # batch written
    assert got["current_user"] == "kim" and got["ip_address"] == "10.1.2.3"
    detail = live_server.admin("GET", f"/api/pcs/{pc['pc_id']}")
    assert detail["metrics"]["processes"] == ["chrome.exe", "code.exe"]
    assert detail["metrics"]["disks"][0]["used"] == 40


def test_logon_event_is_written_at_once(live_server: LiveServer) -> None:
    pc = register_pc(live_server)
    assert hb(live_server, pc, event="logon", current_user="lee")[0] == 200
    assert live_server.get_pc(pc["machine_id"])["current_user"] == "lee"  # no batch delay
    assert hb(live_server, pc, event="logoff", current_user=None)[0] == 200
    assert live_server.get_pc(pc["machine_id"])["current_user"] is None


def test_reregistration_keeps_the_record_and_revokes_the_old_token(
    live_server: LiveServer,
) -> None:
    first = register_pc(live_server)
    shutdown(live_server, first)
    again = register_pc(live_server, machine_id=first["machine_id"], token=first["token"])
    assert again["pc_id"] == first["pc_id"] and again["token"] != first["token"]
    status, body = hb(live_server, first)
    assert status == 401 and body["error"]["code"] == "invalid_token"
    assert hb(live_server, again)[0] == 200
    assert len([p for p in live_server.pcs() if p["machine_id"] == first["machine_id"]]) == 1
    reasons = [
        e["reason"] for e in live_server.admin("GET", f"/api/pcs/{first['pc_id']}")["timeline"]
    ]
    assert reasons == ["registered", "shutdown", "boot"]


def test_deleted_pc_token_stops_working(live_server: LiveServer) -> None:
    pc = register_pc(live_server)
    live_server.admin("DELETE", f"/api/pcs/{pc['pc_id']}")
    status, body = hb(live_server, pc)
    assert status == 401 and body["error"]["code"] == "invalid_token"
    assert live_server.get_pc(pc["machine_id"]) is None


def test_lost_pc_goes_offline_after_its_deadline_and_a_live_one_does_not(
    make_server: Any,
) -> None:
    server = make_server(
        WCMS_OFFLINE_AFTER="1.5", WCMS_CHECK_INTERVAL="0.2", WCMS_FLUSH_INTERVAL="0.2"
    )
    silent, alive = register_pc(server), register_pc(server)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.5:
        assert hb(server, alive, cpu_percent=1.0)[0] == 200
        time.sleep(0.3)  # the heartbeat interval being tested, well inside the 1.5 s deadline
    got = server.get_pc(silent["machine_id"])
    assert (got["state"], got["reason"], got["status"]) == ("offline", "lost", "lost")
    assert server.get_pc(alive["machine_id"])["state"] == "online"
    assert [
        e["reason"] for e in server.admin("GET", f"/api/pcs/{silent['pc_id']}")["timeline"]
    ] == ["registered", "lost"]
    # A lost PC that calls again is back at once (same boot: reconnected).
    assert hb(server, silent)[0] == 200
    assert server.get_pc(silent["machine_id"])["reason"] in {"reconnected", "boot"}


def test_hardware_sent_with_a_heartbeat_refreshes_the_specs(live_server: LiveServer) -> None:
    pc = register_pc(live_server, hardware={"ram_total": 8 * 2**30, "cpu_cores": 4})
    status, _ = hb(
        live_server,
        pc,
        event="boot",
        hardware={"ram_total": 32 * 2**30, "cpu_cores": 8, "os_version": "10.0.26100"},
    )
    assert status == 200
    got = live_server.admin("GET", f"/api/pcs/{pc['pc_id']}")["hardware"]
    assert (got["ram_total"], got["cpu_cores"], got["os_version"]) == (32 * 2**30, 8, "10.0.26100")
