"""Fresh commands handed to waiting polls from memory, their `delivered` marks written in batches.

A bulk command wakes every waiting poll at once. Delivering from the database would cost each
poll a SELECT, an UPDATE and a commit, one after another in the worker; instead the admin's
request stages each PC's command (the same wire form deliver() builds, read in one query), the
woken poll takes it from here, and the writer marks them all `delivered` in one executemany.

Nothing weakens the lifecycle (services/command_queue.py):

- The acknowledgement stays the commit point. acknowledge() accepts a command still `queued`
  in the database (its mark not written yet) exactly like a `delivered` one, and a command
  cancelled or expired before the ack is answered so and never runs.
- If the process dies before the marks are written, the commands are still `queued` and are
  delivered again from the database; the client runs each id once.
- A staged command is handed over only while it is young (STAGE_TTL), unexpired and not stale
  for the PC's boot (the same rule as deliver()); otherwise the database path decides.
- Cancelling discards staged commands first, so none is handed over after a cancel.
- Before a poll reads the database, pending marks are written, so a command is never handed
  over twice because its mark was late.
- A guarded command (a sealed secret, `run`, an account command) is handed over only after
  the poll's token and the PC's approval were checked in the database just before (the
  `vouch` of take()): a token revoked by anyone gets 401 and nothing; an unapproved PC's
  guarded command is left to the database path, which fails it with the reason.
- An ack or a result that arrives before the mark is written sets attempts and delivered_at
  itself (services/command_queue.py), so the late mark, which moves only queued commands, is not
  needed for them.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from wcms.protocol import CommandStatus
from wcms.server.db import BatchStatement, table
from wcms.server.models import Command
from wcms.server.services import secretbox
from wcms.server.services.command_queue import Change, guarded, refusal, wire_form

STAGE_TTL = 30.0  # seconds a staged command may wait in memory for its PC's poll

_C = table(Command)
_MARK_DELIVERED = BatchStatement(
    update(_C)
    .where(_C.c.id == bindparam("b_id"), _C.c.status == CommandStatus.QUEUED)
    .values(
        status=CommandStatus.DELIVERED,
        delivered_at=bindparam("b_at", type_=_C.c.delivered_at.type),
        attempts=_C.c.attempts + 1,
    )
)


@dataclass(frozen=True)
class Staged:
    """A queued command as deliver() would hand it over (attempts is always 0 here)."""

    id: int
    batch_id: int
    pc_id: int
    type: str
    args: dict[str, Any]  # with the secret arguments, unsealed
    queued_at: dt.datetime
    expires_at: dt.datetime
    run_when_online: bool
    staged_at: float  # time.monotonic()
    attempts: int = 0
    sealed: bool = False  # it carries a sealed secret (args hold it unsealed)


class Outbox:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._staged: dict[int, list[Staged]] = {}  # pc_id -> commands, oldest first
        self._marks: list[dict[str, Any]] = []  # delivered, not yet written

    def stage(self, commands: list[Staged]) -> None:
        with self._lock:
            for cmd in commands:
                self._staged.setdefault(cmd.pc_id, []).append(cmd)

    def discard(self, command_ids: set[int] | None = None, batch_id: int | None = None) -> None:
        """Forget staged commands (they are being cancelled): the database path decides."""
        with self._lock:
            for pc_id in list(self._staged):
                kept = [
                    c
                    for c in self._staged[pc_id]
                    if c.batch_id != batch_id and (command_ids is None or c.id not in command_ids)
                ]
                if kept:
                    self._staged[pc_id] = kept
                else:
                    del self._staged[pc_id]

    def take(
        self,
        pc_id: int,
        now: dt.datetime,
        boot_time: float | None,
        vouch: Callable[[], bool] | None = None,
    ) -> tuple[list[dict[str, Any]], list[Change], bool]:
        """The PC's staged commands that may go out now, as wire forms, their `delivered`
        changes, and whether any was left to the database path (expired, stale, too old, or
        guarded for a PC that is not approved).

        `vouch()` is called once if a guarded command would go out: it raises when the poll's
        token is no longer valid (the staged commands stay queued in the database), and
        answers whether the PC is approved. Without it, guarded commands go the database way."""
        with self._lock:
            staged = self._staged.pop(pc_id, [])
        young = time.monotonic() - STAGE_TTL
        ready: list[Staged] = []
        left = False
        for cmd in staged:
            if cmd.staged_at < young or refusal(cmd, now, boot_time) is not None:
                left = True
                continue
            ready.append(cmd)
        if any(guarded(c.type, c.sealed) for c in ready) and (vouch is None or not vouch()):
            left = True
            ready = [c for c in ready if not guarded(c.type, c.sealed)]
        wire: list[dict[str, Any]] = []
        changes: list[Change] = []
        for cmd in ready:
            wire.append(wire_form(cmd, {}, now, 1))
            changes.append(Change(cmd.id, cmd.batch_id, pc_id, CommandStatus.DELIVERED, now))
        if changes:
            with self._lock:
                self._marks += [{"b_id": c.command_id, "b_at": now} for c in changes]
        return wire, changes, left

    def has_marks(self) -> bool:
        return bool(self._marks)

    def flush(self, session: Session) -> int:
        """Write the pending `delivered` marks (only still-queued commands move).

        Commits: the marks must be durable before the database is asked what is left to
        deliver (services/command_queue.deliver), or a staged command would go out twice. On
        failure they are kept for the next try."""
        with self._lock:
            marks, self._marks = self._marks, []
        if not marks:
            return 0
        try:
            _MARK_DELIVERED.execute(session.connection(), marks)
            session.commit()
        except Exception:
            session.rollback()
            with self._lock:
                self._marks = marks + self._marks
            raise
        return len(marks)

    def prune(self) -> None:
        """Drop staged commands nobody came for (their PCs' polls went away)."""
        young = time.monotonic() - STAGE_TTL
        with self._lock:
            for pc_id in list(self._staged):
                if all(c.staged_at < young for c in self._staged[pc_id]):
                    del self._staged[pc_id]


def load(session: Session, batch_id: int, pc_ids: set[int], server_secret: str) -> list[Staged]:
    """The batch's queued commands for `pc_ids`, ready to stage (one query; the batch's sealed
    secret is opened once). A secret that cannot be opened stages nothing: deliver() fails it."""
    rows = session.execute(
        select(Command).where(Command.batch_id == batch_id, Command.status == CommandStatus.QUEUED)
    ).scalars()
    opened: dict[str, dict[str, Any]] = {}
    staged = []
    now = time.monotonic()
    for cmd in rows:
        if cmd.pc_id not in pc_ids:
            continue
        secret: dict[str, Any] = {}
        if cmd.secret:
            if cmd.secret not in opened:
                try:
                    opened[cmd.secret] = secretbox.unseal(server_secret, cmd.secret)
                except secretbox.SecretUnreadable:
                    return []
            secret = opened[cmd.secret]
        staged.append(
            Staged(
                id=cmd.id,
                batch_id=cmd.batch_id,
                pc_id=cmd.pc_id,
                type=cmd.type,
                args={**cmd.args, **secret},
                queued_at=cmd.queued_at,
                expires_at=cmd.expires_at,
                run_when_online=cmd.run_when_online,
                staged_at=now,
                sealed=cmd.secret is not None,
            )
        )
    session.rollback()
    return staged
