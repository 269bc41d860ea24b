"""Small signed bundles made in memory, and an operator key, for the bundle tests."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wcms.bundle.builder import make_manifest, write_zip
from wcms.bundle.signing import public_key_text
from wcms.bundle.verify import MANIFEST, SIGNATURE

FILES = {
    "python.exe": b"MZ not really python",
    "Lib/site-packages/wcms/__init__.py": b'__version__ = "9.9.9"\n',
    "Lib/site-packages/wcms/client/main.py": b"print('agent')\n" * 20,
    "wcms.cmd": b"@echo off\r\n",
}


@pytest.fixture(scope="session")
def operator_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def public_key(operator_key: Ed25519PrivateKey) -> str:
    return public_key_text(operator_key)


def bundle_files(
    key: Ed25519PrivateKey | None, version: str = "9.9.9", extra: dict[str, bytes] | None = None
) -> dict[str, bytes]:
    """A bundle's entries: FILES, the manifest and (with a key) its signature."""
    files = {**FILES, **(extra or {})}
    files[MANIFEST] = make_manifest(files, version)
    if key is not None:
        files[SIGNATURE] = key.sign(files[MANIFEST])
    return files


def write_bundle(path: Path, files: dict[str, bytes]) -> Path:
    path.write_bytes(write_zip(files, 0))
    return path


def unpack(files: dict[str, bytes], root: Path) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def tamper(path: Path, member: str) -> None:
    """Rewrite a zip with one byte of `member` changed."""
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    data = bytearray(files[member])
    data[0] ^= 0x01
    files[member] = bytes(data)
    path.write_bytes(write_zip(files, 0))
