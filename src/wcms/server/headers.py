"""The security headers on every answer: Flask adds them after each request (create_app), the
agent fast path writes them itself (fastpath.py). One tuple, so the two cannot drift apart."""

from __future__ import annotations

SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("X-Frame-Options", "DENY"),
)
