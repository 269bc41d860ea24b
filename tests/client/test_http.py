"""The one HTTP module: a TOTAL deadline against real local sockets, and typed errors."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from wcms.client import http

Handler = Callable[[socket.socket], None]


class TinyServer:
    """A listening socket on 127.0.0.1 whose every connection is given to `handler`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self._conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handler(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for conn in self._conns:
            conn.close()
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], TinyServer]]:
    servers: list[TinyServer] = []

    def make(handler: Handler) -> TinyServer:
        servers.append(TinyServer(handler))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            (
                line.split(b":")[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            ),
            b"0",
        )
    )
    while len(body) < length:
        body += conn.recv(4096)
    return head + b"\r\n\r\n" + body


def respond(conn: socket.socket, status: str, body: object, headers: str = "") -> None:
    payload = json.dumps(body).encode()
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{headers}"
    conn.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    conn.close()


def answer(status: str, body: object, headers: str = "") -> Handler:
    def handle(conn: socket.socket) -> None:
        read_request(conn)
        respond(conn, status, body, headers)

    return handle


def test_success_returns_the_json_body(serve: Callable[[Handler], TinyServer]) -> None:
    seen: list[bytes] = []

    def handle(conn: socket.socket) -> None:
        seen.append(read_request(conn))
        respond(conn, "200 OK", {"state": "online", "config": {"heartbeat_interval": 5}})

    server = serve(handle)
    got = http.request("POST", server.url + "/api/x", body={"a": 1}, token="wcms_pc_t", timeout=2)
    assert got.status == 200
    assert got.body["config"] == {"heartbeat_interval": 5}
    request = seen[0].decode()
    assert request.startswith("POST /api/x HTTP/1.1\r\n")
    assert "Authorization: Bearer wcms_pc_t\r\n" in request
    assert "Content-Type: application/json\r\n" in request
    assert request.endswith('{"a":1}')


def test_chunked_answer(serve: Callable[[Handler], TinyServer]) -> None:
    def handle(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'6\r\n{"a":1\r\n1\r\n}\r\n0\r\n\r\n'
        )
        conn.close()

    assert http.request("GET", serve(handle).url, timeout=2).body == {"a": 1}


def test_error_answer_becomes_a_typed_exception(serve: Callable[[Handler], TinyServer]) -> None:
    body = {"error": {"code": "machine_mismatch", "message": "token belongs to another PC"}}
    server = serve(answer("403 FORBIDDEN", body))
    with pytest.raises(http.ApiError) as caught:
        http.request("POST", server.url, body={}, timeout=2)
    assert (caught.value.status, caught.value.code) == (403, "machine_mismatch")
    assert caught.value.message == "token belongs to another PC"


def test_retry_after_and_non_json_errors(serve: Callable[[Handler], TinyServer]) -> None:
    limited = serve(
        answer("429 TOO MANY REQUESTS", {"error": {"code": "rate_limited"}}, "Retry-After: 7\r\n")
    )
    with pytest.raises(http.ApiError) as caught:
        http.request("POST", limited.url, body={}, timeout=2)
    assert caught.value.retry_after == 7.0

    def html(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 5\r\n\r\n<h1>!")
        conn.close()

    with pytest.raises(http.ApiError) as caught:
        http.request("GET", serve(html).url, timeout=2)
    assert (caught.value.status, caught.value.code) == (502, "http_502")


def test_refused_connection_fails_at_once(closed_port: int) -> None:
    started = time.monotonic()
    with pytest.raises(http.TransportError, match="connection refused"):
        http.request("POST", f"http://127.0.0.1:{closed_port}/", body={}, timeout=2)
    assert time.monotonic() - started < 0.5


def test_silent_server_is_cut_at_the_deadline(serve: Callable[[Handler], TinyServer]) -> None:
    def silent(conn: socket.socket) -> None:
        read_request(conn)
        time.sleep(5)

    server = serve(silent)
    started = time.monotonic()
    with pytest.raises(http.TransportError) as caught:
        http.request("POST", server.url, body={}, timeout=0.6)
    elapsed = time.monotonic() - started
    assert caught.value.timed_out
    assert 0.55 <= elapsed < 0.8


def test_a_dripping_server_cannot_stretch_the_total_deadline(
    serve: Callable[[Handler], TinyServer],
) -> None:
    """Each byte comes well inside a per-recv timeout; only a total deadline stops this."""

    def drip(conn: socket.socket) -> None:
        read_request(conn)
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}":
            conn.sendall(bytes([byte]))
            time.sleep(0.1)

    started = time.monotonic()
    with pytest.raises(http.TransportError) as caught:
        http.request("GET", serve(drip).url, timeout=0.8)
    assert caught.value.timed_out
    assert time.monotonic() - started < 1.0


def test_shared_deadline_that_already_passed() -> None:
    spent = http.Deadline.until(time.monotonic() - 1)
    with pytest.raises(http.TransportError, match="deadline exceeded"):
        http.request("GET", "http://127.0.0.1:1/", timeout=2, deadline=spent)


def test_slow_resolver_is_abandoned() -> None:
    """getaddrinfo takes no timeout; the lookup runs aside and is given up on."""
    release = threading.Event()

    def hanging_getaddrinfo(*args: object, **kwargs: object) -> list[object]:
        release.wait(5)
        raise socket.gaierror("released")

    started = time.monotonic()
    try:
        with pytest.raises(http.TransportError, match="DNS lookup of wcms.test timed out"):
            http.resolve("wcms.test", 80, http.Deadline(0.3), hanging_getaddrinfo)
        assert time.monotonic() - started < 0.5
    finally:
        release.set()


def test_bad_url_is_refused() -> None:
    with pytest.raises(http.TransportError, match="not an http"):
        http.request("GET", "ftp://x/", timeout=1)


def test_deadline_clock_is_injectable() -> None:
    now = [100.0]
    deadline = http.Deadline(2.0, clock=lambda: now[0])
    assert deadline.remaining("connect") == 2.0
    now[0] = 102.5
    with pytest.raises(http.TransportError, match="before connect"):
        deadline.remaining("connect")


def test_error_descriptions() -> None:
    assert http.describe_os_error(ConnectionRefusedError(111, "Connection refused")) == (
        "connection refused"
    )
    assert http.parse_retry_after("abc") is None
    assert http.parse_retry_after("-3") == 0.0
    assert http.parse_json_body(b"[1]") == {}


def test_tls_handshake_shares_the_deadline(serve: Callable[[Handler], TinyServer]) -> None:
    """A server that takes the ClientHello and never answers it."""

    def mute(conn: socket.socket) -> None:
        conn.recv(4096)
        time.sleep(5)

    server = serve(mute)
    started = time.monotonic()
    with pytest.raises(http.TransportError, match="TLS handshake") as caught:
        http.request("GET", server.url.replace("http:", "https:"), timeout=0.5)
    assert caught.value.timed_out
    assert time.monotonic() - started < 0.7


def test_tls_against_plain_http_fails_cleanly(serve: Callable[[Handler], TinyServer]) -> None:
    def plain(conn: socket.socket) -> None:
        conn.recv(4096)  # a ClientHello, answered in plain HTTP
        respond(conn, "400 Bad Request", {})

    server = serve(plain)
    with pytest.raises(http.TransportError, match="TLS with 127.0.0.1 failed"):
        http.request("GET", server.url.replace("http:", "https:"), timeout=2)
