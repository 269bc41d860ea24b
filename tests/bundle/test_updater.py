"""The updater takes only a newer bundle signed by the pinned key; the download comes from a
real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.bundle.conftest import bundle_files, tamper, write_bundle
from wcms.bundle.verify import BundleRefused
from wcms.client import updater
from wcms.client.config import ClientConfig
from wcms.client.updater import Offer, UpdateError


class Files(http.server.BaseHTTPRequestHandler):
    root: Path

    def do_GET(self) -> None:
        path = self.root / self.path.rsplit("/", 1)[-1]
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "served"
    root.mkdir()
    handler = type("Handler", (Files,), {"root": root})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def client_config(tmp_path: Path, server: str, key: str | None) -> ClientConfig:
    config = ClientConfig(
        client_dir=tmp_path / "client", log_dir=tmp_path / "logs", server_url=server
    )
    config.client_dir.mkdir(parents=True, exist_ok=True)
    if key:
        (config.client_dir / "update_key.pub").write_text(key + "\n")
    return config


def offer_for(path: Path, version: str = "9.9.9") -> Offer:
    data = path.read_bytes()
    return Offer(version, path.name, hashlib.sha256(data).hexdigest(), len(data))


BUNDLE = "wcms-client-9.9.9-win_amd64.zip"


def test_versions() -> None:
    assert updater.is_newer("1.0.10", "1.0.9")
    assert not updater.is_newer("1.0.0", "1.0.0")
    assert not updater.is_newer("0.9.99", "1.0.0")
    assert updater.is_newer("1.1.0rc1", "1.0.0")
    with pytest.raises(UpdateError):
        updater.version_key("latest")


@pytest.mark.parametrize(
    "latest",
    [
        {},
        {"version": "2.0", "file": "../../evil.exe", "sha256": "0" * 64, "size": 1},
        {"version": "2.0", "file": "wcms-client-2.0-win_amd64.zip", "sha256": "xyz", "size": 1},
        {"version": "2.0", "file": "wcms-client-2.0-win_amd64.zip", "sha256": "0" * 64, "size": 0},
    ],
)
def test_offers_are_checked_before_use(latest: dict[str, object]) -> None:
    with pytest.raises(UpdateError):
        updater.parse_offer(latest)


def test_a_signed_newer_bundle_is_fetched_verified_and_staged(
    tmp_path: Path, served: tuple[str, Path], operator_key: Ed25519PrivateKey, public_key: str
) -> None:
    url, root = served
    bundle = write_bundle(root / BUNDLE, bundle_files(operator_key))
    config = client_config(tmp_path, url, public_key)
    path = updater.fetch_and_verify(config, offer_for(bundle), tmp_path / "work")
    updater.stage(path, tmp_path / "WCMS.staged")
    assert (tmp_path / "WCMS.staged" / "python.exe").read_bytes().startswith(b"MZ")


def test_a_tampered_bundle_is_refused_and_deleted(
    tmp_path: Path, served: tuple[str, Path], operator_key: Ed25519PrivateKey, public_key: str
) -> None:
    url, root = served
    bundle = write_bundle(root / BUNDLE, bundle_files(operator_key))
    tamper(bundle, "Lib/site-packages/wcms/client/main.py")
    config = client_config(tmp_path, url, public_key)
    with pytest.raises(BundleRefused, match="main.py does not match"):
        updater.fetch_and_verify(config, offer_for(bundle), tmp_path / "work")
    assert not (tmp_path / "work" / BUNDLE).exists()


def test_a_bundle_signed_by_another_key_is_refused(
    tmp_path: Path, served: tuple[str, Path], public_key: str
) -> None:
    url, root = served
    bundle = write_bundle(root / BUNDLE, bundle_files(Ed25519PrivateKey.generate()))
    config = client_config(tmp_path, url, public_key)
    with pytest.raises(BundleRefused, match="signature"):
        updater.fetch_and_verify(config, offer_for(bundle), tmp_path / "work")


def test_the_download_must_match_the_offer(
    tmp_path: Path, served: tuple[str, Path], operator_key: Ed25519PrivateKey, public_key: str
) -> None:
    url, root = served
    bundle = write_bundle(root / BUNDLE, bundle_files(operator_key))
    config = client_config(tmp_path, url, public_key)
    offer = offer_for(bundle)
    with pytest.raises(UpdateError, match="SHA-256"):
        updater.fetch_and_verify(config, Offer("9.9.9", BUNDLE, "0" * 64, offer.size), tmp_path)
    with pytest.raises(UpdateError, match="larger"):
        updater.fetch_and_verify(config, Offer("9.9.9", BUNDLE, offer.sha256, 10), tmp_path)
    with pytest.raises(BundleRefused, match="says 9.9.9"):
        updater.fetch_and_verify(config, offer_for(bundle, "9.9.10"), tmp_path)


def test_no_pinned_key_no_update(tmp_path: Path) -> None:
    config = client_config(tmp_path, "http://127.0.0.1:9", None)
    assert updater.check(config) is None  # never even asks the server
