"""What a command does, OS-agnostic: dispatch by type, run plans, report an Outcome.

The platform modules (`platform/linux_actions.py`, `platform/windows_actions.py`) turn a command
into a Plan: argument lists for subprocesses (no shell; only `run` has one) or in-process calls
(Windows' WTS API). This module runs plans with timeouts, and in dry-run mode records what the
power commands would do instead of doing it: the one stand-in the tests use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psutil

from wcms.protocol import MAX_OUTPUT_CHARS, CommandType

log = logging.getLogger(__name__)

DRY_RUN_TYPES = frozenset(
    {CommandType.SHUTDOWN, CommandType.RESTART, CommandType.LOGOFF, CommandType.LOCK}
)
DEFAULT_STEP_TIMEOUT = 120.0
INSTALL_TIMEOUT = 3600.0
CREATE_NEW_PROCESS_GROUP = 0x00000200  # subprocess's name for it exists on Windows only
KILL_GRACE = 5.0  # seconds a process gets to end after SIGTERM before it is killed


@dataclass(frozen=True)
class Outcome:
    status: str  # succeeded | failed | expired
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"


@dataclass(frozen=True)
class Step:
    """One program to run: an argument list, or (for `run` only) a shell command line."""

    argv: Sequence[str] | str
    stdin: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    timeout: float = DEFAULT_STEP_TIMEOUT
    shell: bool = False
    ok_codes: frozenset[int] = frozenset({0})

    def describe(self) -> str:
        if isinstance(self.argv, str):
            return self.argv
        return subprocess.list2cmdline(list(self.argv))


@dataclass(frozen=True)
class Call:
    """An in-process action (an OS API call); answers an Outcome."""

    description: str
    fn: Callable[[], Outcome]

    def describe(self) -> str:
        return self.description


Plan = list[Step | Call]


class PlatformActions(Protocol):
    """What each OS provides; every method answers plans, never runs anything itself."""

    def power(self, kind: CommandType, delay: int, message: str | None) -> Plan: ...
    def logoff(self) -> Plan: ...
    def lock(self) -> Plan: ...
    def message(self, text: str, title: str) -> Plan: ...
    def shell(self, command: str, timeout: float) -> Plan: ...
    def install(self, package: str) -> list[Plan]: ...  # alternatives, tried in order
    def uninstall(self, package: str) -> list[Plan]: ...
    def account_create(
        self, username: str, password: str, full_name: str | None, language: str | None
    ) -> Plan: ...
    def account_delete(self, username: str) -> Plan: ...
    def account_password(self, username: str, password: str) -> Plan: ...


# ---------------------------------------------------------------------------- dispatch


def perform(
    kind: CommandType, args: Mapping[str, Any], actions: PlatformActions, *, dry_run_power: bool
) -> Outcome:
    """Do one command; never raises for an expected failure (it is an Outcome)."""
    if kind is CommandType.KILL:
        return kill(args.get("name"), args.get("pid"))
    if kind in (CommandType.INSTALL, CommandType.UNINSTALL):
        pkg = str(args["package"])
        choices = actions.install(pkg) if kind is CommandType.INSTALL else actions.uninstall(pkg)
        return run_alternatives(choices)
    plan = _plan(kind, args, actions)
    if dry_run_power and kind in DRY_RUN_TYPES:
        return dry_run(kind, plan)
    return run_plan(plan)


def _plan(kind: CommandType, args: Mapping[str, Any], actions: PlatformActions) -> Plan:
    if kind in (CommandType.SHUTDOWN, CommandType.RESTART):
        return actions.power(kind, int(args.get("delay", 0)), args.get("message"))
    if kind is CommandType.LOGOFF:
        return actions.logoff()
    if kind is CommandType.LOCK:
        return actions.lock()
    if kind is CommandType.MESSAGE:
        return actions.message(str(args["text"]), str(args.get("title") or "WCMS"))
    if kind is CommandType.RUN:
        return actions.shell(str(args["command"]), float(args.get("timeout", 300)))
    if kind is CommandType.ACCOUNT_CREATE:
        return actions.account_create(
            str(args["username"]),
            str(args["password"]),
            args.get("full_name"),
            args.get("language"),
        )
    if kind is CommandType.ACCOUNT_DELETE:
        return actions.account_delete(str(args["username"]))
    if kind is CommandType.ACCOUNT_PASSWORD:
        return actions.account_password(str(args["username"]), str(args["password"]))
    raise ValueError(f"no action for {kind}")


def dry_run(kind: CommandType, plan: Plan) -> Outcome:
    """Record what a power command would do, and do nothing."""
    lines = [f"dry run: {kind} would run: {step.describe()}" for step in plan]
    for line in lines:
        log.info("%s", line)
    return Outcome("succeeded", 0, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------- running plans


def run_plan(plan: Plan) -> Outcome:
    """Run each step in order; stop at the first failure. Output of all steps is kept."""
    out: list[str] = []
    err: list[str] = []
    last = Outcome("succeeded", 0)
    for step in plan:
        last = step.fn() if isinstance(step, Call) else run_step(step)
        out.append(last.stdout)
        err.append(last.stderr)
        if not last.ok:
            break
    return Outcome(last.status, last.exit_code, "".join(out), "".join(err), last.error)


def run_alternatives(choices: list[Plan]) -> Outcome:
    """Try each plan until one succeeds (winget, then Chocolatey); answer the last outcome."""
    if not choices:
        return Outcome("failed", error="no package manager on this PC")
    notes: list[str] = []
    outcome = Outcome("failed", error="nothing ran")
    for plan in choices:
        outcome = run_plan(plan)
        if outcome.ok:
            break
        notes.append(f"{plan[0].describe() if plan else '?'}: {outcome.error or outcome.exit_code}")
    if not outcome.ok and len(notes) > 1:
        return Outcome(
            outcome.status, outcome.exit_code, outcome.stdout, outcome.stderr, "; ".join(notes)
        )
    return outcome


def run_step(step: Step) -> Outcome:
    """One subprocess with a timeout; on timeout the whole process group is killed."""
    env = {**os.environ, **step.env} if step.env else None
    try:
        proc = subprocess.Popen(
            step.argv,
            shell=step.shell,
            stdin=subprocess.PIPE if step.stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            encoding="utf-8",
            errors="replace",
            **_new_group(),
        )
    except FileNotFoundError as exc:
        return Outcome("failed", error=f"not found: {exc.filename or step.describe()}")
    except OSError as exc:
        return Outcome("failed", error=f"cannot start {step.describe()}: {exc}")
    try:
        stdout, stderr = proc.communicate(step.stdin, timeout=step.timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        stdout, stderr = proc.communicate()
        return Outcome(
            "failed", None, cap(stdout), cap(stderr), f"timed out after {step.timeout:g} s"
        )
    code = proc.returncode
    status = "succeeded" if code in step.ok_codes else "failed"
    error = None if status == "succeeded" else f"exit code {code}"
    return Outcome(status, code, cap(stdout), cap(stderr), error)


def _new_group() -> dict[str, Any]:
    """Start children in their own process group / session, so a timeout kills all of it."""
    if os.name == "nt":
        return {"creationflags": CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    if os.name != "nt":
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.kill()


def cap(text: str | None, limit: int = MAX_OUTPUT_CHARS) -> str:
    """At most `limit` characters, saying how much was cut."""
    text = text or ""
    if len(text) <= limit:
        return text
    note = f"\n[... {len(text) - limit} more characters cut]"
    return text[: limit - len(note)] + note


# ---------------------------------------------------------------------------- kill (any OS)


def kill(name: str | None, pid: int | None, *, own_pid: int | None = None) -> Outcome:
    """End processes by name (every match) or pid: terminate, then kill after a grace period."""
    own = own_pid or os.getpid()
    if pid is not None:
        targets = [p for p in _processes() if p.pid == pid]
        what = f"pid {pid}"
    else:
        targets = [p for p in _processes() if name and process_name_matches(p.info["name"], name)]
        what = f"process {name!r}"
    targets = [p for p in targets if p.pid not in (0, 1, 4, own)]
    if not targets:
        return Outcome("failed", error=f"no {what} is running")
    for p in targets:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    alive = _wait_ended(targets, KILL_GRACE)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    still = _wait_ended(alive, KILL_GRACE)
    ended = ", ".join(str(p.pid) for p in targets if p not in still)
    if still:
        left = ", ".join(str(p.pid) for p in still)
        return Outcome(
            "failed", 1, f"ended {ended}\n" if ended else "", error=f"still running: {left}"
        )
    return Outcome("succeeded", 0, f"ended {what}: pid {ended}\n")


def _wait_ended(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has ended; answer those still running at the timeout."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if not _ended(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if not _ended(p)]
    return alive


def _ended(p: psutil.Process) -> bool:
    """A zombie has ended; only its parent has not collected it yet."""
    try:
        return not p.is_running() or bool(p.status() == psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return True


def _processes() -> list[psutil.Process]:
    return list(psutil.process_iter(["name"]))


def process_name_matches(actual: str | None, wanted: str) -> bool:
    """Case-insensitive, and `notepad` matches `notepad.exe`."""
    if not actual:
        return False
    a, w = actual.lower(), wanted.lower()
    return a == w or a == f"{w}.exe" or (w.endswith(".exe") and a == w[:-4])
