"""Seal command secrets (account passwords) at rest under a key derived from the server secret.

Only the Fernet token is stored; it is wiped once the command is final. Changing the server's
secret key makes sealed secrets unreadable: those commands fail rather than run without them.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_INFO = b"wcms command secrets v1"


class SecretUnreadable(Exception):
    """A sealed secret cannot be opened (the server's secret key changed, or it was altered)."""


def _fernet(server_secret: str) -> Fernet:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(
        server_secret.encode()
    )
    return Fernet(base64.urlsafe_b64encode(key))


def seal(server_secret: str, values: dict[str, Any]) -> str:
    return _fernet(server_secret).encrypt(json.dumps(values).encode()).decode("ascii")


def unseal(server_secret: str, token: str) -> dict[str, Any]:
    try:
        data = json.loads(_fernet(server_secret).decrypt(token.encode("ascii")))
    except (InvalidToken, ValueError):
        raise SecretUnreadable("the sealed secret cannot be read with this server's key") from None
    if not isinstance(data, dict):
        raise SecretUnreadable("the sealed secret is not an object")
    return data
