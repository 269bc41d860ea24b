"""Heartbeat throughput: POST /api/client/heartbeat at fixed arrival rates, in steps.

Open loop: at each step's rate, heartbeats are sent at fixed instants whether or not earlier
ones have been answered; latency is measured from the instant each was due. `--pcs` registered
PCs, each with its own token, take turns (PC k % n sends the k-th heartbeat). Bodies are what the
real client sends: CPU, RAM, two disks, 80 process names, the logged-on user (about 2.5 KB).
After the last step the script waits for the batch writer and checks through the admin API that
every PC is online with its metrics written during the last step (nothing lost in the buffer).

    .venv/bin/python bench/heartbeats.py                       # 500, 1000, 2000, 2500 /s
    .venv/bin/python bench/heartbeats.py --rates 2000 --step 30
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
import uuid
from typing import Any

from _common import (
    Conn,
    Server,
    common_args,
    emit,
    generator_gc_paused,
    get_json,
    heartbeat_body,
    latency_ms,
    machine,
    open_loop,
    pin_self,
    plan_cores,
    register_pcs,
    server_env,
)


async def step(
    server: Server,
    conns: list[Conn],
    creds: list[tuple[str, str]],
    rate: float,
    seconds: float,
    stamp: int,
) -> dict[str, Any]:
    n = len(creds)
    bodies = []
    for i, (mid, _tok) in enumerate(creds):
        body = heartbeat_body(mid, i)
        body["cpu_percent"] = float(stamp % 100)  # each step writes values of its own
        bodies.append(json.dumps(body).encode())
    locks = [asyncio.Lock() for _ in range(n)]
    lat: list[float] = []
    errors: dict[str, int] = {}
    loop = asyncio.get_running_loop()

    async def fire(k: int, due: float) -> None:
        i = k % n
        async with locks[i]:  # a PC sends one heartbeat at a time
            try:
                status, _ = await conns[i].request(
                    "POST", "/api/client/heartbeat", bodies[i], creds[i][1]
                )
            except Exception as exc:  # counted: the figure must show every failure
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                return
            if status == 200:
                lat.append(loop.time() - due)
            else:
                errors[f"HTTP {status}"] = errors.get(f"HTTP {status}", 0) + 1

    count = int(rate * seconds)
    cpu0, wall0 = server.cpu_seconds(), time.monotonic()
    sent_for, late = await open_loop((k / rate for k in range(count)), fire)
    wall = time.monotonic() - wall0
    cpu = (server.cpu_seconds() - cpu0) / wall
    stats = latency_ms(lat)
    return {
        "rate": rate,
        "sent": count,
        "ok": len(lat),
        "throughput_per_s": round(len(lat) / wall, 1),
        "latency_ms": stats,
        "generator_late_ms_p99": latency_ms(late).get("p99"),
        "schedule_s": round(sent_for, 2),
        "server_cpu_percent_of_one_core": round(cpu * 100, 1),
        "errors": errors,
        "met": bool(len(lat) == count and stats.get("p99", 1e9) < 100),
    }


async def verify(server: Server, n: int, since: dt.datetime, wait: float) -> dict[str, Any]:
    """Every PC online, with metrics written after `since` (the batch writer caught up)."""
    await asyncio.sleep(wait)
    status, data = await get_json(server.port, "/api/pcs", server.api_key)
    if status != 200:
        return {"ok": False, "status": status}
    pcs = data["pcs"]
    online = sum(1 for p in pcs if p["state"] == "online")
    fresh = sum(
        1 for p in pcs if p["metrics_at"] and dt.datetime.fromisoformat(p["metrics_at"]) >= since
    )
    return {"ok": online == n and fresh == n, "pcs": len(pcs), "online": online, "fresh": fresh}


async def main_async(args: argparse.Namespace) -> int:
    server_cores, load_cores = plan_cores(not args.no_pin)
    pin_self(load_cores)
    info = machine()
    rates = [float(r) for r in args.rates.split(",")]
    keep_alive = args.connection == "keep-alive"
    with Server(args.database_url, server_env(args.env), server_cores, args.keep) as server:
        creds = await register_pcs(server, args.pcs, uuid.uuid4().hex[:6])
        conns = [Conn(server.port, keep_alive) for _ in creds]
        await step(server, conns, creds, min(rates[0], 500), 2, 0)  # warm-up, not reported
        server.start_profile(args.profile)
        steps = []
        last_start = dt.datetime.now(dt.UTC)
        for stamp, rate in enumerate(rates, 1):
            last_start = dt.datetime.now(dt.UTC)
            with generator_gc_paused():
                steps.append(await step(server, conns, creds, rate, args.step, stamp))
            s = steps[-1]
            lat = s["latency_ms"]
            print(
                f"  {rate:6g}/s: {s['throughput_per_s']:7.1f}/s answered  p50 {lat.get('p50')} ms"
                f"  p95 {lat.get('p95')} ms  p99 {lat.get('p99')} ms  max {lat.get('max')} ms"
                f"  server CPU {s['server_cpu_percent_of_one_core']} %"
                f"  errors {s['errors'] or 'none'}",
                flush=True,
            )
        server.stop_profile()
        check = await verify(server, args.pcs, last_start, args.flush_wait)
        tracebacks = server.errors_in_log()
        for c in conns:
            c.close()
    target = next((s for s in steps if s["rate"] == args.target), None)
    met = bool(target and target["met"] and check["ok"])
    figures = {
        **info,
        "database": server.database,
        "connection": args.connection,
        "server_cores": sorted(server_cores or []),
        "load_cores": sorted(load_cores or []),
        "pcs": args.pcs,
        "body_bytes": len(json.dumps(heartbeat_body(creds[0][0], 0))),
        "step_s": args.step,
        "steps": steps,
        "verify": check,
        "server_tracebacks": tracebacks,
        "target": f"{args.target:g}/s with p99 < 100 ms",
        "met": met,
    }
    print(
        f"heartbeats, {server.database}, {args.connection}, {args.pcs} PCs: nothing lost: "
        f"{check}; target {figures['target']}: {'MET' if met else 'MISSED'}"
    )
    emit("heartbeats", figures)
    return 0 if met else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pcs", type=int, default=2000, help="registered PCs (default 2000)")
    p.add_argument("--rates", default="500,1000,2000,2500", help="heartbeats/s per step")
    p.add_argument("--step", type=float, default=15, help="seconds per step (default 15)")
    p.add_argument("--target", type=float, default=2000, help="the rate the target is about")
    p.add_argument("--flush-wait", type=float, default=3, help="seconds to let the writer catch up")
    p.add_argument(
        "--connection",
        choices=["close", "keep-alive"],
        default="close",
        help="close: a new connection per request, as the WCMS client does (default)",
    )
    common_args(p)
    args = p.parse_args()
    if sum(float(r) for r in args.rates.split(",")) * args.step > 300_000:
        p.error("at most 300,000 heartbeats per run")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
