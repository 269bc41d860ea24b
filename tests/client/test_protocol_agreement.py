"""The server and the client read the protocol the same way: one rule, checked from both sides."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import pytest

from wcms import protocol
from wcms.client import command_channel, config
from wcms.client.command_channel import Command
from wcms.protocol import CommandStatus, CommandType
from wcms.server.services import command_args, command_queue, read_models
from wcms.server.services.command_queue import Change
from wcms.server.services.errors import Invalid
from wcms.server.services.pc_service import Transition

NOW = dt.datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=dt.UTC)

ARG_CASES: list[tuple[CommandType, dict[str, Any]]] = [
    (CommandType.SHUTDOWN, {}),
    (CommandType.SHUTDOWN, {"delay": 60, "message": "Class is over"}),
    (CommandType.SHUTDOWN, {"delay": -1}),
    (CommandType.RESTART, {"delay": 86401}),
    (CommandType.RESTART, {"delay": "10"}),
    (CommandType.LOGOFF, {}),
    (CommandType.LOCK, {"delay": 5}),
    (CommandType.MESSAGE, {"text": "hi", "title": "Teacher"}),
    (CommandType.MESSAGE, {"text": ""}),
    (CommandType.MESSAGE, {"text": "x" * 1001}),
    (CommandType.MESSAGE, {"text": "hi", "title": "a\x01b"}),
    (CommandType.RUN, {"command": "dir", "timeout": 30}),
    (CommandType.RUN, {"command": "dir", "timeout": 0}),
    (CommandType.RUN, {}),
    (CommandType.INSTALL, {"package": "Mozilla.Firefox"}),
    (CommandType.INSTALL, {"package": "--force"}),
    (CommandType.UNINSTALL, {"package": "vlc; rm -rf /"}),
    (CommandType.KILL, {"name": "notepad.exe"}),
    (CommandType.KILL, {"pid": 4242}),
    (CommandType.KILL, {"name": "a", "pid": 5}),
    (CommandType.KILL, {"pid": 1}),
    (CommandType.KILL, {"name": "a/b"}),
    (CommandType.ACCOUNT_CREATE, {"username": "kim", "password": "pw", "language": "ko-KR"}),
    (CommandType.ACCOUNT_CREATE, {"username": "bad name", "password": "x"}),
    (CommandType.ACCOUNT_CREATE, {"username": "Administrator", "password": "x"}),
    (CommandType.ACCOUNT_CREATE, {"username": "kim", "password": "x", "language": "korean"}),
    (CommandType.ACCOUNT_DELETE, {"username": "-rf"}),
    (CommandType.ACCOUNT_PASSWORD, {"username": "kim", "password": "a\nb"}),
    (CommandType.ACCOUNT_PASSWORD, {"username": "kim"}),
]


@pytest.mark.parametrize(("kind", "args"), ARG_CASES)
def test_server_and_client_accept_the_same_arguments(
    kind: CommandType, args: dict[str, Any]
) -> None:
    try:
        command_args.validate_args(kind, args)
        server_accepts = True
    except Invalid:
        server_accepts = False
    assert server_accepts == (command_channel.check_args(kind, args) is None)


def test_every_argument_the_server_sends_passes_the_client() -> None:
    """What the server stores after validation (defaults filled in) is what the client accepts."""
    for kind, args in ARG_CASES:
        try:
            public, secret = command_args.validate_args(kind, args)
        except Invalid:
            continue
        assert command_channel.check_args(kind, {**public, **secret}) is None


@dataclass(frozen=True)
class Queued:
    """A command as command_queue.refusal() sees it."""

    type: str
    queued_at: dt.datetime
    run_when_online: bool = False
    id: int = 1
    args: dict[str, Any] | None = None
    expires_at: dt.datetime = NOW + dt.timedelta(hours=1)
    attempts: int = 0


@pytest.mark.parametrize(
    ("kind", "queued_ago", "up_for", "run_when_online"),
    [
        (CommandType.SHUTDOWN, 3600, 60, False),
        (CommandType.SHUTDOWN, 30, 60, False),
        (CommandType.LOCK, 3600, 60, False),
        (CommandType.RESTART, 3600, 60, True),
        (CommandType.INSTALL, 3600, 60, False),
        (CommandType.LOGOFF, 63, 60, False),  # within the slack
        (CommandType.LOGOFF, 66, 60, False),
    ],
)
def test_server_and_client_agree_on_stale_on_boot(
    kind: CommandType, queued_ago: float, up_for: float, run_when_online: bool
) -> None:
    queued_at = NOW - dt.timedelta(seconds=queued_ago)
    boot_time = NOW.timestamp() - up_for
    server = command_queue.refusal(Queued(kind, queued_at, run_when_online), NOW, boot_time)
    client = command_channel.stale_reason(
        Command(1, kind, {}, queued_ago, run_when_online, 1), up_for
    )
    assert (server is not None) == (client is not None)
    assert server is None or server[0] is CommandStatus.EXPIRED
    expected = protocol.stale_on_boot(kind, run_when_online, queued_ago, up_for)
    assert (client is not None) == expected


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("4c4c4544-0042-3510-8048-b2c04f503232", True),
        ("abc:def.ghi_jkl-01", True),
        ("short", False),
        ("x" * 129, False),
        ("has space here", False),
        ("newline-at-end\n", False),
    ],
)
def test_one_machine_id_rule_on_both_sides(value: str, ok: bool) -> None:
    from pydantic import TypeAdapter, ValidationError

    from wcms.server.schemas import MachineId

    try:
        TypeAdapter(MachineId).validate_python(value)
        server_ok = True
    except ValidationError:
        server_ok = False
    assert server_ok == ok == protocol.is_machine_id(value)
    try:
        config._validate("machine_id", value, "the test")
        client_ok = True
    except config.ConfigError:
        client_ok = False
    assert client_ok == ok


def test_pin_pattern_follows_pin_length() -> None:
    assert protocol.is_pin("1" * protocol.PIN_LENGTH)
    assert not protocol.is_pin("1" * (protocol.PIN_LENGTH + 1))
    assert not protocol.is_pin("1" * (protocol.PIN_LENGTH - 1) + "a")


def test_live_feed_and_rest_carry_one_time_format() -> None:
    presence = Transition(7, "online", "offline", "shutdown", NOW).as_message()
    change = Change(1, 2, 7, "running", NOW).as_message()
    rest = read_models.iso(NOW)
    assert presence["since"] == change["at"] == rest == "2026-11-27T12:00:00.123456Z"
    naive = NOW.replace(tzinfo=None)
    seoul = NOW.astimezone(dt.timezone(dt.timedelta(hours=9)))
    assert protocol.wire_time(naive) == protocol.wire_time(seoul) == rest
