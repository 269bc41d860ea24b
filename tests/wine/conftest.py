"""The Wine suite's fixtures: one prefix per session with the real bundle unpacked in it.

Skipped when Wine is absent, unless WCMS_REQUIRE_WINE=1 (CI), which turns the skip into a
failure. WCMS_WINE_KEEP=1 keeps the prefix after the run for a look inside.
"""

from __future__ import annotations

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
    """A booted 64-bit prefix with the bundle built by `wcms client bundle` unpacked in it."""
    missing = wine_missing()
    if missing:
        if os.environ.get("WCMS_REQUIRE_WINE") == "1":
            pytest.fail(f"WCMS_REQUIRE_WINE=1 but {missing}")
        pytest.skip(missing)
    root = tmp_path_factory.mktemp("wine")
    started = time.monotonic()
    key_path = root / "update_key.pem"
    generate_key(key_path)
    bundle = build_bundle(root / "dist", cache_dir=_cache_dir(), key=load_key(key_path))
    TIMINGS["bundle build s"] = bundle.seconds
    TIMINGS["bundle MB"] = bundle.size / 1e6
    prefix = WinePrefix(root)
    prefix.bundle, prefix.public_key, prefix.key_path = bundle.path, bundle.public_key, key_path
    TIMINGS["prefix create s"] = prefix.create()
    prefix.unpack(bundle.path)
    prefix.boot()
    TIMINGS["setup s"] = time.monotonic() - started
    try:
        yield prefix
    finally:
        prefix.kill()
        if os.environ.get("WCMS_WINE_KEEP") != "1":
            shutil.rmtree(prefix.prefix, ignore_errors=True)
        _report()


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
