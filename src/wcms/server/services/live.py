"""In-process publish/subscribe of changes, for the dashboard's live stream.

Subscribers get a bounded queue; a slow one loses its oldest messages rather than holding up
the publisher (it is told to reload). Under gevent the queue is cooperative (monkey-patched).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

MAX_QUEUED = 1000


class Bus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: set[queue.Queue[dict[str, Any]]] = set()

    def subscribe(self) -> queue.Queue[dict[str, Any]]:
        q: queue.Queue[dict[str, Any]] = queue.Queue(MAX_QUEUED)
        with self._lock:
            self._subscribers.add(q)
        return q

    def unsubscribe(self, q: queue.Queue[dict[str, Any]]) -> None:
        with self._lock:
            self._subscribers.discard(q)

    def publish(self, message: dict[str, Any]) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for q in subscribers:
            try:
                q.put_nowait(message)
            except queue.Full:
                _drain(q)
                q.put_nowait({"type": "resync"})

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)


def _drain(q: queue.Queue[dict[str, Any]]) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return
