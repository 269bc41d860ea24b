"""`wcms client bundle`: build the Windows client bundle the server serves (see builder.py).

    wcms client bundle keygen [--key PEM]     make the operator's signing key (once)
    wcms client bundle [--out DIR] [--key PEM] [--cache DIR] [--unsigned]
    wcms client bundle --update-lock [--lock FILE]   new SHA-256 pins (review the diff)

By default the key is $WCMS_DATA_DIR/update_key.pem and the bundle goes to
$WCMS_DATA_DIR/bundles, where the server's /install routes find it. Every piece downloaded
for the bundle (the embeddable Python, each Windows wheel) must match its SHA-256 in
windows.lock (in this package, kept in the repository); --update-lock downloads the pinned
versions afresh, writes their digests there and prints them for review before a commit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["main"]


def _data_dir() -> Path:
    return Path(os.environ.get("WCMS_DATA_DIR") or "var")


def main(argv: list[str]) -> int:
    """Build the bundle (or, with `keygen`, the signing key); print what was made."""
    if argv[:1] == ["keygen"]:
        return _keygen(argv[1:])
    parser = argparse.ArgumentParser(prog="wcms client bundle", description=__doc__)
    parser.add_argument("--out", type=Path, default=_data_dir() / "bundles")
    parser.add_argument("--key", type=Path, default=_data_dir() / "update_key.pem")
    parser.add_argument("--cache", type=Path, default=None, help="download cache folder")
    parser.add_argument("--unsigned", action="store_true", help="build without a signature")
    parser.add_argument("--json", action="store_true", help="print latest.json")
    parser.add_argument(
        "--update-lock", action="store_true", help="download afresh and rewrite windows.lock"
    )
    parser.add_argument("--lock", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from wcms.bundle.builder import BundleError, build_bundle
    from wcms.bundle.lock import LOCK_FILE, LockError, load_lock

    if args.update_lock:
        return _update_lock(args.lock or LOCK_FILE)
    from wcms.bundle.signing import load_key

    key = None
    if not args.unsigned:
        if not args.key.exists():
            print(f"error: no signing key at {args.key}: run `wcms client bundle keygen`"
                  " or pass --unsigned", file=sys.stderr)  # fmt: skip
            return 2
        key = load_key(args.key)
    try:
        lock = load_lock(args.lock or LOCK_FILE)
        info = build_bundle(args.out, cache_dir=args.cache, key=key, lock=lock)
    except (BundleError, LockError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info.latest(), indent=1))
        return 0
    print(f"{info.path}  {info.size / 1e6:.1f} MB  {info.files} files  {info.seconds:.1f} s")
    print(
        f"sha256 {info.sha256}  {'signed by ' + info.public_key if info.public_key else 'UNSIGNED'}"
    )
    return 0


def _update_lock(path: Path) -> int:
    """Download the pinned pieces afresh, write their SHA-256 to `path`, print them."""
    from wcms.bundle.builder import BundleError, update_lock

    try:
        lock = update_lock(path)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for entry in sorted(lock.files, key=lambda e: e.filename):
        print(f"{entry.sha256}  {entry.filename}")
    print(f"wrote {path}: compare these with the project's page on PyPI, review the diff,")
    print("then commit it; every later build refuses any other byte")
    return 0


def _keygen(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="wcms client bundle keygen")
    parser.add_argument("--key", type=Path, default=_data_dir() / "update_key.pem")
    args = parser.parse_args(argv)
    from wcms.bundle.signing import generate_key

    try:
        public = generate_key(args.key)
    except FileExistsError:
        print(f"error: {args.key} exists; a new key would orphan every installed PC",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"private key: {args.key} (keep it secret; only its holder can publish updates)")
    print(f"public key:  {public}")
    return 0
