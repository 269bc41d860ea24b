"""Idle connected clients: what they cost the server, and whether admins still get answers.

Modes:
  longpoll   (default) each client is a registered PC holding GET /api/client/commands open,
             asking again as soon as an answer comes back, as the WCMS client's command channel
             does (a new connection per poll, like the client; --connection keep-alive reuses
             one). Renewals every poll_timeout are part of the idle cost.
  keepalive  each client sends GET /healthz once, then keeps its connection open and silent.

Phases: the probes alone (no idle clients), then N idle clients are opened and held; the
server's CPU is measured over --window seconds with nothing else going on; then /healthz and
GET /api/pcs (admin API key) are probed every --probe-every seconds while the clients stay
connected. Latencies are from a fresh connection per probe.

    .venv/bin/python bench/idle_connections.py --connections 2000
    .venv/bin/python bench/idle_connections.py --connections 5000 \
        --env WCMS_PRESENCE_MODE=conservative
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from typing import Any
from urllib.parse import urlencode

import psutil
from _common import (
    Conn,
    HttpError,
    Server,
    common_args,
    emit,
    generator_gc_paused,
    get_json,
    latency_ms,
    machine,
    pin_self,
    plan_cores,
    register_pcs,
    server_env,
)

HELD = 0.95  # share of the clients the kernel must show connected for the target


class Clients:
    """N idle clients and what happened to them."""

    def __init__(self) -> None:
        self.polls_answered = 0
        self.commands_seen = 0
        self.errors: dict[str, int] = {}
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    async def longpoll(
        self, port: int, mid: str, token: str, keep_alive: bool, t: str, first: float
    ) -> None:
        """Poll for ever; the first poll is shorter (`first` s), so renewals spread out."""
        conn = Conn(port, keep_alive)
        query = {"machine_id": mid} | ({"timeout": t} if t else {})
        steady = "/api/client/commands?" + urlencode(query)
        path = "/api/client/commands?" + urlencode({**query, "timeout": f"{first:.2f}"})
        while not self.stop.is_set():
            try:
                status, _body = await conn.request("GET", path, token=token)
            except (HttpError, OSError) as exc:
                self.error(type(exc).__name__)
                await asyncio.sleep(1)
                continue
            if status != 200:
                self.error(f"HTTP {status}")
                await asyncio.sleep(1)
                continue
            self.polls_answered += 1
            path = steady
        conn.close()

    async def keepalive(self, port: int) -> None:
        conn = Conn(port, keep_alive=True)
        try:
            await conn.request("GET", "/healthz")
            await self.stop.wait()
        except (HttpError, OSError) as exc:
            self.error(type(exc).__name__)
        finally:
            conn.close()


def established(server: Server) -> int:
    """Connections the server holds open on its port, counted by the kernel."""
    pids = {p.pid for p in server.processes()}
    n = 0
    for c in psutil.net_connections("tcp4"):
        if c.pid in pids and c.laddr and c.laddr.port == server.port:
            n += c.status == psutil.CONN_ESTABLISHED
    return n


async def probe(server: Server, seconds: float, every: float) -> dict[str, Any]:
    """/healthz and GET /api/pcs, each from a fresh connection, every `every` seconds."""
    loop = asyncio.get_running_loop()
    health: list[float] = []
    pcs: list[float] = []
    errors = 0
    end = loop.time() + seconds
    while loop.time() < end:
        for path, token, into in (
            ("/healthz", None, health),
            ("/api/pcs", server.api_key, pcs),
        ):
            t0 = loop.time()
            try:
                status, _ = await Conn(server.port, keep_alive=False).request(
                    "GET", path, token=token
                )
            except (HttpError, OSError):
                errors += 1
                continue
            if status == 200:
                into.append(loop.time() - t0)
            else:
                errors += 1
        await asyncio.sleep(every)
    return {"healthz_ms": latency_ms(health), "api_pcs_ms": latency_ms(pcs), "errors": errors}


async def has_longpoll(server: Server) -> bool:
    status, doc = await get_json(server.port, "/api/openapi.json")
    return status == 200 and "/api/client/commands" in doc.get("paths", {})


async def main_async(args: argparse.Namespace) -> int:
    server_cores, load_cores = plan_cores(not args.no_pin)
    pin_self(load_cores)
    info = machine()
    with Server(args.database_url, server_env(args.env), server_cores, args.keep) as server:
        mode = args.mode
        if mode == "longpoll" and not await has_longpoll(server):
            print("no long-poll endpoint in this server: using keep-alive sockets")
            mode = "keepalive"
        creds: list[tuple[str, str]] = []
        if mode == "longpoll":
            creds = await register_pcs(server, args.connections, uuid.uuid4().hex[:6])
        _status, health = await get_json(server.port, "/healthz")
        cycle = float(args.poll_timeout or 0)
        if creds and not cycle:  # the server's poll_timeout, from a client answer's config
            hb = {"machine_id": creds[0][0]}
            _status, answer = await get_json(server.port, "/api/client/heartbeat", creds[0][1], hb)
            cycle = float(answer["config"]["poll_timeout"])
        with generator_gc_paused():
            baseline = await probe(server, args.probe_seconds / 2, args.probe_every)
        clients = Clients()
        t0 = time.monotonic()
        keep_alive = args.connection == "keep-alive"
        for i in range(args.connections):
            if mode == "longpoll":
                mid, tok = creds[i]
                first = cycle * (i + 1) / args.connections
                coro = clients.longpoll(server.port, mid, tok, keep_alive, args.poll_timeout, first)
            else:
                coro = clients.keepalive(server.port)
            clients.tasks.append(asyncio.create_task(coro))
            if i % 200 == 199:
                await asyncio.sleep(0.05)  # open them at a pace the backlog takes
        held = 0
        while time.monotonic() - t0 < 120:
            held = established(server)
            if held >= args.connections * 0.99:
                break
            await asyncio.sleep(0.5)
        opened_s = time.monotonic() - t0
        await asyncio.sleep(2)  # let the opening burst settle
        answered0 = clients.polls_answered
        server.start_profile(args.profile)
        (user0, sys0), wall0 = server.cpu_split(), time.monotonic()
        await asyncio.sleep(args.window)
        wall = time.monotonic() - wall0
        server.stop_profile()
        user1, sys1 = server.cpu_split()
        idle_cpu = (user1 + sys1 - user0 - sys0) / wall
        renewals = (clients.polls_answered - answered0) / wall
        print(
            f"  window: server CPU {idle_cpu * 100:.2f} % of one core (user "
            f"{(user1 - user0) / wall * 100:.2f} %, system {(sys1 - sys0) / wall * 100:.2f} %), "
            f"{renewals:.1f} renewals/s",
            flush=True,
        )
        held_during = established(server)
        with generator_gc_paused():
            loaded = await probe(server, args.probe_seconds, args.probe_every)
        rss = server.rss_mib()
        clients.stop.set()
        await asyncio.gather(*clients.tasks, return_exceptions=True)
        tracebacks = server.errors_in_log()
    h, p = loaded["healthz_ms"], loaded["api_pcs_ms"]
    h0, p0 = baseline["healthz_ms"], baseline["api_pcs_ms"]
    met = bool(
        held_during >= args.connections * HELD  # long polls reconnect after every answer
        and h.get("p99", 1e9) < 100
        and p.get("p99", 1e9) < 100
        and not clients.errors
    )
    figures = {
        **info,
        "database": server.database,
        "mode": mode,
        "connection": args.connection if mode == "longpoll" else "keep-alive",
        "presence_mode": health.get("presence_mode"),
        "poll_timeout_asked": args.poll_timeout or "server's",
        "server_cores": sorted(server_cores or []),
        "load_cores": sorted(load_cores or []),
        "connections": args.connections,
        "established_at_start": held,
        "established_after_window": held_during,
        "open_s": round(opened_s, 1),
        "window_s": args.window,
        "idle_server_cpu_percent_of_one_core": round(idle_cpu * 100, 2),
        "idle_server_cpu_user_percent": round((user1 - user0) / wall * 100, 2),
        "idle_server_cpu_system_percent": round((sys1 - sys0) / wall * 100, 2),
        "poll_renewals_per_s": round(renewals, 1),
        "server_rss_mib": round(rss, 1),
        "probes_without_clients": baseline,
        "probes_with_clients": loaded,
        "pcs_listed": len(creds),
        "client_errors": clients.errors,
        "server_tracebacks": tracebacks,
        "met": met,
    }
    print(
        f"idle clients, {server.database}, {mode} ({figures['connection']}), presence mode "
        f"{figures['presence_mode']}: {held_during}/{args.connections} connections held\n"
        f"  server CPU while idle: {figures['idle_server_cpu_percent_of_one_core']} % of one core "
        f"({figures['poll_renewals_per_s']} poll renewals/s), RSS {round(rss)} MiB\n"
        f"  /healthz  p50 {h.get('p50')} ms p99 {h.get('p99')} ms "
        f"(alone: p50 {h0.get('p50')} p99 {h0.get('p99')})\n"
        f"  /api/pcs  p50 {p.get('p50')} ms p99 {p.get('p99')} ms, {len(creds)} PCs listed "
        f"(alone: p50 {p0.get('p50')} p99 {p0.get('p99')})"
        f"\n  client errors {clients.errors or 'none'}; target (held, p99 < 100 ms): "
        f"{'MET' if met else 'MISSED'}"
    )
    emit("idle_connections", figures)
    return 0 if met else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--connections", type=int, default=2000, help="idle clients (default 2000)")
    p.add_argument("--mode", choices=["longpoll", "keepalive"], default="longpoll")
    p.add_argument(
        "--connection",
        choices=["close", "keep-alive"],
        default="close",
        help="long polls: a new connection per poll, as the WCMS client does (default)",
    )
    p.add_argument("--poll-timeout", default="", help="timeout= to ask for (default: server's)")
    p.add_argument("--window", type=float, default=30, help="CPU window in seconds (default 30)")
    p.add_argument("--probe-seconds", type=float, default=20, help="probing time (default 20)")
    p.add_argument("--probe-every", type=float, default=0.2, help="seconds between probes")
    common_args(p)
    args = p.parse_args()
    if not 1 <= args.connections <= 10_000:
        p.error("--connections: 1 to 10,000")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
