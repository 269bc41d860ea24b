"""Issue 10, High 3 and the Low "Host header in install scripts": what the install scripts run is
checked against what they already hold, and the URL they name is never a request header.

linux.sh runs for real (sh, as root, WCMS_PREFIX in a temporary folder, --no-service so the
machine's systemd is left alone) against the real server serving a real wheel. The Windows side
runs under Wine (tests/wine/test_install_chain_wine.py); here, the logic the scripts share:
the trusted check entry point and the order of the steps in windows.ps1.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.bundle.conftest import bundle_files, unpack
from wcms import __version__
from wcms.bundle import check
from wcms.bundle.builder import build_wheel
from wcms.bundle.signing import public_key_text
from wcms.server.config import ConfigError, load_settings

pytestmark = pytest.mark.timeout(180)
BUNDLE = f"wcms-client-{__version__}-win_amd64.zip"


def publish(server: Any, *, wheel_hash: bool = True) -> Path:
    """What `wcms client bundle` leaves in <data_dir>/bundles: a real wheel and latest.json."""
    folder = Path(server.env["WCMS_DATA_DIR"]) / "bundles"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = build_wheel(folder)
    (folder / BUNDLE).write_bytes(b"PK not a real bundle")
    latest: dict[str, Any] = {
        "version": __version__,
        "file": BUNDLE,
        "sha256": hashlib.sha256(b"PK not a real bundle").hexdigest(),
        "size": 20,
        "public_key": None,
        "wheel": wheel.name,
    }
    if wheel_hash:
        latest["wheel_sha256"] = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (folder / "latest.json").write_text(json.dumps(latest))
    return wheel


def fetch(server: Any, path: str, host: str | None = None) -> tuple[int, str]:
    """GET with a Host header of our choosing (http.client sends it as given)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_host=True)
        connection.putheader("Host", host or f"127.0.0.1:{server.port}")
        connection.putheader("Accept", "application/json")
        connection.endheaders()
        answer = connection.getresponse()
        return answer.status, answer.read().decode()
    finally:
        connection.close()


def run_script(
    script: str, prefix: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    (prefix.parent / "linux.sh").write_text(script)
    return subprocess.run(
        ["sh", str(prefix.parent / "linux.sh"), *args],
        env={**os.environ, "WCMS_PREFIX": str(prefix), **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="linux.sh installs as root")


# ------------------------------------------------------------------ linux.sh, for real


@needs_root
def test_linux_script_refuses_a_tampered_wheel(shared_server: Any, tmp_path: Path) -> None:
    wheel = publish(shared_server)
    status, script = fetch(shared_server, "/install/linux.sh")
    assert status == 200
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the file the server now serves
    wheel.write_bytes(bytes(data))
    prefix = tmp_path / "opt-wcms"
    result = run_script(script, prefix, "--no-service", "--allow-http")
    assert result.returncode == 1, result.stdout + result.stderr
    actual = hashlib.sha256(bytes(data)).hexdigest()
    assert f"refused: {wheel.name} has SHA-256 {actual}" in result.stderr
    assert "nothing installed" in result.stderr
    assert not prefix.exists()  # no venv, no pip run


@needs_root
@pytest.mark.slow  # a real venv and pip install: about 30 s on a busy machine
def test_linux_script_installs_the_genuine_wheel(shared_server: Any, tmp_path: Path) -> None:
    wheel = publish(shared_server)
    status, script = fetch(shared_server, "/install/linux.sh")
    assert status == 200
    prefix = tmp_path / "opt-wcms"
    result = run_script(script, prefix, "--no-service", "--allow-http")
    assert result.returncode == 0, result.stdout + result.stderr
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert f"matches SHA-256 {digest}" in result.stdout
    venv_python = prefix / "venv" / "bin" / "python"
    where = subprocess.run(
        [str(venv_python), "-c", "import wcms, psutil; print(wcms.__version__, wcms.__file__)"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    assert where[0] == __version__ and where[1].startswith(str(prefix / "venv"))
    assert (prefix / "venv" / "bin" / "wcms").exists()


@needs_root
def test_linux_script_refuses_plain_http_without_the_override(
    shared_server: Any, tmp_path: Path
) -> None:
    publish(shared_server)
    _status, script = fetch(shared_server, "/install/linux.sh")
    prefix = tmp_path / "opt-wcms"
    result = run_script(script, prefix, "--no-service")
    assert result.returncode == 1
    assert "plain http" in result.stderr and "--allow-http" in result.stderr
    assert not prefix.exists()
    # The environment variable is the same override (for `curl ... | sh` one-liners): past the
    # http rule, this copy stops at the next check (its wheel hash blanked), before any download.
    blank = re.sub(r"WHEEL_SHA256='[0-9a-f]{64}'", "WHEEL_SHA256=''", script)
    result = run_script(blank, prefix, "--no-service", WCMS_ALLOW_HTTP="1")
    assert result.returncode == 1 and "holds no SHA-256" in result.stderr, result.stderr
    assert "plain http" not in result.stderr


@needs_root
def test_linux_script_refuses_a_wheel_without_a_published_hash(
    shared_server: Any, tmp_path: Path
) -> None:
    publish(shared_server, wheel_hash=False)  # a latest.json from before the hash was published
    _status, script = fetch(shared_server, "/install/linux.sh")
    prefix = tmp_path / "opt-wcms"
    result = run_script(script, prefix, "--no-service", "--allow-http")
    assert result.returncode == 1 and "holds no SHA-256" in result.stderr
    assert not prefix.exists()


# ------------------------------------------------------------------ WCMS_PUBLIC_URL


def test_public_url_is_what_every_script_names(make_server: Any) -> None:
    server = make_server(WCMS_PUBLIC_URL="https://wcms.example.org/")
    publish(server)
    for name in ("windows.ps1", "windows.cmd", "linux.sh"):
        status, text = fetch(server, f"/install/{name}", host="attacker.example:8080")
        assert status == 200, text
        assert "attacker" not in text
        assert "https://wcms.example.org" in text and "https://wcms.example.org/'" not in text


def test_without_public_url_a_hostile_host_is_refused_with_a_json_error(
    shared_server: Any,
) -> None:
    publish(shared_server)
    status, text = fetch(shared_server, "/install/windows.ps1", host="x';iex(irm evil);'")
    assert status == 400
    error = json.loads(text)["error"]
    assert error["code"] == "bad_request" and "WCMS_PUBLIC_URL" in error["message"]
    # A plain host name is the quick-start fallback, copied as given.
    status, text = fetch(shared_server, "/install/linux.sh", host="wcms.lab:5050")
    assert status == 200 and "SERVER='http://wcms.lab:5050'" in text


@pytest.mark.parametrize(
    "bad", ["wcms.lab", "ftp://wcms.lab", "https://wcms.lab/'x", "https://a b", "https://x?y=1"]
)
def test_a_public_url_that_is_not_a_plain_url_stops_the_server(
    bad: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WCMS_PUBLIC_URL", bad)
    with pytest.raises(ConfigError, match="WCMS_PUBLIC_URL"):
        load_settings()


# ------------------------------------------------------------------ the trusted check


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Ed25519PrivateKey, str, Path]:
    key = Ed25519PrivateKey.generate()
    pinned = tmp_path / "update_key.pub"
    pinned.write_text(public_key_text(key) + "\n")
    return key, public_key_text(key), pinned


def test_installed_client_refuses_a_rewritten_and_resigned_bundle(
    signed: tuple[Ed25519PrivateKey, str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, public, pinned = signed
    good = unpack(bundle_files(key), tmp_path / "good")
    assert check.main(["--source", str(good), "--pinned-key-file", str(pinned)]) == 0
    # An attacker rewrites a file and the manifest to match, and signs with a key of their own.
    evil = bundle_files(
        Ed25519PrivateKey.generate(), extra={"Lib/site-packages/wcms/client/main.py": b"pwn()"}
    )
    source = unpack(evil, tmp_path / "evil")
    args = ["--source", str(source), "--pinned-key-file", str(pinned)]
    assert check.main(args) == 1
    assert "signature is not valid for the pinned key" in capsys.readouterr().err
    # Offering the attacker's key in the (rewritten) script does not help: the pin wins.
    stranger = public_key_text(Ed25519PrivateKey.generate())
    assert check.main([*args, "--key", stranger]) == 1
    assert "differs from the one this PC pinned" in capsys.readouterr().err


def test_check_without_any_key_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = unpack(bundle_files(None), tmp_path / "unsigned")
    missing = tmp_path / "none.pub"
    assert check.main(["--source", str(source), "--pinned-key-file", str(missing)]) == 1
    assert "nothing to check the bundle against" in capsys.readouterr().err


def test_an_offered_key_is_used_only_when_none_is_pinned(
    signed: tuple[Ed25519PrivateKey, str, Path], tmp_path: Path
) -> None:
    key, public, _pinned = signed
    source = unpack(bundle_files(key), tmp_path / "b")
    missing = str(tmp_path / "none.pub")
    assert check.main(["--source", str(source), "--pinned-key-file", missing, "--key", public]) == 0
    other = public_key_text(Ed25519PrivateKey.generate())
    assert check.main(["--source", str(source), "--pinned-key-file", missing, "--key", other]) == 1


def test_windows_ps1_checks_with_the_installed_python_before_the_new_one_runs() -> None:
    """The step order of windows.ps1 (PowerShell does not run on this machine nor under Wine)."""
    text = (Path(check.__file__).parents[1] / "server" / "install" / "windows.ps1").read_text()
    https = text.index("StartsWith('https://')")
    download = text.index("Invoke-WebRequest")
    digest = text.index("Get-FileHash")
    trusted = text.index('& "$Target\\python.exe" @check')
    verdict = text.index("if ($LASTEXITCODE -ne 0)", trusted)
    new = text.index('& "$new\\python.exe" @installer')
    assert https < download < digest < trusted < verdict < new
    assert "'-m', 'wcms.bundle.check'" in text and "--pinned-key-file" in text
    # The work folder is under Program Files (admins only), not a TEMP others can write to.
    assert '$work = "$Target.download"' in text
    assert re.search(r"\$env:TEMP", text) is None


def test_no_script_fetches_and_runs_a_script() -> None:
    folder = Path(check.__file__).parents[1] / "server" / "install"
    for name in ("windows.ps1", "windows.cmd", "linux.sh"):
        text = (folder / name).read_text()
        for pattern in ("iex", "Invoke-Expression", "scriptblock", "| sh", "| bash"):
            code = [
                line for line in text.splitlines() if not line.lstrip().startswith(("#", "rem"))
            ]
            assert not any(pattern in line for line in code), (name, pattern)
