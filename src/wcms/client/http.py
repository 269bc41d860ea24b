"""The one module of the client that speaks HTTP.

Every call has a TOTAL deadline covering name resolution, connect, TLS, send and read together.
A plain socket timeout applies to each phase (and to each recv) separately, so a slow resolver
followed by a server that drips bytes could hold a 2-second call for many times 2 seconds; here
each phase gets only what is left of the one budget, and the resolver, which takes no timeout at
all, runs in a daemon thread that is abandoned when the budget runs out.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import json
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from wcms.client import CLIENT_VERSION

MAX_RESPONSE_BYTES = 1024 * 1024
USER_AGENT = f"wcms-client/{CLIENT_VERSION}"

Clock = Callable[[], float]
AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]


class HttpError(Exception):
    """A call did not produce a successful answer."""


class TransportError(HttpError):
    """No HTTP answer at all: DNS, connect, TLS, a reset, or the deadline ran out."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class ApiError(HttpError):
    """The server answered with a non-2xx status; `code` is its `error.code` when it sent one."""

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass
class Response:
    status: int
    body: dict[str, Any] = field(default_factory=dict)


class Deadline:
    """One time budget shared by every phase of a call."""

    def __init__(self, seconds: float, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.at = clock() + seconds

    @classmethod
    def until(cls, at: float, clock: Clock = time.monotonic) -> Deadline:
        """A budget ending at the clock reading `at` (one that started elsewhere)."""
        deadline = cls(0.0, clock)
        deadline.at = at
        return deadline

    def remaining(self, phase: str) -> float:
        """Seconds left, or a TransportError naming the phase that found none left."""
        left = self.at - self._clock()
        if left <= 0:
            raise TransportError(f"deadline exceeded before {phase}", timed_out=True)
        return left


def request(
    method: str,
    url: str,
    *,
    body: dict[str, Any] | None = None,
    token: str | None = None,
    timeout: float,
    deadline: Deadline | None = None,
) -> Response:
    """Send one request; answer the 2xx Response or raise ApiError / TransportError.

    `timeout` is the total budget in seconds; pass `deadline` instead to share a budget that
    started earlier (the shutdown path starts its clock when the OS tells it to go).
    """
    deadline = deadline or Deadline(timeout)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TransportError(f"not an http(s) URL: {url!r}")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    sock = _connect(host, port, deadline)
    try:
        if parts.scheme == "https":
            sock = _wrap_tls(sock, host, deadline)
        head = _request_head(method, path, parts.netloc, token, payload, body is not None)
        _send_all(sock, head + payload, deadline)
        return _read_response(sock, method, deadline)
    except TimeoutError:
        raise TransportError("timed out waiting for the server", timed_out=True) from None
    except (OSError, http.client.HTTPException) as exc:
        raise TransportError(describe_os_error(exc)) from None
    finally:
        sock.close()


def _request_head(
    method: str, path: str, netloc: str, token: str | None, payload: bytes, is_json: bool
) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {netloc}",
        f"User-Agent: {USER_AGENT}",
        "Accept: application/json",
        "Connection: close",
        f"Content-Length: {len(payload)}",
    ]
    if is_json:
        lines.append("Content-Type: application/json")
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def resolve(
    host: str, port: int, deadline: Deadline, getaddrinfo: Callable[..., Any] = socket.getaddrinfo
) -> Sequence[AddrInfo]:
    """getaddrinfo, abandoned (not cancelled: it cannot be) when the deadline passes."""
    if _is_ip_literal(host):
        try:
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise TransportError(f"bad address {host}: {exc}") from None
    result: list[Sequence[AddrInfo] | BaseException] = []

    def lookup() -> None:
        try:
            result.append(getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the waiting thread, which re-raises it
            result.append(exc)

    worker = threading.Thread(target=lookup, name=f"resolve {host}", daemon=True)
    worker.start()
    worker.join(deadline.remaining("DNS lookup"))
    if not result:
        raise TransportError(f"DNS lookup of {host} timed out", timed_out=True)
    if isinstance(result[0], BaseException):
        raise TransportError(f"DNS lookup of {host} failed: {result[0]}")
    return result[0]


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _connect(host: str, port: int, deadline: Deadline) -> socket.socket:
    """Connect to the first address that answers, each try bounded by what is left."""
    errors: list[str] = []
    for family, kind, proto, _name, addr in resolve(host, port, deadline):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(deadline.remaining("connect"))
            sock.connect(addr)
        except TimeoutError:
            sock.close()
            raise TransportError(f"connect to {host}:{port} timed out", timed_out=True) from None
        except OSError as exc:
            sock.close()
            errors.append(describe_os_error(exc))
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise TransportError(f"cannot connect to {host}:{port}: {'; '.join(errors) or 'no address'}")


def _wrap_tls(sock: socket.socket, host: str, deadline: Deadline) -> socket.socket:
    """TLS handshake step by step, so its several round trips share the one deadline."""
    context = ssl.create_default_context()
    tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    tls.setblocking(False)
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                select.select([tls], [], [], deadline.remaining("TLS handshake"))
            except ssl.SSLWantWriteError:
                select.select([], [tls], [], deadline.remaining("TLS handshake"))
    except ssl.SSLError as exc:
        tls.close()
        raise TransportError(f"TLS with {host} failed: {exc.reason or exc}") from None
    except BaseException:
        tls.close()
        raise
    tls.setblocking(True)
    return tls


def _send_all(sock: socket.socket, data: bytes, deadline: Deadline) -> None:
    """sendall, each send bounded by what is left (an SSL socket's sendall is not)."""
    view = memoryview(data)
    while view:
        sock.settimeout(deadline.remaining("send"))
        view = view[sock.send(view) :]


class _DeadlineReader(io.RawIOBase):
    """A socket reader whose every recv gets only what is left of the deadline."""

    def __init__(self, sock: socket.socket, deadline: Deadline) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._sock.settimeout(self._deadline.remaining("reading the answer"))
        return self._sock.recv_into(buffer)


class _DeadlineSocket:
    """What http.client.HTTPResponse needs of a socket: makefile()."""

    def __init__(self, sock: socket.socket, deadline: Deadline) -> None:
        self._reader = io.BufferedReader(_DeadlineReader(sock, deadline))

    def makefile(self, mode: str) -> io.BufferedReader[_DeadlineReader]:
        return self._reader


def _read_response(sock: socket.socket, method: str, deadline: Deadline) -> Response:
    resp = http.client.HTTPResponse(_DeadlineSocket(sock, deadline), method=method)  # type: ignore[arg-type]  # duck-typed: HTTPResponse only calls makefile()
    resp.begin()
    raw = resp.read(MAX_RESPONSE_BYTES + 1)
    if len(raw) > MAX_RESPONSE_BYTES:
        raise TransportError(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
    body = parse_json_body(raw)
    if 200 <= resp.status < 300:
        return Response(resp.status, body)
    raise api_error(resp.status, body, resp.getheader("Retry-After"))


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The answer's JSON object, or {} for an empty or non-JSON body."""
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def api_error(status: int, body: dict[str, Any], retry_after: str | None = None) -> ApiError:
    """Turn an error answer into an ApiError carrying its status and `error.code`."""
    error = body.get("error")
    code, message = f"http_{status}", http.client.responses.get(status, "error")
    if isinstance(error, dict):
        code = str(error.get("code") or code)
        message = str(error.get("message") or message)
    return ApiError(status, code, message, retry_after=parse_retry_after(retry_after))


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is not used by our server)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def describe_os_error(exc: BaseException) -> str:
    """A short reason for a log line: 'connection refused', not a traceback."""
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the server"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
