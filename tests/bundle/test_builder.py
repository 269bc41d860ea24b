"""`wcms client bundle`: the real build (embeddable CPython + win_amd64 wheels + wcms)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from wcms import __version__
from wcms.bundle import main
from wcms.bundle.builder import BundleInfo, build_bundle, wheel_target, write_zip
from wcms.bundle.signing import public_key_text
from wcms.bundle.verify import verify_zip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[BundleInfo, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    return build_bundle(tmp_path_factory.mktemp("dist"), key=key), key


@pytest.mark.slow
def test_bundle_holds_python_pywin32_psutil_and_wcms(
    built: tuple[BundleInfo, Ed25519PrivateKey],
) -> None:
    info, key = built
    with zipfile.ZipFile(info.path) as archive:
        names = set(archive.namelist())
        pth = archive.read("python311._pth").decode()
        stamps = {i.date_time for i in archive.infolist()}
        manifest = json.loads(archive.read("manifest.json"))
    for name in (
        "python.exe",
        "python311.dll",
        "wcms.cmd",
        "install.cmd",
        "Lib/site-packages/win32/servicemanager.pyd",
        "Lib/site-packages/pywin32_system32/pywintypes311.dll",
        "Lib/site-packages/psutil/__init__.py",
        "Lib/site-packages/wcms/client/service.py",
        "Lib/site-packages/wcms/client/platform/windows_scm.py",
        "Lib/site-packages/wcms/protocol.py",
        "manifest.sig",
    ):
        assert name in names, name
    assert not any("__pycache__" in n or n.endswith(".chm") for n in names)
    assert "Lib\\site-packages" in pth and "import site" in pth
    assert stamps == {(1980, 1, 1, 0, 0, 0)}
    assert set(manifest["files"]) == names - {"manifest.json", "manifest.sig"}
    assert manifest["version"] == __version__
    assert verify_zip(info.path, public_key_text(key))
    assert info.public_key == public_key_text(key)
    latest = json.loads((info.path.parent / "latest.json").read_text())
    assert latest["sha256"] == info.sha256 and latest["file"] == info.path.name
    wheel = (info.path.parent / latest["wheel"]).read_bytes()
    assert latest["wheel_sha256"] == __import__("hashlib").sha256(wheel).hexdigest()


@pytest.mark.slow
def test_same_inputs_same_bytes(
    built: tuple[BundleInfo, Ed25519PrivateKey], tmp_path: Path
) -> None:
    info, key = built
    again = build_bundle(tmp_path, key=key)  # Ed25519 signatures are deterministic too
    with zipfile.ZipFile(info.path) as first, zipfile.ZipFile(again.path) as second:
        names = set(first.namelist()) | set(second.namelist())
        read = lambda z, n: z.read(n) if n in z.namelist() else None  # noqa: E731
        differ = sorted(n for n in names if read(first, n) != read(second, n))
    assert not differ, differ  # (a source file edited between the two builds shows here)
    assert again.sha256 == info.sha256
    assert again.path.read_bytes() == info.path.read_bytes()


def test_write_zip_is_order_and_time_independent() -> None:
    files = {"b.txt": b"2", "a/x.py": b"1"}
    assert write_zip(files, 0) == write_zip(dict(reversed(files.items())), 0)
    with zipfile.ZipFile(__import__("io").BytesIO(write_zip(files, 0))) as archive:
        assert archive.namelist() == ["a/x.py", "b.txt"]


@pytest.mark.parametrize(
    ("member", "target"),
    [
        ("psutil/__init__.py", "Lib/site-packages/psutil/__init__.py"),
        ("pywin32-312.data/scripts/pywin32_postinstall.py", "Scripts/pywin32_postinstall.py"),
        ("foo-1.0.data/purelib/foo/x.py", "Lib/site-packages/foo/x.py"),
        ("foo-1.0.data/headers/foo.h", None),
        ("win32/Demos/service/serviceEvents.py", None),
        ("pythonwin/win32ui.pyd", None),
        ("PyWin32.chm", None),
        ("psutil/tests/test_x.py", None),
    ],
)
def test_wheel_members_land_where_pip_would_put_them(member: str, target: str | None) -> None:
    assert wheel_target(member) == target


def test_cli_refuses_to_build_unsigned_without_saying_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--out", str(tmp_path), "--key", str(tmp_path / "none.pem")]) == 2
    assert "keygen" in capsys.readouterr().err


def test_keygen_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "update_key.pem"
    assert main(["keygen", "--key", str(key)]) == 0
    assert "ed25519:" in capsys.readouterr().out
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    before = key.read_bytes()
    assert main(["keygen", "--key", str(key)]) == 1
    assert key.read_bytes() == before
