"""A bundle is taken only whole: every byte as the manifest says, signed by the pinned key."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.bundle.conftest import bundle_files, tamper, unpack, write_bundle
from wcms.bundle.signing import public_key_text
from wcms.bundle.verify import BundleRefused, decode_public_key, verify_dir, verify_zip


def test_a_signed_bundle_passes(
    tmp_path: Path, operator_key: Ed25519PrivateKey, public_key: str
) -> None:
    path = write_bundle(tmp_path / "b.zip", bundle_files(operator_key))
    assert verify_zip(path, public_key)["version"] == "9.9.9"
    assert verify_dir(unpack(bundle_files(operator_key), tmp_path / "d"), public_key)


@pytest.mark.parametrize("member", ["python.exe", "Lib/site-packages/wcms/client/main.py"])
def test_one_changed_byte_is_refused(
    tmp_path: Path, operator_key: Ed25519PrivateKey, public_key: str, member: str
) -> None:
    path = write_bundle(tmp_path / "b.zip", bundle_files(operator_key))
    tamper(path, member)
    with pytest.raises(BundleRefused, match=f"{member} does not match"):
        verify_zip(path, public_key)
    with pytest.raises(BundleRefused):
        verify_zip(path, None)  # the sums alone catch it too


def test_a_changed_manifest_breaks_the_signature(
    tmp_path: Path, operator_key: Ed25519PrivateKey, public_key: str
) -> None:
    path = write_bundle(tmp_path / "b.zip", bundle_files(operator_key))
    tamper(path, "manifest.json")
    with pytest.raises(BundleRefused):
        verify_zip(path, public_key)


def test_another_key_or_no_signature_is_refused(
    tmp_path: Path, operator_key: Ed25519PrivateKey, public_key: str
) -> None:
    stranger = Ed25519PrivateKey.generate()
    signed_by_stranger = write_bundle(tmp_path / "s.zip", bundle_files(stranger))
    with pytest.raises(BundleRefused, match="signature is not valid"):
        verify_zip(signed_by_stranger, public_key)
    unsigned = write_bundle(tmp_path / "u.zip", bundle_files(None))
    with pytest.raises(BundleRefused, match="not signed"):
        verify_zip(unsigned, public_key)
    assert verify_zip(unsigned, None)  # no pinned key: sums only (first install, unsigned)
    assert public_key_text(stranger) != public_key


def test_extra_and_missing_files_are_refused(
    tmp_path: Path, operator_key: Ed25519PrivateKey, public_key: str
) -> None:
    root = unpack(bundle_files(operator_key), tmp_path / "d")
    (root / "evil.dll").write_bytes(b"x")
    with pytest.raises(BundleRefused, match="evil.dll is not in the manifest"):
        verify_dir(root, public_key)
    (root / "evil.dll").unlink()
    (root / "wcms.cmd").unlink()
    with pytest.raises(BundleRefused, match="missing"):
        verify_dir(root, public_key)


def test_not_a_zip_or_no_manifest(tmp_path: Path) -> None:
    (tmp_path / "x.zip").write_bytes(b"PK but not really")
    with pytest.raises(BundleRefused, match="cannot read"):
        verify_zip(tmp_path / "x.zip", None)
    files = bundle_files(None)
    del files["manifest.json"]
    with pytest.raises(BundleRefused, match="no manifest"):
        verify_zip(write_bundle(tmp_path / "n.zip", files), None)


def test_public_key_text() -> None:
    with pytest.raises(ValueError, match="ed25519:"):
        decode_public_key("ssh-ed25519 AAAA")
    with pytest.raises(ValueError, match="32 bytes"):
        decode_public_key("ed25519:AAAA")
