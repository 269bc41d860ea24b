"""The security headers on every answer: Flask adds them after each request (create_app), the
agent fast path writes them itself (fastpath.py). One function, so the two cannot drift apart."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wcms.server.config import Settings

SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("X-Frame-Options", "DENY"),
)
# Sent when the server is published over https (WCMS_PUBLIC_URL=https://...): browsers then
# refuse plain http to this host for a year. No includeSubDomains: other hosts of the domain
# are not ours to decide for.
HSTS = ("Strict-Transport-Security", "max-age=31536000")


def public_https(settings: Settings) -> bool:
    """Whether the configured public URL is https: every cookie is then `Secure` (auth.py),
    whatever the scheme the request reached this process with, and HSTS is sent."""
    return settings.public_url.startswith("https://")


def security_headers(settings: Settings) -> tuple[tuple[str, str], ...]:
    """The headers every answer of a server with these settings carries."""
    return (*SECURITY_HEADERS, HSTS) if public_https(settings) else SECURITY_HEADERS
