"""A room of 500 PCs in the dashboard, in real headless Chromium: how fast it draws, and whether
it stays live while every PC heartbeats.

The real server (gunicorn, one gevent worker) with one 20 x 25 room, every seat taken by a
registered PC that has reported load, user, disks and processes. Figures:

- render: from navigation start to the grid of 500 seats built (`renderedMs`, read by the page's
  own performance clock) and to the first frame after it (`paintedMs`): the first load, then the
  median of further reloads;
- live: while all 500 PCs heartbeat (one every 10 ms), shutdown signals to random PCs; for each,
  the time from just before the POST until its seat showed `off` in the page (both on this
  machine's wall clock). Also the longest main-thread task over 50 ms (0: none) while live.

    .venv/bin/python bench/dashboard_render.py            # 500 PCs, 5 reloads, 30 signals
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import HOST, Server, emit, heartbeat_body, latency_ms

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "bench password, long enough"


class Http:
    """One keep-alive connection per thread."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.local = threading.local()

    def __call__(self, method: str, path: str, body: Any = None, token: str = "") -> Any:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, None if body is None else json.dumps(body), headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status >= 400:
            raise RuntimeError(f"{method} {path}: {resp.status} {data[:200]!r}")
        return json.loads(data) if data else None


def build_lab(server: Server, http: Http, rows: int, cols: int) -> tuple[int, list[dict[str, Any]]]:
    key = server.api_key
    room = http("POST", "/api/rooms", {"name": "Bench hall", "rows": rows, "cols": cols}, key)
    pin = http("POST", "/api/pins", {"multi_use": True, "expires_minutes": 60}, key)["pin"]

    def one(i: int) -> dict[str, Any]:
        mid = f"BENCH-UI-{i:05d}"
        body = {"pin": pin, "machine_id": mid, "hostname": f"hall-{i + 1:03d}"}
        reg = http("POST", "/api/client/register", body)
        seat = {"room_id": room["id"], "row": i // cols + 1, "col": i % cols + 1}
        http("PUT", f"/api/pcs/{reg['pc_id']}/seat", seat, key)
        pc = {"id": reg["pc_id"], "machine_id": mid, "token": reg["token"], "i": i}
        http("POST", "/api/client/heartbeat", heartbeat_body(mid, i), pc["token"])
        return pc

    with ThreadPoolExecutor(8) as pool:
        pcs = list(pool.map(one, range(rows * cols)))
    return int(room["id"]), pcs


def create_admin(server: Server) -> None:
    from wcms.server.db import make_engine, make_sessionmaker, utcnow
    from wcms.server.services import accounts

    engine = make_engine(server.url)
    try:
        with make_sessionmaker(engine)() as s:
            accounts.create_admin(s, "bench", PASSWORD, utcnow())
            s.commit()
    finally:
        engine.dispose()


class Heartbeats(threading.Thread):
    """Every PC heartbeats in turn, one every `gap` seconds."""

    def __init__(self, http: Http, pcs: list[dict[str, Any]], gap: float) -> None:
        super().__init__(daemon=True)
        self.http, self.pcs, self.gap = http, pcs, gap
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        while not self.stop.is_set():
            for pc in self.pcs:
                if self.stop.wait(self.gap):
                    return
                if pc.get("off"):
                    continue
                body = heartbeat_body(pc["machine_id"], pc["i"] + self.sent)
                self.http("POST", "/api/client/heartbeat", body, pc["token"])
                self.sent += 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--cols", type=int, default=25)
    p.add_argument("--reloads", type=int, default=5)
    p.add_argument("--signals", type=int, default=30)
    args = p.parse_args()
    if not Path(CHROMIUM).exists():
        print(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    with Server() as server:
        http = Http(server.port)
        started = time.monotonic()
        room, pcs = build_lab(server, http, args.rows, args.cols)
        create_admin(server)
        print(f"{len(pcs)} PCs registered and seated in {time.monotonic() - started:.1f} s")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(server.base + "/login")
            page.fill("#username", "bench")
            page.fill("#password", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(server.base + "/")
            rendered, painted = [], []
            for _ in range(1 + args.reloads):
                page.goto(f"{server.base}/rooms/{room}")
                page.wait_for_selector("body[data-painted-ms]", timeout=30_000)
                rendered.append(int(page.get_attribute("body", "data-rendered-ms") or 0))
                painted.append(int(page.get_attribute("body", "data-painted-ms") or 0))
            seats = page.locator("#grid .seat[data-pc]").count()
            assert seats == len(pcs), seats
            live = measure_live(page, http, pcs, args.signals)
            browser.close()
    figures = {
        "pcs": len(pcs),
        "first_render_ms": rendered[0],
        "first_paint_ms": painted[0],
        "reload_render_ms_median": statistics.median(rendered[1:]) if args.reloads else None,
        "reload_paint_ms_median": statistics.median(painted[1:]) if args.reloads else None,
        **live,
    }
    print(
        f"500-PC room: grid built {rendered[0]} ms and painted {painted[0]} ms after navigation "
        f"start (reloads: median {figures['reload_paint_ms_median']} ms painted); seat turned off "
        f"p50 {live['signal_to_seat_ms']['p50']} ms, max {live['signal_to_seat_ms']['max']} ms "
        f"after the shutdown signal, under {live['heartbeats_per_s']} heartbeats/s"
    )
    emit("dashboard_render", figures)
    return 0


def measure_live(page: Any, http: Http, pcs: list[dict[str, Any]], signals: int) -> dict[str, Any]:
    """Shutdown signals to random PCs while all of them heartbeat; time until each seat shows."""
    page.evaluate(
        """() => {
            window.offAt = {};
            new MutationObserver(list => {
                for (const m of list) {
                    const seat = m.target;
                    if (seat.dataset.status === 'off' && !window.offAt[seat.dataset.pc])
                        window.offAt[seat.dataset.pc] = Date.now();
                }
            }).observe(document.getElementById('grid'),
                       {attributes: true, subtree: true, attributeFilter: ['data-status']});
            window.longest = 0;
            new PerformanceObserver(list => {
                for (const e of list.getEntries())
                    window.longest = Math.max(window.longest, e.duration);
            }).observe({type: 'longtask', buffered: false});
        }"""
    )
    beats = Heartbeats(http, pcs, gap=0.01)
    beats.start()
    time.sleep(6)  # a couple of metrics frames for every PC first
    latencies = []
    began = time.monotonic()
    for pc in random.Random(5).sample(pcs, signals):
        pc["off"] = True
        sent = time.time()
        body = {"machine_id": pc["machine_id"], "reason": "shutdown"}
        http("POST", "/api/client/shutdown", body, pc["token"])
        page.wait_for_function(
            f"() => window.offAt['{pc['id']}'] !== undefined", polling=20, timeout=10_000
        )
        latencies.append(page.evaluate(f"window.offAt['{pc['id']}']") / 1000 - sent)
        time.sleep(0.2)
    elapsed = time.monotonic() - began + 6
    beats.stop.set()
    beats.join(timeout=5)
    return {
        "signal_to_seat_ms": latency_ms(latencies),
        "heartbeats_per_s": round(beats.sent / elapsed),
        "longest_long_task_ms": round(page.evaluate("window.longest")),
    }


if __name__ == "__main__":
    sys.exit(main())
