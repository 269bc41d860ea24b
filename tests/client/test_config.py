"""Settings: platform defaults, then client.json, then WCMS_* variables, then the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.client.conftest import TmpPlatform
from wcms import protocol
from wcms.client import config as cfg
from wcms.client.config import ConfigError, load_config, write_config_file
from wcms.client.identity import IdentityError, TokenStore, machine_id


def test_shutdown_timeout_is_the_seeds_two_seconds() -> None:
    assert cfg.SHUTDOWN_TIMEOUT == protocol.SHUTDOWN_TIMEOUT == 2


def test_defaults_come_from_the_platform(plat: TmpPlatform) -> None:
    config = load_config(plat, env={})
    assert config.client_dir == plat.root / "lib"
    assert config.log_file == plat.root / "log" / "client.log"
    assert config.token_file == plat.root / "lib" / "token"
    assert config.server_url is None
    assert config.log_level == "INFO"


def test_client_dir_moves_config_token_and_logs(plat: TmpPlatform, tmp_path: Path) -> None:
    config = load_config(plat, env={"WCMS_CLIENT_DIR": str(tmp_path / "c")})
    assert config.config_file == tmp_path / "c" / "client.json"
    assert config.token_file == tmp_path / "c" / "token"
    assert config.log_file == tmp_path / "c" / "logs" / "client.log"


def test_file_then_env_then_overrides(plat: TmpPlatform, tmp_path: Path) -> None:
    env = {"WCMS_CLIENT_DIR": str(tmp_path)}
    (tmp_path / "client.json").write_text(
        json.dumps({"server_url": "http://file:5050/", "pin": "111111", "log_level": "debug"})
    )
    from_file = load_config(plat, env=env)
    assert (from_file.server_url, from_file.pin, from_file.log_level) == (
        "http://file:5050",
        "111111",
        "DEBUG",
    )
    env |= {"WCMS_SERVER_URL": "https://env.example", "WCMS_PIN": "222222"}
    from_env = load_config(plat, env=env)
    assert (from_env.server_url, from_env.pin) == ("https://env.example", "222222")
    cli = load_config(plat, env=env, overrides={"server_url": "http://cli:1", "pin": None})
    assert (cli.server_url, cli.pin) == ("http://cli:1", "222222")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WCMS_SERVER_URL": "wcms.lab:5050"}, "must start with http"),
        ({"WCMS_PIN": "12345"}, "6 digits"),
        ({"WCMS_LOG_LEVEL": "LOUD"}, "log_level"),
        ({"WCMS_MACHINE_ID": "short"}, "machine_id"),
    ],
)
def test_bad_values_are_named(plat: TmpPlatform, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(plat, env=env)


def test_bad_config_file_is_a_clear_error(plat: TmpPlatform, tmp_path: Path) -> None:
    (tmp_path / "client.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"client.json is not valid JSON"):
        load_config(plat, env={"WCMS_CLIENT_DIR": str(tmp_path)})
    (tmp_path / "client.json").write_text('["a list"]')
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(plat, env={"WCMS_CLIENT_DIR": str(tmp_path)})
    (tmp_path / "client.json").write_text('{"server_url": 5050}')
    with pytest.raises(ConfigError, match="must be a string"):
        load_config(plat, env={"WCMS_CLIENT_DIR": str(tmp_path)})


def test_unknown_keys_are_ignored(plat: TmpPlatform, tmp_path: Path) -> None:
    (tmp_path / "client.json").write_text('{"heartbeat_interval": 1, "server_url": "http://a"}')
    config = load_config(plat, env={"WCMS_CLIENT_DIR": str(tmp_path)})
    assert config.server_url == "http://a"


def test_write_config_file_merges_and_is_private(plat: TmpPlatform) -> None:
    config = load_config(plat, env={})
    write_config_file(config, {"server_url": "http://a", "pin": "123456"}, plat)
    write_config_file(config, {"pin": None, "log_level": "DEBUG"}, plat)
    assert json.loads(config.config_file.read_text()) == {
        "server_url": "http://a",
        "log_level": "DEBUG",
    }
    assert config.config_file.stat().st_mode & 0o777 == 0o600


def test_machine_id_override_wins(plat: TmpPlatform) -> None:
    config = load_config(plat, env={"WCMS_MACHINE_ID": "sim-pc-042"})
    assert machine_id(config, plat).value == "sim-pc-042"
    assert machine_id(load_config(plat, env={}), plat).value == "test-machine-0001"


def test_unusable_platform_identity(tmp_path: Path) -> None:
    plat = TmpPlatform(tmp_path, machine_id="aa bb")
    with pytest.raises(IdentityError, match="WCMS_MACHINE_ID"):
        machine_id(load_config(plat, env={}), plat)


def test_token_store_is_owner_only(plat: TmpPlatform, tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "dir" / "token", plat)
    assert store.load() is None
    store.save("wcms_pc_secret")
    assert store.load() == "wcms_pc_secret"
    assert store.path.stat().st_mode & 0o777 == 0o600
    store.path.write_text("garbage")
    assert store.load() is None
    store.discard()
    store.discard()
    assert not store.path.exists()
