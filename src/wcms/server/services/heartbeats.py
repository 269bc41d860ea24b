"""The heartbeat hot path: keep the newest heartbeat of each PC in memory, write them in batches.

A heartbeat from a PC this process knows to be online costs a dict assignment; the writer
flushes every `flush_interval` in one transaction (an executemany UPDATE). Anything that changes
a PC's state (offline -> online, an event like logon) is written at once by the slow path.
If another process flipped a PC offline meanwhile, the conditional UPDATE leaves it alone and
the PC is brought back through the slow path, as long as its heartbeat is newer than the flip.

What holds with several processes and nodes is kept in the database, not in this process: a
history sample is one per PC and slot (a unique index; a second process's INSERT does nothing),
and a heartbeat's disk and process lists are written when they differ from the stored ones'
hashes, whoever stored them.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Connection,
    Float,
    String,
    bindparam,
    case,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as insert_or_skip
from sqlalchemy.orm import Session

from wcms.protocol import PcState
from wcms.server.db import BatchStatement, table
from wcms.server.models import MetricSample, PcInfo, PcMetrics
from wcms.server.schemas import HeartbeatRequest
from wcms.server.services import pc_service
from wcms.server.services.pc_service import Transition

log = logging.getLogger(__name__)

# PCs written per transaction. SQLite calls block the whole (gevent) worker, so one batch of
# every pending PC would hold all requests up for its full length; between chunks the worker
# serves them (bench/heartbeats.py: p99 at 2,000 heartbeats/s).
FLUSH_CHUNK = 200


# The batch writes, each one statement run with the driver's executemany (db.BatchStatement).
_PC, _M = table(PcInfo), table(PcMetrics)
_WRITE_SEEN = BatchStatement(
    update(_PC)
    .where(_PC.c.id == bindparam("b_id"), _PC.c.state == PcState.ONLINE)
    .values(
        last_seen=bindparam("b_seen", type_=_PC.c.last_seen.type),
        offline_after=bindparam("b_deadline", type_=_PC.c.offline_after.type),
        ip_address=func.coalesce(bindparam("b_ip", type_=String), _PC.c.ip_address),
        hostname=func.coalesce(bindparam("b_host", type_=String), _PC.c.hostname),
        boot_time=func.coalesce(bindparam("b_boot", type_=Float), _PC.c.boot_time),
        client_version=func.coalesce(bindparam("b_ver", type_=String), _PC.c.client_version),
        # A heartbeat without the field keeps the user; with it (even null) it sets it.
        current_user=case(
            (bindparam("b_keep_user", type_=Boolean), _PC.c.current_user),
            else_=bindparam("b_user", type_=String),
        ),
    )
)
_WRITE_METRICS = BatchStatement(
    update(_M)
    .where(_M.c.pc_id == bindparam("b_id"))
    .values(
        at=bindparam("b_at", type_=_M.c.at.type),
        cpu_percent=func.coalesce(bindparam("b_cpu", type_=Float), _M.c.cpu_percent),
        ram_used=func.coalesce(bindparam("b_ram_used", type_=BigInteger), _M.c.ram_used),
        ram_percent=func.coalesce(bindparam("b_ram_pct", type_=Float), _M.c.ram_percent),
        uptime=func.coalesce(bindparam("b_uptime", type_=Float), _M.c.uptime),
    )
)
_WRITE_DISKS = BatchStatement(
    update(_M)
    .where(_M.c.pc_id == bindparam("b_id"))
    .values(
        disks=bindparam("b_disks", type_=_M.c.disks.type),
        disks_hash=bindparam("b_hash", type_=BigInteger),
    )
)
_WRITE_PROCESSES = BatchStatement(
    update(_M)
    .where(_M.c.pc_id == bindparam("b_id"))
    .values(
        processes=bindparam("b_procs", type_=_M.c.processes.type),
        processes_hash=bindparam("b_hash", type_=BigInteger),
    )
)
_S = table(MetricSample)
# ON CONFLICT DO NOTHING (PostgreSQL and SQLite alike): the sample of a slot another process
# wrote first is dropped, not an error.
_WRITE_SAMPLE = BatchStatement(
    insert_or_skip(_S)
    .values(
        pc_id=bindparam("b_id", type_=_S.c.pc_id.type),
        at=bindparam("b_at", type_=_S.c.at.type),
        slot=bindparam("b_slot", type_=BigInteger),
        cpu_percent=bindparam("b_cpu", type_=_S.c.cpu_percent.type),
        ram_percent=bindparam("b_ram", type_=_S.c.ram_percent.type),
    )
    .on_conflict_do_nothing()
)


@dataclass
class Pending:
    at: dt.datetime
    hb: HeartbeatRequest


class HeartbeatBuffer:
    def __init__(self, sample_interval: float) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, Pending] = {}
        self._online: set[int] = set()  # PCs this process has seen online
        # The slot of each PC's last sample this process wrote: it skips the INSERTs that
        # cannot write (the unique index is what holds across processes).
        self._last_slot: dict[int, int] = {}
        # (PC, "disks" or "procs") -> (Python's hash of the list, its stable hash): a memo.
        self._hashes: dict[tuple[int, str], tuple[int, int]] = {}
        self.sample_interval = sample_interval

    def knows_online(self, pc_id: int) -> bool:
        return pc_id in self._online

    def set_online(self, pc_id: int, online: bool) -> None:
        with self._lock:
            if online:
                self._online.add(pc_id)
            else:
                self._online.discard(pc_id)
                self._pending.pop(pc_id, None)

    def add(self, pc_id: int, hb: HeartbeatRequest, now: dt.datetime) -> None:
        with self._lock:
            self._pending[pc_id] = Pending(now, hb)

    def touch(self, pc_id: int, machine_id: str, now: dt.datetime) -> None:
        """Contact without a report (a command poll): move last_seen, keep any pending report."""
        with self._lock:
            pending = self._pending.get(pc_id)
            hb = pending.hb if pending is not None else HeartbeatRequest(machine_id=machine_id)
            self._pending[pc_id] = Pending(now, hb)

    def pending_count(self) -> int:
        return len(self._pending)

    def take(self) -> dict[int, Pending]:
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def flush(self, session: Session, offline_after: float) -> list[Transition]:
        """Write every pending heartbeat; returns the PCs brought back online meanwhile.

        Commits: one transaction per chunk, so a large flush never holds locks for long and a
        failing chunk keeps only its own heartbeats for the next try."""
        items = list(self.take().items())
        revived: list[Transition] = []
        for start in range(0, len(items), FLUSH_CHUNK):
            if start:
                time.sleep(0)  # under gevent: a yield to the requests waiting meanwhile
            try:
                revived += self._write(
                    session, dict(items[start : start + FLUSH_CHUNK]), offline_after
                )
            except Exception:
                session.rollback()
                with self._lock:  # keep what was not written, unless a newer one came in
                    for pc_id, p in items[start:]:
                        self._pending.setdefault(pc_id, p)
                raise
        return revived

    def _write(
        self, session: Session, pending: dict[int, Pending], offline_after: float
    ) -> list[Transition]:
        grace = dt.timedelta(seconds=offline_after)
        pc_rows = []
        metric_rows = []
        samples = []
        for pc_id, p in pending.items():
            hb = p.hb
            pc_rows.append(
                {
                    "b_id": pc_id,
                    "b_seen": p.at,
                    "b_deadline": p.at + grace,
                    "b_ip": hb.ip_address,
                    "b_host": hb.hostname,
                    "b_user": hb.current_user,
                    "b_keep_user": "current_user" not in hb.model_fields_set,
                    "b_boot": hb.boot_time,
                    "b_ver": hb.client_version,
                }
            )
            if hb.model_fields_set == {"machine_id"}:
                continue  # a bare contact (touch): nothing to write beyond last_seen
            metric_rows.append(
                {
                    "b_id": pc_id,
                    "b_at": p.at,
                    "b_cpu": hb.cpu_percent,
                    "b_ram_used": hb.ram_used,
                    "b_ram_pct": hb.ram_percent,
                    "b_uptime": hb.uptime,
                }
            )
            slot = int(p.at.timestamp() // self.sample_interval)
            if hb.cpu_percent is not None and self._last_slot.get(pc_id) != slot:
                self._last_slot[pc_id] = slot
                samples.append(
                    {
                        "b_id": pc_id,
                        "b_at": p.at,
                        "b_slot": slot,
                        "b_cpu": hb.cpu_percent,
                        "b_ram": hb.ram_percent,
                    }
                )
        conn = session.connection()
        _WRITE_SEEN.execute(conn, pc_rows)
        _WRITE_METRICS.execute(conn, metric_rows)
        self._write_lists(conn, pending)
        _WRITE_SAMPLE.execute(conn, samples)
        session.commit()
        return self._revive(session, pending, offline_after)

    def _write_lists(self, conn: Connection, pending: dict[int, Pending]) -> None:
        """Disks and processes (JSON lists): written only when they differ from the stored
        lists, compared by hash with what the database holds (one SELECT for the chunk), so a
        list another process wrote meanwhile is replaced as soon as it differs."""
        reported = {
            pc_id: (
                self._stable_hash(pc_id, p.hb, "disks"),
                self._stable_hash(pc_id, p.hb, "procs"),
            )
            for pc_id, p in pending.items()
            if p.hb.disks is not None or p.hb.processes is not None
        }
        if not reported:
            return
        stored = {
            row.pc_id: (row.disks_hash, row.processes_hash)
            for row in conn.execute(
                select(_M.c.pc_id, _M.c.disks_hash, _M.c.processes_hash).where(
                    _M.c.pc_id.in_(reported)
                )
            )
        }
        disk_rows, proc_rows = [], []
        for pc_id, (disks_hash, procs_hash) in reported.items():
            hb = pending[pc_id].hb
            held = stored.get(pc_id, (None, None))
            if hb.disks is not None and disks_hash != held[0]:
                dumped = [d.model_dump() for d in hb.disks]
                disk_rows.append({"b_id": pc_id, "b_disks": dumped, "b_hash": disks_hash})
            if hb.processes is not None and procs_hash != held[1]:
                proc_rows.append({"b_id": pc_id, "b_procs": hb.processes, "b_hash": procs_hash})
        _WRITE_DISKS.execute(conn, disk_rows)
        _WRITE_PROCESSES.execute(conn, proc_rows)

    def _stable_hash(self, pc_id: int, hb: HeartbeatRequest, which: str) -> int | None:
        """pc_service.list_hash of a heartbeat's disks or processes (None: not reported),
        computed again only when the list differs from this PC's last one here (Python's own
        hash of it, cheap, tells): the JSON and BLAKE2b of 80 process names at every flush
        cost a tenth of the server's CPU at 2,000 heartbeats/s."""
        if which == "disks":
            if hb.disks is None:
                return None
            key = hash(tuple((d.mount, d.fstype, d.total, d.used) for d in hb.disks))
        else:
            if hb.processes is None:
                return None
            key = hash(tuple(hb.processes))
        memo = self._hashes.get((pc_id, which))
        if memo is not None and memo[0] == key:
            return memo[1]
        items: list[Any] = (
            [d.model_dump() for d in hb.disks] if which == "disks" and hb.disks else []
        )
        if which == "procs":
            items = list(hb.processes or [])
        stable = pc_service.list_hash(items)
        self._hashes[(pc_id, which)] = (key, stable)
        return stable

    def _revive(
        self, session: Session, pending: dict[int, Pending], offline_after: float
    ) -> list[Transition]:
        """PCs another process flipped offline before a newer heartbeat of theirs was written."""
        offline = (
            session.execute(
                select(PcInfo).where(PcInfo.id.in_(pending), PcInfo.state != PcState.ONLINE)
            )
            .scalars()
            .all()
        )
        revived = []
        for pc in offline:
            p = pending[pc.id]
            if p.at <= pc.state_since:
                self.set_online(pc.id, False)  # the heartbeat predates the shutdown: drop it
                continue
            try:
                t = pc_service.apply_heartbeat(session, pc, p.hb, p.at, offline_after)
            except pc_service.SignedOff:  # from an agent that signed off: drop it
                self.set_online(pc.id, False)
                continue
            if t is not None:
                revived.append(t)
        session.commit()
        return revived
