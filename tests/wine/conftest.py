"""The Wine suite's fixtures: one prefix per session with the real bundle unpacked in it.

Skipped when Wine is absent, unless WCMS_REQUIRE_WINE=1 (CI), which turns the skip into a
failure. WCMS_WINE_KEEP=1 keeps the prefix after the run for a look inside.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.wine.harness import TIMINGS, WineClient, WinePrefix, wine_missing
from wcms.bundle.builder import build_bundle
from wcms.bundle.signing import generate_key, load_key


@pytest.fixture(scope="session")
def wine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WinePrefix]:
    """A booted 64-bit prefix with the bundle built by `wcms client bundle` unpacked in it.

    The bundle and a freshly initialised prefix are made once per run (the first test process
    to get here makes them, under a lock, in the run's shared temporary folder); each test
    process copies the prefix (1-2 s) instead of running its own `wineboot --init` (about 20 s
    of CPU), then boots its own wineserver and session in the copy."""
    missing = wine_missing()
    if missing:
        if os.environ.get("WCMS_REQUIRE_WINE") == "1":
            pytest.fail(f"WCMS_REQUIRE_WINE=1 but {missing}")
        pytest.skip(missing)
    started = time.monotonic()
    shared = _made_once(tmp_path_factory)
    root = tmp_path_factory.mktemp("wine")
    prefix = WinePrefix(root)
    copy_started = time.monotonic()
    shutil.copytree(shared / "prefix", prefix.prefix, symlinks=True)
    TIMINGS["prefix copy s"] = time.monotonic() - copy_started
    prefix.bundle = shared / "bundle.zip"
    prefix.key_path = shared / "update_key.pem"
    prefix.public_key = (shared / "update_key.pub").read_text().strip()
    prefix.unpack(prefix.bundle)
    prefix.boot()
    TIMINGS["setup s"] = time.monotonic() - started
    try:
        yield prefix
    finally:
        prefix.kill()
        if os.environ.get("WCMS_WINE_KEEP") != "1":
            shutil.rmtree(prefix.prefix, ignore_errors=True)
        _report()


def _made_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's signed bundle, its key and an initialised (not running) prefix."""
    base = tmp_path_factory.getbasetemp()
    run_dir = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    shared = run_dir / "wine-shared"
    with (run_dir / "wine-shared.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other test processes wait here for the first
        if not (shared / "done").exists():
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir()
            key_path = shared / "update_key.pem"
            generate_key(key_path)
            bundle = build_bundle(shared / "dist", cache_dir=_cache_dir(), key=load_key(key_path))
            TIMINGS["bundle build s"] = bundle.seconds
            TIMINGS["bundle MB"] = bundle.size / 1e6
            assert bundle.public_key is not None
            shutil.copyfile(bundle.path, shared / "bundle.zip")
            (shared / "update_key.pub").write_text(bundle.public_key + "\n")
            template = WinePrefix(shared)
            TIMINGS["prefix create s"] = template.create()
            template.kill()
            (shared / "done").touch()
    return shared


def _cache_dir() -> Path | None:
    env = os.environ.get("WCMS_BUNDLE_CACHE")
    return Path(env) if env else None


def _report() -> None:
    path = (
        Path(os.environ.get("WCMS_WINE_TIMINGS", "")) if "WCMS_WINE_TIMINGS" in os.environ else None
    )
    text = json.dumps({k: round(v, 3) for k, v in TIMINGS.items()}, indent=1, sort_keys=True)
    if path:
        path.write_text(text + "\n")
    print(f"\nWine suite timings: {text}")


@pytest.fixture
def wine_client(wine: WinePrefix, live_server: Any) -> Iterator[WineClient]:
    client = WineClient(wine, live_server)
    yield client
    try:
        client.remove()
    except AssertionError as exc:  # leave the next test a clean SCM all the same
        print(f"uninstall failed: {exc}")
    print(f"--- client.log\n{client.log()}")
