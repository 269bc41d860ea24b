"""Rate limits kept in the database, checked and consumed in one conditional UPDATE.

Each key (an address, a user name, a global budget) is a GCRA bucket: one row holding its
"theoretical arrival time" (tat, epoch seconds). A request is let through when
`tat - now <= tolerance`, and passing moves tat one interval on, in the same UPDATE: a burst of
concurrent requests (slow bodies, many processes, several nodes) cannot all pass one check that
only one of them may pass, and a restart forgets nothing. What only failures should drain (wrong
PINs, wrong passwords) is taken before the work and given back when it succeeds, so a room of PCs
registering with the right PIN from behind one address never runs its bucket dry.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, bindparam, case, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from wcms.server.db import affected, table
from wcms.server.models import RateLimit

_RL = table(RateLimit)
_TAKE = (
    update(_RL)
    .where(_RL.c.key == bindparam("rl_key"), _RL.c.tat - bindparam("rl_now") <= bindparam("rl_tau"))
    .values(
        tat=case((_RL.c.tat > bindparam("rl_now"), _RL.c.tat), else_=bindparam("rl_now"))
        + bindparam("rl_interval")
    )
)
_GIVE_BACK = (
    update(_RL)
    .where(_RL.c.key == bindparam("rl_key"))
    .values(tat=_RL.c.tat - bindparam("rl_interval"))
)
_TAT = select(_RL.c.tat).where(_RL.c.key == bindparam("rl_key"))


@dataclass(frozen=True)
class Rule:
    """`burst` at once, then `per_minute` a minute."""

    per_minute: float
    burst: int

    @property
    def interval(self) -> float:
        return 60.0 / self.per_minute

    @property
    def tolerance(self) -> float:
        return self.interval * (self.burst - 1)


class Limited(Exception):
    """A limit refused the request; `retry_after` seconds until it would pass."""

    def __init__(self, key: str, retry_after: float) -> None:
        super().__init__(f"{key}: retry after {retry_after:.1f} s")
        self.key = key
        self.retry_after = retry_after


@dataclass
class Taken:
    """What one attempt consumed; `give_back()` when the attempt turned out not to count."""

    limits: Limits
    keys: list[tuple[str, Rule]] = field(default_factory=list)

    def give_back(self) -> None:
        for key, rule in self.keys:
            self.limits.give_back(key, rule)
        self.keys.clear()


class Limits:
    """The shared rate limits of every process and node (table rate_limits)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextlib.contextmanager
    def _begin(self) -> Iterator[Connection]:
        """A transaction that, on PostgreSQL, does not wait for its WAL to reach the disk
        (`synchronous_commit = off`, for this transaction only). A crash may forget the last
        fraction of a second of counts, which a limit can afford; waiting cost a flush per
        commit, five commits per refused login, and each flush blocks the whole (gevent)
        worker: a login flood of 50 refusals a second pushed the shutdown signal's p99 past
        100 ms (tests/security/test_login_flood.py)."""
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
            yield conn

    def take(self, key: str, rule: Rule, now: float | None = None) -> float:
        """Consume one request of `key`: 0.0 when it passes, else seconds until it would.

        Commits (its own short connection): a limit must hold across concurrent requests and
        processes, whatever becomes of the request's own transaction."""
        now = time.time() if now is None else now
        params = {
            "rl_key": key,
            "rl_now": now,
            "rl_tau": rule.tolerance,
            "rl_interval": rule.interval,
        }
        for _ in range(3):  # a first request for the key races its INSERT at most once
            with self._begin() as conn:
                if affected(conn.execute(_TAKE, params)) == 1:
                    return 0.0
                tat = conn.execute(_TAT, params).scalar()
            if tat is not None:
                wait = float(tat) - rule.tolerance - now
                if wait > 0:
                    return wait
                # The row appeared between the UPDATE and the SELECT (another request's first
                # INSERT committed meanwhile) and has room: take it again, do not refuse.
                continue
            try:
                with self._begin() as conn:
                    conn.execute(insert(_RL).values(key=key, tat=now + rule.interval))
                return 0.0
            except IntegrityError:
                continue
        raise Limited(key, rule.interval)  # pragma: no cover - three lost races in a row

    def take_all(self, rules: Sequence[tuple[str, Rule]], now: float | None = None) -> Taken:
        """Consume one request of every key, or none of them: raise Limited for the first
        that refuses (the ones already taken are given back)."""
        taken = Taken(self)
        for key, rule in rules:
            wait = self.take(key, rule, now)
            if wait > 0:
                taken.give_back()
                raise Limited(key, wait)
            taken.keys.append((key, rule))
        return taken

    def give_back(self, key: str, rule: Rule) -> None:
        with self._begin() as conn:
            conn.execute(_GIVE_BACK, {"rl_key": key, "rl_interval": rule.interval})

    def prune(self, now: float | None = None) -> int:
        """Forget buckets that have refilled (their tat is past): they hold nothing."""
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            return affected(conn.execute(delete(_RL).where(_RL.c.tat < now)))


# The rules, in one place (docs/SECURITY.md explains them).
PIN_PER_ADDRESS = Rule(per_minute=10, burst=30)  # wrong PINs from one address
PIN_GLOBAL = Rule(per_minute=60, burst=200)  # wrong PINs from everywhere, against guessing
LOGIN_PER_ADDRESS = Rule(per_minute=5, burst=10)  # failed logins from one address, any name
LOGIN_PER_USER = Rule(per_minute=5, burst=10)  # failed logins for one user name, any address
LOGIN_GLOBAL = Rule(per_minute=30, burst=60)  # failed logins from everywhere


def pin_rules(address: str) -> list[tuple[str, Rule]]:
    return [("pin:global", PIN_GLOBAL), (f"pin:addr:{address}", PIN_PER_ADDRESS)]  # as login


def login_rules(username: str, address: str) -> list[tuple[str, Rule]]:
    # The global budget first: in a flood it is the one that refuses, and then with nothing
    # written (no bucket made for each new address and name, nothing to give back).
    return [
        ("login:global", LOGIN_GLOBAL),
        (f"login:addr:{address}", LOGIN_PER_ADDRESS),
        (f"login:user:{username.casefold()[:64]}", LOGIN_PER_USER),
    ]
