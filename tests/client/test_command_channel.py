"""The client's command decisions and plans, as pure functions (Linux CI covers Windows plans)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from wcms.client import actions, command_channel
from wcms.client.actions import Outcome, Step
from wcms.client.command_channel import Command, Journal
from wcms.client.config import ConfigError
from wcms.client.platform import linux_actions, windows_actions
from wcms.protocol import MAX_BODY_BYTES, MAX_OUTPUT_CHARS, CommandType


class FakePlatform:
    name = "linux"

    def restrict_to_owner(self, path: Path) -> None:
        os.chmod(path, 0o600)


def cmd(kind: CommandType, age: float = 1.0, **kw: Any) -> Command:
    return Command(1, kind, kw.pop("args", {}), age, kw.pop("run_when_online", False), 1)


def test_poll_answers_are_parsed_and_bad_commands_named() -> None:
    good, bad = command_channel.parse_commands(
        [
            {"id": 1, "type": "lock", "args": {}, "age": 0.5, "attempt": 2},
            {"id": 2, "type": "format_disk", "args": {}},
            {"id": 3, "type": "run", "args": "rm -rf /"},
            {"type": "lock"},
            "junk",
        ]
    )
    assert [(c.id, c.type, c.age, c.attempt) for c in good] == [(1, "lock", 0.5, 2)]
    assert [i for i, _ in bad] == [2, 3]
    assert command_channel.parse_commands(None) == ([], [])


@pytest.mark.parametrize(
    ("kind", "args", "problem"),
    [
        (CommandType.RUN, {}, "command is missing"),
        (CommandType.INSTALL, {"package": "--allow-downgrades"}, "package '--allow-downgrades'"),
        (CommandType.ACCOUNT_DELETE, {"username": "a;b"}, "username 'a;b'"),
        (CommandType.ACCOUNT_DELETE, {"username": "Guest"}, "built-in account"),
        (CommandType.KILL, {}, "name (a process name) or pid"),
        (CommandType.KILL, {"pid": 1}, "pid is not between 2"),
        (CommandType.SHUTDOWN, {"delay": -5}, "delay is not between 0"),
        (CommandType.SHUTDOWN, {"delay": "5"}, "delay is not a whole number"),
        (CommandType.SHUTDOWN, {"delay": True}, "delay is not a whole number"),
        (CommandType.MESSAGE, {"text": "x" * 1001}, "text is longer than 1000"),
        (CommandType.RUN, {"command": "dir", "shell": "x"}, "shell is not an argument"),
        (CommandType.SHUTDOWN, {"delay": 5}, None),
        (CommandType.KILL, {"name": "notepad.exe"}, None),
        (
            CommandType.ACCOUNT_CREATE,
            {"username": "kim", "password": "pw", "language": "ko-KR"},
            None,
        ),
        (CommandType.LOCK, {}, None),
    ],
)
def test_arguments_are_checked_again_on_the_client(
    kind: CommandType, args: dict[str, Any], problem: str | None
) -> None:
    found = command_channel.check_args(kind, args)
    assert (found is None) if problem is None else (problem in (found or ""))


def test_a_power_command_from_before_this_boot_is_stale() -> None:
    assert command_channel.stale_reason(cmd(CommandType.SHUTDOWN, age=3600), uptime_seconds=60)
    assert (
        command_channel.stale_reason(cmd(CommandType.SHUTDOWN, age=30), uptime_seconds=60) is None
    )
    asked = cmd(CommandType.RESTART, age=3600, run_when_online=True)
    assert command_channel.stale_reason(asked, uptime_seconds=60) is None
    assert (
        command_channel.stale_reason(cmd(CommandType.INSTALL, age=3600), uptime_seconds=60) is None
    )


def test_results_hide_secrets_and_fit_in_one_request() -> None:
    pw = "hunter2-secret"
    out = Outcome("failed", 1, f"set {pw}\n", "x" * (MAX_OUTPUT_CHARS * 3), f"bad {pw}")
    fields = command_channel.result_fields(out, [pw])
    assert pw not in json.dumps(fields)
    assert fields["stdout"] == "set ***\n" and fields["error"] == "bad ***"
    assert len(fields["stderr"]) <= MAX_OUTPUT_CHARS and "more characters cut" in fields["stderr"]
    wide = Outcome("succeeded", 0, "한" * MAX_OUTPUT_CHARS, "글" * MAX_OUTPUT_CHARS)
    assert len(json.dumps(command_channel.result_fields(wide)).encode()) < MAX_BODY_BYTES


def test_the_journal_survives_a_restart_and_forgets_old_reports(tmp_path: Path) -> None:
    path = tmp_path / "command_channel.json"
    now = [1000.0]
    journal = Journal(path, FakePlatform(), clock=lambda: now[0])
    journal.begin(7, "run")
    journal.finish(7, {"status": "succeeded", "exit_code": 0, "stdout": "ok"})
    journal.begin(8, "run")
    again = Journal(path, FakePlatform(), clock=lambda: now[0])
    assert again.get(8)["state"] == "started"  # type: ignore[index]
    assert again.unreported() == [7]
    again.reported(7)
    assert again.unreported() == [] and again.result(7)["stdout"] == "ok"  # type: ignore[index]
    assert path.stat().st_mode & 0o777 == 0o600
    now[0] += command_channel.JOURNAL_KEEP_SECONDS + 1
    again.begin(9, "lock")
    assert again.get(7) is None and again.get(8) is not None


def test_dry_run_comes_from_the_environment_or_client_json(tmp_path: Path) -> None:
    from wcms.client.config import load_config
    from wcms.client.platform.linux import LinuxPlatform

    env = {"WCMS_CLIENT_DIR": str(tmp_path)}
    plat = LinuxPlatform()
    assert load_config(plat, env=env).dry_run_power is False
    assert load_config(plat, env={**env, "WCMS_DRY_RUN_POWER": "1"}).dry_run_power is True
    (tmp_path / "client.json").write_text('{"dry_run_power": true, "test_controls": false}')
    config = load_config(plat, env=env)
    assert (config.dry_run_power, config.test_controls) == (True, False)
    (tmp_path / "client.json").write_text('{"dry_run_power": "maybe"}')
    with pytest.raises(ConfigError, match="dry_run_power .* must be true or false"):
        load_config(plat, env=env)


def test_dry_run_records_power_commands_and_runs_nothing() -> None:
    plan = linux_actions.LinuxActions(FakePlatform()).power(CommandType.SHUTDOWN, 61, "Bye")  # type: ignore[arg-type]
    outcome = actions.dry_run(CommandType.SHUTDOWN, plan)
    assert outcome.ok and outcome.stdout == "dry run: shutdown would run: shutdown -h +2 Bye\n"


def test_linux_plans_use_argument_lists() -> None:
    assert linux_actions.shutdown_argv(CommandType.RESTART, 0, None) == ["shutdown", "-r", "now"]
    assert linux_actions.useradd_argv("ann", "Ann Lee") == [
        "useradd",
        "--create-home",
        "--shell",
        "/bin/bash",
        "--comment",
        "Ann Lee",
        "--",
        "ann",
    ]
    step = linux_actions.chpasswd_step("ann", "p:w")
    assert step.argv == ["chpasswd"] and step.stdin == "ann:p:w\n"  # never on a command line
    assert linux_actions.check_regular_account("bin", {"bin": 2}) is not None
    assert linux_actions.check_regular_account("ann", {"ann": 1001}) is None
    assert "no account" in (linux_actions.check_regular_account("zed", {}) or "")


def test_windows_plans_pass_values_outside_the_script() -> None:
    assert windows_actions.shutdown_argv(CommandType.SHUTDOWN, 30, "m" * 600) == [
        "shutdown.exe",
        "/s",
        "/t",
        "30",
        "/c",
        "m" * 512,
    ]
    argv = windows_actions.winget_argv("winget.exe", "install", "Mozilla.Firefox")
    assert argv[:4] == ["winget.exe", "install", "--id", "Mozilla.Firefox"] and "--silent" in argv
    assert windows_actions.choco_argv("choco", "uninstall", "vlc") == [
        "choco",
        "uninstall",
        "vlc",
        "-y",
        "--no-progress",
    ]
    plan = windows_actions.WindowsActions(FakePlatform()).account_create(  # type: ignore[arg-type]
        "ann", "Pa55-word", "Ann", "ko-KR"
    )
    create, language = plan
    assert isinstance(create, Step) and isinstance(language, Step)
    assert create.stdin == "Pa55-word\n" and "Pa55-word" not in " ".join(create.argv)
    assert create.env["WCMS_USER"] == "ann" and "S-1-5-32-545" in create.argv[-1]
    assert language.env["WCMS_LANGUAGE"] == "ko-KR"


def test_process_names_match_like_windows_shows_them() -> None:
    assert actions.process_name_matches("notepad.exe", "Notepad")
    assert actions.process_name_matches("chrome.exe", "chrome.exe")
    assert actions.process_name_matches("python3", "python3")
    assert not actions.process_name_matches("notepad++.exe", "notepad")


def test_a_step_that_runs_too_long_is_killed_with_its_children() -> None:
    outcome = actions.run_step(Step("sleep 30 & sleep 30; echo never", shell=True, timeout=0.5))
    assert outcome.status == "failed" and "timed out" in (outcome.error or "")
    missing = actions.run_step(Step(["wcms-no-such-program"]))
    assert missing.status == "failed" and "not found" in (missing.error or "")


def test_kill_never_ends_the_client_itself() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        outcome = actions.kill(None, child.pid, own_pid=child.pid)
        assert outcome.status == "failed" and child.poll() is None
    finally:
        child.kill()
        child.wait()


def test_alternatives_fall_back_and_report_both() -> None:
    first = [Step([sys.executable, "-c", "raise SystemExit(1)"])]
    second = [Step([sys.executable, "-c", "print('choco ok')"])]
    assert actions.run_alternatives([first, second]).stdout == "choco ok\n"
    failed = actions.run_alternatives([first, first])
    assert failed.status == "failed" and ";" in (failed.error or "")
    assert actions.run_alternatives([]).error == "no package manager on this PC"
