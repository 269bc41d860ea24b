"""What one connection may take from the server: the limits the HTTP handler (runner.py) applies
before the application sees a request.

- **Connections per address**: a peer address may hold at most `per_address` open connections;
  one more is answered 503 at once, without reading it, and closed. IPv6 peers count per /64
  (one host usually holds a whole /64). Behind a trusted proxy every peer is the proxy, so the
  cap is the worker's own connection limit and the proxy must cap per client.
- **Deadlines**: a request's line and headers must arrive within `header_timeout` of its first
  byte, and its body within `body_timeout` of the end of the headers, however slowly the bytes
  trickle in. The idle limit (`idle_timeout` without a byte, between keep-alive requests too)
  stays as it was. A long poll is unaffected: while it waits, the server writes, not reads.
- **Framing**: a request with two Content-Length headers, a Content-Length that is not plain
  digits, or a Transfer-Encoding other than `chunked` (or beside a Content-Length) is refused
  with 400: two parsers (a proxy and this server) could otherwise disagree on where it ends.

This module imports neither gevent nor Flask: gunicorn's master imports the runner before the
worker patches the standard library.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from typing import Any

from wcms.protocol import ErrorCode

IDLE_TIMEOUT = 75.0  # seconds a connection may send nothing (between requests, or mid-request)


@dataclass(frozen=True)
class Limits:
    per_address: int
    header_timeout: float
    body_timeout: float
    idle_timeout: float = IDLE_TIMEOUT

    @classmethod
    def of(cls, settings: Any, worker_connections: int) -> Limits:
        """The limits `settings` ask for; behind a trusted proxy, no cap below the worker's."""
        per_address = settings.max_connections_per_address
        if settings.trusted_proxies:
            per_address = max(per_address, worker_connections)
        return cls(per_address, settings.header_timeout, settings.body_timeout)


def address_key(address: Any) -> str:
    """The key a peer's connections are counted under: its IPv4 address, or its IPv6 /64."""
    host = address[0] if isinstance(address, tuple) else str(address)
    if ":" not in host:
        return str(host)  # IPv4, as accept() spells it (the common case: no parsing)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return str(host)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AddressCounter:
    """Open connections per peer key, admitted up to a cap. The worker runs one thread (gevent),
    so admit and release never interleave."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._open: dict[str, int] = {}

    def admit(self, key: str) -> bool:
        count = self._open.get(key, 0)
        if count >= self.cap:
            return False
        self._open[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)

    def count(self, key: str) -> int:
        return self._open.get(key, 0)

    def __len__(self) -> int:
        return len(self._open)


# ---------------------------------------------------------------------------- what can go wrong


class HeaderTimeout(TimeoutError):
    """The request line and headers did not arrive within the header deadline."""


class BadFraming(ValueError):
    """The request's length is ambiguous (see framing_problem)."""


class BodyReadError(OSError):
    """The body could not be read: the client closed mid-body, or missed the body deadline.
    Answered (if the client still listens) as a 4xx with one INFO line, never a traceback."""

    status = 400
    code = ErrorCode.CLIENT_DISCONNECTED


class ClientDisconnected(BodyReadError):
    pass


class BodyTimeout(BodyReadError):
    status = 408
    code = ErrorCode.REQUEST_TIMEOUT


_DIGITS = re.compile(r"[0-9]{1,18}")


def framing_problem(headers: Message) -> str | None:
    """Why the length of a request with these headers is ambiguous, or None."""
    lengths = headers.get_all("content-length") or []
    codings = headers.get_all("transfer-encoding") or []
    if len(lengths) > 1:
        return "more than one Content-Length header"
    if lengths and not _DIGITS.fullmatch(lengths[0].strip()):
        return "Content-Length is not a number"
    if codings and lengths:
        return "both Content-Length and Transfer-Encoding"
    if codings and (len(codings) > 1 or codings[0].strip().lower() != "chunked"):
        return "a Transfer-Encoding other than chunked"
    return None


def raw_answer(
    status: int, code: ErrorCode, message: str, headers: Iterable[tuple[str, str]] = ()
) -> bytes:
    """A complete HTTP/1.1 error answer that closes the connection, in the API's error shape."""
    body = json.dumps({"error": {"code": str(code), "message": message}}).encode()
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


TOO_MANY_CONNECTIONS = raw_answer(
    503,
    ErrorCode.TOO_MANY_CONNECTIONS,
    "too many open connections from this address",
    [("Retry-After", "10")],
)
