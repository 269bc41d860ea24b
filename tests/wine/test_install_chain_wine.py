"""Issue 10, High 3, under Wine: the installed (trusted) client refuses a tampered new bundle
before any of the new bundle's code runs, and windows.cmd runs what is installed.

PowerShell does not exist under Wine (its powershell.exe is a stub that runs nothing), so
windows.ps1 itself cannot run here: these tests run the step it delegates to, the installed
python.exe with `-m wcms.bundle.check`, exactly as the script calls it; the order of the steps in
the script is checked in tests/security/test_install_chain.py. windows.cmd runs for real in
Wine's cmd.exe: both of its branches, the first one's download being PowerShell's (a stub here).
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.wine.harness import PYTHON, WinePrefix
from wcms.bundle.builder import make_manifest
from wcms.bundle.signing import load_key
from wcms.bundle.verify import MANIFEST, SIGNATURE
from wcms.server.api.install import render_script

pytestmark = [pytest.mark.wine, pytest.mark.slow, pytest.mark.timeout(300)]

KEY_DIR = r"C:\wcms-chain"
MARKER = r"C:\wcms-chain\PWNED.txt"
PAYLOAD = (
    "\nopen(r'" + MARKER + "', 'w').write('the new bundle ran')  # what an attacker would run\n"
)


def pin_key(wine: WinePrefix, public_key: str) -> str:
    """The key file an installed client keeps (update_key.pub); its Windows path."""
    folder = wine.drive_c(KEY_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "update_key.pub").write_text(public_key + "\n")
    (folder / "PWNED.txt").unlink(missing_ok=True)
    return KEY_DIR + r"\update_key.pub"


def unpack_new(wine: WinePrefix, windows_dir: str) -> Path:
    target = wine.drive_c(windows_dir)
    shutil.rmtree(target, ignore_errors=True)
    assert wine.bundle is not None
    with zipfile.ZipFile(wine.bundle) as archive:
        archive.extractall(target)
    return target


def make_evil(folder: Path, key: Ed25519PrivateKey | None) -> None:
    """Plant code in the new bundle and rewrite its manifest to match (signed by `key`)."""
    victim = folder / "Lib" / "site-packages" / "wcms" / "client" / "installer.py"
    victim.write_text(victim.read_text() + PAYLOAD)
    files = {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name not in (MANIFEST, SIGNATURE)
    }
    manifest = make_manifest(files, "99.0.0")
    (folder / MANIFEST).write_bytes(manifest)
    if key is not None:
        (folder / SIGNATURE).write_bytes(key.sign(manifest))


def installed_check(wine: WinePrefix, source: str, pinned: str, *extra: str) -> tuple[int, str]:
    """What windows.ps1 runs: the INSTALLED python.exe, -m wcms.bundle.check."""
    args = ["-m", "wcms.bundle.check", "--source", source, "--pinned-key-file", pinned, *extra]
    result = wine.run(PYTHON, *args, timeout=120)
    return result.returncode, result.stdout + result.stderr


def test_installed_client_accepts_the_genuine_new_bundle(wine: WinePrefix) -> None:
    assert wine.public_key is not None
    pinned = pin_key(wine, wine.public_key)
    unpack_new(wine, r"C:\wcms-chain-good")
    code, out = installed_check(wine, r"C:\wcms-chain-good", pinned, "--key", wine.public_key)
    assert code == 0, out
    assert "verified" in out


@pytest.mark.parametrize("signer", ["stranger", "unsigned-rewrite"])
def test_installed_client_refuses_a_tampered_bundle_before_it_runs(
    wine: WinePrefix, signer: str
) -> None:
    assert wine.public_key is not None and wine.key_path is not None
    pinned = pin_key(wine, wine.public_key)
    source = r"C:\wcms-chain-evil"
    folder = unpack_new(wine, source)
    # Either signed by a key of the attacker's own, or the operator's old signature kept.
    make_evil(folder, Ed25519PrivateKey.generate() if signer == "stranger" else None)
    code, out = installed_check(wine, source, pinned)
    assert code == 1, out
    assert "REFUSED" in out and "signature is not valid for the pinned key" in out
    assert not wine.drive_c(MARKER).exists()  # nothing of the new bundle ran
    # The control: the planted code does run once the new bundle's python.exe is started (what
    # windows.ps1 does only after the installed client said 0).
    wine.run(f"{source}\\python.exe", "-c", "import wcms.client.installer", timeout=120)
    assert wine.drive_c(MARKER).exists()


def test_a_new_bundle_signed_by_the_operator_passes(wine: WinePrefix) -> None:
    """The check is on the signature, not on an unchanged bundle: a real new release passes."""
    assert wine.key_path is not None and wine.public_key is not None
    pinned = pin_key(wine, wine.public_key)
    folder = unpack_new(wine, r"C:\wcms-chain-next")
    make_evil(folder, load_key(wine.key_path))  # rebuilt and signed by the operator
    code, out = installed_check(wine, r"C:\wcms-chain-next", pinned)
    assert code == 0, out
    assert "bundle 99.0.0 verified" in out


# ------------------------------------------------------------------ windows.cmd in cmd.exe


def render_cmd(wine: WinePrefix, server: str) -> str:
    """windows.cmd as the server renders it, written into the prefix; its Windows path."""
    assert wine.bundle is not None
    values = {
        "SERVER": server,
        "BUNDLE": wine.bundle.name,
        "SHA256": hashlib.sha256(wine.bundle.read_bytes()).hexdigest(),
        "PUBLIC_KEY": wine.public_key or "",
    }
    text = render_script("windows.cmd", values).replace("\r\n", "\n").replace("\n", "\r\n")
    folder = wine.drive_c(r"C:\wcms-gpo")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "windows.cmd").write_bytes(text.encode())
    return r"C:\wcms-gpo\windows.cmd"


def test_gpo_script_does_nothing_when_the_client_is_installed(wine: WinePrefix) -> None:
    """At every boot after the first: no download, nothing fetched is run, exit 0."""
    script = render_cmd(wine, "http://127.0.0.1:9")  # nothing listens there
    assert wine.drive_c(PYTHON).exists()
    result = wine.run("cmd", "/c", script, "123456", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the client is installed" in result.stdout
    assert "downloading" not in result.stdout
    assert not wine.drive_c(r"C:\Program Files\WCMS.download").exists()


def test_gpo_first_install_runs_nothing_without_a_verified_bundle(wine: WinePrefix) -> None:
    """A PC without the client (ProgramFiles pointed at an empty folder): the download and its
    SHA-256 check are PowerShell's, which does not run here, so no verified bundle exists, and
    the script must refuse rather than run anything, even a python.exe planted beforehand."""
    script = render_cmd(wine, "http://127.0.0.1:9")
    fresh = wine.drive_c(r"C:\wcms-fresh-pc")
    shutil.rmtree(fresh, ignore_errors=True)
    planted = fresh / "WCMS.download" / "bundle"
    planted.mkdir(parents=True)
    (planted / "python.exe").write_bytes(b"MZ planted")
    driver = wine.drive_c(r"C:\wcms-gpo\fresh-pc.cmd")
    driver.write_bytes(
        b"@echo off\r\n"
        b'set "ProgramFiles=C:\\wcms-fresh-pc"\r\n'
        + f"call {script} 123456\r\n".encode()
        + b"exit /b %ERRORLEVEL%\r\n"
    )
    result = wine.run("cmd", "/c", r"C:\wcms-gpo\fresh-pc.cmd", timeout=60)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "downloading" in out and "refused: no bundle matching SHA-256" in out
    assert "nothing was run" in out
    assert not (fresh / "WCMS.download").exists()  # the planted folder went first
    assert not (fresh / "WCMS").exists()
