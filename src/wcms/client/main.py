"""The OS-agnostic agent: register, heartbeat, and tell the server the moment the PC goes away.

`Agent.run()` keeps the loop in a worker thread and returns once `stop()` has finished, so an OS
event (SIGTERM, PreShutdown, logind) only ever waits for the shutdown signal itself, never for a
heartbeat in flight. The platform turns OS events into `stop(reason)` and `report(event)`; this
module never asks which OS it runs on. Decisions (back-off, what an error means) are pure
functions below the class.
"""

from __future__ import annotations

import datetime as dt
import logging
import logging.handlers
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from wcms.client import CLIENT_VERSION, http
from wcms.client import platform as platforms
from wcms.client.collector import Collector, hostname
from wcms.client.command_channel import CommandChannel
from wcms.client.config import SHUTDOWN_TIMEOUT, ClientConfig, ConfigError, load_config
from wcms.client.identity import (
    IdentityError,
    TokenStore,
    machine_id,
    read_state,
    write_state,
)
from wcms.client.platform.base import Platform
from wcms.protocol import (
    CLIENT_PREFIX,
    COMEBACK_EVENTS,
    PRESETS,
    ClientEvent,
    ErrorCode,
    PowerReason,
    PresenceMode,
)

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0  # register and heartbeat: total deadline of one call
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
SLOW_RETRY = 120.0  # the server refused the request itself: asking again soon will not help
# The machine is registered already and an admin must allow it to register again: ask every
# minute or so, so it registers soon after they do, without anyone touching the PC.
AWAIT_ADMIN_RETRY = 60.0
DEFAULT_HEARTBEAT = PRESETS[PresenceMode.STANDARD].heartbeat_interval  # until the server says
POWER_OFF = frozenset({PowerReason.SHUTDOWN, PowerReason.RESTART})
LOG_MAX_BYTES = 1024 * 1024
LOG_BACKUPS = 5

Rand = Callable[[], float]


class Decision(StrEnum):
    """What to do after a failed call."""

    BACKOFF = "backoff"  # the server is away or overloaded: retry soon, then less often
    REREGISTER = "reregister"  # the token is not ours (any more): throw it away, register
    SLOW_RETRY = "slow_retry"  # the server refused the request itself
    AWAIT_ADMIN = "await_admin"  # registered already: an admin must allow it to register again
    ANNOUNCE = "announce"  # the server holds us signed off: say we are here (event boot)


class Agent:
    """One PC's agent. run() blocks until stop(); both may be called from different threads."""

    def __init__(
        self,
        config: ClientConfig,
        platform: Platform,
        *,
        collector: Collector | None = None,
        rand: Rand = random.random,
        reload_config: Callable[[], ClientConfig] | None = None,
    ) -> None:
        if not config.server_url:
            raise ConfigError("no server URL: pass --server or set WCMS_SERVER_URL")
        self.config = config
        self.platform = platform
        self.machine_id = machine_id(config, platform).value
        self.tokens = TokenStore(config.token_file, platform)
        self.token = self.tokens.load()
        self.heartbeat_interval = DEFAULT_HEARTBEAT
        self.server_config: dict[str, Any] = {}
        self._collector = collector or Collector(platform)
        self._rand = rand
        self._reload = reload_config
        self._state = read_state(config.state_file)
        self._events: deque[ClientEvent] = deque([ClientEvent.BOOT], maxlen=16)
        self._failures = 0
        self._stop_lock = threading.RLock()  # RLock: a second SIGTERM may nest in the first
        self._final: PowerReason | None = None
        self._sleeping = False
        self._awake = threading.Event()
        self._awake.set()
        self._wake = threading.Event()
        self._done = threading.Event()
        self.commands: CommandChannel | None = None  # the command channel, started by run()

    @property
    def server_url(self) -> str:
        return self.config.server_url or ""

    # -- the public face: what the CLI, the service and the platform call ------------------

    def run(self) -> PowerReason | None:
        """Run the loop until stop(); answer the reason it stopped for."""
        log.info(
            "Agent started: wcms-client %s, machine_id=%s, server=%s, %s",
            CLIENT_VERSION,
            self.machine_id,
            self.server_url,
            "registered" if self.token else "not registered yet",
        )
        self.commands = CommandChannel(self)  # its own threads; shares self.token
        self.commands.start()
        threading.Thread(target=self._loop, name="wcms-agent", daemon=True).start()
        self._done.wait()
        log.info("Agent stopped (reason=%s)", self._final)
        return self._final

    def stop(self, reason: PowerReason, *, deadline: float | None = None, source: str = "") -> None:
        """Send one shutdown signal with `reason`, then end the loop (SLEEP: pause it).

        `deadline` is a time.monotonic() reading by which the signal must be done; by default
        SHUTDOWN_TIMEOUT from now. Safe to call twice and from any thread: the first call wins.
        """
        with self._stop_lock:
            if self._final is not None or (reason is PowerReason.SLEEP and self._sleeping):
                return
            if self.commands is not None:
                self.commands.pause()  # a poll after the signal would bring the PC back online
            what = "PreShutdown received" if reason in POWER_OFF else "Stop requested"
            log.info(
                "%s (%s): sending the shutdown signal, reason=%s", what, source or "local", reason
            )
            self.send_shutdown_signal(reason, deadline=deadline)
            if reason is PowerReason.SLEEP:
                self._sleeping = True
                self._awake.clear()
                return
            self._final = reason
            self._done.set()
            self._awake.set()
            self._wake.set()

    def report(self, event: ClientEvent) -> None:
        """Send a heartbeat carrying `event` now (RESUME also ends a sleep pause)."""
        log.info("Event: %s", event)
        with self._stop_lock:
            if event is ClientEvent.RESUME:
                self._sleeping = False
                if self.commands is not None:
                    self.commands.resume()
            if event in COMEBACK_EVENTS and not any(e in COMEBACK_EVENTS for e in self._events):
                self._events.appendleft(event)  # before logons: only it brings the PC back
            else:
                self._events.append(event)
            self._awake.set()
            self._wake.set()

    def send_shutdown_signal(self, reason: PowerReason, *, deadline: float | None = None) -> bool:
        """One POST /api/client/shutdown, no retry, done by `deadline` (see stop())."""
        token = self.token
        if token is None:
            log.warning("Shutdown signal not sent (reason=%s): not registered yet", reason)
            return False
        return post_shutdown_signal(self.server_url, self.machine_id, token, reason, deadline)

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._done.is_set():
            self._awake.wait()
            if self._done.is_set():
                return
            delay = self._step()
            self._wake.wait(delay)
            self._wake.clear()

    def _step(self) -> float:
        """Register if needed, send one heartbeat; answer the seconds until the next step."""
        try:
            if self.token is None and not self._register():
                return jittered(SLOW_RETRY, self._rand)
            self._heartbeat()
        except http.HttpError as exc:
            return self._after_failure(exc)
        except Exception:  # a bug or an OS surprise: log it, keep the agent alive
            log.exception("Unexpected error in the agent loop")
            self._failures += 1
            return backoff_delay(self._failures - 1, self._rand)
        self._failures = 0
        if self._events:
            return 0.0
        return heartbeat_delay(self.heartbeat_interval, self._rand)

    def _register(self) -> bool:
        """Register with the PIN; False (logged) when there is no PIN to register with."""
        if self._reload is not None and not self.config.pin:
            self.config = self._reload()
        if not self.config.pin:
            log.error(
                "Not registered and no PIN configured: ask an admin for a PIN (`wcms pin "
                "create`), then set WCMS_PIN or run `wcms client install --pin PIN`"
            )
            return False
        body = {
            "pin": self.config.pin,
            "machine_id": self.machine_id,
            "hostname": hostname(),
            "client_version": CLIENT_VERSION,
            "hardware": self._collector.hardware(),
        }
        # With the token this PC holds, if any: a known machine registers again only with its
        # current token (or once an admin allowed it).
        answer = self.call("/register", body, auth=self.token is not None)
        token = answer.get("token")
        if not isinstance(token, str):
            raise http.ApiError(502, "bad_answer", "register answered without a token")
        self.tokens.save(token)
        self.token = token
        self._state["pc_id"] = answer.get("pc_id")
        log.info("Registered with %s as PC %s", self.server_url, answer.get("pc_id"))
        return True

    def _heartbeat(self) -> None:
        body: dict[str, Any] = {"machine_id": self.machine_id, **self._collector.heartbeat()}
        event = self._events[0] if self._events else None
        if event is not None:
            body["event"] = event.value
        if event is ClientEvent.BOOT:  # specs are re-sent at every start, never stale
            body["hardware"] = self._collector.hardware()
        self.call("/heartbeat", body)
        if event is not None:
            self._events.popleft()
            log.info("Heartbeat sent with event=%s", event)
        else:
            log.debug("Heartbeat sent")

    def call(
        self,
        path: str,
        body: dict[str, Any],
        *,
        auth: bool = True,
        timeout: float = REQUEST_TIMEOUT,
    ) -> dict[str, Any]:
        """POST to the client API; note the server's timing and the contact."""
        url = f"{self.server_url}{CLIENT_PREFIX}{path}"
        answer = http.request(
            "POST", url, body=body, token=self.token if auth else None, timeout=timeout
        )
        self._on_contact(answer.body)
        return answer.body

    def _on_contact(self, answer: dict[str, Any]) -> None:
        config = answer.get("config")
        if isinstance(config, dict):
            self.server_config = config
            self.heartbeat_interval = parse_heartbeat_interval(config, self.heartbeat_interval)
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self._state.update(server_url=self.server_url, machine_id=self.machine_id, last_contact=now)
        write_state(self.config.state_file, self._state, self.platform)

    def forget_token(self, why: str) -> None:
        """Throw the token away: the next step registers afresh (with the PIN, if any)."""
        log.warning("The server refused our token (%s): discarding it and registering afresh", why)
        self.token = None
        self.tokens.discard()

    def _after_failure(self, exc: http.HttpError) -> float:
        decision = decide(exc)
        self._failures += 1
        if decision is Decision.REREGISTER:
            self.forget_token(str(exc))
            return 0.0 if self._failures <= 1 else backoff_delay(self._failures - 2, self._rand)
        if decision is Decision.AWAIT_ADMIN:
            delay = jittered(AWAIT_ADMIN_RETRY, self._rand)
            message = exc.message if isinstance(exc, http.ApiError) else str(exc)
            log.error(
                "Registration refused: %s (machine_id %s). Nothing needs doing on this PC: "
                "it asks again every minute and registers once an admin allows it; next try "
                "in %.0f s",
                message,
                self.machine_id,
                delay,
            )
            return delay
        if decision is Decision.ANNOUNCE:
            self._announce()
            return backoff_delay(self._failures - 1, self._rand)
        if decision is Decision.SLOW_RETRY:
            delay = jittered(SLOW_RETRY, self._rand)
            log.error("The server refused the request: %s; trying again in %.0f s", exc, delay)
            return delay
        delay = backoff_delay(self._failures - 1, self._rand)
        if isinstance(exc, http.ApiError) and exc.retry_after:
            delay = max(delay, exc.retry_after)
        log.warning("Server unavailable (%s); retrying in %.1f s", exc, delay)
        return delay

    def _announce(self) -> None:
        """The server says this PC signed off, without a return since. Mostly that answers a
        heartbeat in flight as stop() sent the signal: stop() holds the lock until it is done,
        and then the agent is ending or asleep and says nothing. An agent still running (its
        identity copied to a second process that signed off) says it is here, with event boot
        (the server tells a reconnection from a boot by the boot time)."""
        with self._stop_lock:
            if self._final is not None or self._sleeping:
                return
            if not any(e in COMEBACK_EVENTS for e in self._events):
                log.warning("The server holds this PC signed off: announcing it is running")
                self._events.appendleft(ClientEvent.BOOT)


# ---------------------------------------------------------------------------- the shutdown signal


def post_shutdown_signal(
    server_url: str,
    machine_id: str,
    token: str,
    reason: PowerReason | str,
    deadline: float | None = None,
) -> bool:
    """Exactly one POST /api/client/shutdown, no retry, finished by `deadline` (monotonic).

    By default the deadline is SHUTDOWN_TIMEOUT from now, for DNS, connect, send and read
    together. Logs one line either way; both contain the lower-case word the seed's
    `findstr "shutdown"` looks for.
    """
    reason = PowerReason(reason)
    started = time.monotonic()
    budget = http.Deadline.until(deadline if deadline is not None else started + SHUTDOWN_TIMEOUT)
    url = f"{server_url}{CLIENT_PREFIX}/shutdown"
    body = {"machine_id": machine_id, "reason": reason.value}
    try:
        http.request("POST", url, body=body, token=token, timeout=SHUTDOWN_TIMEOUT, deadline=budget)
    except http.HttpError as exc:
        log.error(
            "Shutdown signal failed: %s (POST %s/shutdown, reason=%s, %.2f s)",
            exc,
            CLIENT_PREFIX,
            reason,
            time.monotonic() - started,
        )
        return False
    log.info(
        "Shutdown signal sent (POST %s/shutdown, reason=%s, %.2f s)",
        CLIENT_PREFIX,
        reason,
        time.monotonic() - started,
    )
    return True


def send_shutdown_signal(reason: PowerReason | str = PowerReason.SHUTDOWN) -> bool:
    """The seed's helper: report this PC offline with the installed client's settings."""
    plat = platforms.current()
    try:
        config = load_config(plat)
        mid = machine_id(config, plat).value
    except (ConfigError, IdentityError) as exc:
        log.error("Shutdown signal failed: %s (reason=%s)", exc, reason)
        return False
    token = TokenStore(config.token_file, plat).load()
    if not config.server_url or token is None:
        log.error("Shutdown signal failed: this PC is not registered (reason=%s)", reason)
        return False
    return post_shutdown_signal(config.server_url, mid, token, reason)


# ---------------------------------------------------------------------------- pure decisions


def decide(exc: http.HttpError) -> Decision:
    """What a failed call means: the server is away, the token is bad, or the request is."""
    if not isinstance(exc, http.ApiError):
        return Decision.BACKOFF
    if exc.status >= 500 or exc.status in (408, 429):
        return Decision.BACKOFF
    if exc.status == 401 or exc.code == ErrorCode.MACHINE_MISMATCH:
        return Decision.REREGISTER
    if exc.code == ErrorCode.MACHINE_REGISTERED:
        return Decision.AWAIT_ADMIN
    if exc.code == ErrorCode.SIGNED_OFF:
        return Decision.ANNOUNCE
    return Decision.SLOW_RETRY


def backoff_delay(attempt: int, rand: Rand = random.random) -> float:
    """Exponential from BACKOFF_BASE, capped at BACKOFF_CAP, with jitter in [50 %, 100 %]."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(attempt, 30))
    return ceiling * (0.5 + 0.5 * rand())


def heartbeat_delay(interval: float, rand: Rand = random.random) -> float:
    """interval * uniform(0.8, 1.0): jitter only shortens the wait, so no PC flaps offline."""
    return interval * (0.8 + 0.2 * rand())


def jittered(seconds: float, rand: Rand = random.random) -> float:
    return seconds * (0.8 + 0.4 * rand())


def parse_heartbeat_interval(config: dict[str, Any], current: float) -> float:
    """The server's heartbeat_interval, if it is a sane number of seconds; else `current`."""
    value = config.get("heartbeat_interval")
    if isinstance(value, int | float) and not isinstance(value, bool) and 0.1 <= value <= 3600:
        return float(value)
    return current


# ---------------------------------------------------------------------------- logging


_OUR_HANDLER = "_wcms_client_handler"


def configure_logging(config: ClientConfig, *, console: bool) -> None:
    """client.log in the log dir, rotated; plus stderr in the foreground."""
    logger = logging.getLogger("wcms")
    for handler in [h for h in logger.handlers if getattr(h, _OUR_HANDLER, False)]:
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(config.log_level)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = []
    try:
        config.log_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                config.log_file, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8"
            )
        )
    except OSError as exc:
        print(f"wcms client: cannot write {config.log_file}: {exc}", file=sys.stderr)
    if console:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        setattr(handler, _OUR_HANDLER, True)
        handler.setFormatter(formatter)
        logger.addHandler(handler)
