"""The agent's pure decisions: back-off, heartbeat jitter, what an error means; stop()'s rules."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.client.conftest import TmpPlatform
from tests.conftest import LiveServer, register_pc
from wcms.client import http
from wcms.client.config import load_config
from wcms.client.main import (
    AWAIT_ADMIN_RETRY,
    BACKOFF_CAP,
    Agent,
    Decision,
    backoff_delay,
    decide,
    heartbeat_delay,
    parse_heartbeat_interval,
    send_shutdown_signal,
)
from wcms.protocol import ClientEvent, PowerReason


def test_backoff_doubles_with_jitter_and_caps() -> None:
    assert backoff_delay(0, lambda: 0.0) == 0.5
    assert backoff_delay(0, lambda: 1.0) == 1.0
    assert backoff_delay(3, lambda: 1.0) == 8.0
    assert backoff_delay(3, lambda: 0.0) == 4.0
    assert backoff_delay(10, lambda: 1.0) == BACKOFF_CAP
    assert backoff_delay(10_000, lambda: 0.5) == pytest.approx(BACKOFF_CAP * 0.75)


def test_heartbeat_jitter_only_shortens_the_wait() -> None:
    assert heartbeat_delay(15, lambda: 0.0) == pytest.approx(12.0)
    assert heartbeat_delay(15, lambda: 1.0) == pytest.approx(15.0)


@pytest.mark.parametrize(
    ("error", "decision"),
    [
        (http.TransportError("connection refused"), Decision.BACKOFF),
        (http.TransportError("timed out", timed_out=True), Decision.BACKOFF),
        (http.ApiError(500, "internal_error", "boom"), Decision.BACKOFF),
        (http.ApiError(503, "http_503", "unavailable"), Decision.BACKOFF),
        (http.ApiError(429, "rate_limited", "slow down", retry_after=30), Decision.BACKOFF),
        (http.ApiError(401, "invalid_token", "unknown token"), Decision.REREGISTER),
        (http.ApiError(403, "machine_mismatch", "not your token"), Decision.REREGISTER),
        (http.ApiError(403, "invalid_pin", "no such PIN"), Decision.SLOW_RETRY),
        (http.ApiError(403, "pin_expired", "expired"), Decision.SLOW_RETRY),
        (http.ApiError(400, "validation_error", "cpu_percent"), Decision.SLOW_RETRY),
        (http.ApiError(404, "not_found", "no route"), Decision.SLOW_RETRY),
        (http.ApiError(409, "conflict", "raced"), Decision.SLOW_RETRY),
        (http.ApiError(409, "machine_registered", "ask an admin"), Decision.AWAIT_ADMIN),
        (http.ApiError(409, "signed_off", "boot or resume"), Decision.ANNOUNCE),
    ],
)
def test_what_an_error_means(error: http.HttpError, decision: Decision) -> None:
    assert decide(error) is decision


def test_heartbeat_interval_comes_from_the_server() -> None:
    assert parse_heartbeat_interval({"heartbeat_interval": 5}, 15.0) == 5.0
    assert parse_heartbeat_interval({"heartbeat_interval": 0}, 15.0) == 15.0
    assert parse_heartbeat_interval({"heartbeat_interval": "5"}, 15.0) == 15.0
    assert parse_heartbeat_interval({"heartbeat_interval": True}, 15.0) == 15.0
    assert parse_heartbeat_interval({}, 15.0) == 15.0


def _agent(plat: TmpPlatform, tmp_path: Path, port: int) -> Agent:
    env = {"WCMS_CLIENT_DIR": str(tmp_path / "c"), "WCMS_SERVER_URL": f"http://127.0.0.1:{port}"}
    return Agent(load_config(plat, env=env), plat)


def test_unregistered_agent_does_not_send(
    plat: TmpPlatform, tmp_path: Path, closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    agent = _agent(plat, tmp_path, closed_port)
    with caplog.at_level(logging.INFO, logger="wcms"):
        assert agent.send_shutdown_signal(PowerReason.SHUTDOWN) is False
    assert "not registered yet" in caplog.text


def test_stop_is_final_and_sends_once(
    plat: TmpPlatform, tmp_path: Path, closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    agent = _agent(plat, tmp_path, closed_port)
    agent.token = "wcms_pc_x"
    with caplog.at_level(logging.INFO, logger="wcms"):
        agent.stop(PowerReason.SHUTDOWN, source="test")
        agent.stop(PowerReason.AGENT_STOPPED, source="test")
    assert caplog.text.count("Shutdown signal failed: cannot connect") == 1
    assert "PreShutdown received (test): sending the shutdown signal, reason=shutdown" in (
        caplog.text
    )
    assert agent.run() is PowerReason.SHUTDOWN  # already stopped: returns at once


def test_sleep_pauses_until_resume(plat: TmpPlatform, tmp_path: Path, closed_port: int) -> None:
    agent = _agent(plat, tmp_path, closed_port)
    agent.token = "wcms_pc_x"
    agent.stop(PowerReason.SLEEP)
    assert not agent._awake.is_set()
    agent.stop(PowerReason.SLEEP)  # a second sleep signal is not sent
    agent.report(ClientEvent.RESUME)
    assert agent._awake.is_set()
    # The boot was never reported (no server here): it goes first, then the resume.
    assert list(agent._events) == [ClientEvent.BOOT, ClientEvent.RESUME]
    agent.stop(PowerReason.SHUTDOWN)
    assert agent.run() is PowerReason.SHUTDOWN


def test_a_resume_goes_before_logons_queued_while_asleep(
    plat: TmpPlatform, tmp_path: Path, closed_port: int
) -> None:
    """After a sleep signal only a heartbeat saying resume brings the PC back (the server
    refuses others as `signed_off`), so it is sent before a logon that waited meanwhile."""
    agent = _agent(plat, tmp_path, closed_port)
    agent.token = "wcms_pc_x"
    agent._events.clear()  # the boot was reported
    agent.report(ClientEvent.LOGON)
    agent.stop(PowerReason.SLEEP)
    agent.report(ClientEvent.RESUME)
    assert list(agent._events) == [ClientEvent.RESUME, ClientEvent.LOGON]


SIGNED_OFF = http.ApiError(409, "signed_off", "this PC signed off (shutdown)")


def test_signed_off_answers_a_late_heartbeat_quietly_and_a_running_agent_by_announcing(
    plat: TmpPlatform, tmp_path: Path, closed_port: int
) -> None:
    """`signed_off` to the heartbeat the loop had in flight as stop() sent the signal: the
    agent is ending and queues nothing. To an agent that is running (its identity was copied
    to a process that signed off): it says it is here, with event boot, after a short wait."""
    running = _agent(plat, tmp_path / "a", closed_port)
    running._events.clear()
    delay = running._after_failure(SIGNED_OFF)
    assert list(running._events) == [ClientEvent.BOOT]
    assert delay <= 1.0  # the first back-off step, not the minute of a refused request
    running._after_failure(SIGNED_OFF)
    assert list(running._events) == [ClientEvent.BOOT]  # once

    for reason in (PowerReason.SHUTDOWN, PowerReason.SLEEP):  # ending, or asleep
        signed = _agent(plat, tmp_path / reason, closed_port)
        signed.token = "wcms_pc_x"
        signed._events.clear()
        signed.stop(reason)
        signed._after_failure(SIGNED_OFF)
        assert list(signed._events) == [], reason


def test_seed_helper_without_registration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The module-level send_shutdown_signal() reads the installed client's settings."""
    monkeypatch.setenv("WCMS_CLIENT_DIR", str(tmp_path))
    monkeypatch.setenv("WCMS_SERVER_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("WCMS_MACHINE_ID", "TEST-helper-01")
    with caplog.at_level(logging.INFO, logger="wcms"):
        assert send_shutdown_signal() is False
    assert "Shutdown signal failed: this PC is not registered (reason=shutdown)" in caplog.text


def test_a_known_machine_waits_for_an_admin_then_registers_by_itself(
    plat: TmpPlatform, tmp_path: Path, live_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Registered already (a reinstalled PC lost its token): 409 `machine_registered` is not
    transient but not final either; the agent asks every minute and registers once an admin
    allowed it, without anyone touching the PC."""
    first = register_pc(live_server, machine_id=plat.machine_id())
    env = {
        "WCMS_CLIENT_DIR": str(tmp_path / "c"),
        "WCMS_SERVER_URL": live_server.url,
        "WCMS_PIN": live_server.create_pin(multi=True, approve=False),
    }
    agent = Agent(load_config(plat, env=env), plat, rand=lambda: 0.5)
    assert agent.token is None
    with caplog.at_level(logging.INFO, logger="wcms"):
        delay = agent._step()
    assert delay == pytest.approx(AWAIT_ADMIN_RETRY)  # jittered around a minute (0.5: the middle)
    assert agent.token is None
    assert "Registration refused" in caplog.text and "an admin must allow" in caplog.text
    assert "every minute" in caplog.text
    assert agent._step() == pytest.approx(AWAIT_ADMIN_RETRY)  # and again, as long as it takes

    live_server.admin("POST", f"/api/pcs/{first['pc_id']}/allow-reregister")
    with caplog.at_level(logging.INFO, logger="wcms"):
        assert agent._step() < AWAIT_ADMIN_RETRY / 2  # registered, heartbeat sent
    assert agent.token is not None and agent.token != first["token"]
    assert "Registered with" in caplog.text
    pc = live_server.admin("GET", f"/api/pcs/{first['pc_id']}")
    assert pc["approved"] is False and pc["reregister_until"] is None  # the leave is used up


def test_registering_again_sends_the_token_it_holds(
    plat: TmpPlatform, tmp_path: Path, live_server: LiveServer
) -> None:
    first = register_pc(live_server, machine_id=plat.machine_id())
    env = {
        "WCMS_CLIENT_DIR": str(tmp_path / "c"),
        "WCMS_SERVER_URL": live_server.url,
        "WCMS_PIN": live_server.create_pin(approve=False),
    }
    agent = Agent(load_config(plat, env=env), plat)
    agent.token = first["token"]
    assert agent._register() is True  # its current token: no admin needed
    assert agent.token != first["token"]
    assert live_server.admin("GET", f"/api/pcs/{first['pc_id']}")["approved"] is True  # kept
