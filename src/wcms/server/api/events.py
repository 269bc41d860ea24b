"""`GET /api/events`: the dashboard's live stream (server-sent events), one per open page.

Each frame is `data: <json>` with a `type`: `hello` first (the page fetches a fresh snapshot on
every hello, so a reconnect resyncs), then the bus's messages as they come (`presence`, `pc`,
`pc_deleted`, `layout`, `command`, `resync`), and every few seconds a `metrics` frame with the
load and user of the PCs whose heartbeats were written since. A comment line every 15 s keeps
proxies from closing an idle stream and finds dead connections. Under gevent a stream is one
greenlet waiting on its queue, so it costs next to nothing while idle.
"""

from __future__ import annotations

import datetime as dt
import json
import queue
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from wcms.server.api.request import runtime
from wcms.server.auth import bearer, current_admin
from wcms.server.db import unit_of_work, utcnow
from wcms.server.models import PcInfo, PcMetrics
from wcms.server.openapi import documented
from wcms.server.runtime import Runtime
from wcms.server.schemas import strip_bidi_json
from wcms.server.services import accounts
from wcms.server.services.read_models import iso

bp = Blueprint("events_api", __name__, url_prefix="/api")

PING_SECONDS = 15.0
METRICS_SECONDS = 3.0
# Heartbeats are written in batches, so a row may land with a time a little in the past.
METRICS_LOOKBACK = dt.timedelta(seconds=10)
RECONNECT_MS = 1000


SERVER_CLOSING = "server_closing"


def frame(message: dict[str, Any]) -> str:
    # PC strings stored before input was checked: no bidi controls on the page (schemas.py).
    return f"data: {strip_bidi_json(json.dumps(message, separators=(',', ':')))}\n\n"


@bp.get("/events")
@documented(
    "Live changes as server-sent events (text/event-stream); a `hello` frame starts each stream",
    auth="admin",
    tag="live",
)
def events() -> ResponseReturnValue:
    who = current_admin()
    rt = runtime()
    allowed = _still_allowed(rt, who.session_hash, bearer())
    resp = Response(stream(rt, allowed), mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache, no-store"
    resp.headers["X-Accel-Buffering"] = "no"  # nginx: pass frames on at once
    return resp


def stream(rt: Runtime, allowed: Callable[[], bool]) -> Iterator[str]:
    """Frames until the caller goes away or loses access; always unsubscribes."""
    q = rt.bus.subscribe()
    metrics = MetricsWatch(rt)
    try:
        yield f"retry: {RECONNECT_MS}\n" + frame({"type": "hello", "at": iso(utcnow())})
        next_ping = time.monotonic() + PING_SECONDS
        next_metrics = time.monotonic() + METRICS_SECONDS
        while True:
            wait = max(0.0, min(next_ping, next_metrics) - time.monotonic())
            try:
                message = q.get(timeout=wait)
            except queue.Empty:
                message = None
            if message is not None:
                yield frame(message)
                if message.get("type") == SERVER_CLOSING:
                    return  # the browser reconnects after `retry` to the next server
                continue
            now = time.monotonic()
            if now >= next_metrics:
                next_metrics = now + METRICS_SECONDS
                changed = metrics.changes()
                if changed:
                    yield frame({"type": "metrics", "pcs": changed})
            if now >= next_ping:
                next_ping = now + PING_SECONDS
                if not allowed():
                    yield frame({"type": "logged_out"})
                    return
                yield ": ping\n\n"
    finally:
        rt.bus.unsubscribe(q)


class MetricsWatch:
    """The load, user and hostname of PCs whose metrics changed since the last look."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.sent: dict[int, dt.datetime | None] = {}
        self.since = utcnow() - METRICS_LOOKBACK

    def changes(self) -> list[dict[str, Any]]:
        started = utcnow()
        with self.rt.sessions() as s:
            rows = s.execute(
                select(
                    PcMetrics.pc_id,
                    PcMetrics.at,
                    PcMetrics.cpu_percent,
                    PcMetrics.ram_percent,
                    PcInfo.current_user,
                    PcInfo.hostname,
                )
                .join(PcInfo, PcInfo.id == PcMetrics.pc_id)
                .where(PcMetrics.at > self.since)
            ).all()
        self.since = started - METRICS_LOOKBACK
        out = []
        for pc_id, at, cpu, ram, user, hostname in rows:
            if self.sent.get(pc_id) == at:
                continue
            self.sent[pc_id] = at
            out.append(
                {
                    "pc_id": pc_id,
                    "at": iso(at),
                    "cpu_percent": cpu,
                    "ram_percent": ram,
                    "current_user": user,
                    "hostname": hostname,
                }
            )
        return out


def _still_allowed(rt: Runtime, session_hash: str | None, token: str | None) -> Callable[[], bool]:
    """A check the stream repeats: the dashboard session is still live (not logged out, ended
    by a password change or a disable, nor expired), or the API key still works. The request
    context is gone by then, so it takes what it needs."""

    def check() -> bool:
        with unit_of_work(rt.sessions) as s:
            if session_hash is not None:
                return accounts.session_for(s, session_hash, utcnow()) is not None
            return token is not None and accounts.api_key_for(s, token, utcnow()) is not None

    return check
