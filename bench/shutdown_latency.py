"""Latency of the shutdown signal (POST /api/client/shutdown) at a fixed arrival rate.

Open loop: shutdowns are sent at fixed instants (`--rate` per second) whether or not earlier
ones have been answered, and each latency is measured from the instant the request was due, so
a slow server cannot hide its queue. Every PC is registered over HTTP with its own token, and
every shutdown is a real online -> offline transition that writes a power event.

  --mode once   (default) a lab powering off: rate x (duration + warm-up) PCs, each sends one
                heartbeat (a live PC), then each is shut down once. The server runs with
                WCMS_OFFLINE_AFTER=3600 so the presence checker does not flip PCs that
                registered a minute earlier and then stayed silent.
  --mode cycle  --pcs PCs shut down once per round, each brought back online half a round later
                by a heartbeat carrying the `boot` event (the client's first call after a boot),
                so the server also takes `--rate` comeback heartbeats per second (reported too;
                only the shutdowns are the figure).

    .venv/bin/python bench/shutdown_latency.py                 # SQLite, 1,000/s for 10 s
    .venv/bin/python bench/shutdown_latency.py --mode cycle --pcs 1000 --rate 500
    .venv/bin/python bench/shutdown_latency.py --database-url postgresql://postgres@127.0.0.1/test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid

from _common import (
    Conn,
    Server,
    common_args,
    emit,
    generator_gc_paused,
    get_json,
    heartbeat_all,
    heartbeat_body,
    latency_ms,
    machine,
    pin_self,
    plan_cores,
    register_pcs,
    server_env,
)


class Pc:
    def __init__(self, port: int, index: int, mid: str, token: str, keep_alive: bool) -> None:
        self.conn = Conn(port, keep_alive)
        self.lock = asyncio.Lock()  # one request at a time on a keep-alive connection
        self.mid = mid
        self.token = token
        self.online = True  # registration left it online
        self.shutdown_body = json.dumps({"machine_id": mid, "reason": "shutdown"}).encode()
        self.boot_body = json.dumps(heartbeat_body(mid, index, event="boot")).encode()


class Run:
    def __init__(self) -> None:
        self.shutdown_lat: list[float] = []
        self.slow: dict[int, float] = {}  # second of the run -> worst shutdown latency in it
        self.heartbeat_lat: list[float] = []
        self.lag: list[float] = []
        self.errors: dict[str, int] = {}
        self.start = 0.0
        self.not_online = 0  # shutdowns sent before the PC's comeback heartbeat was answered

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


async def send(
    run: Run, pc: Pc, kind: str, due: float, counted: bool, loop: asyncio.AbstractEventLoop
) -> None:
    async with pc.lock:
        run.lag.append(loop.time() - due)
        if kind == "shutdown":
            if not pc.online:
                run.not_online += 1
            path, body = "/api/client/shutdown", pc.shutdown_body
        else:
            path, body = "/api/client/heartbeat", pc.boot_body
        try:
            status, data = await pc.conn.request("POST", path, body, pc.token)
        except Exception as exc:  # counted and reported: the figure must show every failure
            run.error(f"{kind}: {type(exc).__name__}")
            return
        took = loop.time() - due
        if status != 200:
            run.error(f"{kind}: HTTP {status}")
            return
        if kind == "shutdown":
            pc.online = False
            if counted:
                run.shutdown_lat.append(took)
                second = int(due - run.start)
                run.slow[second] = max(run.slow.get(second, 0.0), took)
        else:
            pc.online = True
            if counted:
                run.heartbeat_lat.append(took)


async def drive(
    pcs: list[Pc], rate: float, duration: float, warmup: float, cycle: bool
) -> tuple[Run, float]:
    """Shutdown k at k/rate for PC k % n; in cycle mode its comeback heartbeat half a round
    later (the last round's comebacks are not sent)."""
    loop = asyncio.get_running_loop()
    n = len(pcs)
    half_round = n / rate / 2
    total = int(rate * (duration + warmup))
    events = [(k / rate, "shutdown", k) for k in range(total)]
    if cycle:
        events += [(k / rate + half_round, "heartbeat", k) for k in range(total - n)]
    events.sort()
    run = Run()
    tasks = set()
    start = run.start = loop.time() + 0.2
    for offset, kind, k in events:
        due = start + offset
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(send(run, pcs[k % n], kind, due, offset >= warmup, loop))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sent_for = loop.time() - start
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    return run, sent_for


async def main_async(args: argparse.Namespace) -> int:
    server_cores, load_cores = plan_cores(not args.no_pin)
    pin_self(load_cores)
    info = machine()
    keep_alive = args.connection == "keep-alive"
    cycle = args.mode == "cycle"
    n_pcs = args.pcs if cycle else int(args.rate * (args.duration + args.warmup))
    env = server_env(args.env)
    if not cycle:
        env.setdefault("WCMS_OFFLINE_AFTER", "3600")
    with Server(args.database_url, env, server_cores, args.keep) as server:
        t0 = time.monotonic()
        creds = await register_pcs(server, n_pcs, uuid.uuid4().hex[:6])
        reg_s = time.monotonic() - t0
        if not cycle:  # live PCs: each has heartbeated (its token is in the server's cache)
            await heartbeat_all(server, creds)
            await asyncio.sleep(2)  # the batch writer catches up before the measurement
        pcs = [Pc(server.port, i, mid, tok, keep_alive) for i, (mid, tok) in enumerate(creds)]
        server.start_profile(args.profile)
        cpu0, wall0 = server.cpu_seconds(), time.monotonic()
        with generator_gc_paused():
            run, sent_for = await drive(pcs, args.rate, args.duration, args.warmup, cycle)
        cpu = (server.cpu_seconds() - cpu0) / (time.monotonic() - wall0)
        # Signals per commit (group commit): the worker that answered, one of them if several.
        grouped = (await get_json(server.port, "/healthz"))[1]["shutdown_signals"]
        server.stop_profile()
        tracebacks = server.errors_in_log()
        for pc in pcs:
            pc.conn.close()
    sd = latency_ms(run.shutdown_lat)
    hb = latency_ms(run.heartbeat_lat)
    lag = latency_ms(run.lag)
    figures = {
        **info,
        "database": server.database,
        "mode": args.mode,
        "connection": args.connection,
        "server_env": {k: v for k, v in env.items() if k.startswith("WCMS_")},
        "server_cores": sorted(server_cores or []),
        "load_cores": sorted(load_cores or []),
        "pcs": n_pcs,
        "rate_shutdowns_per_s": args.rate,
        "rate_total_requests_per_s": (2 if cycle else 1) * args.rate,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "schedule_s": round(sent_for, 2),
        "registration_s": round(reg_s, 2),
        "shutdown_ms": sd,
        "comeback_heartbeat_ms": hb,
        "generator_lag_ms": lag,
        "worst_seconds_ms": {
            str(sec): round(v * 1000, 1)
            for sec, v in sorted(run.slow.items(), key=lambda kv: -kv[1])[:5]
        },
        "server_cpu_percent_of_one_core": round(cpu * 100, 1),
        "signals_per_commit": round(grouped["signals"] / max(grouped["commits"], 1), 2),
        "errors": run.errors,
        "shutdowns_before_comeback": run.not_online,
        "server_tracebacks": tracebacks,
        "target_p99_ms": 10,
        "met": bool(sd.get("p99", 1e9) < 10 and not run.errors),
    }
    extra = f" (+{args.rate:g}/s comeback heartbeats)" if cycle else ""
    print(
        f"shutdown signal, {server.database}, {args.mode}, {args.connection}: {args.rate:g}/s "
        f"shutdowns{extra} over {n_pcs} PCs for {args.duration:g} s\n"
        f"  shutdown  p50 {sd.get('p50')} ms  p95 {sd.get('p95')} ms  p99 {sd.get('p99')} ms  "
        f"max {sd.get('max')} ms  (n={sd.get('n')})\n"
        f"  heartbeat p50 {hb.get('p50')} ms  p99 {hb.get('p99')} ms;  generator lag p99 "
        f"{lag.get('p99')} ms;  server CPU {figures['server_cpu_percent_of_one_core']} %;  "
        f"signals per commit {figures['signals_per_commit']}\n"
        f"  errors {run.errors or 'none'}; shutdowns before comeback {run.not_online}; "
        f"target p99 < 10 ms: {'MET' if figures['met'] else 'MISSED'}"
    )
    emit("shutdown_latency", figures)
    return 0 if figures["met"] else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=["once", "cycle"], default="once")
    p.add_argument("--pcs", type=int, default=1000, help="cycle mode: PCs (default 1000)")
    p.add_argument("--rate", type=float, default=1000, help="shutdowns per second (default 1000)")
    p.add_argument("--duration", type=float, default=10, help="measured seconds (default 10)")
    p.add_argument("--warmup", type=float, default=1, help="seconds not counted (default 1)")
    p.add_argument(
        "--connection",
        choices=["close", "keep-alive"],
        default="close",
        help="close: a new connection per request, as the WCMS client does (default)",
    )
    common_args(p)
    args = p.parse_args()
    if args.mode == "cycle" and args.pcs / args.rate < 0.1:
        p.error("--pcs / --rate must leave each PC at least 0.1 s per round")
    if (args.duration + args.warmup) * args.rate > (200_000 if args.mode == "cycle" else 30_000):
        p.error("at most 200,000 shutdowns per run (30,000 PCs in once mode)")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
