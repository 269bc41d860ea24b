"""Per-process server state: settings, database, the heartbeat buffer, the live bus, limiters."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from flask import current_app
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from wcms.protocol import PresenceMode, PresenceTiming
from wcms.server.config import Settings
from wcms.server.db import utcnow
from wcms.server.models import Setting
from wcms.server.services import pc_service
from wcms.server.services.heartbeats import HeartbeatBuffer
from wcms.server.services.live import Bus
from wcms.server.services.pc_service import Transition
from wcms.server.services.ratelimit import FailureLimiter

log = logging.getLogger(__name__)

TOKEN_CACHE_TTL = 60.0  # seconds a token lookup is trusted before the database is asked again


@dataclass
class Runtime:
    settings: Settings
    secret_key: str
    engine: Engine
    sessions: sessionmaker[Session]
    buffer: HeartbeatBuffer
    bus: Bus = field(default_factory=Bus)
    pin_limiter: FailureLimiter = field(default_factory=lambda: FailureLimiter(10, 30))
    login_limiter: FailureLimiter = field(default_factory=lambda: FailureLimiter(5, 10))
    mode: PresenceMode = PresenceMode.STANDARD
    # token sha256 -> (pc_id, machine_id, cached at)
    tokens: dict[str, tuple[int, str, float]] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def timing(self) -> PresenceTiming:
        return self.settings.timing(self.mode)

    def wire_config(self) -> dict[str, Any]:
        return {**self.timing.as_wire(), "presence_mode": str(self.mode)}

    def load_mode(self) -> None:
        """The presence mode an admin chose in the dashboard wins over the environment."""
        with self.sessions() as s:
            value = s.execute(select(Setting.value).where(Setting.key == "presence_mode")).scalar()
        modes = {m.value for m in PresenceMode}
        self.mode = PresenceMode(value) if value in modes else self.settings.presence_mode

    def publish(self, transitions: list[Transition] | Transition | None) -> None:
        """Tell the dashboard about state changes and keep the online cache in step."""
        if transitions is None:
            return
        for t in transitions if isinstance(transitions, list) else [transitions]:
            self.buffer.set_online(t.pc_id, t.to_state == "online")
            self.bus.publish(t.as_message())

    # ------------------------------------------------------------ background work

    def start_background(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="wcms-presence", daemon=True)
            self._thread.start()

    def stop_background(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.tick(utcnow(), check=False)  # write what is still buffered

    def _loop(self) -> None:
        next_check = 0.0
        while not self._stop.wait(min(self.settings.flush_interval, self.timing.check_interval)):
            mono = time.monotonic()
            due = mono >= next_check
            try:
                self.tick(utcnow(), check=due)
            except Exception:  # the loop must outlive a database hiccup
                log.exception("presence loop failed; trying again")
            if due:
                next_check = mono + self.timing.check_interval

    def tick(self, now: dt.datetime, check: bool = True) -> list[Transition]:
        """Flush buffered heartbeats, then (if `check`) mark overdue PCs lost."""
        timing = self.timing
        with self.sessions() as s:
            changed = self.buffer.flush(s, timing.offline_after)
            if check:
                changed += pc_service.mark_overdue_lost(s, now, timing.check_interval)
        self.publish(changed)
        return changed


def runtime() -> Runtime:
    rt: Runtime = current_app.extensions["wcms"]
    return rt
