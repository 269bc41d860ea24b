"""The bundle's installer under Wine: what /install/windows.ps1 runs after unpacking the zip.

A tampered or foreign-signed bundle is refused, and the client already running stays as it was.
"""

from __future__ import annotations

import shutil
import time
import zipfile
from pathlib import Path

import pytest

from tests.wine.harness import TIMINGS, WineClient, WinePrefix
from wcms.bundle.signing import generate_key

pytestmark = [pytest.mark.wine, pytest.mark.slow, pytest.mark.timeout(300)]

SOURCE = r"C:\wcms-src"
RUNNING = 4


def unpack_source(wine: WinePrefix, windows_dir: str = SOURCE) -> Path:
    target = wine.drive_c(windows_dir)
    shutil.rmtree(target, ignore_errors=True)
    assert wine.bundle is not None
    with zipfile.ZipFile(wine.bundle) as archive:
        archive.extractall(target)
    return target


def run_installer(client: WineClient, source: str = SOURCE, *extra: str) -> tuple[int, str]:
    wine = client.wine
    args = [f"{source}\\python.exe", "-m", "wcms.client.installer", "--source", source]
    args += ["--server", client.server.url, "--pin", client.server.create_pin(), "--wait", "30"]
    result = wine.run(*args, *extra, timeout=120)
    return result.returncode, result.stdout + result.stderr


def install_fresh(client: WineClient) -> str:
    """Run the installer from an unpacked bundle on a PC without the client; the machine_id."""
    shutil.rmtree(client.data, ignore_errors=True)
    unpack_source(client.wine)
    assert client.wine.public_key is not None
    started = time.monotonic()
    code, out = run_installer(client, SOURCE, "--public-key", client.wine.public_key)
    TIMINGS["installer to online s"] = time.monotonic() - started
    assert code == 0, out
    assert "ONLINE" in out
    return client.machine_id()


def test_installer_installs_starts_and_reports_online(wine_client: WineClient) -> None:
    machine_id = install_fresh(wine_client)
    assert wine_client.status()[0] == RUNNING
    pc = wine_client.server.wait_pc(machine_id, timeout=10, state="online")
    assert pc["state"] == "online"
    assert (wine_client.data / "update_key.pub").read_text().strip() == wine_client.wine.public_key
    installed = wine_client.wine.drive_c(r"C:\Program Files\WCMS")
    assert (installed / "python.exe").exists() and (installed / "manifest.json").exists()
    key = wine_client.wine.run(
        "reg", "query", r"HKLM\System\CurrentControlSet\Services\WCMSClient"
    ).stdout
    assert r'"C:\Program Files\WCMS\python.exe" -m wcms.client.service' in key
    # restrict_to_owner() ran on the folder and each file (SetNamedSecurityInfo succeeded), but
    # Wine 8 keeps no DACL on files (reading it back gives Everyone/SYSTEM/user): the ACL itself
    # can only be checked on Windows.


def test_tampered_bundle_is_refused_and_the_client_keeps_running(
    wine_client: WineClient,
) -> None:
    machine_id = install_fresh(wine_client)
    source = unpack_source(wine_client.wine, r"C:\wcms-bad")
    victim = source / "Lib" / "site-packages" / "wcms" / "client" / "main.py"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0x01  # one bit of one byte
    victim.write_bytes(bytes(data))
    code, out = run_installer(wine_client, r"C:\wcms-bad")
    assert code == 1, out
    assert "bundle refused" in out and "main.py does not match" in out
    assert wine_client.status()[0] == RUNNING
    assert wine_client.server.get_pc(machine_id)["state"] == "online"


def test_bundle_signed_by_another_key_is_refused(wine_client: WineClient, tmp_path: Path) -> None:
    install_fresh(wine_client)
    stranger = generate_key(tmp_path / "stranger.pem")
    # The PC pinned the operator's key: an offered key that differs is refused outright...
    code, out = run_installer(wine_client, SOURCE, "--public-key", stranger)
    assert code == 1 and "differs from the one this PC pinned" in out, out
    # ...and a bundle whose signature does not match the pinned key too.
    source = unpack_source(wine_client.wine, r"C:\wcms-resigned")
    (source / "manifest.sig").write_bytes(b"\0" * 64)
    code, out = run_installer(wine_client, r"C:\wcms-resigned")
    assert code == 1 and "signature is not valid" in out, out
    assert wine_client.status()[0] == RUNNING


def test_rerun_with_upgrade_swaps_the_folder_and_comes_back_online(
    wine_client: WineClient,
) -> None:
    """What the updater hands over to: stop the service, swap folders, start, wait online."""
    machine_id = install_fresh(wine_client)
    unpack_source(wine_client.wine, r"C:\wcms-next")
    wine = wine_client.wine
    args = [r"C:\wcms-next\python.exe", "-m", "wcms.client.installer"]
    args += ["--source", r"C:\wcms-next", "--upgrade", "--wait", "15"]
    started = time.monotonic()
    result = wine.run(*args, timeout=120)
    TIMINGS["upgrade to online s"] = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stopping the running client" in result.stdout and "ONLINE" in result.stdout
    assert wine_client.status()[0] == RUNNING
    assert wine_client.server.wait_pc(machine_id, timeout=10, state="online")
    assert not wine.drive_c(r"C:\Program Files\WCMS.old").exists()
