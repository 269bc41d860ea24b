"""/install: the scripts carry this server's URL and the bundle's digest and key; only the
files latest.json names are served."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flask import Flask
from flask.testing import FlaskClient

from tests.bundle.conftest import bundle_files, write_bundle
from wcms.bundle.builder import build_wheel
from wcms.server.api.install import register_install

BUNDLE = "wcms-client-9.9.9-win_amd64.zip"


@pytest.fixture
def bundles(tmp_path: Path, operator_key: Ed25519PrivateKey, public_key: str) -> Path:
    import json

    folder = tmp_path / "bundles"
    folder.mkdir()
    data = write_bundle(folder / BUNDLE, bundle_files(operator_key)).read_bytes()
    wheel = build_wheel(folder)
    latest = {
        "version": "9.9.9",
        "file": BUNDLE,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "public_key": public_key,
        "wheel": wheel.name,
        "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
    }
    (folder / "latest.json").write_text(json.dumps(latest))
    (folder / "secret.pem").write_text("not for download")
    return folder


def make_client(folder: Path, public_url: str = "") -> FlaskClient:
    app = Flask(__name__)
    app.config["WCMS_BUNDLE_DIR"] = str(folder)
    app.config["WCMS_PUBLIC_URL"] = public_url
    register_install(app)
    return app.test_client()


def test_windows_script_is_filled_in(bundles: Path, public_key: str) -> None:
    resp = make_client(bundles).get("/install/windows.ps1", base_url="http://wcms.lab:5050")
    assert resp.status_code == 200
    text = resp.get_data(as_text=True)
    assert "@@" not in text
    assert "$Server = 'http://wcms.lab:5050'" in text
    assert f"$Bundle = '{BUNDLE}'" in text
    assert f"$PublicKey = '{public_key}'" in text
    assert "wcms.client.installer" in text and "Get-FileHash" in text
    assert resp.headers["Cache-Control"] == "no-store"


def test_cmd_runs_nothing_it_fetches_and_pins_the_bundle(bundles: Path) -> None:
    client = make_client(bundles)
    cmd = client.get("/install/windows.cmd", base_url="http://wcms.lab:5050").get_data()
    digest = hashlib.sha256((bundles / BUNDLE).read_bytes()).hexdigest()
    assert b"\r\n" in cmd and b"@@" not in cmd
    assert f'set "WCMS_SHA256={digest}"'.encode() in cmd
    assert b'set "WCMS_SERVER=http://wcms.lab:5050"' in cmd
    # No script is fetched and run: the only download is the bundle zip, checked by its hash.
    for fetched_code in (b"windows.ps1", b"Invoke-RestMethod", b"irm ", b"scriptblock", b"iex"):
        assert fetched_code not in cmd
    assert b"Get-FileHash" in cmd and b"goto installed" in cmd


def test_linux_script_pins_the_wheel(bundles: Path) -> None:
    client = make_client(bundles)
    sh = client.get("/install/linux.sh", base_url="http://wcms.lab:5050").get_data(as_text=True)
    digest = hashlib.sha256(next(bundles.glob("*.whl")).read_bytes()).hexdigest()
    assert "SERVER='http://wcms.lab:5050'" in sh and "WHEEL='wcms-" in sh and "@@" not in sh
    assert f"WHEEL_SHA256='{digest}'" in sh


def test_the_public_url_wins_over_the_host_header(bundles: Path) -> None:
    client = make_client(bundles, public_url="https://wcms.example.org")
    for name in ("windows.ps1", "windows.cmd", "linux.sh"):
        resp = client.get(f"/install/{name}", headers={"Host": "attacker.example:80"})
        assert resp.status_code == 200
        text = resp.get_data(as_text=True)
        assert "https://wcms.example.org" in text and "attacker" not in text
    hostile = client.get("/install/linux.sh", headers={"Host": "x';Remove-Item C:\\ -Recurse;'"})
    assert hostile.status_code == 200 and "Remove-Item" not in hostile.get_data(as_text=True)


def test_a_hostile_host_header_is_not_pasted_into_a_script(bundles: Path) -> None:
    resp = make_client(bundles).get(
        "/install/windows.ps1", headers={"Host": "x';Remove-Item C:\\ -Recurse;'"}
    )
    assert resp.status_code == 400
    assert "WCMS_PUBLIC_URL" in resp.get_data(as_text=True)


def test_the_bundle_and_wheel_are_served_and_nothing_else(bundles: Path) -> None:
    client = make_client(bundles)
    resp = client.get(f"/install/{BUNDLE}")
    assert resp.status_code == 200
    assert resp.get_data() == (bundles / BUNDLE).read_bytes()
    resp.close()
    assert client.get("/install/latest.json").get_json()["file"] == BUNDLE
    for name in ("secret.pem", "../bundles/secret.pem", "latest.json.bak"):
        assert client.get(f"/install/{name}").status_code == 404


def test_no_bundle_yet(tmp_path: Path) -> None:
    client = make_client(tmp_path)
    assert client.get("/install/windows.ps1").status_code == 404
    assert client.get("/install/latest.json").status_code == 404
