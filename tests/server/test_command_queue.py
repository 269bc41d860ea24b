"""The command lifecycle, driven in-process with `now` passed in: queue, deliver, ack, result,
redelivery, expiry, cancel, and secrets that never rest in plain text."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from wcms.protocol import CommandStatus, CommandType
from wcms.server.errors import http_status
from wcms.server.models import AuditLog, Command, CommandBatch, PcInfo
from wcms.server.runtime import Runtime
from wcms.server.schemas import RegisterRequest
from wcms.server.services import command_queue, pc_service, secretbox
from wcms.server.services.command_queue import Report, Target
from wcms.server.services.errors import DomainError

T0 = dt.datetime(2026, 11, 26, 17, 0, tzinfo=dt.UTC)
SECRET = "server-secret-for-tests"
PASSWORD = "Tr0ub4dor&3-zebra"


def add_pc(session: Session, name: str) -> PcInfo:
    req = RegisterRequest.model_validate(
        {"pin": "000000", "machine_id": f"TEST-{name}-0000", "hostname": name}
    )
    pc, _token, _t = pc_service.register(session, req, T0, offline_after=35, approve=True)
    session.commit()
    return pc


def send(
    session: Session, pcs: list[PcInfo], kind: CommandType, args: dict[str, Any], **kw: Any
) -> CommandBatch:
    batch, _ids = command_queue.queue(
        session,
        actor="alice",
        kind=kind,
        args=args,
        target=Target(pc_ids=tuple(p.id for p in pcs)),
        now=kw.pop("now", T0),
        server_secret=SECRET,
        **kw,
    )
    session.commit()  # the service flushes; its caller commits
    return batch


def deliver(session: Session, pc: PcInfo, at: dt.datetime, **kw: Any) -> list[dict[str, Any]]:
    wire, _changes = command_queue.deliver(session, pc.id, at, server_secret=SECRET, **kw)
    return wire


def status_of(session: Session, command_id: int) -> str:
    session.expire_all()
    cmd = session.get(Command, command_id)
    assert cmd is not None
    return cmd.status


def later(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_queue_to_a_selection_is_one_batch_and_is_audited(session: Session) -> None:
    a, b = add_pc(session, "lab-a"), add_pc(session, "lab-b")
    batch = send(session, [a, b], CommandType.MESSAGE, {"text": "Class starts in 5 minutes"})
    assert batch.pc_count == 2 and batch.target == "2 selected PCs"
    rows = session.execute(select(Command).where(Command.batch_id == batch.id)).scalars().all()
    assert {(c.pc_id, c.status) for c in rows} == {(a.id, "queued"), (b.id, "queued")}
    assert all(c.expires_at == T0 + dt.timedelta(minutes=15) for c in rows)
    entry = session.execute(select(AuditLog).where(AuditLog.action == "command.send")).scalar_one()
    assert entry.actor == "alice"
    assert entry.details["pc_ids"] == sorted([a.id, b.id])
    assert entry.details["args"] == {"text": "Class starts in 5 minutes"}


def test_room_and_every_online_pc_targets(session: Session, rt: Runtime) -> None:
    from wcms.server.models import Room

    room = Room(name="B101", rows=2, cols=2)
    session.add(room)
    a, b, c = add_pc(session, "a"), add_pc(session, "b"), add_pc(session, "c")
    a.room_id = b.room_id = room.id
    session.commit()
    pc_service.set_offline_immediately(session, c.machine_id, "shutdown", T0)
    batch, ids = command_queue.queue(
        session,
        actor="alice",
        kind=CommandType.LOCK,
        args={},
        target=Target(room_id=room.id),
        now=T0,
        server_secret=SECRET,
    )
    assert sorted(ids) == sorted([a.id, b.id]) and batch.target == "room B101 (2 PCs)"
    _batch, ids = command_queue.queue(
        session,
        actor="alice",
        kind=CommandType.LOCK,
        args={},
        target=Target(all_online=True),
        now=T0,
        server_secret=SECRET,
    )
    assert sorted(ids) == sorted([a.id, b.id])  # c is off


def test_lifecycle_queued_delivered_running_succeeded(session: Session) -> None:
    pc = add_pc(session, "lab")
    send(session, [pc], CommandType.RUN, {"command": "echo hi", "timeout": 30})
    [wire] = deliver(session, pc, later(1))
    assert wire["type"] == "run" and wire["args"] == {"command": "echo hi", "timeout": 30}
    assert wire["attempt"] == 1 and wire["age"] == 1.0
    assert status_of(session, wire["id"]) == "delivered"
    status, _ = command_queue.acknowledge(session, pc.id, wire["id"], later(2))
    assert status == "running"
    cmd, changes = command_queue.record_result(
        session,
        pc.id,
        wire["id"],
        Report(CommandStatus.SUCCEEDED, 0, "hi\n"),
        later(3),
        server_secret=SECRET,
    )
    assert [c.status for c in changes] == ["succeeded"]
    assert (cmd.status, cmd.exit_code, cmd.stdout) == ("succeeded", 0, "hi\n")
    assert (cmd.delivered_at, cmd.started_at, cmd.finished_at) == (later(1), later(2), later(3))
    assert deliver(session, pc, later(60)) == []


def test_unacknowledged_command_is_delivered_again_after_the_ack_timeout(session: Session) -> None:
    pc = add_pc(session, "lab")
    send(session, [pc], CommandType.LOCK, {})
    [first] = deliver(session, pc, later(1))
    assert deliver(session, pc, later(5)) == []  # still waiting for its ack
    [again] = deliver(session, pc, later(12))
    assert again["id"] == first["id"] and again["attempt"] == 2
    command_queue.acknowledge(session, pc.id, first["id"], later(13))
    assert deliver(session, pc, later(40)) == []  # running: never delivered again


def test_a_command_never_acknowledged_fails_after_max_attempts(session: Session) -> None:
    pc = add_pc(session, "lab")
    send(session, [pc], CommandType.MESSAGE, {"text": "x"})
    for i in range(command_queue.MAX_ATTEMPTS):
        assert len(deliver(session, pc, later(1 + 11 * i))) == 1
    assert deliver(session, pc, later(200)) == []
    cmd = session.execute(select(Command)).scalar_one()
    assert cmd.status == "failed" and "never acknowledged" in (cmd.error or "")


def test_a_failure_is_a_failure_and_a_duplicate_result_changes_nothing(session: Session) -> None:
    pc = add_pc(session, "lab")
    send(session, [pc], CommandType.RUN, {"command": "exit 3"})
    [wire] = deliver(session, pc, later(1))
    command_queue.acknowledge(session, pc.id, wire["id"], later(1))
    cmd, _ = command_queue.record_result(
        session,
        pc.id,
        wire["id"],
        Report(CommandStatus.SUCCEEDED, 3),
        later(2),
        server_secret=SECRET,
    )
    assert cmd.status == "failed" and cmd.exit_code == 3
    cmd, changes = command_queue.record_result(
        session,
        pc.id,
        wire["id"],
        Report(CommandStatus.SUCCEEDED, 0, "other"),
        later(3),
        server_secret=SECRET,
    )
    assert changes == [] and cmd.status == "failed" and cmd.finished_at == later(2)


def test_another_pcs_command_is_not_found(session: Session) -> None:
    a, b = add_pc(session, "a"), add_pc(session, "b")
    send(session, [a], CommandType.LOCK, {})
    [wire] = deliver(session, a, later(1))
    with pytest.raises(DomainError) as err:
        command_queue.acknowledge(session, b.id, wire["id"], later(2))
    assert http_status(err.value) == 404
    with pytest.raises(DomainError):
        command_queue.record_result(
            session,
            b.id,
            wire["id"],
            Report(CommandStatus.SUCCEEDED, 0),
            later(2),
            server_secret=SECRET,
        )
    assert status_of(session, wire["id"]) == "delivered"


def test_power_commands_expire_in_minutes_and_are_never_run_late(session: Session) -> None:
    pc = add_pc(session, "lab")
    pc_service.set_offline_immediately(session, pc.machine_id, "shutdown", T0)
    batch = send(session, [pc], CommandType.SHUTDOWN, {"delay": 0})
    assert batch.expires_at == T0 + dt.timedelta(minutes=5)
    changes = command_queue.expire_overdue(session, later(4 * 60))
    assert changes == []
    changes = command_queue.expire_overdue(session, later(5 * 60 + 1))
    assert [c.status for c in changes] == ["expired"]
    # The PC boots hours later: nothing to run.
    assert deliver(session, pc, later(3 * 3600)) == []


def test_expiry_is_also_enforced_at_delivery(session: Session) -> None:
    pc = add_pc(session, "lab")
    send(session, [pc], CommandType.RESTART, {"delay": 60, "message": "Updates"})
    assert deliver(session, pc, later(301)) == []
    cmd = session.execute(select(Command)).scalar_one()
    assert cmd.status == "expired" and cmd.delivered_at is None


def test_power_command_queued_before_the_pcs_current_boot_expires(session: Session) -> None:
    pc = add_pc(session, "lab")
    send(session, [pc], CommandType.SHUTDOWN, {})
    booted = later(60).timestamp()
    assert deliver(session, pc, later(120), boot_time=booted) == []
    cmd = session.execute(select(Command)).scalar_one()
    assert cmd.status == "expired" and "started again" in (cmd.error or "")
    # Unless the admin asked for "when it next comes online".
    send(session, [pc], CommandType.SHUTDOWN, {}, run_when_online=True)
    [wire] = deliver(session, pc, later(120), boot_time=booted)
    assert wire["run_when_online"] is True
    # Other types are not about this boot: an install still runs.
    send(session, [pc], CommandType.INSTALL, {"package": "vlc"})
    assert [w["type"] for w in deliver(session, pc, later(121), boot_time=booted)] == ["install"]


def test_run_when_online_waits_days(session: Session) -> None:
    pc = add_pc(session, "lab")
    batch = send(session, [pc], CommandType.INSTALL, {"package": "vlc"}, run_when_online=True)
    assert batch.expires_at == T0 + dt.timedelta(days=7)
    assert len(deliver(session, pc, later(3 * 86400))) == 1


def test_cancel_stops_what_has_not_started(session: Session) -> None:
    a, b, c = add_pc(session, "a"), add_pc(session, "b"), add_pc(session, "c")
    batch = send(session, [a, b, c], CommandType.RUN, {"command": "sleep 60"})
    [wa] = deliver(session, a, later(1))
    command_queue.acknowledge(session, a.id, wa["id"], later(1))  # a is running
    [wb] = deliver(session, b, later(1))  # b has it, not acknowledged
    changes = command_queue.cancel(session, actor="bob", now=later(2), batch_id=batch.id)
    assert sorted(ch.pc_id for ch in changes) == sorted([b.id, c.id])
    status, _ = command_queue.acknowledge(session, b.id, wb["id"], later(3))
    assert status == "cancelled"  # b must not run it
    assert deliver(session, c, later(3)) == []
    assert status_of(session, wa["id"]) == "running"
    audit = session.execute(
        select(AuditLog).where(AuditLog.action == "command.cancel")
    ).scalar_one()
    assert audit.actor == "bob" and len(audit.details["cancelled"]) == 2


def test_running_command_without_a_result_fails_eventually(session: Session) -> None:
    pc = add_pc(session, "lab")
    send(session, [pc], CommandType.RUN, {"command": "sleep 1", "timeout": 60})
    [wire] = deliver(session, pc, later(1))
    command_queue.acknowledge(session, pc.id, wire["id"], later(1))
    assert command_queue.expire_overdue(session, later(60 + 10 * 60)) == []
    [change] = command_queue.expire_overdue(session, later(60 + 16 * 60 + 1))
    assert change.status == "failed"
    # A result that arrives after all still counts.
    cmd, _ = command_queue.record_result(
        session,
        pc.id,
        wire["id"],
        Report(CommandStatus.SUCCEEDED, 0),
        later(2000),
        server_secret=SECRET,
    )
    assert cmd.status == "succeeded" and cmd.error is None


def dump(session: Session, table: str) -> str:
    rows = session.execute(text(f"SELECT * FROM {table}")).all()  # the table names are fixed above
    return repr([tuple(r) for r in rows])


def test_passwords_are_sealed_at_rest_redacted_and_wiped(session: Session) -> None:
    pc = add_pc(session, "lab")
    args = {"username": "student01", "password": PASSWORD, "full_name": "Student"}
    batch = send(session, [pc], CommandType.ACCOUNT_CREATE, args)
    assert batch.args["password"] == "***"
    for table in ("commands", "command_batches", "audit_log"):
        assert PASSWORD not in dump(session, table), table
    cmd = session.execute(select(Command)).scalar_one()
    assert cmd.secret and secretbox.unseal(SECRET, cmd.secret) == {"password": PASSWORD}
    [wire] = deliver(session, pc, later(1))
    assert wire["args"]["password"] == PASSWORD  # only on the wire to its PC
    command_queue.acknowledge(session, pc.id, wire["id"], later(2))
    out = f"created student01 with {PASSWORD}"
    cmd, _ = command_queue.record_result(
        session,
        pc.id,
        wire["id"],
        Report(CommandStatus.SUCCEEDED, 0, out, PASSWORD),
        later(3),
        server_secret=SECRET,
    )
    assert cmd.stdout == "created student01 with ***" and cmd.stderr == "***"
    assert cmd.secret is None
    for table in ("commands", "command_batches", "audit_log"):
        assert PASSWORD not in dump(session, table), table


def test_secrets_are_wiped_when_a_command_expires_or_is_cancelled(session: Session) -> None:
    pc = add_pc(session, "lab")
    args = {"username": "student01", "password": PASSWORD}
    send(session, [pc], CommandType.ACCOUNT_PASSWORD, args)
    b2 = send(session, [pc], CommandType.ACCOUNT_PASSWORD, args, expires_in=dt.timedelta(hours=2))
    command_queue.expire_overdue(session, later(16 * 60))
    command_queue.cancel(session, actor="alice", now=later(16 * 60), batch_id=b2.id)
    rows = session.execute(select(Command)).scalars().all()
    assert [(c.status, c.secret) for c in rows] == [("expired", None), ("cancelled", None)]


def test_an_unreadable_secret_fails_the_command_instead_of_running_it(session: Session) -> None:
    pc = add_pc(session, "lab")
    send(session, [pc], CommandType.ACCOUNT_PASSWORD, {"username": "u1", "password": "pw"})
    wire, _ = command_queue.deliver(session, pc.id, later(1), server_secret="another key")
    assert wire == []
    cmd = session.execute(select(Command)).scalar_one()
    assert cmd.status == "failed" and cmd.secret is None


@pytest.mark.parametrize(
    ("kind", "args", "field"),
    [
        (CommandType.SHUTDOWN, {"delay": -1}, "args.delay"),
        (CommandType.RESTART, {"delay": 86401}, "args.delay"),
        (CommandType.RESTART, {"message": "x" * 501}, "args.message"),
        (CommandType.MESSAGE, {"text": ""}, "args.text"),
        (CommandType.MESSAGE, {"text": "x" * 1001}, "args.text"),
        (CommandType.RUN, {"command": "dir", "timeout": 0}, "args.timeout"),
        (CommandType.INSTALL, {"package": "vlc; rm -rf /"}, "args.package"),
        (CommandType.INSTALL, {"package": "--force"}, "args.package"),
        (CommandType.KILL, {"name": "a", "pid": 5}, "args"),
        (CommandType.KILL, {"pid": 1}, "args.pid"),
        (CommandType.ACCOUNT_CREATE, {"username": "bad name", "password": "x"}, "args.username"),
        (CommandType.ACCOUNT_CREATE, {"username": "Administrator", "password": "x"}, "args"),
        (CommandType.ACCOUNT_PASSWORD, {"username": "u", "password": "a\nb"}, "args.password"),
        (CommandType.ACCOUNT_DELETE, {"username": "u", "extra": 1}, "args.extra"),
        (CommandType.LOCK, {"delay": 5}, "args.delay"),
    ],
)
def test_arguments_are_validated_per_type(
    session: Session, kind: CommandType, args: dict[str, Any], field: str
) -> None:
    pc = add_pc(session, "lab")
    with pytest.raises(DomainError) as err:
        send(session, [pc], kind, args)
    assert http_status(err.value) == 400
    assert field in (err.value.fields or {}), err.value.fields
    assert session.execute(select(Command)).first() is None


def test_unknown_pcs_and_empty_targets_are_refused(session: Session) -> None:
    pc = add_pc(session, "lab")
    with pytest.raises(DomainError) as err:
        command_queue.queue(
            session,
            actor="a",
            kind=CommandType.LOCK,
            args={},
            target=Target(pc_ids=(pc.id, 999)),
            now=T0,
            server_secret=SECRET,
        )
    assert http_status(err.value) == 404 and "999" in err.value.message
    pc_service.set_offline_immediately(session, pc.machine_id, "shutdown", T0)
    with pytest.raises(DomainError) as err:
        command_queue.queue(
            session,
            actor="a",
            kind=CommandType.LOCK,
            args={},
            target=Target(all_online=True),
            now=T0,
            server_secret=SECRET,
        )
    assert http_status(err.value) == 409


def test_deleting_a_pc_deletes_its_commands(session: Session) -> None:
    pc = add_pc(session, "lab")
    send(session, [pc], CommandType.LOCK, {})
    session.delete(pc)
    session.commit()
    assert session.execute(select(Command)).first() is None


def test_the_presence_loop_expires_commands_and_publishes(rt: Runtime, session: Session) -> None:
    pc = add_pc(session, "lab")
    send(session, [pc], CommandType.LOCK, {})
    q = rt.bus.subscribe()
    rt.tick(later(301), check=True)
    messages = []
    while not q.empty():
        messages.append(q.get_nowait())
    assert {"type": "command", "status": "expired", "pc_id": pc.id}.items() <= messages[-1].items()


# ---------------------------------------------------------------------------- delivery marks


def _handed_from_memory(session: Session, pc: PcInfo, box: Any) -> int:
    """A message staged and handed to a woken poll (the outbox), its mark not written yet."""
    from wcms.server.services import outbox

    batch = send(session, [pc], CommandType.MESSAGE, {"text": "hi"})
    box.stage(outbox.load(session, batch.id, {pc.id}, SECRET))
    [wire], _changes, left = box.take(pc.id, later(1), None)
    assert not left and box.has_marks()
    return int(wire["id"])


def _delivery(session: Session, command_id: int) -> tuple[str, int, dt.datetime | None]:
    session.expire_all()
    cmd = session.get(Command, command_id)
    assert cmd is not None
    return cmd.status, cmd.attempts, cmd.delivered_at


def test_an_ack_before_the_outbox_mark_counts_the_delivery(session: Session) -> None:
    # What a crash (or a quick client) left as attempts 0 / delivered_at NULL: the client acked
    # a command handed over from memory before the `delivered` mark was written, and the late
    # mark only moves queued commands.
    from wcms.server.services import outbox

    pc = add_pc(session, "lab")
    box = outbox.Outbox()
    command_id = _handed_from_memory(session, pc, box)
    assert _delivery(session, command_id) == ("queued", 0, None)
    status, _ = command_queue.acknowledge(session, pc.id, command_id, later(2))
    assert status == "running"
    assert _delivery(session, command_id) == ("running", 1, later(2))
    assert box.flush(session) == 1  # the mark comes late and moves nothing
    assert _delivery(session, command_id) == ("running", 1, later(2))
    cmd, _ = command_queue.record_result(
        session, pc.id, command_id, Report(CommandStatus.SUCCEEDED, 0), later(3), server_secret=""
    )
    assert (cmd.status, cmd.attempts, cmd.delivered_at) == ("succeeded", 1, later(2))


def test_a_result_for_a_command_never_marked_counts_the_delivery(session: Session) -> None:
    # After a crash lost the mark and the ack's answer, the client's journalled result is all
    # the server hears of the command.
    from wcms.server.services import outbox

    pc = add_pc(session, "lab")
    command_id = _handed_from_memory(session, pc, outbox.Outbox())  # the marks die with it
    cmd, changes = command_queue.record_result(
        session, pc.id, command_id, Report(CommandStatus.SUCCEEDED, 0), later(3), server_secret=""
    )
    assert [c.status for c in changes] == ["succeeded"]
    assert (cmd.status, cmd.attempts, cmd.delivered_at, cmd.started_at) == (
        "succeeded",
        1,
        later(3),
        later(3),
    )


def _meet_before(rt: Runtime, sql_prefix: str, parties: int) -> Any:
    """Make `parties` threads meet at a barrier right before each runs its statement starting
    with `sql_prefix`: every one of them has read the row before any writes it."""
    import contextlib
    import threading

    from sqlalchemy import event

    barrier = threading.Barrier(parties, timeout=10)

    def hook(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith(sql_prefix) and not barrier.broken:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()

    event.listen(rt.engine, "before_cursor_execute", hook)
    return lambda: event.remove(rt.engine, "before_cursor_execute", hook)


def _race(*calls: Any, together: bool = False) -> list[Any]:
    """Run each call in its own thread (`together`: released at once by a barrier)."""
    import threading

    results: list[Any] = [None] * len(calls)
    start = threading.Barrier(len(calls), timeout=10)

    def run(i: int) -> None:
        try:
            if together:
                start.wait()
            results[i] = calls[i]()
        except Exception as exc:  # handed back to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_two_acks_racing_start_the_command_once(rt: Runtime, session: Session) -> None:
    pc = add_pc(session, "lab")
    send(session, [pc], CommandType.LOCK, {})
    [wire] = deliver(session, pc, later(1))

    def ack() -> list[Any]:
        with rt.sessions() as s:
            return command_queue.acknowledge(s, pc.id, wire["id"], later(2))[1]

    done = _meet_before(rt, "UPDATE COMMANDS", 2)
    try:
        changes = _race(ack, ack)
    finally:
        done()
    assert sorted(len(c) for c in changes) == [0, 1], changes  # one `running`, announced once
    assert _delivery(session, wire["id"]) == ("running", 1, later(1))


def test_two_copies_of_a_result_racing_are_stored_and_announced_once(
    rt: Runtime, session: Session
) -> None:
    pc = add_pc(session, "lab")
    send(session, [pc], CommandType.RUN, {"command": "echo hi"})
    [wire] = deliver(session, pc, later(1))
    command_queue.acknowledge(session, pc.id, wire["id"], later(2))

    def result(text: str) -> Any:
        def call() -> list[Any]:
            with rt.sessions() as s:
                report = Report(CommandStatus.SUCCEEDED, 0, text)
                return command_queue.record_result(
                    s, pc.id, wire["id"], report, later(3), server_secret=SECRET
                )[1]

        return call

    done = _meet_before(rt, "UPDATE COMMANDS", 2)
    try:
        changes = _race(result("first"), result("second"))
    finally:
        done()
    assert sorted(len(c) for c in changes) == [0, 1], changes
    cmd = session.get(Command, wire["id"])
    assert cmd is not None
    session.refresh(cmd)
    winner = "first" if changes[0] else "second"
    assert (cmd.status, cmd.stdout) == ("succeeded", winner)  # the announced one is stored


def test_an_ack_racing_the_outbox_mark_always_counts_one_delivery(
    rt: Runtime, session: Session
) -> None:
    from wcms.server.services import outbox

    pc = add_pc(session, "lab")
    for _ in range(10):
        box = outbox.Outbox()
        command_id = _handed_from_memory(session, pc, box)

        def ack(command_id: int = command_id) -> str:
            with rt.sessions() as s:
                return command_queue.acknowledge(s, pc.id, command_id, later(2))[0]

        def flush(box: Any = box) -> int:
            with rt.sessions() as s:
                return int(box.flush(s))

        # The mark runs on the driver's cursor (no SQLAlchemy event): both start together.
        assert _race(ack, flush, together=True) == ["running", 1]
        status, attempts, delivered_at = _delivery(session, command_id)
        assert (status, attempts) == ("running", 1) and delivered_at is not None
