"""The agent fast path against Flask alone, over generated requests (Hypothesis).

Each generated request goes to the app twice, from the same database and process state: once
through the fast path (fastpath.py), once to Flask behind it. The two runs must give the same
status, headers, body and rows written; the fast path's own count says which runs it answered,
and the test fails unless it answered a good share of them and handed the rest to Flask.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Table, select

from tests.server.test_fastpath import Agent, Answer, add_agent, call, fast_path
from wcms.protocol import MAX_BODY_BYTES, CommandType
from wcms.server import create_app
from wcms.server.db import Base, utcnow
from wcms.server.fastpath import AgentFastPath
from wcms.server.runtime import Runtime
from wcms.server.schemas import RegisterRequest
from wcms.server.services import command_queue, pc_service
from wcms.server.services.command_queue import Target
from wcms.server.services.doorbell import Doorbell
from wcms.server.services.heartbeats import HeartbeatBuffer
from wcms.server.services.outbox import Outbox

if TYPE_CHECKING:
    from flask import Flask

    from tests.conftest import Database

TABLES: list[Table] = list(Base.metadata.sorted_tables)
HEARTBEAT, SHUTDOWN, COMMANDS = (
    "/api/client/heartbeat",
    "/api/client/shutdown",
    "/api/client/commands",
)
MID = "TEST-gen-a-0000"  # the calling PC (add_agent names it)
OTHER_MID = "TEST-gen-b-0000"  # a second PC
Rows = dict[str, list[dict[str, Any]]]  # table name -> its rows, by primary key

# ---------------------------------------------------------------------------- the cast


@dataclass
class Cast:
    """The PCs and the database rows every run starts from."""

    pc: Agent
    other: Agent
    revoked_token: str  # the calling PC's token before it registered again
    rows: Rows
    now: Rows | None = None  # the rows as the last run left them


@pytest.fixture
def gen_app(database: Database) -> Iterator[Flask]:
    """The in-process app (conftest's `app`) with polls that never wait: a generated poll
    without a timeout would otherwise hold the test for the whole poll timeout."""
    database.migrate()
    app = create_app(
        {
            "database_url": database.url,
            "data_dir": database.data_dir,
            "background": False,
            "poll_timeout": 0,
        }
    )
    yield app
    app.extensions["wcms"].engine.dispose()


@pytest.fixture
def cast(gen_app: Flask) -> Cast:
    rt: Runtime = gen_app.extensions["wcms"]
    first = add_agent(rt, "gen-a")
    other = add_agent(rt, "gen-b")
    pc = _register_again(rt, first)
    with rt.sessions() as s:  # something for the calling PC's polls to fetch
        for kind, args in ((CommandType.MESSAGE, {"text": "hi"}), (CommandType.SHUTDOWN, {})):
            command_queue.queue(
                s,
                actor="alice",
                kind=kind,
                args=args,
                target=Target(pc_ids=(pc.pc_id,)),
                now=utcnow(),
                server_secret=rt.secret_key,
            )
        s.commit()
    return Cast(pc, other, first.token, _rows(rt))


def _register_again(rt: Runtime, first: Agent) -> Agent:
    """The PC registers again with its token: the old token is revoked, a new one issued."""
    req = RegisterRequest.model_validate(
        {"pin": "000000", "machine_id": first.machine_id, "hostname": "gen-a"}
    )
    with rt.sessions() as s:
        pc, token, _t = pc_service.register(
            s, req, utcnow(), rt.presence.timing.offline_after, token=first.token, approve=True
        )
        s.commit()
    rt.forget_tokens(pc.id)
    return Agent(pc.id, first.machine_id, token)


def _rows(rt: Runtime) -> Rows:
    with rt.engine.connect() as conn:
        return {
            t.name: [
                dict(r._mapping) for r in conn.execute(select(t).order_by(*t.primary_key.columns))
            ]
            for t in TABLES
        }


def _restore(rt: Runtime, cast: Cast, known_online: bool) -> None:
    """The database and the process state every run starts from. Only the rows the last run
    changed are put back (a run changes a few; rewriting every table is slow on PostgreSQL)."""
    now = cast.rows if cast.now is None else cast.now
    with rt.engine.begin() as conn:
        for table in reversed(TABLES):  # new rows, dependents first
            keys = list(table.primary_key.columns)
            old = {_key(table, r) for r in cast.rows[table.name]}
            for row in now[table.name]:
                if _key(table, row) not in old:
                    conn.execute(table.delete().where(*[c == row[c.name] for c in keys]))
        for table in TABLES:  # changed and deleted rows, parents first
            keys = list(table.primary_key.columns)
            current = {_key(table, r): r for r in now[table.name]}
            for row in cast.rows[table.name]:
                found = current.get(_key(table, row))
                if found is None:
                    conn.execute(table.insert(), [row])
                elif found != row:
                    where = [c == row[c.name] for c in keys]
                    conn.execute(table.update().where(*where).values(row))
    cast.now = None
    rt.tokens.clear()
    rt.buffer = HeartbeatBuffer(rt.settings.metrics_sample_interval)
    rt.doorbell = Doorbell()
    rt.outbox = Outbox()
    for pc_id in (cast.pc.pc_id, cast.other.pc_id):
        rt.buffer.set_online(pc_id, known_online)


def _key(table: Table, row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[c.name] for c in table.primary_key.columns)


def _written(before: Rows, after: Rows) -> dict[str, list[str]]:
    """The rows a run wrote: changed columns of old rows, new rows without their id, deleted
    keys; a time a run set is only `<now>` (the two runs happen at different instants)."""
    out: dict[str, list[str]] = {}
    for table in TABLES:
        old = {_key(table, r): r for r in before[table.name]}
        changes = []
        for row in after[table.name]:
            key = _key(table, row)
            base = old.pop(key, None)
            if base == row:
                continue
            cols = {
                name: "<now>" if isinstance(value, dt.datetime) else value
                for name, value in row.items()
                if base is None or base[name] != value
            }
            if base is None:
                cols.pop("id", None)  # ids from a sequence differ between the two runs
            changes.append(repr((key if base is not None else "new", sorted(cols.items()))))
        changes += [repr(("deleted", key)) for key in old]
        if changes:
            out[table.name] = sorted(changes)
    return out


# ---------------------------------------------------------------------------- the requests


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    query: str
    body: bytes | None
    content_type: str | None
    authorization: str  # a template: {pc}, {other}, {revoked} become the cast's tokens
    known_online: bool  # whether this process knows the PC online (the heartbeat fast case)

    def send(self, wsgi: Any, cast: Cast) -> Answer:
        auth = self.authorization.format(
            pc=cast.pc.token, other=cast.other.token, revoked=cast.revoked_token
        )
        return call(
            wsgi,
            self.method,
            self.path,
            query=self.query,
            body=self.body,
            content_type=self.content_type,
            authorization=auth or None,
        )


HALF = st.sampled_from([True, False])  # an ordinary request (the fast path's own case) or not
MOSTLY = st.sampled_from([True, True, False])  # a PC this process knows to be online
AUTHORIZATIONS = [
    "Bearer {pc}",
    "Bearer {pc}",  # the valid one, twice as likely
    "bearer   {pc}  ",
    "Bearer {other}",
    "Bearer {revoked}",
    "Bearer not-a-token",
    "Bearer",
    "Bearer ",
    "Basic {pc}",
    "{pc}",
    "",
]
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "Application/JSON ; charset=UTF-8",
    "application/json; charset=latin-1",
    "application/vnd.wcms+json",
    "text/plain",
    None,
]
NAMES = st.one_of(  # what a PC may send: controls are stripped from it (schemas.PcReport)
    st.sampled_from(["alice", "", "al\x00ice", "\u202eecila", "a\u2066b\u2069c"]),
    st.text(max_size=6),
)
TEXT = st.one_of(NAMES, st.just("x" * 256), st.integers())
MACHINE_IDS = st.sampled_from(
    [
        MID,
        MID,
        OTHER_MID,
        "TEST-unknown-0000",
        "short",
        "TEST\x00gen-a-0000",
        "\u202eTEST-gen-a-0000",
        42,
        None,
    ]
)
PERCENT = st.floats(min_value=0, max_value=100)
NUMBERS = st.one_of(st.sampled_from([0, 100, -1, 101, "5", True, None, 1e400, 2**70]), PERCENT)
# Each field: what an ordinary client sends (None: it never sends it), and anything else.
Fields = dict[str, tuple[st.SearchStrategy[Any] | None, st.SearchStrategy[Any]]]
HEARTBEAT_FIELDS: Fields = {
    "cpu_percent": (PERCENT, NUMBERS),
    "ram_percent": (PERCENT, NUMBERS),
    "uptime": (st.integers(0, 10**6), NUMBERS),
    "boot_time": (st.just(1.7e9), NUMBERS),
    "current_user": (NAMES, TEXT),
    "processes": (st.lists(NAMES, max_size=3), st.lists(TEXT, max_size=3)),
    "disks": (
        st.just([{"mount": "C:", "total": 10, "used": 5}]),
        st.sampled_from([[], [{"mount": 1}], "x"]),
    ),
    "event": (None, st.sampled_from(["logon", "resume", "boot", "bogus", 3, None])),
    "hardware": (None, st.sampled_from([{"os_name": "Linux"}, {}, "x"])),
    "nope": (None, st.just(1)),
}
SHUTDOWN_FIELDS: Fields = {
    "reason": (
        st.sampled_from(["shutdown", "restart", "sleep", "agent_stopped"]),
        st.sampled_from(["x", 5, None, "", "Shutdown"]),
    ),
    "nope": (None, st.just(1)),
}


@st.composite
def json_body(draw: st.DrawFn, fields: Fields, ordinary: bool) -> bytes:
    """A body: an ordinary client's, or one with any fields, values and framing."""
    obj: dict[str, Any] = {}
    if ordinary or draw(st.integers(0, 9)):  # mostly with a machine id
        obj["machine_id"] = MID if ordinary else draw(MACHINE_IDS)
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)):
        usual, unusual = fields[name]
        if usual is None and ordinary:
            continue
        pick = usual if usual is not None and (ordinary or draw(st.booleans())) else unusual
        if name == "nope":  # a field no model has, under a name an error echoes
            name = draw(st.sampled_from(["\u202enope", "no\x00pe", "n\u00f6pe", "nope"]))
        obj[name] = draw(pick)
    raw = json.dumps(obj).encode()
    forms = ["valid"] * 6 + ["empty", "truncated", "list", "null", "oversized", "full"]
    form = "valid" if ordinary else draw(st.sampled_from(forms))
    if form == "valid":
        return raw
    if form == "empty":
        return b""
    if form == "truncated":
        return raw[: len(raw) // 2]
    if form in ("list", "null"):
        return b"[1, 2]" if form == "list" else b"null"
    size = MAX_BODY_BYTES + 1 if form == "oversized" else MAX_BODY_BYTES  # "full": the limit
    return raw[:-1] + b', "pad": "' + b"x" * (size - len(raw) - 10) + b'"}'


@st.composite
def post_request(draw: st.DrawFn, path: str, fields: Fields) -> Req:
    ordinary = draw(HALF)
    return Req(
        "POST",
        path,
        "" if ordinary else draw(st.sampled_from(["", "machine_id=x"])),
        draw(json_body(fields, ordinary)),
        draw(st.sampled_from(CONTENT_TYPES[:3] if ordinary else CONTENT_TYPES)),
        AUTHORIZATIONS[0] if ordinary else draw(st.sampled_from(AUTHORIZATIONS)),
        draw(MOSTLY),
    )


QUERY_VALUES: Fields = {
    "machine_id": (
        st.just(MID),
        st.sampled_from(
            [
                OTHER_MID,
                "short",
                "TEST%00gen-a-0000",
                "TEST-gen-a-0000%00",
                quote("\u202e") + MID,
                "",
            ]
        ),
    ),
    "timeout": (
        st.sampled_from(["0", "5", "0.5"]),
        st.sampled_from(["x", "-1", "1e3", "1e9", "nan", "inf", ""]),
    ),
    "boot_time": (
        st.sampled_from(["0", "1700000000"]),
        st.sampled_from(["-5", "abc", "1e12", "1e300"]),
    ),
    "extra": (None, st.sampled_from(["1", ""])),
}


@st.composite
def poll_request(draw: st.DrawFn) -> Req:
    """A poll's query: an ordinary client's, or repeated, missing, extra and bad parameters."""
    ordinary = draw(HALF)
    pairs = [("machine_id", MID)] if ordinary or draw(st.integers(0, 5)) else []
    names = st.sampled_from(["timeout", "boot_time"] if ordinary else sorted(QUERY_VALUES))
    for name in draw(st.lists(names, max_size=3, unique=ordinary)):  # repeats: repeated keys
        usual, unusual = QUERY_VALUES[name]
        pick = usual if usual is not None and (ordinary or draw(st.booleans())) else unusual
        pairs.append((name, draw(pick)))
    if not ordinary and draw(HALF):  # a NUL: refused before any view, by name or by value
        pairs.append(draw(st.sampled_from([("timeout", "0%00"), ("ex%00tra", "1")])))
    return Req(
        "GET",
        COMMANDS,
        "&".join(f"{k}={v}" for k, v in draw(st.permutations(pairs))),
        None,
        None,
        AUTHORIZATIONS[0] if ordinary else draw(st.sampled_from(AUTHORIZATIONS)),
        draw(MOSTLY),
    )


REQUESTS: dict[str, Callable[[], st.SearchStrategy[Req]]] = {
    "heartbeat": lambda: post_request(HEARTBEAT, HEARTBEAT_FIELDS),
    "shutdown": lambda: post_request(SHUTDOWN, SHUTDOWN_FIELDS),
    "commands": poll_request,
}

# What these tests found once, sent on every run whatever the generator draws.
_ODD_NAME = json.dumps({"machine_id": MID, "\u202enope": 1}).encode()  # an error echoes it
FOUND: dict[str, list[Req]] = {
    "heartbeat": [Req("POST", HEARTBEAT, "", _ODD_NAME, "application/json", "Bearer {pc}", True)],
    "shutdown": [Req("POST", SHUTDOWN, "", _ODD_NAME, "application/json", "Bearer {pc}", True)],
    "commands": [Req("GET", COMMANDS, f"machine_id={MID}%00", None, None, "Bearer {pc}", True)],
}

# ---------------------------------------------------------------------------- the comparison


def _run(
    rt: Runtime, fp: AgentFastPath, wsgi: Any, req: Req, cast: Cast
) -> tuple[int, Answer, dict[str, list[str]]]:
    """One run from the cast's state: whether the fast path answered, the answer, the rows."""
    _restore(rt, cast, req.known_online)
    before = fp.answered[req.path]
    try:
        answer = req.send(wsgi, cast)
        answered = fp.answered[req.path] - before
        rt.tick(utcnow(), check=False)  # what the heartbeat buffer and the outbox hold
    finally:
        cast.now = _rows(rt)  # what the next run must undo, whatever happened
    return answered, answer, _written(cast.rows, cast.now)


AGE = re.compile(rb'"age":[0-9.e+-]+')  # a delivered command's age: the two runs differ in it


def _comparable(answer: Answer) -> tuple[Any, ...]:
    """The answer's headers and bytes, but for the delivered commands' ages (and so the
    length, which must still be the body's)."""
    headers = dict(answer.headers)
    assert int(headers.pop("Content-Length")) == len(answer.body)
    return tuple(headers.items()), AGE.sub(b'"age":0', answer.body)


@pytest.mark.parametrize("route", sorted(REQUESTS))
def test_the_fast_path_answers_generated_requests_exactly_as_flask(
    route: str, gen_app: Flask, cast: Cast
) -> None:
    rt: Runtime = gen_app.extensions["wcms"]
    fp = fast_path(gen_app)
    seen: Counter[str] = Counter()  # who answered, and how

    @settings(
        max_examples=100,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(REQUESTS[route]())
    def compare(req: Req) -> None:
        fast_answered, fast, fast_rows = _run(rt, fp, fp, req, cast)
        flask_answered, slow, slow_rows = _run(rt, fp, fp.app, req, cast)
        assert fast_answered in (0, 1) and flask_answered == 0
        seen["fast " + ("ok" if fast.status == 200 else "error") if fast_answered else "flask"] += 1
        assert fast.status == slow.status
        assert _comparable(fast) == _comparable(slow)
        assert fast_rows == slow_rows

    for req in FOUND[route]:
        compare = example(req)(compare)
    compare()
    # All kinds were generated: the fast path's answers and refusals, and requests it handed
    # to Flask (a poll only for a NUL in its query). A fast path never taken fails here.
    assert seen["fast ok"] >= 3 and seen["fast error"] >= 3 and seen["flask"] >= 3, seen
