"""Password hashing off the request path: one low-priority OS thread and a bounded queue.

argon2 costs about 0.2 s of CPU by design. Run on the one gevent worker, two dozen logins in
flight stalled every heartbeat and shutdown signal for seconds. Here the hash runs in a real OS
thread (argon2-cffi releases the GIL), niced so the worker's own thread wins the CPU, while the
request's greenlet waits for it at no cost. Waiting is where a flood should spend its time: a
login answered "busy" at once would only come back at once, and its requests, not the hashes,
would then load the worker. The queue is bounded (in all, and per client address); a login
beyond it is refused at once (429). The bound is per process on purpose: it protects this
process's CPU. How many passwords are checked at all is bounded by the shared limits
(services/ratelimit.py), which run before the hash.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

THREADS = 1  # hashing threads per process (argon2 itself uses several lanes)
MAX_IN_FLIGHT = 32  # hashes running or waiting in this process (about 6 s of work)
PER_ADDRESS = 4  # hashes running or waiting for one client address
NICE = 10  # the hashing thread's priority below the request thread's


class Busy(Exception):
    """Too many password checks in flight (in all, or from this address)."""


def _patched() -> bool:
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a server dependency
        return False
    return bool(monkey.is_module_patched("threading"))


def _lower_priority(nice: int) -> None:
    # Linux: a thread's own id takes a per-thread nice value, inherited by argon2's lanes.
    if nice <= 0:
        return
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not permitted
        os.setpriority(os.PRIO_PROCESS, _native_thread_id(), nice)


def _native_thread_id() -> int:
    from gevent.monkey import get_original

    get_id: Callable[[], int] = get_original("threading", "get_native_id")
    return get_id()


class HashPool:
    def __init__(
        self,
        threads: int = THREADS,
        max_in_flight: int = MAX_IN_FLIGHT,
        per_address: int = PER_ADDRESS,
        nice: int = NICE,
    ) -> None:
        self.nice = nice
        self.threads = threads
        self.max_in_flight = max_in_flight
        self.per_address = per_address
        self._lock = threading.Lock()
        self._in_flight = 0
        self._by_address: Counter[str] = Counter()
        self._pool: Any = None  # gevent's ThreadPool, made on first use (after the fork)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def run(self, address: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the hashing thread (inline without gevent); Busy when full."""
        with self._lock:
            if (
                self._in_flight >= self.max_in_flight
                or self._by_address[address] >= self.per_address
            ):
                raise Busy(address)
            self._in_flight += 1
            self._by_address[address] += 1
        try:
            return self._call(fn, *args)
        finally:
            with self._lock:
                self._in_flight -= 1
                self._by_address[address] -= 1
                if self._by_address[address] <= 0:
                    del self._by_address[address]

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if not _patched():  # the CLI, tests in-process: no hub to keep responsive
            return fn(*args)
        if self._pool is None:
            from gevent.threadpool import ThreadPool

            self._pool = ThreadPool(self.threads)
        result: T = self._pool.apply(_niced, (self.nice, fn, *args))
        return result


def _niced(nice: int, fn: Callable[..., T], *args: Any) -> T:
    _lower_priority(nice)  # one cheap system call; the pool's threads are its own
    return fn(*args)
