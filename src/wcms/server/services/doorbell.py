"""Per-PC wake-ups for the command long poll: no database polling while a request waits.

A waiting poll registers an Event for its PC *before* it looks in the database, so a command
queued between the look and the wait still rings it. Under gevent (the production server)
threading.Event is cooperative, so thousands of polls wait in one process for a few hundred
bytes each. The bell is per process: the server runs one worker (see runner.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class Doorbell:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, set[threading.Event]] = {}
        self.closed = False  # the server is stopping: polls answer at once

    def close(self) -> int:
        """Wake every waiting poll and let new ones answer at once (the server is stopping)."""
        with self._lock:
            self.closed = True
            events = [e for waiting in self._waiting.values() for e in waiting]
        for event in events:
            event.set()
        return len(events)

    @contextmanager
    def listen(self, pc_id: int) -> Iterator[threading.Event]:
        """An Event set by the next ring() for `pc_id`, while the block lasts."""
        event = threading.Event()
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
        """Wake every poll waiting for one of `pc_ids`; answer how many were woken."""
        with self._lock:
            events = [e for pc_id in pc_ids for e in self._waiting.get(pc_id, ())]
        for event in events:
            event.set()
        return len(events)

    @property
    def waiting(self) -> int:
        with self._lock:
            return sum(len(events) for events in self._waiting.values())
