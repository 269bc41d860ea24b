"""`wcms client ...`: readable messages and exit codes, never tracebacks for expected errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wcms.client.cli import main


@pytest.fixture(autouse=True)
def client_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WCMS_CLIENT_DIR", str(tmp_path))
    monkeypatch.setenv("WCMS_MACHINE_ID", "TEST-cli-0001")
    for name in ("WCMS_SERVER_URL", "WCMS_PIN", "WCMS_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_run_without_a_server_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 2
    assert "no server URL" in capsys.readouterr().err


def test_bad_pin_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--server", "http://127.0.0.1:1", "--pin", "12"]) == 2
    assert "6 digits" in capsys.readouterr().err


def test_broken_config_file(client_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (client_env / "client.json").write_text("{")
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert "not valid JSON" in err
    assert "Traceback" not in err


def test_status_of_an_unregistered_client(
    closed_port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WCMS_SERVER_URL", f"http://127.0.0.1:{closed_port}")
    assert main(["status"]) == 1
    out = capsys.readouterr().out
    assert "TEST-cli-0001 (from WCMS_MACHINE_ID)" in out
    assert "registered:     no" in out
    assert "last contact:   never" in out
    assert "unreachable: cannot connect" in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "run" in capsys.readouterr().out


def test_top_level_wcms_routes_to_the_client(client_env: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "wcms", "client", "run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "no server URL" in out.stderr
    assert "Traceback" not in out.stderr
