"""The leader lease: which one process of all nodes runs the background duties.

The presence checker (marking silent PCs lost), command expiry and retention must run
somewhere, and once: every process runs its background loop (each writes its own buffered
heartbeats and replays its node's kept shutdown signals), but only the leader does those
duties. On PostgreSQL the lease is a session-level advisory lock held on a connection of its
own, keyed by the schema (servers of different schemas on one database, like the tests', each
have their leader): when the leader's process dies, PostgreSQL sees its connection close and
frees the lock, and a standby takes it at its next check (within one check interval). A leader
whose connection broke (PostgreSQL restarted) finds out at its next check and tries again like
a standby. The duties' writes are conditional besides (a PC flips lost once, a command expires
once), so two leaders for a moment would do no harm. On SQLite the one process always leads.
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection, Engine, text

log = logging.getLogger(__name__)

LEADER_LOCK = 0x6C656164  # "lead": the first key; the second is the schema's hash
_KEY = "CAST(:k AS integer), hashtext(current_schema())"  # the two int4 keys
_TAKE = text(f"SELECT pg_try_advisory_lock({_KEY})")
_RELEASE = text(f"SELECT pg_advisory_unlock({_KEY})")
_HOLDS = text(
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND pid = pg_backend_pid() AND classid::bigint = :k"
)


class LeaderLease:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.shared = engine.dialect.name == "postgresql"
        self._conn: Connection | None = None

    @property
    def leading(self) -> bool:
        """Whether this process led at its last check (for /healthz)."""
        return not self.shared or self._conn is not None

    def check(self) -> bool:
        """Whether this process leads now: keeps the lease, or tries to take it."""
        if not self.shared:
            return True
        if self._conn is not None:
            try:
                if self._conn.execute(_HOLDS, {"k": LEADER_LOCK}).scalar() == 1:
                    return True
                log.warning("the leader lease was lost; trying to take it again")
            except Exception as exc:
                log.warning("the leader lease's connection broke (%s); trying again", exc)
            self._drop()
        try:
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except Exception:
            return False  # the database is away: nobody leads until it is back
        try:
            if conn.execute(_TAKE, {"k": LEADER_LOCK}).scalar():
                self._conn = conn
                log.info("this process leads the background duties")
                return True
        except Exception as exc:
            log.warning("the leader lease could not be asked for: %s", exc)
        conn.close()
        return False

    def release(self) -> None:
        """Let a standby take over at once (a graceful stop)."""
        if self._conn is not None:
            try:
                self._conn.execute(_RELEASE, {"k": LEADER_LOCK})
            except Exception:
                log.debug("the leader lease was not released cleanly", exc_info=True)
            self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()  # never back into the pool: it may still hold the lock
                conn.close()
            except Exception:
                log.debug("closing the lease's connection failed", exc_info=True)
