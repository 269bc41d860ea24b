"""Failover: N simulated clients reach two nodes through HAProxy; one node is killed with SIGKILL.

Two `wcms server run` nodes (one process each) share one PostgreSQL schema and secret behind
HAProxy (Debian's package, deploy/haproxy.cfg with this run's ports). Every simulated client
behaves as the real one on the wire: a heartbeat every heartbeat_interval x U(0.8, 1.0) (the full
report of bench/_common.heartbeat_body), a command long poll renewed as soon as it answers, a new
connection per request, and after a failed request the client's own back-off (1 s doubling to
60 s, each wait x U(0.5, 1.0)). After a settling period the leader node is killed.

Measured: the seconds until the other node leads; for each client whose request the kill cut
(a poll or a call open on the dead node), the seconds from the kill to its next answered request
(through the survivor); the others never noticed. Then the request rate the
survivor answered per second before and after the kill (its peak: do the clients come back in a
herd?); failed requests by kind; and whether any PC was ever marked lost.

    .venv/bin/python bench/failover.py --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from _common import (
    HOST,
    Conn,
    HttpError,
    Server,
    common_args,
    emit,
    free_port,
    get_json,
    heartbeat_body,
    latency_ms,
    machine,
    register_pcs,
    server_env,
)

ROOT = Path(__file__).resolve().parent.parent


def haproxy_config(front: int, nodes: list[int]) -> str:
    """The repository's deploy/haproxy.cfg, listening on `front`, with `nodes` as its servers
    and no syslog (the benchmark has none)."""
    text = (ROOT / "deploy" / "haproxy.cfg").read_text()
    text = "\n".join(line for line in text.splitlines() if "log /dev/log" not in line)
    text = text.replace("bind :5050", f"bind {HOST}:{front}")
    for default, port in zip(("5051", "5052"), nodes, strict=True):
        text = text.replace(f"127.0.0.1:{default}", f"{HOST}:{port}")
    # Each proxied connection is two descriptors: 8,000 fits the usual limit of 20,000.
    return re.sub(r"maxconn \d+", "maxconn 8000", text) + "\n"


def backoff(failures: int, rand: random.Random) -> float:
    """The real client's wait after `failures` failed requests in a row (wcms.client.main)."""
    return min(60.0, 2.0 ** (failures - 1)) * (0.5 + 0.5 * rand.random())


class Fleet:
    def __init__(self, port: int, interval: float) -> None:
        self.port = port
        self.interval = interval
        self.stop = asyncio.Event()
        self.answered: list[float] = []  # monotonic time of every answered request
        self.cut: dict[str, float] = {}  # clients with a request failed after the kill: when
        self.back: dict[str, float] = {}  # their first answered request sent after the kill
        self.killed_at: float | None = None
        self.errors: Counter[str] = Counter()

    def ok(self, mid: str, sent: float) -> None:
        """An answered request, sent at `sent`: the server had the client's contact then (a
        long poll is contact when it starts)."""
        now = time.monotonic()
        self.answered.append(now)
        if mid in self.cut and self.killed_at is not None and sent >= self.killed_at:
            # The earliest sent: a long poll sent first may answer after a later heartbeat.
            self.back[mid] = min(self.back.get(mid, sent - self.killed_at), sent - self.killed_at)

    def failed(self, mid: str, kind: str) -> None:
        self.errors[kind] += 1
        if self.killed_at is not None:
            self.cut.setdefault(mid, time.monotonic() - self.killed_at)

    async def call(self, mid: str, method: str, path: str, token: str, body: Any = None) -> Any:
        """The answer's JSON, or None after a failure (counted by kind)."""
        raw = None if body is None else json.dumps(body).encode()
        sent = time.monotonic()
        try:
            status, data = await Conn(self.port, keep_alive=False).request(method, path, raw, token)
        except (HttpError, OSError) as exc:
            self.failed(mid, type(exc.__cause__ or exc).__name__)
            return None
        if status != 200:
            self.failed(mid, f"HTTP {status}")
            return None
        self.ok(mid, sent)
        return json.loads(data)

    async def heartbeats(self, i: int, mid: str, token: str, rand: random.Random) -> None:
        await asyncio.sleep(rand.uniform(0, self.interval))
        failures = 0
        while not self.stop.is_set():
            body = heartbeat_body(mid, i)
            answer = await self.call(mid, "POST", "/api/client/heartbeat", token, body)
            failures = 0 if answer is not None else failures + 1
            wait = backoff(failures, rand) if failures else self.interval * rand.uniform(0.8, 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), wait)

    async def polls(self, mid: str, token: str, rand: random.Random, first: float) -> None:
        path = "/api/client/commands?" + urlencode({"machine_id": mid, "timeout": f"{first:.2f}"})
        steady = "/api/client/commands?" + urlencode({"machine_id": mid})
        failures = 0
        while not self.stop.is_set():
            answer = await self.call(mid, "GET", path, token)
            path = steady
            if answer is None:
                failures += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), backoff(failures, rand))
            else:
                failures = 0

    def rate(self, since: float, until: float) -> tuple[float, int]:
        """(mean answered requests per second, the busiest whole second) in [since, until)."""
        per_second = Counter(int(t - since) for t in self.answered if since <= t < until)
        span = max(until - since, 1e-9)
        return sum(per_second.values()) / span, max(per_second.values(), default=0)


def lost_events(url: str) -> int:
    """PCs marked lost at any time in the run (their power events), by the database."""
    import sqlalchemy

    from wcms.server.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            query = "SELECT count(*) FROM power_events WHERE reason = 'lost'"
            return int(conn.execute(sqlalchemy.text(query)).scalar_one())
    finally:
        engine.dispose()


async def leader_of(nodes: list[Server]) -> int | None:
    for n, node in enumerate(nodes):
        with contextlib.suppress(HttpError, OSError):
            status, health = await get_json(node.port, "/healthz")
            if status == 200 and health.get("leader"):
                return n
    return None


async def main_async(args: argparse.Namespace) -> int:
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).exists():
        print("HAProxy is needed: apt-get install haproxy", file=sys.stderr)
        return 2
    info = machine()
    env = {"WCMS_WORKERS": "1", **server_env(args.env)}
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(Server(args.database_url, env, None, args.keep))
        b = stack.enter_context(Server(args.database_url, env, None, args.keep, a))
        nodes = [a, b]
        front = free_port()
        config = a.tmp / "haproxy.cfg"
        config.write_text(haproxy_config(front, [a.port, b.port]))
        proxy = subprocess.Popen(
            [binary, "-db", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=(a.tmp / "haproxy.log").open("wb"),
        )
        stack.callback(proxy.wait, 10)
        stack.callback(proxy.terminate)
        creds = await register_pcs(a, args.clients, uuid.uuid4().hex[:6])
        _s, answer = await get_json(
            a.port, "/api/client/heartbeat", creds[0][1], {"machine_id": creds[0][0]}
        )
        config_of = answer["config"]
        interval = float(config_of["heartbeat_interval"])
        cycle = float(config_of["poll_timeout"])
        fleet = Fleet(front, interval)
        tasks = []
        for i, (mid, token) in enumerate(creds):
            rand = random.Random(i)
            tasks.append(asyncio.create_task(fleet.heartbeats(i, mid, token, rand)))
            first = cycle * (i + 1) / len(creds)
            tasks.append(asyncio.create_task(fleet.polls(mid, token, random.Random(-i), first)))
        settle_from = time.monotonic()
        await asyncio.sleep(args.settle)
        leader = await leader_of(nodes)
        if leader is None:
            print("no node leads", file=sys.stderr)
            return 1
        victim, survivor = nodes[leader], nodes[1 - leader]
        cpu_before = survivor.cpu_seconds()
        fleet.killed_at = time.monotonic()
        victim.kill()
        moved = None
        while time.monotonic() - fleet.killed_at < args.observe:
            if moved is None and await leader_of([survivor]) == 0:
                moved = time.monotonic() - fleet.killed_at
            await asyncio.sleep(0.05)
        observed = time.monotonic() - fleet.killed_at
        survivor_cpu = survivor.cpu_seconds() - cpu_before
        fleet.stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        _s, listing = await get_json(survivor.port, "/api/pcs", survivor.api_key)
        states = Counter(p["state"] for p in listing["pcs"])
        lost = lost_events(survivor.url)
        tracebacks = survivor.errors_in_log()
    killed = fleet.killed_at
    before_mean, before_peak = fleet.rate(max(settle_from, killed - args.settle / 2), killed)
    after_mean, after_peak = fleet.rate(killed, killed + observed)
    recovery = list(fleet.back.values())
    missing = len(fleet.cut) - len(fleet.back)
    met = missing == 0 and lost == 0 and states.get("online", 0) == args.clients
    figures = {
        **info,
        "database": "postgresql",
        "nodes": 2,
        "clients": args.clients,
        "heartbeat_interval_s": interval,
        "poll_timeout_s": cycle,
        "leader_moved_s": None if moved is None else round(moved, 2),
        "clients_cut_by_the_kill": len(fleet.cut),
        "cut_at_s": latency_ms(fleet.cut.values()),
        "back_on_survivor_s": latency_ms(recovery),
        "clients_never_back": missing,
        "all_back_within_s": round(max(recovery), 2) if recovery else None,
        "requests_per_s_before": {"mean": round(before_mean, 1), "peak_second": before_peak},
        "requests_per_s_after": {"mean": round(after_mean, 1), "peak_second": after_peak},
        "survivor_cpu_percent_after": round(100 * survivor_cpu / observed, 1),
        "failed_requests": dict(fleet.errors),
        "states_after": dict(states),
        "pcs_lost": lost,
        "server_tracebacks": tracebacks,
        "met": met,
    }
    rec = figures["back_on_survivor_s"]
    print(
        f"failover, {args.clients} clients on two nodes behind HAProxy: the lease moved in "
        f"{figures['leader_moved_s']} s; {len(fleet.cut)} clients had a request cut, and each "
        f"was answered by the survivor within {figures['all_back_within_s']} s of the kill "
        f"(p50 {rec.get('p50')} ms, p99 {rec.get('p99')} ms; {missing} never); "
        f"requests/s before {before_mean:.0f} (peak "
        f"{before_peak}), after {after_mean:.0f} (peak {after_peak}); survivor CPU "
        f"{figures['survivor_cpu_percent_after']} %; failed requests {dict(fleet.errors)}; "
        f"states after {dict(states)}; lost {lost}"
    )
    emit("failover", figures)
    return 0 if met else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=1000, help="simulated clients (default 1000)")
    p.add_argument(
        "--settle", type=float, default=20, help="seconds of normal running before the kill"
    )
    p.add_argument(
        "--observe",
        type=float,
        default=45,
        help="seconds watched after the kill (default 45: past the standard loss deadline)",
    )
    common_args(p)
    args = p.parse_args()
    if not args.database_url:
        p.error("two nodes need PostgreSQL: --database-url postgresql://...")
    if not 1 <= args.clients <= 5000:
        p.error("--clients: 1 to 5,000")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
