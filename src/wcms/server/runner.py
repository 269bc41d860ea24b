"""The production server: gunicorn with one gevent worker, built for thousands of idle
long-poll connections in one process (see docs/ARCHITECTURE.md for why one worker)."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import resource
import time
from _socket import close as _close_fd
from collections import Counter
from typing import Any

import gevent
from gevent import pywsgi
from gevent.pywsgi import Input
from gevent.socket import socket as GeventSocket
from gunicorn.app.base import BaseApplication
from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler, PyWSGIServer

from wcms.protocol import ErrorCode
from wcms.server.config import Settings
from wcms.server.connlimits import (
    IDLE_TIMEOUT,
    TOO_MANY_CONNECTIONS,
    AddressCounter,
    BadFraming,
    BodyReadError,
    BodyTimeout,
    ClientDisconnected,
    HeaderTimeout,
    Limits,
    address_key,
    framing_problem,
    raw_answer,
)

log = logging.getLogger(__name__)

KEEPALIVE = IDLE_TIMEOUT  # seconds an idle connection stays open
GC_THRESHOLDS = (10000, 10, 10)  # Python's default is (700, 10, 10)
WORKER_CONNECTIONS = 20000  # open connections the worker serves at once
FD_RESERVE = 512  # descriptors kept for everything else: the database, logs, the listener
REFUSALS_PER_TURN = 100  # connections over the cap refused in one turn of the event loop
REPORT_EVERY = 60.0  # seconds between two log lines about refused or cut connections


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


class _Report:
    """One log line per minute at most about connections the limits refused or cut, so an
    attack of thousands of connections costs the log a line, not thousands."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.addresses: set[str] = set()
        self._next = 0.0

    def note(self, what: str, key: str) -> None:
        self.counts[what] += 1
        if len(self.addresses) < 10:
            self.addresses.add(key)
        now = time.monotonic()
        if now >= self._next:
            log.warning(
                "connection limits: %s (from %s)",
                ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts.items())),
                ", ".join(sorted(self.addresses)),
            )
            self.counts.clear()
            self.addresses.clear()
            self._next = now + REPORT_EVERY


class _Server(PyWSGIServer):  # type: ignore[misc]
    """gevent's WSGI server, plus the per-address connection cap (connlimits.py): a connection
    over it is answered 503 and closed as it is accepted, before it takes a place in the
    worker's pool or is read; the count drops when a connection's handler is done with it
    (do_close runs once for every connection do_read handed over)."""

    def __init__(self, *args: Any, limits: Limits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.connections = AddressCounter(limits.per_address)
        self.report = _Report()
        self._refusals_left = REFUSALS_PER_TURN

    def _do_read(self) -> None:
        self._refusals_left = REFUSALS_PER_TURN
        super()._do_read()

    def do_read(self) -> tuple[Any, Any] | None:
        """The next connection within the cap; those over it are refused on the way, on the
        bare descriptor (a refusal is a few system calls, not a socket object), at most
        REFUSALS_PER_TURN in one turn of the event loop: a flood of connections must not keep
        the loop from the requests already admitted."""
        listener = self.socket
        while self._refusals_left > 0:
            try:
                fd, address = listener._accept()
            except BlockingIOError:
                return None
            key = address_key(address)
            if self.connections.admit(key):
                sock = GeventSocket(listener.family, listener.type, listener.proto, fileno=fd)
                return sock, address
            self._refusals_left -= 1
            self.report.note("connections refused over the per-address limit", key)
            _refuse(fd)
        return None  # the rest on the next turn

    def do_close(self, sock: Any, address: Any) -> None:
        try:
            super().do_close(sock, address)
        finally:
            self.connections.release(address_key(address))


def _refuse(fd: int) -> None:
    """503 and close, without waiting for anything: what the client sent is dropped unread
    (read once so the close is a FIN, not a reset that could lose the answer)."""
    try:
        os.set_blocking(fd, False)
        with contextlib.suppress(OSError):
            os.read(fd, 65536)
        with contextlib.suppress(OSError):
            os.write(fd, TOO_MANY_CONNECTIONS)
    finally:
        _close_fd(fd)  # the C call: gevent's os.close looks for watchers this fd never had


class _Body(Input):  # type: ignore[misc]
    """A request body that must arrive by `deadline` (time.monotonic()), however slowly it
    trickles; a read that fails (the client closed, or the deadline passed) raises a
    BodyReadError, which the app answers quietly (errors.py, fastpath.py), and the connection
    is closed after the answer."""

    __slots__ = ("deadline", "failed")
    deadline: float
    failed: BodyReadError | None

    def read(self, length: int | None = None) -> bytes:
        return self._guarded(Input.read, length)

    def readline(self, size: int | None = None) -> bytes:
        return self._guarded(Input.readline, size)

    def _guarded(self, read: Any, arg: int | None) -> bytes:
        if self.failed is not None:
            raise self.failed
        left = max(self.deadline - time.monotonic(), 0.001)
        # Only a read that has to wait for the network can be interrupted: bytes already
        # received are still handed over after the deadline.
        timer = gevent.Timeout.start_new(
            left, BodyTimeout("the request body did not arrive in time")
        )
        try:
            data: bytes = read(self, arg)
            return data
        except BodyReadError as exc:
            self.failed = exc
            raise
        except _INVALID_INPUT:
            raise  # a malformed chunked body: gevent answers 400 itself
        except OSError as exc:  # end of file before the body's end, reset, ...
            self.failed = ClientDisconnected("the client closed the connection mid-body")
            raise self.failed from exc
        finally:
            timer.cancel()


_INVALID_INPUT: type[Exception] = pywsgi._InvalidClientInput


class _Handler(PyWSGIHandler):  # type: ignore[misc]
    """gevent's HTTP/1.1 handler, plus the limits of connlimits.py: an idle limit on every
    connection (a client that sends nothing for KEEPALIVE seconds, between keep-alive requests
    or mid-request, is closed), a deadline for a request's line and headers from its first
    byte, one for its body from the end of the headers, and no ambiguous framing. A long poll
    is unaffected: while it waits, the server is writing, not reading."""

    server: _Server
    wsgi_input: Any
    _headers_deadline: Any = None

    def handle(self) -> None:
        self.socket.settimeout(self.server.limits.idle_timeout)
        super().handle()

    def handle_one_request(self) -> Any:
        if self.rfile.closed:
            return None
        try:  # the first byte of the next request, under the idle limit only
            if not self.rfile.peek(1):
                return None
        except (OSError, ValueError):
            return None
        limits = self.server.limits
        self._headers_deadline = gevent.Timeout.start_new(
            limits.header_timeout, HeaderTimeout("request headers not complete in time")
        )
        try:
            return super().handle_one_request()
        finally:
            self._headers_deadline.cancel()

    def read_requestline(self) -> str:
        try:
            line: str = super().read_requestline()
            return line
        except HeaderTimeout:  # gevent closes the connection on this OSError, without a word
            self.server.report.note("requests cut at the header deadline", self._key())
            with contextlib.suppress(OSError):
                self.socket.sendall(raw_answer(408, ErrorCode.REQUEST_TIMEOUT, _HEADERS_LATE))
            raise

    def read_request(self, raw_requestline: str) -> Any:
        try:
            return super().read_request(raw_requestline)
        finally:
            self._headers_deadline.cancel()  # the application's time is not the headers'

    def MessageClass(self, *args: Any) -> Any:  # gevent's name
        headers = super().MessageClass(*args)
        problem = framing_problem(headers)
        if problem is not None:
            raise BadFraming(problem)  # before gevent drops a Content-Length beside chunked
        return headers

    def _handle_client_error(self, ex: Exception) -> Any:
        if isinstance(ex, HeaderTimeout):
            self.server.report.note("requests cut at the header deadline", self._key())
            return ("408", raw_answer(408, ErrorCode.REQUEST_TIMEOUT, _HEADERS_LATE))
        if isinstance(ex, BadFraming):
            log.info("refused a request from %s: %s", self._key(), ex)
            return ("400", raw_answer(400, ErrorCode.BAD_REQUEST, f"refused: {ex}"))
        return super()._handle_client_error(ex)

    def get_environ(self) -> Any:
        env = super().get_environ()
        plain: Any = self.wsgi_input
        if env.get("wsgi.input") is plain and (self.content_length or plain.chunked_input):
            body = _Body(
                self.rfile,
                self.content_length,
                socket=plain.socket,
                chunked_input=plain.chunked_input,
            )
            body.deadline = time.monotonic() + self.server.limits.body_timeout
            body.failed = None
            self.wsgi_input = env["wsgi.input"] = body
        return env

    def handle_one_response(self) -> None:
        super().handle_one_response()
        body = self.wsgi_input
        if isinstance(body, _Body) and body.failed is not None:
            # What is left of the body is unknown: never read a next request from it.
            self.close_connection = True
            if isinstance(body.failed, BodyTimeout):
                self.server.report.note("requests cut at the body deadline", self._key())

    def _key(self) -> str:
        return address_key(self.client_address)


_HEADERS_LATE = "the request line and headers did not arrive in time"


class Worker(GeventPyWSGIWorker):  # type: ignore[misc]
    """gunicorn's gevent worker with gevent's own HTTP handler (pywsgi): at 2,000 heartbeats/s
    it took 5 % less CPU than gunicorn's parser and cut p99 from over 125 ms to 53 ms
    (docs/PERFORMANCE.md). On SIGTERM it also ends long polls and live streams."""

    wsgi_handler = _Handler

    def run(self) -> None:
        limits = Limits.of(self.app.settings, self.worker_connections)
        self.server_class = functools.partial(_Server, limits=limits)
        super().run()

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        rt = _runtime_of(self)
        if rt is not None:
            gevent.spawn(rt.begin_shutdown)  # out of the signal handler, into the hub


def _worker_exit(_server: Any, worker: Any) -> None:
    rt = _runtime_of(worker)
    if rt is not None:
        rt.stop_background()  # write buffered heartbeats before the process goes


def _descriptors(wanted: int) -> int:
    """Raise this process's open-file limit (inherited by the worker) towards `wanted`, up to
    the hard limit; the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return wanted if soft == resource.RLIM_INFINITY else soft


def worker_connections() -> int:
    """WORKER_CONNECTIONS, or fewer if the open-file limit cannot hold them: a worker out of
    descriptors can accept nothing, not even /healthz."""
    limit = _descriptors(WORKER_CONNECTIONS + FD_RESERVE)
    connections = min(WORKER_CONNECTIONS, limit - FD_RESERVE)
    if connections < WORKER_CONNECTIONS:
        log.warning(
            "the open-file limit is %d: serving at most %d connections (raise `ulimit -n`)",
            limit,
            connections,
        )
    return max(connections, 64)


def serve(settings: Settings, access_log: bool = False) -> None:
    options = {
        "bind": f"{settings.host}:{settings.port}",
        "workers": settings.worker_count,
        "worker_class": "wcms.server.runner.Worker",
        "worker_connections": worker_connections(),
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
