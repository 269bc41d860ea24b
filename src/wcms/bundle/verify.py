"""Check a client bundle before anything of it runs: every file against the manifest's SHA-256,
no file the manifest does not list, and the manifest against the operator's Ed25519 key.

Used by the installer (on the unpacked folder) and the updater (on the downloaded zip). The key
is pinned at install (update_key.pub in the client dir); an update without a valid signature by
that key is refused, and so is any bundle in which one byte differs from its manifest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from wcms.bundle import ed25519

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
KEY_PREFIX = "ed25519:"
_NOT_LISTED = frozenset({MANIFEST, SIGNATURE})


class BundleRefused(Exception):
    """The bundle does not match its manifest, or its signature is missing or wrong."""


def parse_manifest(data: bytes) -> dict[str, Any]:
    """The manifest as a dict, or BundleRefused if it is not one."""
    try:
        manifest = json.loads(data)
    except ValueError:
        raise BundleRefused("manifest.json is not valid JSON") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise BundleRefused("manifest.json lists no files")
    return dict(manifest)


def check_files(manifest: dict[str, Any], entries: Iterable[tuple[str, bytes]]) -> None:
    """Every listed file present with its SHA-256, and nothing more."""
    expected: dict[str, str] = dict(manifest["files"])
    seen: set[str] = set()
    for name, data in entries:
        if name in _NOT_LISTED:
            continue
        want = expected.get(name)
        if want is None:
            raise BundleRefused(f"{name} is not in the manifest")
        if hashlib.sha256(data).hexdigest() != want:
            raise BundleRefused(f"{name} does not match its SHA-256 in the manifest")
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise BundleRefused(f"{len(missing)} file(s) missing, first {missing[0]}")


def check_signature(manifest: bytes, signature: bytes | None, public_key: str) -> None:
    """The manifest signed by the pinned key, or BundleRefused."""
    if signature is None:
        raise BundleRefused("the bundle is not signed, and this PC only takes signed bundles")
    try:
        raw = decode_public_key(public_key)
    except ValueError as exc:
        raise BundleRefused(f"the pinned key is unusable: {exc}") from None
    if not ed25519.verify(raw, signature, manifest):
        raise BundleRefused("the bundle's signature is not valid for the pinned key")


def decode_public_key(text: str) -> bytes:
    """`ed25519:<base64 of 32 bytes>` -> the raw key."""
    text = text.strip()
    if not text.startswith(KEY_PREFIX):
        raise ValueError("a public key must start with 'ed25519:'")
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX) :], validate=True)
    except binascii.Error:
        raise ValueError("the public key is not base64") from None
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return raw


def verify_entries(entries: dict[str, bytes], public_key: str | None) -> dict[str, Any]:
    """Check a bundle given as {path: bytes}; the manifest when it passes."""
    if MANIFEST not in entries:
        raise BundleRefused("the bundle has no manifest.json")
    manifest = parse_manifest(entries[MANIFEST])
    if public_key is not None:
        check_signature(entries[MANIFEST], entries.get(SIGNATURE), public_key)
    check_files(manifest, entries.items())
    return manifest


def verify_zip(path: Path, public_key: str | None) -> dict[str, Any]:
    """Check a bundle zip (the updater's download) without unpacking it."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = {i.filename: archive.read(i) for i in archive.infolist() if not i.is_dir()}
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleRefused(f"cannot read {path.name}: {exc}") from None
    return verify_entries(entries, public_key)


def verify_dir(root: Path, public_key: str | None) -> dict[str, Any]:
    """Check an unpacked bundle (the installer's source folder)."""
    return verify_entries(dict(_read_tree(root)), public_key)


def _read_tree(root: Path) -> Iterator[tuple[str, bytes]]:
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and "__pycache__" not in relative.parts:
            yield relative.as_posix(), path.read_bytes()
