"""Seal command secrets (account passwords) at rest under a key derived from the server secret.

Only the Fernet token is stored; it is wiped once the command is final. Changing the server's
secret key makes sealed secrets unreadable: those commands fail rather than run without them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from wcms.server.models import Setting

_INFO = b"wcms command secrets v1"
_FINGERPRINT_TEXT = b"wcms: the fingerprint of the server secret, v1"
FINGERPRINT_SETTING = "secret_fingerprint"  # the settings row that keeps it


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


class SecretMismatch(Exception):
    """This process's secret is not the one the database was first served with."""


def fingerprint(server_secret: str) -> str:
    """What the database keeps of the secret: an HMAC of a fixed text under it (the secret
    cannot be recovered from it)."""
    return hmac.new(server_secret.encode(), _FINGERPRINT_TEXT, hashlib.sha256).hexdigest()


def agree_on_secret(session: Session, server_secret: str) -> None:
    """Every process and node on one database must hold the same secret: sessions, PINs and
    sealed passwords made by one are read by another. The first to start records the secret's
    fingerprint; one with another secret raises SecretMismatch, before it serves anything.

    Commits: it runs once at start-up, outside any request.
    """
    mine = fingerprint(server_secret)
    row = session.get(Setting, FINGERPRINT_SETTING)
    if row is None:
        session.add(Setting(key=FINGERPRINT_SETTING, value=mine))
        try:
            session.commit()
            return
        except IntegrityError:  # another node recorded its own at the same instant
            session.rollback()
            row = session.get(Setting, FINGERPRINT_SETTING)
    if row is None or not hmac.compare_digest(row.value, mine):
        raise SecretMismatch(
            "this server's secret key is not the one this database was first served with "
            "(another node, or a lost data dir): give every node the same WCMS_SECRET_KEY, or "
            "copy secret_key from the first node's data dir"
        )
