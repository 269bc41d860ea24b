"""Per-process server state: settings, database, the heartbeat buffer, the live bus, limiters."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from wcms.protocol import PresenceMode, PresenceTiming
from wcms.server.config import Settings
from wcms.server.db import db_unavailable, unit_of_work, utcnow
from wcms.server.hashpool import HashPool
from wcms.server.lease import LeaderLease
from wcms.server.models import Setting
from wcms.server.notifier import Notifier, for_engine
from wcms.server.services import command_queue, pc_service, retention
from wcms.server.services.doorbell import Doorbell
from wcms.server.services.heartbeats import HeartbeatBuffer
from wcms.server.services.live import Bus
from wcms.server.services.outbox import Outbox
from wcms.server.services.pc_service import SignalWriter, Transition
from wcms.server.services.ratelimit import Limits
from wcms.server.services.spool import ShutdownJournal, apply_kept

log = logging.getLogger(__name__)

PRUNE_EVERY = 3600.0  # seconds between retention passes
FLUSH_BATCH = 100  # buffered heartbeats that are worth a write at once
FLUSH_MAX_WAIT = 1.0  # seconds a buffered heartbeat waits at most, when few come in
# A token this server revokes (re-registration, deletion) leaves the cache at once; the TTL only
# bounds how long a change made to the database from outside goes unnoticed.
TOKEN_CACHE_TTL = 600.0  # seconds a token lookup is trusted before the database is asked again


class TokenCache:
    """Which PC each bearer token belongs to, kept per process by the token's SHA-256.

    A token this server revokes leaves at once (`forget`, `forget_pc`); the TTL only bounds how
    long a change made from outside (another process, the CLI) goes unnoticed. The seam for a
    shared backend (scale-out): its `forget*` would also reach the other processes.
    """

    def __init__(self, ttl: float = TOKEN_CACHE_TTL) -> None:
        self.ttl = ttl
        self._hits: dict[str, tuple[int, str, float]] = {}  # digest -> (pc_id, machine_id, at)

    def fresh(self, digest: str) -> tuple[int, str] | None:
        """(pc_id, machine_id) of a token looked up within the TTL, else None."""
        hit = self._hits.get(digest)
        if hit is None or time.monotonic() - hit[2] > self.ttl:
            return None
        return hit[0], hit[1]

    def known(self, digest: str) -> tuple[int, str] | None:
        """(pc_id, machine_id) of a token looked up at any time (the database is away)."""
        hit = self._hits.get(digest)
        return None if hit is None else (hit[0], hit[1])

    def remember(self, digest: str, pc_id: int, machine_id: str, at: float | None = None) -> None:
        self._hits[digest] = (pc_id, machine_id, time.monotonic() if at is None else at)

    def forget(self, digest: str) -> None:
        """The database says this token is gone."""
        self._hits.pop(digest, None)

    def forget_pc(self, pc_id: int) -> None:
        """Every token of this PC (it registered again, or was deleted)."""
        for digest in [d for d, hit in self._hits.items() if hit[0] == pc_id]:
            self._hits.pop(digest, None)

    def clear(self) -> None:
        self._hits.clear()

    def __contains__(self, digest: object) -> bool:
        return digest in self._hits


class PresenceSettings:
    """The presence mode in force and its timing (cached per mode: every request asks).

    `load` reads the mode an admin chose at start; `changed` is called when an admin changes
    it. The seam for a shared backend (scale-out): a change in one process reaching the others.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.mode = settings.presence_mode
        self._timings: dict[PresenceMode, PresenceTiming] = {}

    @property
    def timing(self) -> PresenceTiming:
        timing = self._timings.get(self.mode)
        if timing is None:
            timing = self._timings[self.mode] = self._settings.timing(self.mode)
        return timing

    def changed(self, mode: PresenceMode) -> None:
        """An admin chose `mode` (already committed to the settings table)."""
        self.mode = mode

    def load(self, sessions: sessionmaker[Session]) -> None:
        """The presence mode an admin chose in the dashboard wins over the environment."""
        with sessions() as s:
            value = s.execute(select(Setting.value).where(Setting.key == "presence_mode")).scalar()
        modes = {m.value for m in PresenceMode}
        self.mode = PresenceMode(value) if value in modes else self._settings.presence_mode


class Limiters:
    """What holds back abuse: the shared rate limits (in the database, so the same for every
    process and node) and the pool that runs argon2 off the request path."""

    def __init__(self, engine: Engine, hash_nice: int) -> None:
        self.rates = Limits(engine)
        self.hashing = HashPool(nice=hash_nice)


@dataclass
class Runtime:
    """The process's state, as named components: `tokens` (token cache), `doorbell` (wakes
    command long polls), `bus` (live events for dashboards), `limiters` (rate limits, hash
    pool), `presence` (mode and timing), plus the heartbeat buffer, the outbox and the shutdown
    journal. Callers use the components' methods (`tokens.forget_pc`, `doorbell.ring`,
    `presence.changed`), never their insides."""

    settings: Settings
    secret_key: str
    engine: Engine
    sessions: sessionmaker[Session]
    buffer: HeartbeatBuffer
    bus: Bus = field(default_factory=Bus)
    doorbell: Doorbell = field(default_factory=Doorbell)  # wakes command long polls per PC
    outbox: Outbox = field(default_factory=Outbox)  # fresh commands for woken polls
    tokens: TokenCache = field(default_factory=TokenCache)
    _stop: threading.Event = field(default_factory=lambda: threading.Event())  # gevent's, later
    _thread: threading.Thread | None = None
    # Shutdown signals the database could not take, kept on disk until it answers again.
    spool: ShutdownJournal = field(init=False)
    presence: PresenceSettings = field(init=False)
    limiters: Limiters = field(init=False)
    # Tells the other processes and nodes (server/notifier.py); in-process on SQLite.
    notifier: Notifier = field(init=False)
    # Whether this process runs the background duties of all (server/lease.py).
    lease: LeaderLease = field(init=False)
    # Shutdown signals, many per commit on PostgreSQL (pc_service.SignalWriter).
    signals: SignalWriter = field(init=False)

    def __post_init__(self) -> None:
        self.spool = ShutdownJournal(self.settings.data_dir / "spool")
        self.presence = PresenceSettings(self.settings)
        self.limiters = Limiters(self.engine, self.settings.hash_nice)
        self.notifier = for_engine(self.engine)
        self.lease = LeaderLease(self.engine)
        self.signals = SignalWriter(gather=not self.settings.on_sqlite)
        self.notifier.on("wake", self.doorbell.ring)
        self.notifier.on("revoke", self._revoked_elsewhere)
        self.notifier.on("settings", self._settings_elsewhere)
        self.notifier.on("live", self._live_elsewhere)
        self.notifier.on_resync(self._resync)

    # ------------------------------------------------------------ what other processes tell

    def _revoked_elsewhere(self, pc_ids: list[int]) -> None:
        for pc_id in pc_ids:
            self.forget_tokens(int(pc_id))

    def _settings_elsewhere(self, data: dict[str, Any]) -> None:
        self.presence.changed(PresenceMode(data["presence_mode"]))

    def _live_elsewhere(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            kind, pc_id = message.get("type"), message.get("pc_id")
            if kind == "presence" and isinstance(pc_id, int):  # keep the online cache in step
                self.buffer.set_online(pc_id, message.get("state") == "online")
            elif kind == "pc_deleted" and isinstance(pc_id, int):
                self.buffer.set_online(pc_id, False)
            self.bus.publish(message)

    def _resync(self) -> None:
        """Notifications may have been missed: nothing cached is believed any longer."""
        self.tokens.clear()
        self.doorbell.resync()
        self.presence.load(self.sessions)
        self.bus.publish({"type": "resync"})

    # ------------------------------------------------------------ telling the others

    def broadcast(self, message: dict[str, Any]) -> None:
        """A live event for every dashboard, on this process and the others."""
        self.bus.publish(message)
        self.notifier.post(message)

    def wake(self, s: Session, pc_ids: list[int]) -> None:
        """Before `s` commits new commands for `pc_ids`: the other processes ring their
        doorbells on commit (this one rings after its commit, `doorbell.ring`)."""
        self.notifier.send(s, "wake", list(pc_ids))

    def revoke(self, s: Session, pc_id: int) -> None:
        """Before `s` commits a revocation of `pc_id`'s token: the other processes forget it
        on commit (this one after its commit, `forget_tokens`)."""
        self.notifier.send(s, "revoke", [pc_id])

    def settings_changed(self, s: Session, mode: PresenceMode) -> None:
        """Before `s` commits a new presence mode; this process applies it after its commit."""
        self.notifier.send(s, "settings", {"presence_mode": str(mode)})

    def forget_tokens(self, pc_id: int) -> None:
        """A PC's token was revoked (it registered again, or was deleted): drop it from the
        cache and wake the PC's waiting polls, which check their token and answer 401 if it
        was theirs. Other PCs keep theirs."""
        self.tokens.forget_pc(pc_id)
        self.doorbell.revoke([pc_id])

    def wire_config(self) -> dict[str, Any]:
        return {**self.presence.timing.as_wire(), "presence_mode": str(self.presence.mode)}

    def agent_answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """An answer to a PC: every one carries the timing, so clients follow a mode change."""
        return {**body, "config": self.wire_config()}

    def load_mode(self) -> None:
        """The presence mode an admin chose in the dashboard wins over the environment."""
        self.presence.load(self.sessions)

    def publish(self, transitions: list[Transition] | Transition | None) -> None:
        """Tell the dashboard about state changes and keep the online cache in step."""
        if transitions is None:
            return
        for t in transitions if isinstance(transitions, list) else [transitions]:
            self.buffer.set_online(t.pc_id, t.to_state == "online")
            self.broadcast(t.as_message())

    # ------------------------------------------------------------ background work

    def start_background(self) -> None:
        if self._thread is None:
            self.notifier.start()
            try:  # signals a crash left on disk, before the checker can call those PCs lost
                self.replay_shutdowns()
            except Exception:
                log.exception("kept shutdown signals not replayed at start; the loop retries")
            self._thread = threading.Thread(target=self._loop, name="wcms-presence", daemon=True)
            self._thread.start()

    def begin_shutdown(self) -> None:
        """The process is stopping: answer waiting polls and end live streams now, so the
        graceful stop takes a moment instead of a whole poll timeout."""
        self.doorbell.close()
        self.bus.publish({"type": "server_closing"})

    def stop_background(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.notifier.stop()
        self.lease.release()
        try:
            self.tick(utcnow(), check=False)  # write what is still buffered
        except Exception as exc:  # the database is away: kept shutdown signals stay on disk
            log.warning("could not write what was buffered before stopping: %s", exc)
        self.spool.close()

    def _loop(self) -> None:
        next_check = 0.0
        next_prune = time.monotonic() + 60  # not in the busy first minute after a start
        last_flush = 0.0
        # Under load, batches go out every flush_interval (short waits for the requests); when
        # only a few PCs call, they wait up to a second, so a batch is not a handful of rows.
        max_wait = max(FLUSH_MAX_WAIT, self.settings.flush_interval)
        db_away = False  # logged once per outage, not at every try
        # After an outage nobody is judged lost for a while: the other processes and nodes
        # first write the heartbeats they took meanwhile and replay the shutdown signals they
        # kept (this process's own come first in tick()). Without it the leader marked `lost`
        # a PC whose signal another node was about to replay (tests/security/test_db_outage.py).
        grace = 2 * (self.presence.timing.check_interval + max_wait)
        checks_from = 0.0
        while not self._stop.wait(
            min(self.settings.flush_interval, self.presence.timing.check_interval)
        ):
            mono = time.monotonic()
            due = mono >= next_check
            full = (
                self.buffer.pending_count() >= FLUSH_BATCH
                or self.outbox.has_marks()
                or self.spool.kept()  # kept shutdown signals: replay once the database is back
                or mono - last_flush >= max_wait
            )
            try:
                if due or full:
                    last_flush = mono
                    # Every process writes its own buffer; one (the leader) checks for all.
                    may_check = not db_away and mono >= checks_from  # not in the first tick back
                    self.tick(utcnow(), check=due and self.lease.check() and may_check)
                    if db_away:
                        log.warning("the database answers again; no PC judged lost for %g s", grace)
                        db_away = False
                        checks_from = time.monotonic() + grace
                if mono >= next_prune:
                    next_prune = mono + PRUNE_EVERY
                    if self.lease.leading:
                        self.prune(utcnow())
            except Exception as exc:  # the loop must outlive a database hiccup
                if not db_unavailable(exc):
                    log.exception("presence loop failed; trying again")
                elif not db_away:
                    db_away = True
                    name = type(exc).__name__
                    log.warning("the database is away (%s); the loop keeps trying", name)
            if due:
                next_check = mono + self.presence.timing.check_interval

    def prune(self, now: dt.datetime) -> dict[str, int]:
        """Delete rows past their retention (metric samples, power events, dead PINs)."""
        with unit_of_work(self.sessions) as s:
            counts = retention.prune(
                s, now, self.settings.metrics_retention_days, self.settings.events_retention_days
            )
        counts["rate_limits"] = self.limiters.rates.prune(now.timestamp())
        if any(counts.values()):
            log.info("retention: deleted %s", counts)
        return counts

    def tick(self, now: dt.datetime, check: bool = True) -> list[Transition]:
        """Replay kept shutdown signals, write delivery marks and buffered heartbeats, then (if
        `check`) mark overdue PCs lost and expire overdue commands.

        The replay comes first and raises while the database is away, so a PC whose signal
        waits on disk is never judged `lost` before its signal is applied."""
        self.replay_shutdowns()
        if check and self.spool.kept():
            # Another worker of this node is replaying kept signals: no PC is judged lost
            # before its signal is applied.
            check = False
        timing = self.presence.timing
        with self.sessions() as s:
            self.outbox.flush(s)
            changed = self.buffer.flush(s, timing.offline_after)
            if check:
                changed += pc_service.mark_overdue_lost(s, now, timing.check_interval)
        self.publish(changed)
        if check:
            self.outbox.prune()
            self.expire_commands(now)
        return changed

    def replay_shutdowns(self) -> list[Transition]:
        """Apply the shutdown signals kept on disk while the database was away, oldest first,
        each as of the time it arrived (services/spool.py); the journal is forgotten only after
        its last commit. Raises (leaving the rest kept) while the database is still away."""
        applied: list[Transition] = []
        for _ in range(2):  # a claimed file a crash left behind, then the journal
            if not self.spool.kept():
                break
            batch = self.spool.claim()
            if batch is None:
                break
            with self.sessions() as s:
                for signal in batch:
                    try:
                        t = apply_kept(s, signal)
                    except Exception as exc:
                        _rollback_quietly(s)
                        if db_unavailable(exc):
                            raise
                        log.exception("kept shutdown signal #%d not applied; dropped", signal.seq)
                        continue
                    if t is not None:
                        applied.append(t)
                        self.publish(t)
            self.spool.done(batch)
            log.warning("replayed %d kept shutdown signal(s)", len(batch))
        return applied

    def expire_commands(self, now: dt.datetime) -> None:
        """Expire commands nobody fetched in time; fail running ones that never reported."""
        with unit_of_work(self.sessions) as s:
            changes = command_queue.expire_overdue(s, now)
        for change in changes:  # after the commit
            self.broadcast(change.as_message())


def _rollback_quietly(s: Session) -> None:
    try:
        s.rollback()
    except Exception:  # the connection is gone; closing the session discards it
        log.debug("rollback failed", exc_info=True)
