"""The heartbeat writer with several processes (issue 12): what must hold for all of them is
kept in the database. Each "process" here is a HeartbeatBuffer with an engine of its own, as
each worker or node has; on PostgreSQL their flushes really run at once."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select, update

from tests.conftest import Database
from wcms.server.db import make_engine, make_sessionmaker
from wcms.server.models import MetricSample, PcInfo, PcMetrics
from wcms.server.schemas import HeartbeatRequest, RegisterRequest
from wcms.server.services import pc_service
from wcms.server.services.heartbeats import HeartbeatBuffer

T0 = dt.datetime(2026, 11, 28, 9, 0, 0, tzinfo=dt.UTC)  # the start of a 60 s slot
PCS = 20


class Process:
    """One server process's writer: its own engine, session and buffer."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.session = make_sessionmaker(self.engine)()
        self.buffer = HeartbeatBuffer(sample_interval=60)

    def beat(self, pc_ids: list[int], at: dt.datetime, **report: Any) -> None:
        for pc_id in pc_ids:
            hb = HeartbeatRequest.model_validate(
                {"machine_id": f"TEST-WRITER-M{pc_id:04d}", **report}
            )
            self.buffer.add(pc_id, hb, at)

    def flush(self) -> None:
        self.buffer.flush(self.session, offline_after=35)

    def close(self) -> None:
        self.session.close()
        self.engine.dispose()


@pytest.fixture
def two(database: Database) -> Iterator[tuple[Process, Process, list[int]]]:
    database.migrate()
    a, b = Process(database.url), Process(database.url)
    ids: list[int] = []
    for n in range(PCS):
        body = {"pin": "000000", "machine_id": f"TEST-WRITER-{n:04d}", "hostname": f"pc{n}"}
        pc, _token, _t = pc_service.register(
            a.session, RegisterRequest.model_validate(body), T0, offline_after=35
        )
        ids.append(pc.id)
    a.session.commit()
    for pc_id in ids:  # both have seen every PC online (their heartbeats take the fast path)
        a.buffer.set_online(pc_id, True)
        b.buffer.set_online(pc_id, True)
    yield a, b, ids
    a.close()
    b.close()


def _race(*flushes: Any) -> None:
    """Run the flushes in threads that meet at a barrier first; re-raise what any raised."""
    meet = threading.Barrier(len(flushes))
    errors: list[BaseException] = []

    def run(flush: Any) -> None:
        meet.wait(10)
        try:
            flush()
        except BaseException as exc:  # handed to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f,)) for f in flushes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors


def test_two_processes_write_one_history_sample_per_pc_and_slot(
    two: tuple[Process, Process, list[int]],
) -> None:
    """Heartbeats of the same PCs in the same minute, written by two processes at once, leave
    one sample each (the unique index on PC and slot); the next minute adds one more each."""
    a, b, ids = two
    for minute in range(3):
        at = T0 + dt.timedelta(minutes=minute)
        a.beat(ids, at + dt.timedelta(seconds=1), cpu_percent=10.0, ram_percent=20.0)
        b.beat(ids, at + dt.timedelta(seconds=2), cpu_percent=30.0, ram_percent=40.0)
        _race(a.flush, b.flush)
        with make_sessionmaker(a.engine)() as s:
            per_pc = s.execute(
                select(MetricSample.pc_id, func.count()).group_by(MetricSample.pc_id)
            ).all()
        assert sorted(per_pc) == [(pc_id, minute + 1) for pc_id in ids], per_pc


def test_lists_another_process_wrote_are_replaced_and_unchanged_ones_not_rewritten(
    two: tuple[Process, Process, list[int]],
) -> None:
    """A writes the PC's lists, B writes others, A's next heartbeat carries A's lists again:
    they are written back (A compares with the database, not with what it wrote last). A
    heartbeat with the lists the database holds writes no list."""
    a, b, ids = two
    pc = ids[:1]
    disks_a = [{"mount": "C:\\", "fstype": "NTFS", "total": 100, "used": 10}]
    disks_b = [{"mount": "C:\\", "fstype": "NTFS", "total": 100, "used": 90}]

    def stored() -> tuple[Any, Any]:
        with make_sessionmaker(a.engine)() as s:
            m = s.get(PcMetrics, pc[0])
            assert m is not None
            return m.processes, m.disks

    a.beat(pc, T0 + dt.timedelta(seconds=1), processes=["a.exe"], disks=disks_a)
    a.flush()
    b.beat(pc, T0 + dt.timedelta(seconds=2), processes=["b.exe"], disks=disks_b)
    b.flush()
    assert stored() == (["b.exe"], disks_b)
    a.beat(pc, T0 + dt.timedelta(seconds=3), processes=["a.exe"], disks=disks_a)
    a.flush()
    assert stored() == (["a.exe"], disks_a)

    # The same lists again, through either process: no list is written. (The stored lists are
    # marked behind the writer's back, hashes kept: a write would replace the mark.)
    with a.engine.begin() as conn:
        conn.execute(
            update(PcMetrics).where(PcMetrics.pc_id == pc[0]).values(processes=["mark"], disks=[])
        )
    for p in (b, a):
        p.beat(pc, T0 + dt.timedelta(seconds=4), processes=["a.exe"], disks=disks_a)
        p.flush()
        assert stored() == (["mark"], [])
    with a.engine.begin() as conn:
        conn.execute(
            update(PcMetrics)
            .where(PcMetrics.pc_id == pc[0])
            .values(processes=["a.exe"], disks=disks_a)
        )

    # The slow path (a PC coming back) writes lists and their hashes together.
    with make_sessionmaker(a.engine)() as s:
        pc_row = s.get(PcInfo, pc[0])
        assert pc_row is not None
        hb = HeartbeatRequest.model_validate(
            {"machine_id": pc_row.machine_id, "processes": ["c.exe"], "disks": disks_b}
        )
        pc_service.apply_heartbeat(s, pc_row, hb, T0 + dt.timedelta(seconds=5), 35)
        s.commit()
    assert stored() == (["c.exe"], disks_b)
    b.beat(pc, T0 + dt.timedelta(seconds=6), processes=["a.exe"], disks=disks_a)
    b.flush()
    assert stored() == (["a.exe"], disks_a)
