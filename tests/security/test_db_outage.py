"""Issue 10, item 11: a shutdown signal sent while the database is down is kept, not lost.

The shutdown signal is sent once and never retried (the PC is going down). Before, a signal that
met a PostgreSQL outage was a 500 and the PC later showed `lost` instead of `off`. Now the server
keeps the signal in a journal on its own disk (fsynced before it answers) and applies it, in
order and as of the time it arrived, once the database answers, before the presence checker may
call the PC lost.

The live tests start their OWN PostgreSQL cluster (initdb into a temporary directory, pg_ctl on a
free port; never the machine's shared server) and stop it with `pg_ctl stop -m immediate`, a
crash, while a real server (gunicorn + gevent) runs against it. They run in both CI passes (the
SQLite one too: the outage needs a database server of its own). SQLite itself is a file inside
the server process, with no separate server that can go away; it has no outage test.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import sqlalchemy
from flask import Flask

from tests.conftest import LiveServer, free_port, register_pc
from wcms.client.main import post_shutdown_signal
from wcms.protocol import PcState, PowerReason
from wcms.server import migrate
from wcms.server.db import make_engine, utcnow
from wcms.server.errors import http_status
from wcms.server.models import PcInfo, PowerEvent
from wcms.server.runtime import Runtime
from wcms.server.services import accounts, agent, spool
from wcms.server.services.errors import DomainError

SIGNAL_BUDGET = 2.0  # the client's SHUTDOWN_TIMEOUT: the answer must come within it
APPLY_BOUND = 10.0  # seconds after the database returns by which the PC must show `off`
FAST = {  # a loss shows within ~2 s: waiting past it proves the checker never won the race
    "WCMS_HEARTBEAT_INTERVAL": "1",
    "WCMS_POLL_TIMEOUT": "1",
    "WCMS_OFFLINE_AFTER": "2",
    "WCMS_CHECK_INTERVAL": "0.25",
}


# --------------------------------------------------------------------------- the test's cluster


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not candidates:
        raise AssertionError(f"{name} not found (install the PostgreSQL server package)")
    return candidates[-1]


class Cluster:
    """A throw-away PostgreSQL cluster on 127.0.0.1, owned by this test module.

    As root, PostgreSQL refuses to run, so its commands run as the `postgres` user in a
    directory that user owns."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="wcms-outage-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        initdb = [_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust"]
        self._run(*initdb, "-E", "UTF8", "--locale=C", "--no-sync")

    def _run(self, *cmd: str) -> None:
        res = subprocess.run(
            [*self._as, *cmd], capture_output=True, text=True, timeout=120, cwd=self.root
        )
        if res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}")

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
            "-c fsync=off -c full_page_writes=off -c max_connections=60"
        )
        log = str(self.root / "postgres.log")
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-l", log, "-o", options, "-w", "start")

    def crash(self) -> None:
        """The database goes away at once: every backend killed, no checkpoint."""
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        subprocess.run(
            [*self._as, _pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        engine = sqlalchemy.create_engine(
            "postgresql+psycopg://" + self.url.split("://", 1)[1], isolation_level="AUTOCOMMIT"
        )
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.destroy()


@dataclass
class OwnDatabase:
    """What LiveServer needs of a database: a data dir and a URL (here, the test's cluster)."""

    data_dir: Path
    url: str

    def migrate(self) -> None:
        engine = make_engine(self.url)
        try:
            migrate.upgrade(engine)
        finally:
            engine.dispose()


@pytest.fixture
def outage(cluster: Cluster, tmp_path: Path) -> Iterator[Outage]:
    o = Outage(cluster, tmp_path)
    try:
        yield o
    finally:
        if not o.db_up:
            cluster.start()
        for server in o.servers:
            server.stop()


class Outage:
    """Servers on one database of the test's cluster, and the outage to put them through."""

    def __init__(self, cluster: Cluster, tmp: Path) -> None:
        self.cluster = cluster
        self.tmp = tmp
        self.url = cluster.create_database()
        self.servers: list[LiveServer] = []
        self.db_up = True

    def server(self, name: str = "a", api_key: str = "", **env: str) -> LiveServer:
        data = self.tmp / f"data-{name}"
        data.mkdir(exist_ok=True)
        server = LiveServer(self.tmp, OwnDatabase(data, self.url), {**FAST, **env})
        server.api_key = api_key
        self.servers.append(server)
        return server.start()

    def down(self) -> None:
        self.cluster.crash()
        self.db_up = False

    def up(self) -> None:
        self.cluster.start()
        self.db_up = True

    def rows(self, sql: str, **params: Any) -> list[Any]:
        engine = make_engine(self.url)
        try:
            with engine.connect() as conn:
                return list(conn.execute(sqlalchemy.text(sql), params).all())
        finally:
            engine.dispose()

    def events(self, pc_id: int) -> list[tuple[int, str | None, str, str, dt.datetime]]:
        rows = self.rows(
            "SELECT id, from_state, to_state, reason, at FROM power_events"
            " WHERE pc_id = :pc ORDER BY id",
            pc=pc_id,
        )
        return [(r[0], r[1], r[2], r[3], r[4].replace(tzinfo=dt.UTC)) for r in rows]


def heartbeat(server: LiveServer, pc: dict[str, Any], **extra: Any) -> tuple[int, Any]:
    body = {"machine_id": pc["machine_id"], "cpu_percent": 5.0, **extra}
    return server.api("POST", "/api/client/heartbeat", body, token=pc["token"])


def send_signal(server: LiveServer, pc: dict[str, Any], reason: str = "shutdown") -> float:
    """The real client's one shutdown signal; returns how long it took. It must succeed."""
    started = time.monotonic()
    ok = post_shutdown_signal(server.url, pc["machine_id"], pc["token"], reason)
    took = time.monotonic() - started
    assert ok, f"the client saw its shutdown signal fail:\n{server.log()[-3000:]}"
    assert took < SIGNAL_BUDGET, took
    return took


def kill_9(server: LiveServer) -> None:
    """SIGKILL the worker and its master: nothing written on the way out."""
    assert server.proc is not None
    master = psutil.Process(server.proc.pid)
    workers = master.children()
    master.suspend()  # no replacement worker meanwhile
    for worker in workers:
        worker.kill()
    server.stop(signal.SIGKILL)
    psutil.wait_procs(workers, timeout=5)


def wait_for(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last})")


def started_online(server: LiveServer, n: int = 1) -> list[dict[str, Any]]:
    """n PCs registered, online, their tokens in the server's cache (a heartbeat each)."""
    pcs = [register_pc(server) for _ in range(n)]
    for pc in pcs:
        status, body = heartbeat(server, pc)
        assert status == 200, body
    return pcs


def wait_past_the_deadline() -> None:
    """Past every PC's offline_after: were the checker to run first, they would be lost."""
    time.sleep(float(FAST["WCMS_OFFLINE_AFTER"]) + 0.5)  # a deadline to pass, not readiness


# ------------------------------------------------------------------------------ the live tests


def test_a_signal_during_an_outage_shows_off_once_the_database_returns(outage: Outage) -> None:
    server = outage.server()
    (pc,) = started_online(server)
    uncached = register_pc(server)  # registered, never a heartbeat: its token is not cached
    outage.down()

    started = time.monotonic()
    status, body = server.api(
        "POST", "/api/client/shutdown", {"machine_id": pc["machine_id"]}, token=pc["token"]
    )
    assert time.monotonic() - started < SIGNAL_BUDGET
    assert status == 200, body
    assert body["state"] == "offline" and body["reason"] == "shutdown" and body["queued"] is True
    # Kept on disk: in the journal, or already claimed by a replay that waits for the database.
    kept = server.tmp / "data-a" / "spool"
    assert (kept / spool.JOURNAL).exists() or (kept / spool.CLAIMED).exists()

    # What the outage does to everything else: 503 database_unavailable, never a 500.
    status, body = server.api(
        "POST",
        "/api/client/shutdown",
        {"machine_id": uncached["machine_id"]},
        token=uncached["token"],
    )
    assert status == 503 and body["error"]["code"] == "database_unavailable", body
    status, body = heartbeat(server, pc, event="logon")  # a state change: the slow path
    assert status == 503 and body["error"]["code"] == "database_unavailable", body
    status, body = server.api("GET", "/api/pcs", token=server.api_key)
    assert status == 503 and body["error"]["code"] == "database_unavailable", body
    status, body = server.api("GET", "/healthz")
    assert status == 503 and body["status"] == "degraded", body
    assert body["kept_shutdown_signals"] == 1

    wait_past_the_deadline()
    outage.up()
    back = utcnow()
    shown = server.wait_pc(pc["machine_id"], timeout=APPLY_BOUND, status="off")
    assert shown["reason"] == "shutdown" and shown["state"] == "offline"
    # Applied as of its arrival, not of the replay; never `lost` on the way.
    since = dt.datetime.fromisoformat(shown["since"].replace("Z", "+00:00"))
    assert since < back
    reasons = [e[3] for e in outage.events(pc["pc_id"])]
    assert reasons == ["registered", "shutdown"], reasons
    wait_for(
        "journal drained",
        lambda: server.api("GET", "/healthz")[1].get("kept_shutdown_signals") == 0,
        APPLY_BOUND,
    )
    assert "unhandled error" not in server.log()


@pytest.mark.slow
def test_two_nodes_ride_out_a_database_restart_under_load(outage: Outage) -> None:
    """Issue 12, scenario 5: two nodes on the test's own cluster, 16 PCs heartbeating through
    both; the cluster crashes and is started again 6 s later (longer than a PC's 4 s deadline).
    Meanwhile four PCs send their shutdown signals. Both nodes serve again (healthy, notifier
    connected, the same processes) within 10 s of the start; the four show `off`, every other
    PC is online and none was ever `lost` (the heartbeats taken during the outage are written
    once it ends); a command queued before the crash reaches its PCs once."""
    slow = {
        "WCMS_OFFLINE_AFTER": "4",
        "WCMS_CHECK_INTERVAL": "0.5",
        "WCMS_SECRET_KEY": uuid.uuid4().hex * 2,  # one secret for both nodes
    }
    a = outage.server("a", **slow)
    # b takes up its kept signals late (its loop wakes every 2 s): the leader after the restart
    # (most often a, which wakes every 0.5 s) must not judge b's PCs lost meanwhile.
    b = outage.server(
        "b", api_key=a.api_key, **{**slow, "WCMS_CHECK_INTERVAL": "2", "WCMS_FLUSH_INTERVAL": "2"}
    )
    pcs = started_online(a, 16)
    leaving = pcs[8:12]
    stop = threading.Event()
    gone: set[str] = set()
    statuses: Counter[int] = Counter()

    def beat(n: int, pc: dict[str, Any]) -> None:
        node = (a, b)[n % 2]
        while not stop.is_set() and pc["machine_id"] not in gone:
            node = b if node is a else a  # every PC reaches both nodes
            try:
                statuses[heartbeat(node, pc)[0]] += 1
            except OSError:
                statuses[0] += 1
            stop.wait(0.5)

    threads = [threading.Thread(target=beat, args=(n, pc)) for n, pc in enumerate(pcs)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)  # both nodes have every PC's token in their caches
        a.admin(
            "POST",
            "/api/commands",
            {
                "type": "message",
                "target": {"pc_ids": [p["pc_id"] for p in pcs[:4]]},
                "args": {"text": "before the crash"},
            },
        )
        pids = {s.port: _pids(s) for s in (a, b)}

        outage.down()
        time.sleep(0.5)
        for n, pc in enumerate(leaving):
            gone.add(pc["machine_id"])
            send_signal((a, b)[n % 2], pc)  # kept on the node's disk, answered within 2 s
        time.sleep(5.5)  # down 6 s: longer than a PC's deadline (4 s)
        outage.up()
        back = time.monotonic()
        for node in (a, b):
            wait_for(
                f"node on port {node.port} healthy and hearing the others",
                lambda node=node: (
                    (h := node.api("GET", "/healthz"))[0] == 200
                    and h[1]["notifier"] == "connected"
                    and h[1]["kept_shutdown_signals"] == 0
                ),
                10 - (time.monotonic() - back),
            )
        assert time.monotonic() - back < 10
        assert {s.port: _pids(s) for s in (a, b)} == pids, "a node restarted"

        for pc in leaving:
            a.wait_pc(pc["machine_id"], timeout=APPLY_BOUND, status="off", reason="shutdown")
        time.sleep(float(slow["WCMS_OFFLINE_AFTER"]) + 1)  # past every deadline once more
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    staying = [pc for pc in pcs if pc not in leaving]
    shown = {p["machine_id"]: p["status"] for p in a.pcs()}
    assert {shown[pc["machine_id"]] for pc in staying} == {"online"}, shown
    lost = outage.rows("SELECT count(*) FROM power_events WHERE reason = 'lost'")[0][0]
    assert lost == 0, lost
    for n, pc in enumerate(pcs[:4]):
        node = (a, b)[n % 2]
        path = f"/api/client/commands?machine_id={pc['machine_id']}&timeout=0"
        status, answer = node.api("GET", path, token=pc["token"])
        assert status == 200 and [c["type"] for c in answer["commands"]] == ["message"], answer
    assert statuses[200] > 0, statuses
    assert "unhandled error" not in a.log() + b.log()


def _pids(server: LiveServer) -> list[int]:
    assert server.proc is not None and server.proc.poll() is None
    master = psutil.Process(server.proc.pid)
    return sorted([master.pid, *(c.pid for c in master.children())])


def test_signals_of_two_pcs_are_applied_in_the_order_they_arrived(outage: Outage) -> None:
    server = outage.server()
    first, second = started_online(server, 2)
    outage.down()
    send_signal(server, second, "restart")  # the second registered is the first to go down
    send_signal(server, first, "shutdown")
    send_signal(server, second, "shutdown")  # then it goes down again, for good
    outage.up()
    server.wait_pc(first["machine_id"], timeout=APPLY_BOUND, status="off")
    server.wait_pc(second["machine_id"], timeout=APPLY_BOUND, status="off", reason="shutdown")

    ev_first, ev_second = outage.events(first["pc_id"]), outage.events(second["pc_id"])
    assert [e[1:4] for e in ev_second[1:]] == [
        ("online", "offline", "restart"),
        ("offline", "offline", "shutdown"),
    ]
    assert [e[1:4] for e in ev_first[1:]] == [("online", "offline", "shutdown")]
    # In arrival order: the database wrote them in the journal's order, at their arrival times.
    applied = sorted([ev_second[1], ev_first[1], ev_second[2]], key=lambda e: e[0])
    assert [e[0] for e in applied] == [ev_second[1][0], ev_first[1][0], ev_second[2][0]]
    assert applied[0][4] < applied[1][4] < applied[2][4]


def test_a_server_killed_during_the_outage_replays_its_journal_at_start(outage: Outage) -> None:
    """kill -9 while signals wait on disk; at the next start they are applied, except the one
    of a PC that came back meanwhile (it reached another server first): its older signal must
    not turn it off."""
    slow = {"WCMS_OFFLINE_AFTER": "120"}  # no PC lost while the servers restart
    server = outage.server(**slow)
    gone, back = started_online(server, 2)
    outage.down()
    send_signal(server, gone)
    send_signal(server, back, "restart")
    kill_9(server)  # nothing written on the way out: the signals are only in the journal
    outage.up()
    states = outage.rows(
        "SELECT state FROM pc_info WHERE id IN (:a, :b)", a=gone["pc_id"], b=back["pc_id"]
    )
    assert states == [("online",), ("online",)]
    # The restarted PC reaches another server (its own data dir, the same database) first;
    # without a background loop, which would judge the other PC lost, knowing no journal.
    # Nodes of one database share one secret (a node with another is refused at start).
    secret = (outage.tmp / "data-a" / "secret_key").read_text().strip()
    other = outage.server(
        "b", api_key=server.api_key, WCMS_BACKGROUND="0", WCMS_SECRET_KEY=secret, **slow
    )
    status, body = heartbeat(other, back, event="boot", boot_time=time.time() - 20)
    assert status == 200, body
    other.stop()

    server.start()  # replays the journal a crash left
    shown = server.wait_pc(gone["machine_id"], timeout=APPLY_BOUND, status="off")
    assert shown["reason"] == "shutdown"
    assert [e[3] for e in outage.events(gone["pc_id"])] == ["registered", "shutdown"]
    wait_for(
        "journal drained",
        lambda: server.api("GET", "/healthz")[1].get("kept_shutdown_signals") == 0,
        APPLY_BOUND,
    )
    assert not (server.tmp / "data-a" / "spool" / spool.JOURNAL).exists()
    assert not (server.tmp / "data-a" / "spool" / spool.CLAIMED).exists()
    shown = server.get_pc(back["machine_id"])
    assert shown is not None and shown["status"] == "online", shown
    assert [e[3] for e in outage.events(back["pc_id"])] == ["registered"]


# ------------------------------------------------------------------- the journal, in-process


@pytest.fixture
def app(app: Flask) -> Iterator[Flask]:
    """The shared in-process app; its first engine is disposed too, as a test replaces it."""
    engine = app.extensions["wcms"].engine
    yield app
    engine.dispose()


def _database_away(rt: Runtime) -> None:
    """The runtime's database stops answering: its engine points at a port nothing listens on."""
    rt.engine.dispose()
    rt.engine = make_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing_listens")
    rt.sessions.configure(bind=rt.engine)


@pytest.fixture
def rt(app: Flask) -> Runtime:
    runtime: Runtime = app.extensions["wcms"]
    return runtime


def _online_pc(rt: Runtime, machine_id: str, now: dt.datetime) -> int:
    with rt.sessions() as s:
        pc = PcInfo(
            machine_id=machine_id,
            hostname="lab-pc",
            state=PcState.ONLINE,
            is_online=True,
            reason=PowerReason.BOOT,
            state_since=now,
            last_seen=now,
            offline_after=now + dt.timedelta(seconds=30),
            registered_at=now,
        )
        s.add(pc)
        s.commit()
        return pc.id


def _state(rt: Runtime, pc_id: int) -> tuple[str, str, dt.datetime]:
    with rt.sessions() as s:
        pc = s.get(PcInfo, pc_id)
        assert pc is not None
        return pc.state, pc.reason, pc.state_since


def _events(rt: Runtime, pc_id: int) -> list[tuple[str | None, str, str]]:
    with rt.sessions() as s:
        rows = s.execute(
            sqlalchemy.select(PowerEvent).where(PowerEvent.pc_id == pc_id).order_by(PowerEvent.id)
        ).scalars()
        return [(e.from_state, e.to_state, e.reason) for e in rows]


T0 = dt.datetime(2026, 11, 27, 9, 0, tzinfo=dt.UTC)


def test_a_crash_between_commit_and_truncation_applies_nothing_twice(rt: Runtime) -> None:
    pc_id = _online_pc(rt, "PC-CRASH-0001", T0)
    rt.spool.append(pc_id, "PC-CRASH-0001", "restart", T0 + dt.timedelta(seconds=5))
    rt.spool.append(pc_id, "PC-CRASH-0001", "shutdown", T0 + dt.timedelta(seconds=9))
    batch = rt.spool.claim()
    assert batch is not None and [e.seq for e in batch] == [1, 2]
    with rt.sessions() as s:
        for entry in batch:
            spool.apply_kept(s, entry)
    # ... and the process dies before done() (its replay lock goes with it): the claimed file is
    # still there at the next start.
    rt.spool.close()
    again = spool.ShutdownJournal(rt.settings.data_dir / "spool")
    assert again.pending == 2
    rt.spool = again
    assert rt.replay_shutdowns() == []  # every entry a no-op the second time
    assert rt.spool.pending == 0 and rt.spool.claim() is None
    assert _state(rt, pc_id) == ("offline", "shutdown", T0 + dt.timedelta(seconds=9))
    assert _events(rt, pc_id) == [
        ("online", "offline", "restart"),
        ("offline", "offline", "shutdown"),
    ]


def test_an_older_signal_never_overrides_a_newer_change(rt: Runtime) -> None:
    pc_id = _online_pc(rt, "PC-ORDER-0001", T0)
    late = spool.SpooledSignal(2, pc_id, "PC-ORDER-0001", "shutdown", T0 + dt.timedelta(seconds=9))
    early = spool.SpooledSignal(1, pc_id, "PC-ORDER-0001", "restart", T0 + dt.timedelta(seconds=5))
    with rt.sessions() as s:
        assert spool.apply_kept(s, late) is not None
        assert spool.apply_kept(s, early) is None
    assert _state(rt, pc_id)[1] == "shutdown"


def test_a_kept_signal_replaces_a_later_lost(rt: Runtime) -> None:
    """The checker's `lost` is a guess; the signal (earlier, but with no contact since) is the
    truth, as it is for a signal that arrives directly after a loss."""
    pc_id = _online_pc(rt, "PC-LOST-0001", T0)
    signal_at = T0 + dt.timedelta(seconds=5)
    rt.spool.append(pc_id, "PC-LOST-0001", "shutdown", signal_at)
    with rt.sessions() as s:
        from wcms.server.services import pc_service

        lost = pc_service.mark_overdue_lost(s, T0 + dt.timedelta(seconds=40), 1.0)
    assert [t.reason for t in lost] == ["lost"]
    assert [t.reason for t in rt.replay_shutdowns()] == ["shutdown"]
    assert _state(rt, pc_id) == ("offline", "shutdown", signal_at)


def test_signals_wait_behind_kept_ones_while_any_are_kept(rt: Runtime, app: Flask) -> None:
    now = utcnow()
    a = _online_pc(rt, "PC-QUEUE-000A", now)
    b = _online_pc(rt, "PC-QUEUE-000B", now)
    rt.spool.append(a, "PC-QUEUE-000A", "shutdown", now)  # kept during an outage, not replayed
    with app.app_context(), rt.sessions() as s:
        who = agent.PcIdentity(b, "PC-QUEUE-000B")
        answer = agent.going_down(rt, s, who, "shutdown")
    assert answer["queued"] is True  # the database answers, but b must not overtake a
    assert _state(rt, b)[0] == "online"
    applied = rt.replay_shutdowns()
    assert [t.pc_id for t in applied] == [a, b]


def test_a_torn_last_line_is_cut_and_the_sequence_goes_on(tmp_path: Path) -> None:
    journal = spool.ShutdownJournal(tmp_path)
    journal.append(1, "PC-TORN-00001", "shutdown", T0)
    with (tmp_path / spool.JOURNAL).open("ab") as f:
        f.write(b'{"seq":2,"pc_id":2,"machine_id":"PC-TO')  # the crash came mid-write
    journal = spool.ShutdownJournal(tmp_path)
    assert journal.pending == 1
    entry = journal.append(3, "PC-TORN-00003", "restart", T0)
    assert entry.seq == 2
    lines = (tmp_path / spool.JOURNAL).read_bytes().splitlines()
    assert [json.loads(line)["pc_id"] for line in lines] == [1, 3]
    assert oct((tmp_path / spool.JOURNAL).stat().st_mode & 0o777) == oct(0o600)


def test_a_cached_token_outlives_its_ttl_while_the_database_is_away(rt: Runtime) -> None:
    """Every cached token goes stale after TOKEN_CACHE_TTL; an outage longer than that must not
    turn the signals of the PCs this process knows into 503s."""
    token = "wcms_pc_stale-token-for-the-outage"
    rt.tokens.remember(accounts.sha256(token), 41, "PC-STALE-0001", at=time.monotonic() - 3600)
    _database_away(rt)
    who = agent.shutdown_caller(rt, token, "PC-STALE-0001")
    assert (who.pc_id, who.machine_id) == (41, "PC-STALE-0001")
    with pytest.raises(DomainError) as mismatch:
        agent.shutdown_caller(rt, token, "PC-OTHER-0002")
    assert http_status(mismatch.value) == 403
    with pytest.raises(sqlalchemy.exc.OperationalError):  # answered 503 by errors.py
        agent.shutdown_caller(rt, "wcms_pc_never-seen", "PC-STALE-0001")


def test_http_answers_503_not_500_when_the_database_is_away(
    app: Flask, rt: Runtime, tmp_path: Path
) -> None:
    _database_away(rt)
    status, body = _flask(app, "GET", "/api/pcs", "wcms_ak_not-a-real-key")
    assert status == 503 and body["error"]["code"] == "database_unavailable", body


def _flask(app: Flask, method: str, path: str, token: str) -> tuple[int, Any]:
    resp = app.test_client().open(path, method=method, headers={"Authorization": f"Bearer {token}"})
    return resp.status_code, resp.get_json()


def test_heartbeats_taken_while_the_database_is_away_are_written_once_it_returns(
    rt: Runtime,
) -> None:
    """A flush that cannot reach the database keeps its heartbeats for the next one, so a PC
    that kept calling during an outage is written with its newest contact, not left to look
    silent since before it."""
    from wcms.server.schemas import HeartbeatRequest

    pc_id = _online_pc(rt, "TEST-BUFFER-0001", T0)
    rt.buffer.set_online(pc_id, True)
    seen = T0 + dt.timedelta(seconds=20)
    hb = HeartbeatRequest(machine_id="TEST-BUFFER-0001", cpu_percent=7.0)
    rt.buffer.add(pc_id, hb, seen)
    reachable = rt.engine
    away = make_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing_listens")
    rt.sessions.configure(bind=away)
    try:
        with rt.sessions() as s, pytest.raises(sqlalchemy.exc.OperationalError):
            rt.buffer.flush(s, 30)
    finally:
        rt.sessions.configure(bind=reachable)
        away.dispose()
    assert rt.buffer.pending_count() == 1
    with rt.sessions() as s:
        rt.buffer.flush(s, 30)
    with rt.sessions() as s:
        pc = s.get(PcInfo, pc_id)
        assert pc is not None
        assert (pc.last_seen, pc.offline_after) == (seen, seen + dt.timedelta(seconds=30))
