"""The presence state machine, driven in-process with `now` passed in."""

from __future__ import annotations

import contextlib
import datetime as dt
import multiprocessing
import threading
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from wcms.server.db import utcnow
from wcms.server.models import PcInfo, PowerEvent
from wcms.server.runtime import Runtime
from wcms.server.schemas import HeartbeatRequest, RegisterRequest
from wcms.server.services import pc_service

T0 = dt.datetime(2026, 11, 26, 9, 0, tzinfo=dt.UTC)


def add_pc(session: Session, machine_id: str, now: dt.datetime = T0) -> PcInfo:
    req = RegisterRequest.model_validate(
        {"pin": "000000", "machine_id": machine_id, "hostname": machine_id.lower()}
    )
    pc, _token, _t = pc_service.register(session, req, now, offline_after=35)
    session.commit()
    return pc


def events(session: Session, pc: PcInfo) -> list[tuple[str | None, str, str]]:
    rows = session.execute(
        select(PowerEvent).where(PowerEvent.pc_id == pc.id).order_by(PowerEvent.id)
    ).scalars()
    return [(e.from_state, e.to_state, e.reason) for e in rows]


def test_checker_flips_only_overdue_pcs(session: Session) -> None:
    late, fresh = add_pc(session, "PC-LATE-0001"), add_pc(session, "PC-FRESH-001")
    pc_service.apply_heartbeat(
        session,
        fresh,
        HeartbeatRequest(machine_id=fresh.machine_id),
        T0 + dt.timedelta(seconds=30),
        35,
    )
    at = T0 + dt.timedelta(seconds=36)
    flipped = pc_service.mark_overdue_lost(session, at, retry_in=5)
    assert [t.pc_id for t in flipped] == [late.id]
    session.expire_all()
    assert (late.state, late.reason, late.is_online, late.state_since) == (
        "offline",
        "lost",
        False,
        at,
    )
    assert late.offline_after is None
    assert fresh.state == "online"
    assert events(session, late) == [(None, "online", "registered"), ("online", "offline", "lost")]
    # Nothing left to do: a second pass flips nobody and writes no event.
    assert pc_service.mark_overdue_lost(session, at + dt.timedelta(seconds=1), retry_in=5) == []
    assert len(events(session, late)) == 2


def _checker(url: str, who: int, rounds: list[dt.datetime], meet: Any, ran: list[Any]) -> None:
    """One checker process with its own engine: in each round it meets the other one right
    before its flip (both have read the PC as due), and flips first in every other round; the
    second starts while the first's transaction is still open."""
    from sqlalchemy import Engine, event

    from wcms.server.db import make_engine, make_sessionmaker

    engine = make_engine(url)
    state = {"round": -1, "armed": False, "running": False}

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if state["armed"] and statement.lstrip().upper().startswith("UPDATE PC_INFO"):
            state["armed"], state["running"] = False, True
            with contextlib.suppress(threading.BrokenBarrierError):
                meet.wait(10)
            if state["round"] % 2 != who:
                ran[state["round"]].wait(10)

    def after(*_args: Any) -> None:
        if state["running"]:
            state["running"] = False
            ran[state["round"]].set()

    event.listen(Engine, "before_cursor_execute", before)
    event.listen(Engine, "after_cursor_execute", after)
    with make_sessionmaker(engine)() as s:
        for i, at in enumerate(rounds):
            state["round"], state["armed"] = i, True
            with contextlib.suppress(threading.BrokenBarrierError):
                meet.wait(10)  # released together
            pc_service.mark_overdue_lost(s, at, retry_in=5)
            ran[i].set()  # in case it never reached its flip
    engine.dispose()


def test_two_processes_never_double_flip(rt: Runtime) -> None:
    """Two checker processes (two workers, two nodes) race for each late PC: one `lost`."""
    ctx = multiprocessing.get_context("spawn")
    pcs, rounds = [], []
    with rt.sessions() as s:
        for i in range(10):
            pcs.append(add_pc(s, f"PC-RACE-{i:04d}", now=T0 + dt.timedelta(hours=i)).id)
            rounds.append(T0 + dt.timedelta(hours=i, seconds=60))  # only this one is due
    meet = ctx.Barrier(2)
    ran = [ctx.Event() for _ in rounds]
    url = rt.settings.database_url
    procs = [ctx.Process(target=_checker, args=(url, w, rounds, meet, ran)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    with rt.sessions() as s:
        for pc_id in pcs:
            n = s.execute(
                select(func.count())
                .select_from(PowerEvent)
                .where(PowerEvent.pc_id == pc_id, PowerEvent.reason == "lost")
            ).scalar()
            assert n == 1, pc_id


def test_shutdown_signal_is_idempotent_and_keeps_the_freshest_reason(session: Session) -> None:
    pc = add_pc(session, "PC-SHUT-0001")
    at = T0 + dt.timedelta(seconds=10)
    t = pc_service.set_offline_immediately(session, pc.machine_id, "shutdown", at)
    assert t is not None and (t.from_state, t.to_state, t.reason) == (
        "online",
        "offline",
        "shutdown",
    )
    assert pc_service.set_offline_immediately(session, pc.machine_id, "shutdown", at) is None
    session.expire_all()
    assert (pc.state, pc.reason, pc.last_seen, pc.state_since) == ("offline", "shutdown", at, at)
    assert len(events(session, pc)) == 2
    # The checker never touches an offline PC.
    assert pc_service.mark_overdue_lost(session, at + dt.timedelta(hours=1), retry_in=5) == []
    assert pc_service.set_offline_immediately(session, "NO-SUCH-PC-01", "shutdown", at) is None


def test_a_pc_back_online_between_the_signals_two_statements_goes_off(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signal finds a lost PC (its flip of an online PC moves nothing) and, before it writes
    the reason, the PC's late poll brings it back (another process, on PostgreSQL). The signal
    must not write `shutdown` on an online PC: it turns it off. The revival is made on the
    signal's own connection, which sees it as it would see another's commit."""
    pc = add_pc(session, "PC-BACK-0001")
    lost_at = T0 + dt.timedelta(minutes=5)
    assert pc_service.mark_overdue_lost(session, lost_at, retry_in=5)
    real = pc_service._RAW_GO_OFFLINE
    back_at = lost_at + dt.timedelta(seconds=5)

    class RevivedMeanwhile:
        def fetch(self, conn: Any, params: dict[str, Any]) -> Any:
            moved = real.fetch(conn, params)
            if not moved:
                conn.execute(
                    update(PcInfo)
                    .where(PcInfo.id == pc.id)
                    .values(state="online", is_online=True, reason="reconnected")
                )
                monkeypatch.setattr(pc_service, "_RAW_GO_OFFLINE", real)
            return moved

    monkeypatch.setattr(pc_service, "_RAW_GO_OFFLINE", RevivedMeanwhile())
    signal_at = back_at + dt.timedelta(seconds=1)
    t = pc_service.set_offline_immediately(session, pc.machine_id, "shutdown", signal_at)
    assert t is not None and (t.from_state, t.to_state, t.reason) == (
        "online",
        "offline",
        "shutdown",
    )
    session.expire_all()
    assert (pc.state, pc.reason, pc.offline_after) == ("offline", "shutdown", None)


def test_buffered_heartbeat_older_than_a_shutdown_does_not_revive(rt: Runtime) -> None:
    with rt.sessions() as s:
        pc = add_pc(s, "PC-BUFF-0001", now=utcnow())
    rt.buffer.set_online(pc.id, True)
    hb_at = utcnow()
    rt.buffer.add(pc.id, HeartbeatRequest(machine_id=pc.machine_id, cpu_percent=50.0), hb_at)
    taken = rt.buffer.take()  # the writer has taken the batch...
    with rt.sessions() as s:  # ...when the shutdown lands
        pc_service.set_offline_immediately(s, pc.machine_id, "shutdown", utcnow())
    for pc_id, p in taken.items():
        rt.buffer.add(pc_id, p.hb, p.at)
    with rt.sessions() as s:
        revived = rt.buffer.flush(s, 35)
        assert revived == []
        assert s.get(PcInfo, pc.id).state == "offline"  # type: ignore[union-attr]


def test_buffered_heartbeat_newer_than_a_loss_brings_the_pc_back(rt: Runtime) -> None:
    with rt.sessions() as s:
        pc = add_pc(s, "PC-BACK-0001", now=utcnow() - dt.timedelta(minutes=5))
        pc_id, machine_id = pc.id, pc.machine_id
        pc.boot_time = 1000.0
        s.commit()
        pc_service.mark_overdue_lost(s, utcnow(), retry_in=5)
    hb = HeartbeatRequest(machine_id=machine_id, cpu_percent=5.0, boot_time=1000.0)
    rt.buffer.add(pc_id, hb, utcnow())
    with rt.sessions() as s:
        revived = rt.buffer.flush(s, 35)
        assert [(t.pc_id, t.to_state) for t in revived] == [(pc_id, "online")]
        again = s.get(PcInfo, pc_id)
        assert again is not None and again.state == "online" and again.reason == "reconnected"


def test_tick_publishes_changes_on_the_live_bus(rt: Runtime) -> None:
    with rt.sessions() as s:
        pc = add_pc(s, "PC-LIVE-0001", now=utcnow() - dt.timedelta(minutes=5))
    q = rt.bus.subscribe()
    changed = rt.tick(utcnow())
    assert [t.pc_id for t in changed] == [pc.id]
    msg = q.get_nowait()
    assert (msg["type"], msg["pc_id"], msg["state"], msg["reason"]) == (
        "presence",
        pc.id,
        "offline",
        "lost",
    )


def test_retention_deletes_only_what_is_past_its_time(rt: Runtime) -> None:
    from wcms.server.models import MetricSample

    now = utcnow()
    with rt.sessions() as s:
        pc = add_pc(s, "PC-PRUNE-001", now=now - dt.timedelta(days=400))
        s.add_all(
            [
                MetricSample(pc_id=pc.id, at=now - dt.timedelta(days=15), cpu_percent=1.0),
                MetricSample(pc_id=pc.id, at=now - dt.timedelta(days=1), cpu_percent=2.0),
                PowerEvent(
                    pc_id=pc.id,
                    from_state="online",
                    to_state="offline",
                    reason="shutdown",
                    at=now - dt.timedelta(days=10),
                ),
            ]
        )
        s.commit()
    counts = rt.prune(now)
    assert counts["metric_samples"] == 1 and counts["power_events"] == 1  # the 400-day-old one
    with rt.sessions() as s:
        assert [m.cpu_percent for m in s.execute(select(MetricSample)).scalars()] == [2.0]
        assert events(s, pc) == [("online", "offline", "shutdown")]


def test_process_lists_are_written_when_they_change_even_after_the_slow_path(rt: Runtime) -> None:
    from wcms.server.models import PcMetrics

    with rt.sessions() as s:
        pc = add_pc(s, "PC-LIST-0001", now=utcnow())
        pc_id, machine_id = pc.id, pc.machine_id
    rt.buffer.set_online(pc_id, True)

    def processes() -> list[str]:
        with rt.sessions() as s:
            row = s.get(PcMetrics, pc_id)
            assert row is not None
            return list(row.processes)

    def buffered(procs: list[str]) -> None:
        rt.buffer.add(pc_id, HeartbeatRequest(machine_id=machine_id, processes=procs), utcnow())
        with rt.sessions() as s:
            rt.buffer.flush(s, 35)

    buffered(["a.exe"])
    assert processes() == ["a.exe"]
    buffered(["a.exe", "b.exe"])
    assert processes() == ["a.exe", "b.exe"]
    # The slow path (an event heartbeat) writes another list behind the buffer's back...
    with rt.sessions() as s:
        row = s.get(PcInfo, pc_id)
        assert row is not None
        hb = HeartbeatRequest(machine_id=machine_id, event="logon", processes=["c.exe"])
        pc_service.apply_heartbeat(s, row, hb, utcnow(), 35)
    rt.buffer.set_online(pc_id, True)  # as the API view does after the slow path
    assert processes() == ["c.exe"]
    # ...so the same list as before must still be written again.
    buffered(["a.exe", "b.exe"])
    assert processes() == ["a.exe", "b.exe"]
