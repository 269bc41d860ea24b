"""Two nodes behind HAProxy (Debian's package, started by the test, with the repository's own
deploy/haproxy.cfg): kill -9 either, and every PC stays online through the other (issue 12).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client as http_client
import os
import random
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy

from tests.client.clientproc import ClientProcess
from tests.conftest import ROOT, LiveServer, free_port, http
from tests.server.test_nodes import health, kill_leader, nodes

pytestmark = pytest.mark.slow

PCS = 20
BEAT = 0.5  # seconds between one simulated PC's heartbeats


def proxy_config(port: int, a_port: int, b_port: int) -> str:
    """deploy/haproxy.cfg with this test's ports (no syslog, fewer connections)."""
    text = (ROOT / "deploy" / "haproxy.cfg").read_text()
    text = text.replace("    log /dev/log local0\n", "")
    text = re.sub(r"maxconn \d+", "maxconn 2000", text)
    assert "bind :5050" in text and "127.0.0.1:5051" in text and "127.0.0.1:5052" in text
    text = text.replace("bind :5050", f"bind 127.0.0.1:{port}")
    return text.replace("127.0.0.1:5051", f"127.0.0.1:{a_port}").replace(
        "127.0.0.1:5052", f"127.0.0.1:{b_port}"
    )


def haproxy() -> str:
    path = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )
    if path is None:
        if os.environ.get("WCMS_NO_SKIPS") == "1":
            pytest.fail("HAProxy is not installed (apt-get install haproxy; .ci/run does)")
        pytest.skip("HAProxy is not installed (apt-get install haproxy)")
    return path


@contextlib.contextmanager
def proxied(tmp_path: Path, a: LiveServer, b: LiveServer) -> Iterator[str]:
    """HAProxy in front of nodes A and B, ready; yields its URL."""
    binary = haproxy()
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(proxy_config(port, a.port, b.port))
    with (tmp_path / "haproxy.log").open("wb") as log:
        proxy = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log, stderr=log)
        front = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    if http("GET", front + "/healthz", timeout=1)[0] == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline and proxy.poll() is None, "HAProxy not up"
                time.sleep(0.1)
            yield front
        finally:
            proxy.terminate()
            proxy.wait(10)


def lost_events(node: LiveServer) -> int:
    engine = sqlalchemy.create_engine(node.database.url)
    try:
        with engine.connect() as conn:
            query = "SELECT count(*) FROM power_events WHERE reason = 'lost'"
            return int(conn.execute(sqlalchemy.text(query)).scalar_one())
    finally:
        engine.dispose()


def test_kill_9_a_node_behind_haproxy_and_no_pc_is_ever_shown_lost(tmp_path: Path) -> None:
    """20 PCs heartbeat every 0.5 s through HAProxy to two nodes (a PC is lost 4 s after its
    last contact here, checked every second). kill -9 the leader node: the other takes the
    lease within a second or two, HAProxy sends everything to it, no PC is ever marked lost,
    and a command queued through the proxy afterwards reaches every PC."""
    env = {"WCMS_OFFLINE_AFTER": "4", "WCMS_HEARTBEAT_INTERVAL": "1"}
    with nodes(tmp_path, **env) as (a, b), proxied(tmp_path, a, b) as front:
        pin = a.create_pin(multi=True)
        pcs = []
        for n in range(PCS):
            body = {"pin": pin, "machine_id": f"TEST-FAILOVER-{n:03d}", "hostname": f"pc{n}"}
            status, data = http("POST", front + "/api/client/register", body)
            assert status == 201, data
            pcs.append({**data, "machine_id": body["machine_id"]})
        stop = threading.Event()
        failures: Counter[int | str] = Counter()
        last_ok: dict[str, float] = {}

        def beat(pc: dict[str, Any]) -> None:
            body = {"machine_id": pc["machine_id"]}
            while not stop.is_set():
                try:
                    status, _ = http(
                        "POST", front + "/api/client/heartbeat", body, pc["token"], timeout=3
                    )
                except (OSError, http_client.HTTPException) as exc:
                    # A node killed while answering cuts the response mid-body: a failed
                    # heartbeat, retried at the next beat, as the real client does.
                    status = type(exc).__name__  # type: ignore[assignment]
                if status == 200:
                    last_ok[pc["machine_id"]] = time.monotonic()
                else:
                    failures[status] += 1
                stop.wait(BEAT)

        threads = [threading.Thread(target=beat, args=(pc,)) for pc in pcs]
        for t in threads:
            t.start()
        time.sleep(2)
        leader, survivor = (a, b) if health(a)["leader"] else (b, a)
        assert health(leader)["leader"] and not health(survivor)["leader"]
        killed_at = time.monotonic()
        took = kill_leader(leader, survivor)
        time.sleep(8)  # twice the loss deadline: a PC left without contact would be lost
        stale = {m: killed_at - at for m, at in last_ok.items() if at < killed_at + 4}
        assert len(last_ok) == PCS and not stale, stale
        # A command through the proxy reaches every PC (all polls land on the survivor).
        survivor.admin(
            "POST",
            "/api/commands",
            {
                "type": "message",
                "target": {"pc_ids": [p["pc_id"] for p in pcs]},
                "args": {"text": "after the failover"},
            },
        )
        for pc in pcs:
            path = f"/api/client/commands?machine_id={pc['machine_id']}&timeout=0"
            status, answer = http("GET", front + path, None, pc["token"], timeout=10)
            assert status == 200 and len(answer["commands"]) == 1, answer
        stop.set()
        for t in threads:
            t.join(10)
        states = {p["machine_id"]: p["state"] for p in survivor.pcs()}
        assert set(states.values()) == {"online"}, states
        assert lost_events(survivor) == 0
        print(f"lease moved in {took:.2f} s; heartbeats that failed: {dict(failures)}")


class SimulatedPc:
    """A lab PC's agent reduced to its protocol: a heartbeat thread, and a command channel that
    long-polls, acks, runs (a pause), journals and reports, retrying through the proxy as the
    real client does. It records how often it ran each command and which calls failed."""

    def __init__(self, front: str, pc: dict[str, Any], beat: float, stop: threading.Event):
        self.front, self.pc, self.beat, self.stop = front, pc, beat, stop
        self.body = {"machine_id": pc["machine_id"]}
        self.runs: Counter[int] = Counter()
        self.done: dict[int, dict[str, Any]] = {}  # the journal: results of commands taken on
        self.failures: Counter[str] = Counter()
        self.rng = random.Random(pc["machine_id"])
        self.threads = [
            threading.Thread(target=self._beats, daemon=True),
            threading.Thread(target=self._commands, daemon=True),
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join(15)

    def _call(self, method: str, path: str, body: Any = None, timeout: float = 5) -> Any:
        """(status, body), or None when the connection failed (a node killed mid-answer)."""
        try:
            status, answer = http(
                method, self.front + path, body, self.pc["token"], timeout=timeout
            )
        except (OSError, http_client.HTTPException) as exc:
            self.failures[type(exc).__name__] += 1
            return None
        if status != 200:
            self.failures[str(status)] += 1
        return status, answer

    def _beats(self) -> None:
        while not self.stop.wait(self.beat):
            self._call("POST", "/api/client/heartbeat", self.body)

    def _commands(self) -> None:
        path = f"/api/client/commands?machine_id={self.pc['machine_id']}&timeout=4"
        while not self.stop.is_set():
            got = self._call("GET", path, timeout=15)
            if got is None or got[0] != 200:
                self.stop.wait(0.2)
                continue
            for cmd in got[1]["commands"]:
                self._take(int(cmd["id"]))

    def _take(self, cid: int) -> None:
        if cid not in self.done:
            acked = self._call("POST", f"/api/client/commands/{cid}/ack", self.body)
            if acked is None or acked[0] != 200 or acked[1]["status"] != "running":
                return  # not taken on: it comes again, or it is not to run
            self.runs[cid] += 1
            self.stop.wait(self.rng.uniform(1.0, 5.0))  # the work
            self.done[cid] = {**self.body, "status": "succeeded", "exit_code": 0, "stdout": "ok"}
        while not self.stop.is_set():  # the result, until the server has it
            sent = self._call("POST", f"/api/client/commands/{cid}/result", self.done[cid])
            if sent is not None and sent[0] == 200:
                return
            self.stop.wait(0.2)


SIMULATED = 200
REAL = 3


def read(node: LiveServer, path: str) -> Any:
    """An admin GET with room for a slow moment (30 s) of the one node left serving 203 PCs."""
    status, body = node.api("GET", path, token=node.api_key, timeout=30)
    assert status == 200, body
    return body


def seen_at(iso: str) -> float:
    """Epoch seconds of an ISO time the API answers ("...Z")."""
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# Timing bounds with 203 clients on one surviving process: measured alone (in the parallel phase,
# with five other test processes on two cores, the survivor once took over 10 s to answer).
@pytest.mark.serial
def test_kill_9_a_node_under_200_simulated_and_3_real_clients_with_a_bulk_command_in_flight(
    tmp_path: Path,
) -> None:
    """Issue 12, scenario 4. 200 simulated PCs and 3 real clients (`wcms client run`) reach two
    nodes through HAProxy; a `run` command to all 203 is sent through the leader node A and, with
    part of it acknowledged and running, A is killed with SIGKILL. Every PC is in contact through
    B within one heartbeat interval + 5 s of the kill, none is ever shown lost (sampled every
    0.5 s, and no `lost` event), the leader moves to B within one check interval (plus the
    moment PostgreSQL takes to see A's connection gone), and every PC runs the command exactly
    once: no command lost, none run twice. (The simulated PCs work 1-5 s on it, so most results
    are due after the kill, and those sent to A as it died are sent again, to B.)"""
    beat = 2.0
    env = {"WCMS_HEARTBEAT_INTERVAL": f"{beat:g}", "WCMS_OFFLINE_AFTER": "8"}
    with nodes(tmp_path, **env) as (a, b), proxied(tmp_path, a, b) as front:
        pin = a.create_pin(multi=True)
        stop = threading.Event()
        sims = []
        for n in range(SIMULATED):
            body = {"pin": pin, "machine_id": f"TEST-SIM-{n:03d}", "hostname": f"sim{n:03d}"}
            status, data = http("POST", front + "/api/client/register", body)
            assert status == 201, data
            sims.append(SimulatedPc(front, {**data, "machine_id": body["machine_id"]}, beat, stop))
        reals = [
            ClientProcess(tmp_path, front, pin=pin, env={"WCMS_DRY_RUN_POWER": "1"})
            for _ in range(REAL)
        ]
        try:
            for sim in sims:
                sim.start()
            for client in reals:
                client.start().wait_log("Heartbeat sent with event=boot")
            everyone = {p["machine_id"]: p for p in a.pcs()}
            assert len(everyone) == SIMULATED + REAL
            for client in reals:
                a.wait_pc(client.machine_id, state="online")
            leader, survivor = (a, b) if health(a)["leader"] else (b, a)
            assert health(leader)["leader"] and not health(survivor)["leader"]

            # Watch B's view of every PC from now on: nobody may ever be shown anything but
            # online; and each PC's first contact after the kill (its `last_seen`, by B's clock).
            seen_off: list[tuple[float, str, Any]] = []
            first_contact: dict[str, float] = {}
            killed: list[float] = []  # the kill's wall-clock time, once done
            watching = threading.Event()

            def watch() -> None:
                while not watching.wait(0.5):
                    for p in read(survivor, "/api/pcs")["pcs"]:
                        if p["state"] != "online":
                            seen_off.append((time.monotonic(), p["machine_id"], p["state"]))
                        at = seen_at(p["last_seen"])
                        if killed and at > killed[0]:
                            mid = p["machine_id"]
                            first_contact[mid] = min(first_contact.get(mid, at), at)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()

            command = "sleep 1; echo ran"
            batch = leader.admin(
                "POST",
                "/api/commands",
                {
                    "type": "run",
                    "target": {"pc_ids": [p["id"] for p in everyone.values()]},
                    "args": {"command": command},
                },
            )
            deadline = time.monotonic() + 20
            while True:  # in flight: taken on by most, finished by few
                counts = read(survivor, f"/api/batches/{batch['id']}")["counts"]
                if counts["running"] + counts["succeeded"] >= 100:
                    break
                assert time.monotonic() < deadline, counts
                time.sleep(0.05)
            assert counts["succeeded"] < 100, counts
            killed_at = time.monotonic()
            killed.append(time.time())
            took = kill_leader(leader, survivor)

            deadline = time.monotonic() + 60
            while True:
                view = read(survivor, f"/api/batches/{batch['id']}")
                if view["finished"]:
                    break
                assert time.monotonic() < deadline, view["counts"]
                time.sleep(0.5)
            finished_after = time.monotonic() - killed_at
            time.sleep(beat)  # one more heartbeat round for everyone, watched
            watching.set()
            watcher.join(10)

            by_id = {p["id"]: p for p in read(survivor, "/api/pcs")["pcs"]}
            states = Counter(p["state"] for p in by_id.values())
            assert states == Counter({"online": SIMULATED + REAL}), states
            assert not seen_off, seen_off[:10]
            assert lost_events(survivor) == 0
            assert took < 2.0, took  # one check interval (1 s), plus PostgreSQL seeing A gone
            # Everyone in contact through B within one heartbeat interval + 5 s of the kill.
            back = {mid: at - killed[0] for mid, at in first_contact.items()}
            assert set(back) == set(everyone), set(everyone) - set(back)
            slowest = max(back.values())
            assert slowest <= beat + 5, sorted(back.items(), key=lambda kv: -kv[1])[:5]

            # Every PC ran the command, exactly once.
            assert view["counts"]["succeeded"] == SIMULATED + REAL, view["counts"]
            ids = {c["pc_id"]: c["id"] for c in view["commands"]}
            for sim in sims:
                assert sim.runs == Counter({ids[sim.pc["pc_id"]]: 1}), (sim.pc, sim.runs)
            for client in reals:
                cid = ids[everyone[client.machine_id]["id"]]
                assert client.log().count(f"Running command {cid} ") == 1, client.log()
            attempts = Counter(c["attempts"] for c in view["commands"])
            failed = sum((sim.failures for sim in sims), Counter())
            print(
                f"\nat the kill: {counts}; lease moved in {took:.2f} s; "
                f"every PC back through B within {slowest:.2f} s; "
                f"the batch finished {finished_after:.1f} s after the kill; deliveries per "
                f"command {dict(attempts)}; simulated calls that failed {dict(failed)}"
            )
        finally:
            stop.set()
            for client in reals:
                client.kill()
            for sim in sims:
                sim.join()
