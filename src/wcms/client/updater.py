"""Client updates: fetch the bundle the server serves when it is newer, verify it, hand over.

    GET /install/latest.json -> {"version", "file", "sha256", "size", "public_key"}

A PC updates only to a bundle whose manifest is signed by the key it pinned at install
(update_key.pub in the client dir): the server may say what is newest, but only the operator's
key can say what runs. Without a pinned key the PC never updates itself. A verified bundle is
unpacked into C:\\Program Files\\WCMS.staged, and its own installer takes over in a process of
its own (`--upgrade`): it stops the service, swaps the folder, starts the service, and puts the
previous client back if the new one does not come online.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wcms.bundle.verify import MANIFEST, BundleRefused, verify_zip
from wcms.client import CLIENT_VERSION, http
from wcms.client.config import WINDOWS_INSTALL_DIR, ClientConfig, pinned_key

log = logging.getLogger(__name__)

CHECK_INTERVAL = 6 * 3600.0  # seconds between checks, jittered
FIRST_CHECK = 120.0  # after the service starts: let it register first
LATEST_TIMEOUT = 10.0
DOWNLOAD_TIMEOUT = 300.0  # the whole download, about 13 MB
MAX_BUNDLE_BYTES = 200 * 1024 * 1024
_FILE_RE = re.compile(r"^wcms-client-[0-9A-Za-z.+-]+-win_amd64\.zip$")
_DETACHED = 0x00000008 | 0x00000200 | 0x01000000  # DETACHED, NEW_GROUP, BREAKAWAY_FROM_JOB


class UpdateError(Exception):
    """No update this time; the message says why."""


@dataclass(frozen=True)
class Offer:
    version: str
    file: str
    sha256: str
    size: int


def version_key(version: str) -> tuple[int, ...]:
    """1.10.2 -> (1, 10, 2); a suffix after the numbers (1.1.0rc1) sorts as its numbers."""
    numbers = re.match(r"^\d+(?:\.\d+)*", version.strip())
    if not numbers:
        raise UpdateError(f"not a version: {version!r}")
    return tuple(int(part) for part in numbers.group().split("."))


def is_newer(offered: str, current: str) -> bool:
    return version_key(offered) > version_key(current)


def parse_offer(latest: dict[str, Any]) -> Offer:
    """latest.json from the server, checked before any of it is used in a path or a URL."""
    try:
        offer = Offer(
            str(latest["version"]), str(latest["file"]), str(latest["sha256"]), int(latest["size"])
        )
    except (KeyError, TypeError, ValueError):
        raise UpdateError("latest.json lacks version, file, sha256 or size") from None
    if not _FILE_RE.match(offer.file) or not re.fullmatch(r"[0-9a-f]{64}", offer.sha256):
        raise UpdateError("latest.json names an unexpected file or digest")
    if not 0 < offer.size <= MAX_BUNDLE_BYTES:
        raise UpdateError(f"latest.json gives an implausible size {offer.size}")
    return offer


def check(config: ClientConfig, current: str = CLIENT_VERSION) -> Offer | None:
    """The server's offer when it is newer than `current` and this PC can verify it."""
    if pinned_key(config) is None:
        log.debug("No pinned update key: this PC does not update itself")
        return None
    answer = http.request("GET", f"{config.server_url}/install/latest.json", timeout=LATEST_TIMEOUT)
    offer = parse_offer(answer.body)
    return offer if is_newer(offer.version, current) else None


def download(url: str, dest: Path, offer: Offer, timeout: float = DOWNLOAD_TIMEOUT) -> None:
    """Fetch the bundle to `dest`, refusing more bytes than offered or a different SHA-256."""
    digest = hashlib.sha256()
    deadline = time.monotonic() + timeout
    with urllib.request.urlopen(url, timeout=min(timeout, 30.0)) as answer, dest.open("wb") as out:
        size = 0
        while chunk := answer.read(1024 * 1024):
            size += len(chunk)
            if size > offer.size or time.monotonic() > deadline:
                raise UpdateError("the download is larger or slower than offered")
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != offer.sha256:
        raise UpdateError("the download's SHA-256 differs from latest.json")


def fetch_and_verify(config: ClientConfig, offer: Offer, work: Path) -> Path:
    """Download the offered bundle and verify it against the pinned key; the zip's path."""
    key = pinned_key(config)
    if key is None:
        raise UpdateError("no pinned key")
    work.mkdir(parents=True, exist_ok=True)
    path = work / offer.file
    download(f"{config.server_url}/install/{offer.file}", path, offer)
    try:
        manifest = verify_zip(path, key)
    except BundleRefused:
        path.unlink(missing_ok=True)
        raise
    if manifest.get("version") != offer.version:
        raise BundleRefused(f"the bundle says {manifest.get('version')}, not {offer.version}")
    return path


def stage(bundle: Path, staged: Path) -> None:
    """Unpack a verified bundle into a fresh staging folder."""
    shutil.rmtree(staged, ignore_errors=True)
    with zipfile.ZipFile(bundle) as archive:
        archive.extractall(staged)


def hand_over(staged: Path, target: Path) -> None:
    """Start the staged installer in its own process; it stops this service and swaps folders."""
    command = [str(staged / "python.exe"), "-m", "wcms.client.installer"]
    command += ["--source", str(staged), "--target", str(target), "--upgrade", "--wait", "60"]
    log.info("Update: handing over to %s", " ".join(command))
    subprocess.Popen(
        command,
        creationflags=_DETACHED,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )


def update_once(config: ClientConfig, target: Path = WINDOWS_INSTALL_DIR) -> bool:
    """One check; True when a verified update was handed over (the service will restart)."""
    offer = check(config)
    if offer is None:
        return False
    log.info("Update: %s offers %s (running %s)", config.server_url, offer.version, CLIENT_VERSION)
    work = config.client_dir / "updates"
    bundle = fetch_and_verify(config, offer, work)
    staged = target.with_name(target.name + ".staged")
    stage(bundle, staged)
    bundle.unlink(missing_ok=True)
    hand_over(staged, target)
    return True


def bundle_install() -> Path | None:
    """The folder of the bundle this interpreter runs from, or None (a pip install)."""
    here = Path(sys.executable).parent
    return here if (here / MANIFEST).exists() else None


class UpdateChecker:
    """A daemon thread: check soon after start, then every CHECK_INTERVAL (jittered)."""

    def __init__(
        self, config: ClientConfig, target: Path, rand: Callable[[], float] = random.random
    ) -> None:
        self.config = config
        self.target = target
        self._rand = rand
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wcms-updater", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        delay = FIRST_CHECK
        while not self._stop.wait(delay):
            try:
                if update_once(self.config, self.target):
                    return
            except (UpdateError, BundleRefused, http.HttpError, OSError) as exc:
                log.warning("Update check: %s", exc)
            delay = CHECK_INTERVAL * (0.75 + 0.5 * self._rand())
