"""What the domain refuses, without HTTP: each kind names the rule that failed, and the API
layer alone (errors.py, `http_status`) decides which status answers it.

Every error carries a stable `code` (protocol.ErrorCode, the `code` of the JSON error body), a
message for people, and optionally the fields it concerns.
"""

from __future__ import annotations

from typing import ClassVar, TypeVar

from wcms.protocol import ErrorCode


class DomainError(Exception):
    """A rule of the domain refused the request; the caller may fix it and try again."""

    default_code: ClassVar[ErrorCode] = ErrorCode.BAD_REQUEST

    def __init__(
        self, message: str, code: ErrorCode | None = None, fields: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.fields = fields


class Invalid(DomainError):
    """The input breaks a rule of its shape (a field out of range, a name already taken...)."""

    default_code = ErrorCode.VALIDATION


class Unauthenticated(DomainError):
    """The caller's credential is missing, unknown or revoked."""

    default_code = ErrorCode.INVALID_TOKEN


class Forbidden(DomainError):
    """The caller is known but may not do this."""

    default_code = ErrorCode.FORBIDDEN


class NotFound(DomainError):
    """The thing named does not exist (or is not the caller's)."""

    default_code = ErrorCode.NOT_FOUND


class Conflict(DomainError):
    """The request is well formed but the current state refuses it."""

    default_code = ErrorCode.CONFLICT


class Unavailable(DomainError):
    """Something the request needs (the database, the disk) is away; try again later."""

    default_code = ErrorCode.DATABASE_UNAVAILABLE


T = TypeVar("T")


def found(row: T | None, message: str) -> T:
    """`row`, or NotFound with `message` when it does not exist."""
    if row is None:
        raise NotFound(message)
    return row
