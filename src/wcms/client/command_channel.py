"""The command channel: one long poll open to the server, each command run once, results kept
until the server has them.

Delivery is at least once, so this side makes execution at most once:
- a command runs only after its ack answers `running` (the server's commit point: a command
  cancelled or expired before it is never run);
- its id is written to a journal on disk (`commands.json` in the client dir) before it runs, so
  a redelivery, even after a restart of the client, is answered from the journal, never rerun;
- its result is journaled before it is posted and posted until the server has it (after a
  restart too), so no result is lost while the server is away.

Power commands, lock and messages run at once in their own thread (a shutdown must not wait
behind an hour-long install); everything else runs in order, one at a time.
Pure decisions (parsing, staleness, result bodies) are functions below the class.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode

import psutil

from wcms.client import actions, http
from wcms.client.config import ClientConfig, write_private
from wcms.client.platform.base import Platform
from wcms.protocol import (
    CLIENT_PREFIX,
    MAX_BODY_BYTES,
    MAX_OUTPUT_CHARS,
    SECRET_ARGS,
    CommandType,
    ErrorCode,
    args_problem,
    stale_on_boot,
)

log = logging.getLogger(__name__)

JOURNAL_FILE = "commands.json"
JOURNAL_KEEP_SECONDS = 7 * 86400
JOURNAL_KEEP_REPORTED = 1000
REPORTED_OUTPUT_CHARS = 2000  # output kept per reported command (the journal stays small)
DEFAULT_POLL_TIMEOUT = 15.0  # until the server says otherwise
POLL_SLACK = 10.0  # the HTTP deadline of a poll is the server's wait plus this
CALL_TIMEOUT = 10.0  # ack and result posts
ACK_TRIES = 3
RETRY_BASE = 1.0
RETRY_CAP = 30.0
URGENT = frozenset(
    {
        CommandType.SHUTDOWN,
        CommandType.RESTART,
        CommandType.LOGOFF,
        CommandType.LOCK,
        CommandType.MESSAGE,
        CommandType.KILL,
    }
)
INTERRUPTED = "interrupted: the client stopped while it ran; not run again"

Rand = Callable[[], float]


class Host(Protocol):
    """What the channel needs of the agent (wcms.client.main.Agent)."""

    config: ClientConfig
    platform: Platform
    machine_id: str
    token: str | None
    server_config: dict[str, Any]

    @property
    def server_url(self) -> str: ...

    def forget_token(self, why: str) -> None: ...


@dataclass(frozen=True)
class Command:
    id: int
    type: CommandType
    args: dict[str, Any]
    age: float  # seconds since the admin queued it, by the server's clock
    run_when_online: bool
    attempt: int


# ---------------------------------------------------------------------------- the journal


class Journal:
    """Command ids this client took on: `started`, `done` (with its result) or `reported`."""

    def __init__(self, path: Path, platform: Platform, clock: Callable[[], float] = time.time):
        self.path = path
        self._platform = platform
        self._clock = clock
        self._lock = threading.Lock()
        self._entries = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # Refusing to start would stop every command; a lost journal risks a rerun only
            # of commands redelivered from before, so say so loudly and go on.
            log.error("Cannot read %s (%s): starting a new command journal", self.path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, command_id: int) -> dict[str, Any] | None:
        with self._lock:
            entry = self._entries.get(str(command_id))
            return dict(entry) if entry is not None else None

    def begin(self, command_id: int, kind: str) -> None:
        self._set(command_id, {"state": "started", "type": kind})

    def finish(self, command_id: int, result: dict[str, Any]) -> None:
        self._set(command_id, {"state": "done", "result": result})

    def reported(self, command_id: int) -> None:
        """The server has it; keep a short copy to answer a redelivery the same way."""
        result = self.result(command_id) or {}
        short = {
            k: v[:REPORTED_OUTPUT_CHARS] if isinstance(v, str) else v for k, v in result.items()
        }
        self._set(command_id, {"state": "reported", "result": short or None})

    def unreported(self) -> list[int]:
        with self._lock:
            return sorted(int(k) for k, v in self._entries.items() if v.get("state") == "done")

    def result(self, command_id: int) -> dict[str, Any] | None:
        entry = self.get(command_id)
        result = entry.get("result") if entry else None
        return result if isinstance(result, dict) else None

    def _set(self, command_id: int, values: dict[str, Any]) -> None:
        with self._lock:
            entry = self._entries.setdefault(str(command_id), {})
            entry.update(values, at=self._clock())
            self._entries = prune_journal(self._entries, self._clock())
            text = json.dumps(self._entries, sort_keys=True)
            write_private(self.path, text + "\n", self._platform)  # atomic replace


def prune_journal(entries: dict[str, dict[str, Any]], now: float) -> dict[str, dict[str, Any]]:
    """Forget reported commands after a week (or beyond the newest 1,000); keep the rest."""
    reported = sorted(
        (k for k, v in entries.items() if v.get("state") == "reported"),
        key=lambda k: entries[k].get("at", 0),
        reverse=True,
    )
    drop = set(reported[JOURNAL_KEEP_REPORTED:])
    drop |= {k for k in reported if now - float(entries[k].get("at", 0)) > JOURNAL_KEEP_SECONDS}
    return {k: v for k, v in entries.items() if k not in drop}


# ---------------------------------------------------------------------------- the channel


class CommandChannel:
    def __init__(
        self,
        host: Host,
        *,
        platform_actions: actions.PlatformActions | None = None,
        dry_run_power: bool | None = None,
        rand: Rand = random.random,
    ) -> None:
        self._host = host
        self._journal = Journal(host.config.client_dir / JOURNAL_FILE, host.platform)
        self._actions = platform_actions or actions_for(host.platform)
        self.dry_run_power = host.config.dry_run_power if dry_run_power is None else dry_run_power
        self._rand = rand
        self._stopped = threading.Event()
        self._active = threading.Event()  # set: polling; clear: paused (asleep, stopping)
        self._active.set()
        self._lock = threading.Lock()
        self._inflight: set[int] = set()
        self._results: queue.Queue[int] = queue.Queue()
        self._lane: queue.Queue[Command] = queue.Queue()
        self._poll_timeout = DEFAULT_POLL_TIMEOUT

    def start(self) -> None:
        if self.dry_run_power:
            log.info("Command channel: power commands are a dry run (recorded, not done)")
        for name, target in (
            ("wcms-commands", self._poll_loop),
            ("wcms-results", self._results_loop),
            ("wcms-command-lane", self._lane_loop),
        ):
            threading.Thread(target=target, name=name, daemon=True).start()

    def pause(self) -> None:
        """Stop polling (before the shutdown signal: a poll after it would revive the PC)."""
        self._active.clear()

    def resume(self) -> None:
        self._active.set()

    def stop(self) -> None:
        self._active.clear()
        self._stopped.set()

    # -- polling ---------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            if not self._active.wait(1.0):
                continue
            token = self._host.token
            if token is None:  # the agent registers; the channel waits for its token
                self._stopped.wait(0.2)
                continue
            try:
                body = self._poll(token)
            except http.HttpError as exc:
                failures += 1
                self._stopped.wait(self._after_failure(exc, token, failures))
                continue
            failures = 0
            if not self._active.is_set():
                continue  # paused while it waited: leave them to be delivered again
            try:
                self._handle(body)
            except Exception:  # a bug must not end the channel
                log.exception("Unexpected error handling commands")

    def _poll(self, token: str) -> dict[str, Any]:
        query = {"machine_id": self._host.machine_id, "timeout": f"{self._poll_timeout:g}"}
        boot = boot_time()
        if boot is not None:
            query["boot_time"] = f"{boot:.0f}"
        url = f"{self._host.server_url}{CLIENT_PREFIX}/commands?{urlencode(query)}"
        answer = http.request("GET", url, token=token, timeout=self._poll_timeout + POLL_SLACK)
        self._poll_timeout = parse_poll_timeout(answer.body.get("config"), self._poll_timeout)
        return answer.body

    def _after_failure(self, exc: http.HttpError, token: str, failures: int) -> float:
        if isinstance(exc, http.ApiError) and (
            exc.status == 401 or exc.code == ErrorCode.MACHINE_MISMATCH
        ):
            if self._host.token == token:
                self._host.forget_token(str(exc))
            return 1.0
        delay = retry_delay(failures - 1, self._rand)
        level = logging.WARNING if failures <= 3 or failures % 20 == 0 else logging.DEBUG
        log.log(level, "Command poll failed (%s); polling again in %.1f s", exc, delay)
        return delay

    def _handle(self, body: Mapping[str, Any]) -> None:
        commands, bad = parse_commands(body.get("commands"))
        for command_id, why in bad:
            log.error("Command %s refused: %s", command_id, why)
            self._finish(
                command_id, actions.Outcome("failed", error=f"refused by the client: {why}")
            )
        for cmd in commands:
            self._take(cmd)

    def _take(self, cmd: Command) -> None:
        with self._lock:
            if cmd.id in self._inflight:
                return
        entry = self._journal.get(cmd.id)
        if entry is not None:
            self._redelivered(cmd, entry)
            return
        log.info("Command %s received: %s (attempt %s)", cmd.id, cmd.type, cmd.attempt)
        problem = check_args(cmd.type, cmd.args)
        if problem is not None:
            self._finish(cmd.id, actions.Outcome("failed", error=f"bad arguments: {problem}"))
            return
        stale = stale_reason(cmd, uptime())
        if stale is not None:
            log.warning("Command %s not run: %s", cmd.id, stale)
            self._finish(cmd.id, actions.Outcome("expired", error=stale))
            return
        status = self._ack(cmd.id)
        if status != "running":
            log.info("Command %s not run: the server says it is %s", cmd.id, status or "unknown")
            return
        self._journal.begin(cmd.id, cmd.type)
        with self._lock:
            self._inflight.add(cmd.id)
        if cmd.type in URGENT:
            threading.Thread(target=self._execute, args=(cmd,), daemon=True).start()
        else:
            self._lane.put(cmd)

    def _redelivered(self, cmd: Command, entry: Mapping[str, Any]) -> None:
        log.info("Command %s delivered again: already taken on, not run again", cmd.id)
        if entry.get("state") == "started":  # this client died while it ran
            self._finish(cmd.id, actions.Outcome("failed", error=INTERRUPTED))
        elif entry.get("state") == "done":
            self._results.put(cmd.id)
        else:  # reported already: the server lost it (say, restored from a backup)
            result = self._journal.result(cmd.id) or {"status": "failed", "error": INTERRUPTED}
            self._journal.finish(cmd.id, result)
            self._results.put(cmd.id)

    def _ack(self, command_id: int) -> str | None:
        for attempt in range(ACK_TRIES):
            try:
                answer = self._post(f"/commands/{command_id}/ack", {})
            except http.ApiError as exc:
                if exc.status < 500 and exc.status not in (408, 429):
                    log.warning("Command %s: ack refused (%s)", command_id, exc)
                    return None
            except http.TransportError as exc:
                log.warning("Command %s: ack failed (%s)", command_id, exc)
            else:
                status = answer.get("status")
                return status if isinstance(status, str) else None
            self._stopped.wait(0.5 * 2**attempt)
        return None  # the server delivers it again after its ack timeout

    # -- running ---------------------------------------------------------------------------

    def _lane_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                cmd = self._lane.get(timeout=1.0)
            except queue.Empty:
                continue
            self._execute(cmd)

    def _execute(self, cmd: Command) -> None:
        log.info("Running command %s (%s)", cmd.id, cmd.type)
        try:
            outcome = actions.perform(
                cmd.type, cmd.args, self._actions, dry_run_power=self.dry_run_power
            )
        except Exception as exc:  # an OS surprise is this command's failure, not the agent's
            log.exception("Command %s crashed", cmd.id)
            outcome = actions.Outcome("failed", error=f"client error: {type(exc).__name__}: {exc}")
        self._finish(cmd.id, outcome, secret_values(cmd.args))
        with self._lock:
            self._inflight.discard(cmd.id)

    def _finish(
        self, command_id: int, outcome: actions.Outcome, secrets: Iterable[str] = ()
    ) -> None:
        result = result_fields(outcome, secrets)
        self._journal.finish(command_id, result)
        log.info(
            "Command %s finished: %s (exit code %s)%s",
            command_id,
            result["status"],
            result["exit_code"],
            f": {result['error']}" if result.get("error") else "",
        )
        self._results.put(command_id)

    # -- results ---------------------------------------------------------------------------

    def _results_loop(self) -> None:
        for command_id in self._journal.unreported():  # left over from before a restart
            self._results.put(command_id)
        while not self._stopped.is_set():
            try:
                command_id = self._results.get(timeout=1.0)
            except queue.Empty:
                continue
            failures = 0
            while not self._stopped.is_set() and not self._send_result(command_id):
                failures += 1
                self._stopped.wait(retry_delay(failures - 1, self._rand))

    def _send_result(self, command_id: int) -> bool:
        """Post one journaled result; True when it needs no more tries."""
        result = self._journal.result(command_id)
        if result is None:
            return True
        if self._host.token is None:
            return False
        try:
            answer = self._post(f"/commands/{command_id}/result", result)
        except http.ApiError as exc:
            if exc.status in (400, 404, 413):  # no retry can fix these: say so and move on
                log.error("Result of command %s refused for good: %s", command_id, exc)
                self._journal.reported(command_id)
                return True
            log.warning("Result of command %s not sent yet: %s", command_id, exc)
            return False
        except http.TransportError as exc:
            log.warning("Result of command %s not sent yet: %s", command_id, exc)
            return False
        self._journal.reported(command_id)
        log.info("Result of command %s sent (server: %s)", command_id, answer.get("status"))
        return True

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self._host.server_url}{CLIENT_PREFIX}{path}"
        answer = http.request(
            "POST",
            url,
            body={"machine_id": self._host.machine_id, **body},
            token=self._host.token,
            timeout=CALL_TIMEOUT,
        )
        return answer.body


# ---------------------------------------------------------------------------- pure decisions


def parse_commands(raw: Any) -> tuple[list[Command], list[tuple[int, str]]]:
    """The poll answer's commands: the well-formed ones, and (id, why) for the others."""
    good: list[Command] = []
    bad: list[tuple[int, str]] = []
    if not isinstance(raw, list):
        return good, bad
    for item in raw:
        if not isinstance(item, dict) or not _is_int(item.get("id")):
            log.error("Ignoring a command without an id: %r", item)
            continue
        try:
            good.append(parse_command(item))
        except ValueError as exc:
            bad.append((int(item["id"]), str(exc)))
    return good, bad


def parse_command(item: Mapping[str, Any]) -> Command:
    try:
        kind = CommandType(str(item.get("type")))
    except ValueError:
        raise ValueError(f"unknown command type {item.get('type')!r}") from None
    args = item.get("args", {})
    if not isinstance(args, dict):
        raise ValueError("args is not an object")
    age = item.get("age", 0)
    attempt = item.get("attempt", 1)
    return Command(
        id=int(item["id"]),
        type=kind,
        args=args,
        age=float(age) if isinstance(age, int | float) and not isinstance(age, bool) else 0.0,
        run_when_online=item.get("run_when_online") is True,
        attempt=int(attempt) if _is_int(attempt) else 1,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_args(kind: CommandType, args: Mapping[str, Any]) -> str | None:
    """What is wrong with `args` (the server checked them; this is the second lock), or None."""
    return args_problem(kind, args)


def stale_reason(cmd: Command, uptime_seconds: float | None) -> str | None:
    """A power command queued before this boot is not for this boot (unless asked for)."""
    if stale_on_boot(cmd.type, cmd.run_when_online, cmd.age, uptime_seconds):
        return f"queued {cmd.age:.0f} s ago, before this PC started ({uptime_seconds:.0f} s ago)"
    return None


def secret_values(args: Mapping[str, Any]) -> list[str]:
    return [v for k, v in args.items() if k in SECRET_ARGS and isinstance(v, str) and v]


def result_fields(outcome: actions.Outcome, secrets: Iterable[str] = ()) -> dict[str, Any]:
    """The result body (without machine_id): secrets cut out, output capped to fit a request."""
    hidden = [s for s in secrets if s]

    def clean(text: str | None) -> str:
        text = text or ""
        for secret in hidden:
            text = text.replace(secret, "***")
        return actions.cap(text, MAX_OUTPUT_CHARS)

    fields: dict[str, Any] = {
        "status": outcome.status,
        "exit_code": outcome.exit_code,
        "stdout": clean(outcome.stdout),
        "stderr": clean(outcome.stderr),
        "error": clean(outcome.error)[:4000] or None,
    }
    return fit_body(fields)


def fit_body(fields: dict[str, Any], limit: int = MAX_BODY_BYTES - 4096) -> dict[str, Any]:
    """Shorten stdout/stderr (longest first) until the JSON body fits the server's limit."""
    fields = dict(fields)
    while len(json.dumps(fields).encode()) > limit:
        name = max(("stdout", "stderr"), key=lambda k: len(fields[k]))
        text = fields[name]
        if not text:
            break
        fields[name] = actions.cap(text, max(len(text) // 2, 64))
        if len(text) <= 64:
            break
    return fields


def retry_delay(attempt: int, rand: Rand = random.random) -> float:
    ceiling = min(RETRY_CAP, RETRY_BASE * 2.0 ** min(attempt, 30))
    return ceiling * (0.5 + 0.5 * rand())


def parse_poll_timeout(config: Any, current: float) -> float:
    value = config.get("poll_timeout") if isinstance(config, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 3600:
        return float(value)
    return current


def boot_time() -> float | None:
    try:
        return float(psutil.boot_time())
    except (OSError, psutil.Error):
        return None


def uptime() -> float | None:
    boot = boot_time()
    return None if boot is None else max(0.0, time.time() - boot)


def actions_for(platform: Platform) -> actions.PlatformActions:
    """The platform's action set, chosen by the platform object already picked once."""
    if platform.name == "windows":
        from wcms.client.platform.windows_actions import WindowsActions

        return WindowsActions(platform)
    from wcms.client.platform.linux_actions import LinuxActions

    return LinuxActions(platform)
