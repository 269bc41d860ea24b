"""The client's own Ed25519 verifier against `cryptography` and RFC 8032's vectors."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wcms.bundle import ed25519

L = 2**252 + 27742317777372353535851937790883648493

# RFC 8032, 7.1: TEST 1 (empty message), TEST 2 (one byte), TEST 3 (two bytes).
RFC_VECTORS = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60", ""),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb", "72"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7", "af82"),
]
RFC_TEST1 = (
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bac"
    "c61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
)


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_rfc_8032_test_1() -> None:
    public, signature = (bytes.fromhex(x) for x in RFC_TEST1)
    assert ed25519.verify(public, signature, b"")
    assert not ed25519.verify(public, signature, b"\0")


@pytest.mark.parametrize(("secret", "message"), RFC_VECTORS)
def test_rfc_8032_keys_signed_by_cryptography(secret: str, message: str) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(secret))
    msg = bytes.fromhex(message)
    assert ed25519.verify(raw_public(key), key.sign(msg), msg)


def test_agrees_with_cryptography_on_random_keys_and_messages() -> None:
    for size in (0, 1, 64, 1000, 70_000):
        key = Ed25519PrivateKey.generate()
        message = os.urandom(size)
        signature = key.sign(message)
        public = raw_public(key)
        assert ed25519.verify(public, signature, message)
        assert not ed25519.verify(public, signature, message + b"!")
        other = raw_public(Ed25519PrivateKey.generate())
        assert not ed25519.verify(other, signature, message)
        for i in (0, 31, 32, 63):
            bad = bytearray(signature)
            bad[i] ^= 0x40
            assert not ed25519.verify(public, bytes(bad), message)


def test_malformed_inputs_are_refused() -> None:
    key = Ed25519PrivateKey.generate()
    signature, public = key.sign(b"m"), raw_public(key)
    assert not ed25519.verify(public, signature[:63], b"m")
    assert not ed25519.verify(public[:31], signature, b"m")
    # S + L is the same scalar mod L but not canonical: refused (no malleability).
    s = int.from_bytes(signature[32:], "little") + L
    assert s < 2**256
    assert not ed25519.verify(public, signature[:32] + s.to_bytes(32, "little"), b"m")
    # y >= p is not a point encoding.
    assert not ed25519.verify(b"\xff" * 31 + b"\x7f", signature, b"m")
