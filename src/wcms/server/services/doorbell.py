"""Per-PC wake-ups for the command long poll: no database polling while a request waits.

A waiting poll registers an Event for its PC *before* it looks in the database, so a command
queued between the look and the wait still rings it. Under gevent (the production server)
threading.Event is cooperative, so thousands of polls wait in one process for a few hundred
bytes each. The bell is per process; other processes ring it through the notifier
(server/notifier.py), and an idle mark is believed for IDLE_TTL seconds at most.

A revoked token (the PC registered again, or was deleted) rings the PC's polls with `revoked`
set: each checks its own token in the database and answers 401 if it was the one revoked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

# How long "this PC has nothing open" is believed without a look in the database: a wake-up
# from another process that was lost (server/notifier.py) delays a command by at most this.
IDLE_TTL = 300.0


class Bell:
    """One waiting poll's wake-up; `revoked`: a token of its PC was revoked meanwhile.

    It holds an Event made when the poll starts, not a subclass of threading.Event: gunicorn's
    master imports this module before the worker patches the standard library, so a class
    derived from threading.Event at import time stays the OS-thread Event, whose set() under
    gevent switched to the woken poll at once. A bulk command's ring() then ran all 1,000
    deliveries inside the admin's request (p99 2.1 s against 0.37 s, bench/bulk_command.py).
    gevent's own Event (what threading.Event is once patched) only schedules the waiters.
    """

    __slots__ = ("_event", "revoked")

    def __init__(self) -> None:
        self._event = threading.Event()  # looked up now: gevent's, in the server's worker
        self.revoked = False

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)


class Doorbell:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, set[Bell]] = {}
        self.closed = False  # the server is stopping: polls answer at once
        # PCs known to have no open command, so an empty poll need not ask the database, and
        # a counter per PC that ring() moves, so a check that raced a new command is ignored.
        self._idle: dict[int, float] = {}  # pc_id -> monotonic time of the mark
        self._rings: dict[int, int] = {}

    def close(self) -> int:
        """Wake every waiting poll and let new ones answer at once (the server is stopping)."""
        with self._lock:
            self.closed = True
            events = [e for waiting in self._waiting.values() for e in waiting]
        for event in events:
            event.set()
        return len(events)

    @contextmanager
    def listen(self, pc_id: int) -> Iterator[Bell]:
        """A Bell set by the next ring() or revoke() for `pc_id`, while the block lasts."""
        event = Bell()
        with self._lock:
            if self.closed:
                event.set()
            self._waiting.setdefault(pc_id, set()).add(event)
        try:
            yield event
        finally:
            with self._lock:
                events = self._waiting.get(pc_id)
                if events is not None:
                    events.discard(event)
                    if not events:
                        del self._waiting[pc_id]

    def ring(self, pc_ids: Iterable[int]) -> int:
        """Wake every poll waiting for one of `pc_ids` (they have work now); answer how many."""
        ids = list(pc_ids)
        with self._lock:
            for pc_id in ids:
                self._rings[pc_id] = self._rings.get(pc_id, 0) + 1
                self._idle.pop(pc_id, None)
            events = [e for pc_id in ids for e in self._waiting.get(pc_id, ())]
        for event in events:
            event.set()
        return len(events)

    def resync(self) -> int:
        """Wake-ups may have been missed: forget every idle mark and wake every waiting poll
        to look in the database."""
        with self._lock:
            self._idle.clear()
            for pc_id in self._waiting:
                self._rings[pc_id] = self._rings.get(pc_id, 0) + 1
            events = [e for waiting in self._waiting.values() for e in waiting]
        for event in events:
            event.set()
        return len(events)

    def revoke(self, pc_ids: Iterable[int]) -> int:
        """A token of each of `pc_ids` was revoked: wake their polls to check theirs."""
        ids = list(pc_ids)
        with self._lock:
            events = [e for pc_id in ids for e in self._waiting.get(pc_id, ())]
            for event in events:
                event.revoked = True
        for event in events:
            event.set()
        return len(events)

    def listening(self, pc_ids: Iterable[int]) -> set[int]:
        """Which of `pc_ids` have a poll waiting now."""
        with self._lock:
            return {pc_id for pc_id in pc_ids if pc_id in self._waiting}

    @property
    def waiting(self) -> int:
        with self._lock:
            return sum(len(events) for events in self._waiting.values())

    def is_idle(self, pc_id: int) -> bool:
        """True when the PC is known to have no queued or unacknowledged command (a mark is
        believed for IDLE_TTL seconds)."""
        marked = self._idle.get(pc_id)
        return marked is not None and time.monotonic() - marked < IDLE_TTL

    def rings(self, pc_id: int) -> int:
        """Read before looking in the database; hand it to mark_idle() afterwards."""
        with self._lock:
            return self._rings.get(pc_id, 0)

    def mark_idle(self, pc_id: int, rings_before: int) -> None:
        """The database had nothing open for the PC, unless a command came in meanwhile."""
        with self._lock:
            if self._rings.get(pc_id, 0) == rings_before:
                self._idle[pc_id] = time.monotonic()

    def mark_busy(self, pc_id: int) -> None:
        """The PC has commands out (they may need delivering again)."""
        with self._lock:
            self._idle.pop(pc_id, None)
