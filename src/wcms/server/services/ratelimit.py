"""Token buckets that count only failures, so correct requests are never refused."""

from __future__ import annotations

import threading


class FailureLimiter:
    """Each key (a client address) may fail `burst` times, then `per_minute` times a minute.

    Only failures drain the bucket: a room of PCs registering with the right PIN from behind one
    address never runs it dry, while guessing PINs from that address soon does.
    """

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until `key` may fail again; 0 when it may try now."""
        with self._lock:
            tokens = self._tokens(key, now)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def failed(self, key: str, now: float) -> None:
        with self._lock:
            self._buckets[key] = (max(0.0, self._tokens(key, now) - 1), now)
            if len(self._buckets) > 10_000:
                self._forget_full(now)

    def _forget_full(self, now: float) -> None:
        full = [k for k in self._buckets if self._tokens(k, now) >= self.burst]
        for k in full:
            del self._buckets[k]
