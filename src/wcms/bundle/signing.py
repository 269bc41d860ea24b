"""The operator's Ed25519 key: made once, kept off the PCs, used to sign each bundle's manifest.

The private key is a PEM file (mode 600) that only the server's operator holds; PCs pin the
public half (`ed25519:<base64>`) when the client is installed and refuse updates it did not sign.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wcms.bundle.verify import KEY_PREFIX


def generate_key(path: Path) -> str:
    """Write a new private key to `path` (refusing to overwrite); return its public key text."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return public_key_text(key)


def load_key(path: Path) -> Ed25519PrivateKey:
    """The private key in `path`, or ValueError if it is not an Ed25519 key."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return key


def public_key_text(key: Ed25519PrivateKey) -> str:
    """`ed25519:<base64 of the 32-byte public key>`, the form PCs pin."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode()
