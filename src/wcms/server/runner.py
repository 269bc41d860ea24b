"""The production server: gunicorn with one gevent worker, built for thousands of idle
long-poll connections in one process (see docs/ARCHITECTURE.md for why one worker)."""

from __future__ import annotations

import gc
from typing import Any

import gevent
from gunicorn.app.base import BaseApplication
from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler

from wcms.server.config import Settings

KEEPALIVE = 75  # seconds an idle connection stays open
GC_THRESHOLDS = (10000, 10, 10)  # Python's default is (700, 10, 10)


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, settings: Settings, options: dict[str, Any]) -> None:
        self.settings = settings
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in self.cfg.settings:  # settings differ between gunicorn releases
                self.cfg.set(key, value)

    def load(self) -> Any:
        # Imported in the worker, after gevent has patched the standard library.
        from wcms.server import create_app

        app = create_app(self.settings)
        # Everything loaded so far (Flask, SQLAlchemy, pydantic, the app) lives as long as the
        # process: keep it out of the cyclic collector, whose full passes over it stalled every
        # request for a few hundred milliseconds with thousands of polls open.
        gc.collect()
        gc.freeze()
        # Thousands of waiting polls keep their objects alive for minutes, and every full
        # collection walks all of them: with Python's default thresholds that was a third of
        # the CPU of 5,000 idle clients (bench/idle_connections.py). Collect less often.
        gc.set_threshold(*GC_THRESHOLDS)
        return app


def _runtime_of(worker: Any) -> Any:
    app = getattr(worker, "wsgi", None)
    return getattr(app, "extensions", {}).get("wcms") if app is not None else None


class _Handler(PyWSGIHandler):  # type: ignore[misc]
    """gevent's HTTP/1.1 handler, plus an idle limit on every connection: a client that sends
    nothing for KEEPALIVE seconds (between keep-alive requests, or mid-request) is closed.
    A long poll is unaffected: while it waits, the server is writing, not reading."""

    def handle(self) -> None:
        self.socket.settimeout(KEEPALIVE)
        super().handle()


class Worker(GeventPyWSGIWorker):  # type: ignore[misc]
    """gunicorn's gevent worker with gevent's own HTTP handler (pywsgi): at 2,000 heartbeats/s
    it took 5 % less CPU than gunicorn's parser and cut p99 from over 125 ms to 53 ms
    (docs/PERFORMANCE.md). On SIGTERM it also ends long polls and live streams."""

    wsgi_handler = _Handler

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        rt = _runtime_of(self)
        if rt is not None:
            gevent.spawn(rt.begin_shutdown)  # out of the signal handler, into the hub


def _worker_exit(_server: Any, worker: Any) -> None:
    rt = _runtime_of(worker)
    if rt is not None:
        rt.stop_background()  # write buffered heartbeats before the process goes


def serve(settings: Settings, access_log: bool = False) -> None:
    options = {
        "bind": f"{settings.host}:{settings.port}",
        "workers": 1,
        "worker_class": "wcms.server.runner.Worker",
        "worker_connections": 20000,
        "timeout": 60,
        "graceful_timeout": 10,
        "backlog": 4096,
        "accesslog": "-" if access_log else None,
        "errorlog": "-",
        "loglevel": settings.log_level.lower(),
        "worker_exit": _worker_exit,
        "proc_name": "wcms-server",
        # No shared ~/.gunicorn control socket: several servers must run side by side.
        "control_socket_disable": True,
        # Forwarded headers are trusted only through WCMS_TRUSTED_PROXIES (the app's ProxyFix),
        # so gunicorn trusts no peer for any, and need not check every peer's address.
        "forwarded_allow_ips": "*",
        "secure_scheme_headers": {},
        "forwarder_headers": "",
    }
    _Gunicorn(settings, options).run()
