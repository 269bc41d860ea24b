"""Telling every server process about a change: one interface, two backends (issue 12).

Per-process state (the doorbell's waiting polls and idle marks, the token cache, the presence
mode, the dashboards' live streams) must hear of a change made by any process or node. The
`Notifier` carries what they need, never the data itself:

- `wake`: command ids' PCs have new work (ids, not bodies: the poll reads the database);
- `revoke`: a PC's token was revoked (it registered again, or was deleted);
- `settings`: an admin changed the presence mode;
- `live`: dashboard events, coalesced (one NOTIFY per short tick carries many).

Backends, chosen by the database (`for_engine`):

- `Notifier`, in-process (SQLite: one process, which already applied the change itself):
  sending is a no-op.
- `PgNotifier`, PostgreSQL `LISTEN/NOTIFY`: `send` runs `pg_notify` inside the caller's
  transaction, so the message goes out exactly when the change commits and never for a change
  rolled back; `post` (live events) is sent by a background sender after a 20 ms gathering
  window. A listener thread (a greenlet under gevent) hands what other processes sent to the
  handlers; a process ignores its own messages (it applied them before sending).

A notification can be lost (the listener's connection broke, a process died between its commit
and a live event's send). Every cache tolerates that: when the listener connects again it runs
the `on_resync` handlers (the token cache is emptied, idle marks dropped and every waiting poll
woken to look in the database, the presence mode read again, open dashboard streams told to
resync); while it is disconnected, `trusted` is False and the doorbell's idle marks are not
believed; idle marks also expire on their own (services/doorbell.py).

The channel is named after the database and schema, so servers of different databases on one
PostgreSQL (the tests' schemas) never hear each other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import select
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

MAX_PAYLOAD = 7900  # bytes; PostgreSQL refuses a NOTIFY payload of 8000 bytes or more
GATHER = 0.02  # seconds live events wait for company before they are sent
RECONNECT_WAIT = (0.2, 5.0)  # the listener's first and longest wait between connection tries
_NOTIFY = text("SELECT pg_notify(:channel, :payload)")

Handler = Callable[[Any], object]


class Notifier:
    """The in-process backend: one process, so every change is already known to it."""

    shared = False  # True when other processes may be serving the same database

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._resync: list[Callable[[], None]] = []

    def on(self, kind: str, handler: Handler) -> None:
        """Call `handler(data)` for each `kind` message another process sends."""
        self._handlers[kind] = handler

    def on_resync(self, handler: Callable[[], None]) -> None:
        """Call `handler()` when messages may have been missed (the listener reconnected)."""
        self._resync.append(handler)

    @property
    def trusted(self) -> bool:
        """Whether no message can be missing right now (the listener is connected)."""
        return True

    def send(self, session: Session, kind: str, data: Any) -> None:
        """Tell the other processes `kind`/`data` when `session` commits (it has not yet)."""

    def post(self, message: dict[str, Any]) -> None:
        """A live event for the other processes' dashboards, sent within a tick."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    # ---- shared by the backends

    def dispatch(self, kind: str, data: Any) -> None:
        handler = self._handlers.get(kind)
        if handler is None:
            log.warning("notification of unknown kind %r ignored", kind)
            return
        try:
            handler(data)
        except Exception:  # one bad message must not end the listener
            log.exception("notification %r not handled", kind)

    def resync(self) -> None:
        for handler in self._resync:
            try:
                handler()
            except Exception:
                log.exception("resync handler failed")


class PgNotifier(Notifier):
    """PostgreSQL LISTEN/NOTIFY (see the module's docstring)."""

    shared = True

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine
        self.origin = uuid.uuid4().hex[:12]
        self.channel = ""
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._outgoing: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._has_outgoing = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def trusted(self) -> bool:
        return not self.channel or self._connected.is_set()  # not started: one process

    def start(self) -> None:
        if self._threads:
            return
        with self.engine.connect() as conn:
            where = conn.execute(text("SELECT current_database(), current_schema()")).one()
        self.channel = channel_name(str(where[0]), str(where[1]))
        for target, name in ((self._listen, "wcms-listen"), (self._send_loop, "wcms-notify")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._connected.wait(5)  # usually at once; if not, the listener keeps trying

    def stop(self) -> None:
        self._stop.set()
        self._has_outgoing.set()
        for thread in self._threads:
            thread.join(timeout=3)

    def send(self, session: Session, kind: str, data: Any) -> None:
        if not self.channel:
            return  # not started (an app that serves nothing, as in in-process tests)
        for payload in self._payloads(kind, data):
            session.execute(_NOTIFY, {"channel": self.channel, "payload": payload})

    def post(self, message: dict[str, Any]) -> None:
        if not self.channel:
            return
        with self._lock:
            self._outgoing.append(message)
        self._has_outgoing.set()

    def _payloads(self, kind: str, data: Any) -> list[str]:
        """One payload, or several under PostgreSQL's limit: a list splits into chunks."""
        whole = self._payload(kind, data)
        fits = len(whole.encode()) <= MAX_PAYLOAD
        if fits or not isinstance(data, list) or len(data) < 2:
            # One item too large: say only "resync".
            return [whole] if fits else [self._payload("resync", None)]
        half = len(data) // 2
        return self._payloads(kind, data[:half]) + self._payloads(kind, data[half:])

    def _payload(self, kind: str, data: Any) -> str:
        return json.dumps({"o": self.origin, "k": kind, "d": data}, separators=(",", ":"))

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            self._has_outgoing.wait()
            if self._stop.is_set():
                return
            time.sleep(GATHER)  # let the events of the same moment travel together
            with self._lock:
                messages, self._outgoing = self._outgoing, []
                self._has_outgoing.clear()
            if not messages:
                continue
            try:
                with self.engine.begin() as conn:
                    for payload in self._payloads("live", messages):
                        conn.execute(_NOTIFY, {"channel": self.channel, "payload": payload})
            except Exception as exc:  # the database is away: the other dashboards resync later
                log.warning("live events not sent to the other processes: %s", exc)

    def _listen(self) -> None:
        import psycopg

        url = self.engine.url.set(drivername="postgresql")
        dsn = url.render_as_string(hide_password=False)
        wait, first = RECONNECT_WAIT[0], True
        while not self._stop.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as conn:
                    conn.execute(f"LISTEN {self.channel}")
                    self._connected.set()
                    if not first:
                        log.warning("notifier connected again: caches resync")
                        self.resync()
                    first, wait = False, RECONNECT_WAIT[0]
                    pgconn = conn.pgconn
                    while not self._stop.is_set():
                        # select() (gevent's, in the server's worker) rather than psycopg's own
                        # wait, which the worker may have bound to a blocking one (runner.py).
                        ready, _, _ = select.select([pgconn.socket], [], [], 1.0)
                        if not ready:
                            continue
                        pgconn.consume_input()  # raises when the connection is gone
                        while (note := pgconn.notifies()) is not None:
                            self._handle(note.extra.decode())
            except Exception as exc:
                if self._connected.is_set():
                    log.warning("notifier lost its connection (%s); reconnecting", exc)
                self._connected.clear()
                if self._stop.wait(wait):
                    return
                wait = min(wait * 2, RECONNECT_WAIT[1])
            finally:
                self._connected.clear()

    def _handle(self, payload: str) -> None:
        try:
            message = json.loads(payload)
            origin, kind, data = message["o"], message["k"], message.get("d")
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable notification ignored: %.80r", payload)
            return
        if origin == self.origin:
            return  # this process applied it before sending
        if kind == "resync":
            self.resync()
        else:
            self.dispatch(kind, data)


def channel_name(database: str, schema: str) -> str:
    """The LISTEN channel of one database and schema (an identifier PostgreSQL accepts)."""
    return "wcms_" + hashlib.sha256(f"{database}\0{schema}".encode()).hexdigest()[:24]


def for_engine(engine: Engine) -> Notifier:
    """PostgreSQL gets LISTEN/NOTIFY; SQLite (one process) the in-process notifier."""
    return PgNotifier(engine) if engine.dialect.name == "postgresql" else Notifier()
