"""A bulk command to N connected clients: how long until each one has it.

N registered PCs each hold the command long poll (GET /api/client/commands) open, asking again
as soon as an answer comes back, with a new connection per poll as the WCMS client does. Their
first polls are spread over one poll_timeout, so they are not all renewing at the same moment.
Each round an admin sends one `message` command to every online PC (POST /api/commands,
target all_online, API key); a client's latency is from just before that request is written to
the moment its poll answer carrying the command has been read. Clients then acknowledge and
report a result, as the real client does (that traffic competes with the remaining deliveries).

    .venv/bin/python bench/bulk_command.py                  # 1,000 clients, 3 rounds
    .venv/bin/python bench/bulk_command.py --nodes 2 \
        --database-url postgresql://postgres@127.0.0.1:5432/test   # split over two nodes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from typing import Any
from urllib.parse import urlencode

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


class Fleet:
    def __init__(self, port: int, ack: bool) -> None:
        self.port = port
        self.ack = ack
        self.sent_at: dict[str, float] = {}  # round text -> when the admin's request went out
        self.received: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}
        self.stop = asyncio.Event()
        self.polling = 0

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    async def client(self, mid: str, token: str, first: float, port: int) -> None:
        loop = asyncio.get_running_loop()
        conn = Conn(port, keep_alive=False)
        steady = "/api/client/commands?" + urlencode({"machine_id": mid})
        path = "/api/client/commands?" + urlencode({"machine_id": mid, "timeout": f"{first:.2f}"})
        body = json.dumps({"machine_id": mid}).encode()
        while not self.stop.is_set():
            try:
                self.polling += 1
                status, data = await conn.request("GET", path, token=token)
            except (HttpError, OSError) as exc:
                self.error(type(exc).__name__)
                await asyncio.sleep(1)
                continue
            finally:
                self.polling -= 1
            now = loop.time()
            path = steady
            if status != 200:
                self.error(f"poll HTTP {status}")
                await asyncio.sleep(1)
                continue
            for cmd in json.loads(data)["commands"]:
                text = cmd.get("args", {}).get("text", "")
                if text in self.sent_at and cmd.get("attempt") == 1:
                    self.received[text].append(now - self.sent_at[text])
                if self.ack:
                    await self.finish(conn, cmd["id"], mid, token, body)

    async def finish(self, conn: Conn, cid: int, mid: str, token: str, body: bytes) -> None:
        try:
            await conn.request("POST", f"/api/client/commands/{cid}/ack", body, token)
            result = {"machine_id": mid, "status": "succeeded", "exit_code": 0}
            await conn.request(
                "POST", f"/api/client/commands/{cid}/result", json.dumps(result).encode(), token
            )
        except (HttpError, OSError) as exc:
            self.error(f"ack/result {type(exc).__name__}")


async def send_round(server: Server, fleet: Fleet, text: str, n: int, wait: float) -> Any:
    loop = asyncio.get_running_loop()
    body = {
        "type": "message",
        "args": {"text": text, "title": "bench"},
        "target": {"all_online": True},
    }
    fleet.received[text] = []
    conn = Conn(server.port, keep_alive=False)
    fleet.sent_at[text] = loop.time()
    status, data = await conn.request(
        "POST", "/api/commands", json.dumps(body).encode(), server.api_key
    )
    post_s = loop.time() - fleet.sent_at[text]
    if status != 201:
        raise HttpError(f"POST /api/commands: {status} {data[:300]!r}")
    deadline = loop.time() + wait
    while len(fleet.received[text]) < n and loop.time() < deadline:
        await asyncio.sleep(0.01)
    got = fleet.received[text]
    return {
        "targets": json.loads(data).get("total", n),
        "received": len(got),
        "post_answered_ms": round(post_s * 1000, 1),
        "latency_ms": latency_ms(got),
        "met": len(got) == n and latency_ms(got).get("p99", 1e9) < 1000,
    }


async def main_async(args: argparse.Namespace) -> int:
    server_cores, load_cores = plan_cores(not args.no_pin)
    pin_self(load_cores)
    info = machine()
    env = server_env(args.env)
    if args.nodes > 1:
        env = {"WCMS_WORKERS": "1", **env}  # a node is one process here
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(Server(args.database_url, env, server_cores, args.keep))
        nodes = [server] + [
            stack.enter_context(Server(args.database_url, env, server_cores, args.keep, server))
            for _ in range(args.nodes - 1)
        ]
        creds = await register_pcs(server, args.clients, uuid.uuid4().hex[:6])
        _s, answer = await get_json(
            server.port, "/api/client/heartbeat", creds[0][1], {"machine_id": creds[0][0]}
        )
        cycle = float(answer["config"]["poll_timeout"])
        fleet = Fleet(server.port, not args.no_ack)
        # Client i polls node i mod N; the admin sends through the first node.
        tasks = [
            asyncio.create_task(
                fleet.client(mid, tok, cycle * (i + 1) / len(creds), nodes[i % len(nodes)].port)
            )
            for i, (mid, tok) in enumerate(creds)
        ]
        t0 = time.monotonic()
        while fleet.polling < args.clients and time.monotonic() - t0 < 60:
            await asyncio.sleep(0.2)
        await asyncio.sleep(args.settle)
        rounds = []
        server.start_profile(args.profile)
        for r in range(args.rounds):
            cpu0 = sum(node.cpu_seconds() for node in nodes)
            with generator_gc_paused():
                one = await send_round(
                    server, fleet, f"bench-{r}-{uuid.uuid4().hex[:6]}", len(creds), 30
                )
            one["server_cpu_s"] = round(sum(node.cpu_seconds() for node in nodes) - cpu0, 2)
            rounds.append(one)
            lat = one["latency_ms"]
            print(
                f"  round {r + 1}: {one['received']}/{len(creds)} received; p50 {lat.get('p50')} ms"
                f"  p95 {lat.get('p95')} ms  p99 {lat.get('p99')} ms  max {lat.get('max')} ms"
                f"  (POST answered in {one['post_answered_ms']} ms)",
                flush=True,
            )
            await asyncio.sleep(args.pause)
        server.stop_profile()
        fleet.stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        tracebacks = sum(node.errors_in_log() for node in nodes)
    everyone = [x for got in fleet.received.values() for x in got]
    met = all(one["met"] for one in rounds) and not fleet.errors
    figures = {
        **info,
        "database": server.database,
        "server_cores": sorted(server_cores or []),
        "load_cores": sorted(load_cores or []),
        "clients": args.clients,
        "nodes": args.nodes,
        "poll_timeout_s": cycle,
        "ack_and_result": not args.no_ack,
        "rounds": rounds,
        "all_rounds_ms": latency_ms(everyone),
        "client_errors": fleet.errors,
        "server_tracebacks": tracebacks,
        "target": "every client within 1 s (p99 < 1000 ms)",
        "met": met,
    }
    allr = figures["all_rounds_ms"]
    print(
        f"bulk command, {server.database}, {args.clients} long-polling clients on "
        f"{args.nodes} node(s), "
        f"{args.rounds} rounds: p50 {allr.get('p50')} ms  p99 {allr.get('p99')} ms  "
        f"max {allr.get('max')} ms; errors {fleet.errors or 'none'}; "
        f"target p99 < 1 s: {'MET' if met else 'MISSED'}"
    )
    emit("bulk_command", figures)
    return 0 if met else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=1000, help="connected clients (default 1000)")
    p.add_argument("--rounds", type=int, default=3, help="bulk commands sent (default 3)")
    p.add_argument("--pause", type=float, default=5, help="seconds between rounds (default 5)")
    p.add_argument("--settle", type=float, default=3, help="seconds before the first round")
    p.add_argument("--no-ack", action="store_true", help="clients do not ack or report results")
    p.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="server nodes on one PostgreSQL database, one process each; the clients are split "
        "evenly, the admin sends through the first (default 1)",
    )
    common_args(p)
    args = p.parse_args()
    if not 1 <= args.clients <= 5000 or not 1 <= args.rounds <= 20:
        p.error("--clients: 1 to 5,000; --rounds: 1 to 20")
    if not 1 <= args.nodes <= 4 or (args.nodes > 1 and not args.database_url):
        p.error("--nodes: 1 to 4; more than one needs PostgreSQL (--database-url)")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
