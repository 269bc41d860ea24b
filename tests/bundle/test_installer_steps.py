"""The installer's steps on Linux, with the SCM replaced by a stand-in (the Wine suite runs the
real one): verify, swap the folder, write settings, wait for the first contact, roll back."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.bundle.conftest import bundle_files, unpack
from wcms.client import installer
from wcms.client.config import load_config


class FakePlatform:
    name = "test"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.restricted: list[Path] = []

    def default_client_dir(self) -> Path:
        return self.root / "ProgramData" / "WCMS"

    def default_log_dir(self) -> Path:
        return self.default_client_dir() / "logs"

    def machine_id(self) -> str:
        return "TEST-MACHINE-0001"

    def console_user(self) -> str | None:
        return None

    def os_info(self) -> dict[str, Any]:
        return {}

    def restrict_to_owner(self, path: Path) -> None:
        self.restricted.append(path)


class FakeService:
    """The service module's face; `comes_online` decides whether the agent 'contacts' the server."""

    SERVICE_NAME = "WCMSClient"

    def __init__(self, comes_online: bool = True) -> None:
        self.comes_online = comes_online
        self.status = "not installed"
        self.calls: list[str] = []

    def service_status(self) -> str:
        return self.status

    def stop_service(self) -> None:
        self.calls.append("stop")
        self.status = "stopped"

    def install_service(self, config: Any, *, python: str) -> None:
        self.calls.append(f"install {Path(python).parent.name}")
        self.status = "running"
        if self.comes_online:
            now = dt.datetime.now(dt.UTC).isoformat()  # distinct from any earlier contact
            state = {"last_contact": now, "machine_id": "TEST-MACHINE-0001"}
            config.state_file.write_text(json.dumps(state))


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakePlatform:
    for name in ("WCMS_CLIENT_DIR", "WCMS_SERVER_URL", "WCMS_PIN", "WCMS_MACHINE_ID"):
        monkeypatch.delenv(name, raising=False)
    return FakePlatform(tmp_path)


def run(platform: FakePlatform, service: FakeService, source: Path, *args: str) -> int:
    target = platform.root / "Program Files" / "WCMS"
    argv = ["--source", str(source), "--target", str(target), "--wait", "1", *args]
    return installer.main(argv, platform=platform, service=service)


def test_first_install_places_configures_pins_and_reports_online(
    env: FakePlatform,
    operator_key: Ed25519PrivateKey,
    public_key: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = unpack(bundle_files(operator_key), env.root / "src")
    service = FakeService()
    args = ("--server", "http://wcms.lab:5050", "--pin", "123456", "--public-key", public_key)
    assert run(env, service, source, *args) == installer.ONLINE
    target = env.root / "Program Files" / "WCMS"
    assert (target / "Lib/site-packages/wcms/client/main.py").exists()
    config = load_config(env)
    assert config.server_url == "http://wcms.lab:5050" and config.pin == "123456"
    assert (config.client_dir / "update_key.pub").read_text().strip() == public_key
    assert config.client_dir in env.restricted  # the folder, then each secret file
    assert service.calls == ["install WCMS"]
    assert "ONLINE" in capsys.readouterr().out


def test_rerun_upgrades_in_place_and_keeps_the_pinned_key(
    env: FakePlatform, operator_key: Ed25519PrivateKey, public_key: str
) -> None:
    source = unpack(bundle_files(operator_key), env.root / "src")
    service = FakeService()
    assert run(env, service, source, "--server", "http://a:1", "--public-key", public_key) == 0
    newer = unpack(bundle_files(operator_key, "9.9.10", {"new.txt": b"n"}), env.root / "src2")
    assert run(env, service, newer) == installer.ONLINE  # the pinned key is used
    target = env.root / "Program Files" / "WCMS"
    assert (target / "new.txt").exists()
    assert not target.with_name("WCMS.old").exists()
    assert service.calls == ["install WCMS", "stop", "install WCMS"]


def test_tampered_source_is_refused_and_nothing_changes(
    env: FakePlatform, operator_key: Ed25519PrivateKey, public_key: str
) -> None:
    files = bundle_files(operator_key)
    files["python.exe"] = b"MZ evil"
    source = unpack(files, env.root / "src")
    service = FakeService()
    assert run(env, service, source, "--public-key", public_key) == installer.FAILED
    assert service.calls == []
    assert not (env.root / "Program Files").exists()


def test_a_different_key_than_the_pinned_one_is_refused(
    env: FakePlatform, operator_key: Ed25519PrivateKey, public_key: str
) -> None:
    source = unpack(bundle_files(operator_key), env.root / "src")
    assert run(env, FakeService(), source, "--public-key", public_key) == 0
    other = "ed25519:" + "A" * 43 + "="
    assert run(env, FakeService(), source, "--public-key", other) == installer.FAILED


def test_upgrade_that_does_not_come_online_is_rolled_back(
    env: FakePlatform, operator_key: Ed25519PrivateKey, public_key: str
) -> None:
    source = unpack(bundle_files(operator_key), env.root / "src")
    assert run(env, FakeService(), source, "--public-key", public_key) == 0
    newer = unpack(bundle_files(operator_key, "9.9.10", {"new.txt": b"n"}), env.root / "src2")
    service = FakeService(comes_online=False)
    service.status = "running"
    assert run(env, service, newer, "--upgrade") == installer.ROLLED_BACK
    target = env.root / "Program Files" / "WCMS"
    assert not (target / "new.txt").exists()  # the previous client is back
    assert service.calls == ["stop", "install WCMS", "stop", "install WCMS"]


def test_upgrade_without_a_pinned_key_is_refused(
    env: FakePlatform, operator_key: Ed25519PrivateKey
) -> None:
    source = unpack(bundle_files(operator_key), env.root / "src")
    assert run(env, FakeService(), source, "--upgrade") == installer.FAILED


def test_contact_must_come_after_the_install_started() -> None:
    now = dt.datetime(2026, 11, 26, 14, 0, 0, tzinfo=dt.UTC)
    assert installer._contact_after({"last_contact": now.isoformat()}, now.timestamp())
    assert not installer._contact_after({"last_contact": now.isoformat()}, now.timestamp() + 2)
    assert not installer._contact_after({}, 0)
    assert not installer._contact_after({"last_contact": "yesterday"}, 0)
