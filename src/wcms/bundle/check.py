"""Check a new bundle with the client already installed, before anything of the new one runs.

    "C:\\Program Files\\WCMS\\python.exe" -m wcms.bundle.check --source DIR
        --pinned-key-file C:\\ProgramData\\WCMS\\update_key.pub [--key ed25519:...]

/install/windows.ps1 runs this with the INSTALLED python.exe (code this PC already trusts) on
the unpacked download, and runs the download's own python.exe only when it answers 0: a bundle
whose files differ from its manifest, or whose manifest is not signed by the key this PC pinned,
never gets to run its own code (which could otherwise just skip its own check).

The key is the pinned one when the PC has one (an offered --key that differs is refused); an
offered key is used only by a PC that pinned none. With no key at all the check refuses: there
is nothing to trust a bundle by. Exit status 0 verified, 1 refused, 2 bad arguments.
A client installed before this module existed answers "No module named" (exit 1), which
the script takes as a refusal too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wcms.bundle.verify import BundleRefused, verify_dir

VERIFIED, REFUSED = 0, 1


def choose_key(pinned_file: Path | None, offered: str | None) -> str:
    """The key to trust: the pinned one; an offered one only when none is pinned."""
    pinned = None
    if pinned_file is not None:
        try:
            pinned = pinned_file.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            pinned = None
        except OSError as exc:
            raise BundleRefused(f"cannot read the pinned key {pinned_file}: {exc}") from None
    offered = offered.strip() if offered else None
    if pinned and offered and offered != pinned:
        raise BundleRefused("the offered public key differs from the one this PC pinned")
    key = pinned or offered
    if not key:
        raise BundleRefused("no pinned or offered key: nothing to check the bundle against")
    return key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wcms.bundle.check", description=__doc__)
    parser.add_argument("--source", type=Path, required=True, help="the unpacked new bundle")
    parser.add_argument("--pinned-key-file", type=Path, help="update_key.pub of this PC")
    parser.add_argument("--key", help="ed25519:... offered by the install script")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        key = choose_key(args.pinned_key_file, args.key)
        manifest = verify_dir(args.source, key)
    except BundleRefused as exc:
        print(f"wcms check: REFUSED {args.source}: {exc}", file=sys.stderr, flush=True)
        return REFUSED
    files = len(manifest["files"])
    print(f"wcms check: bundle {manifest.get('version')} verified ({files} files, {key[:20]}...)")
    return VERIFIED


if __name__ == "__main__":
    sys.exit(main())
