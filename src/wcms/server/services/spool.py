"""Shutdown signals kept on the server's disk while the database is away, replayed in order.

The shutdown signal is sent once and never retried (the PC is going down), so a signal that
finds the database away must not be lost: the PC would later show `lost` instead of `off`.
`ShutdownJournal` appends it as one JSON line to `<data_dir>/spool/shutdown.jsonl` and fsyncs
before the client is answered. The background loop replays the journal, oldest first, once the
database answers, before the presence checker runs:

- the journal is claimed by renaming it to `shutdown.replaying.jsonl` (new signals start a
  fresh file), every entry is applied in its own transaction, and the claimed file is deleted
  only after the last commit;
- a crash between a commit and the delete replays the claimed entries again at the next start:
  `apply_kept` is conditional on the PC having had no contact since the signal arrived, and a signal
  already applied leaves nothing to change, so a second replay writes nothing.

Several worker processes of one node share the journal: a lock file (`flock` on
`spool/.lock`) orders every append, claim and delete across them, and one process replays at a
time (a second lock, `spool/.replay`, taken without waiting and held from the claim to the
delete; a process that finds it taken leaves the replay to its holder). The loop asks the disk
whether anything is kept (`kept`), so it also replays what another worker, since dead, kept.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from wcms.protocol import PcState, PowerReason
from wcms.server.db import affected, table
from wcms.server.models import PcInfo, PowerEvent
from wcms.server.services.pc_service import Transition

log = logging.getLogger(__name__)

JOURNAL = "shutdown.jsonl"
CLAIMED = "shutdown.replaying.jsonl"


@dataclass(frozen=True)
class SpooledSignal:
    """One shutdown signal as it arrived: which PC, why, when, and its place in the order."""

    seq: int
    pc_id: int
    machine_id: str
    reason: str
    at: dt.datetime

    def line(self) -> bytes:
        data = {
            "seq": self.seq,
            "pc_id": self.pc_id,
            "machine_id": self.machine_id,
            "reason": self.reason,
            "at": self.at.isoformat(),
        }
        return json.dumps(data, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def parse(cls, line: bytes) -> SpooledSignal:
        data: dict[str, Any] = json.loads(line)
        at = dt.datetime.fromisoformat(data["at"])
        if at.tzinfo is None:
            raise ValueError("a journal time without its zone")
        return cls(
            seq=int(data["seq"]),
            pc_id=int(data["pc_id"]),
            machine_id=str(data["machine_id"]),
            reason=str(PowerReason(data["reason"])),
            at=at.astimezone(dt.UTC),
        )


class ShutdownJournal:
    """The append-only journal of shutdown signals the database could not take (see above)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / JOURNAL
        self.claimed_path = directory / CLAIMED
        self._lock = threading.Lock()
        self._replaying: int | None = None  # the descriptor holding spool/.replay
        with self._across_processes():
            self._repair_tail(self.path)
            kept = self._read(self.claimed_path) + self._read(self.path)
        self._seq = max((e.seq for e in kept), default=0)
        self._pending = len(kept)

    @property
    def pending(self) -> int:
        """Signals this process kept, or found kept at its start, and not yet applied (read
        without the lock: a hint for /healthz)."""
        return self._pending

    def kept(self) -> bool:
        """Whether any process of this node keeps a signal on disk now (two stat calls)."""
        return self._pending > 0 or self.path.exists() or self.claimed_path.exists()

    @contextmanager
    def _across_processes(self) -> Iterator[None]:
        """This process's lock, then the node's (the workers share the journal)."""
        with self._lock:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def append(self, pc_id: int, machine_id: str, reason: str, at: dt.datetime) -> SpooledSignal:
        """Write one signal and fsync it; only then may the client hear it was taken.

        Raises OSError when the disk refuses; the journal is left as it was.
        """
        with self._across_processes():
            entry = SpooledSignal(self._seq + 1, pc_id, machine_id, reason, at)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                size = os.fstat(fd).st_size
                try:
                    data = entry.line()
                    while data:
                        data = data[os.write(fd, data) :]
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, size)  # no torn line left for the next append
                    raise
            finally:
                os.close(fd)
            if created:
                _fsync_dir(self.directory)  # the new file's name is durable too
            self._seq = entry.seq
            self._pending += 1
            return entry

    def claim(self) -> list[SpooledSignal] | None:
        """The oldest kept signals, in order: a claimed file a crash left, else the journal
        (renamed, so signals arriving meanwhile start a new one). None when nothing is kept, or
        when another worker is replaying (it holds spool/.replay until its `done`)."""
        if self._replaying is None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.directory / ".replay", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            self._replaying = fd
        with self._across_processes():
            if not self.claimed_path.exists():
                if not self.path.exists():
                    self._pending = 0  # what was counted here was replayed by another worker
                    self._end_replay()
                    return None
                os.replace(self.path, self.claimed_path)
                _fsync_dir(self.directory)
            return self._read(self.claimed_path)

    def close(self) -> None:
        """Let go of the replay lock (what the process's end does): another worker may
        replay what this one claimed and did not finish."""
        self._end_replay()

    def _end_replay(self) -> None:
        if self._replaying is not None:
            os.close(self._replaying)
            self._replaying = None

    def done(self, batch: list[SpooledSignal]) -> None:
        """The claimed signals are committed to the database: forget them."""
        with self._across_processes():
            self.claimed_path.unlink(missing_ok=True)
            _fsync_dir(self.directory)
            self._pending = max(0, self._pending - len(batch))
        self._end_replay()

    @staticmethod
    def _read(path: Path) -> list[SpooledSignal]:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return []
        entries = []
        for number, line in enumerate(raw.splitlines(keepends=True), 1):
            if not line.endswith(b"\n"):
                break  # torn by a crash mid-write: never acknowledged to its client
            try:
                entries.append(SpooledSignal.parse(line))
            except (ValueError, KeyError, TypeError):
                log.error("shutdown journal %s: line %d is unreadable; skipped", path, number)
        return entries  # in the order they were appended

    @staticmethod
    def _repair_tail(path: Path) -> None:
        """Cut a line a crash left half-written, so the next append starts on a fresh line."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        if raw and not raw.endswith(b"\n"):
            keep = raw.rfind(b"\n") + 1
            log.warning("shutdown journal %s: cutting a torn last line (%d bytes)", path, len(raw))
            with path.open("r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_PC = table(PcInfo)


def apply_kept(session: Session, signal: SpooledSignal) -> Transition | None:
    """Apply one kept signal as of the time it arrived. None when nothing changed.

    Commits: the replay forgets a signal from the journal on disk only after it is durable in
    the database, one signal at a time.

    What the signal would have done then, as long as the PC has not been in contact since
    (`last_seen` after the signal: it came back, and the old signal must not turn it off): an
    online PC goes offline with the signal's reason at the signal's time; an offline PC takes
    the signal's reason if it differs. Every change of state but one moves `last_seen` (contact,
    and a signal applied, which sets it to the signal's time), so "no contact since" also means
    "no newer signal"; the one that does not is the checker's `lost`, a guess the signal
    replaces, as it does when a signal arrives directly after a loss. Applying the same signal
    twice changes nothing the second time.
    """
    at = signal.at
    same_pc = (_PC.c.id == signal.pc_id, _PC.c.machine_id == signal.machine_id)
    quiet_since = _PC.c.last_seen <= at  # no contact after the signal arrived
    moved = session.execute(
        update(_PC)
        .where(*same_pc, quiet_since, _PC.c.state == PcState.ONLINE)
        .values(
            state=PcState.OFFLINE,
            is_online=False,
            reason=signal.reason,
            state_since=at,
            last_seen=at,
            offline_after=None,
        )
    )
    from_state: str = PcState.ONLINE
    if affected(moved) != 1:
        from_state = PcState.OFFLINE
        moved = session.execute(
            update(_PC)
            .where(
                *same_pc,
                quiet_since,
                _PC.c.state == PcState.OFFLINE,
                _PC.c.reason != signal.reason,
            )
            .values(reason=signal.reason, state_since=at, last_seen=at)
        )
    if affected(moved) != 1:
        session.rollback()
        return None
    t = Transition(signal.pc_id, from_state, PcState.OFFLINE, signal.reason, at)
    session.add(
        PowerEvent(
            pc_id=t.pc_id, from_state=t.from_state, to_state=t.to_state, reason=t.reason, at=at
        )
    )
    session.commit()
    return t
