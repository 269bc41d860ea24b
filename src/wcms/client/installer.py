"""The installer inside the Windows bundle: what /install/windows.ps1 runs, elevated.

    python.exe -m wcms.client.installer --server URL --pin PIN [--public-key KEY]
    python.exe -m wcms.client.installer --uninstall

It checks every file of the unpacked bundle against the manifest (and the manifest against the
operator's key), stops a running client, puts the bundle in C:\\Program Files\\WCMS (swapping the
folder whole, so an upgrade never leaves a mix), writes client.json and the pinned key in
C:\\ProgramData\\WCMS for SYSTEM and Administrators only, installs and starts the WCMSClient
service, and waits for the agent's first contact with the server. Re-running it upgrades.

Exit status: 0 online, 1 refused or failed, 3 installed and running but not online yet,
4 (--upgrade) the new client did not come online and the previous one is back.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wcms.bundle.verify import MANIFEST, SIGNATURE, BundleRefused, verify_dir
from wcms.client.config import (
    WINDOWS_INSTALL_DIR,
    ClientConfig,
    ConfigError,
    load_config,
    pinned_key,
    write_config_file,
    write_private,
)
from wcms.client.identity import read_state
from wcms.client.platform.base import Platform
from wcms.protocol import PIN_LENGTH

log = logging.getLogger(__name__)

ONLINE, FAILED, NOT_ONLINE, ROLLED_BACK = 0, 1, 3, 4


class InstallError(Exception):
    """The install cannot go on; the message says why."""


def choose_key(pinned: str | None, offered: str | None) -> str | None:
    """The key to check the bundle with: the pinned one; an offered one only on first install."""
    if pinned and offered and offered.strip() != pinned:
        raise InstallError("the offered public key differs from the one this PC pinned")
    return pinned or (offered.strip() if offered else None)


def verify_source(source: Path, key: str | None) -> dict[str, Any]:
    """Check the unpacked bundle; its manifest when every byte matches."""
    try:
        manifest = verify_dir(source, key)
    except BundleRefused as exc:
        raise InstallError(f"bundle refused: {exc}") from None
    if key is None:
        log.warning("No public key given: checked SHA-256 sums only, signature not checked")
    return manifest


def place_bundle(source: Path, target: Path, manifest: dict[str, Any]) -> Path | None:
    """Copy the manifest's files to `target`: into a sibling folder first, then swap it in.

    Answers the previous installation, moved aside to `<target>.old` (None if there was none);
    the caller deletes it once the new client is online, or puts it back with restore().
    """
    if source.resolve() == target.resolve():
        return None
    fresh = target.with_name(target.name + ".new")
    old = target.with_name(target.name + ".old")
    shutil.rmtree(fresh, ignore_errors=True)
    for name in [*manifest["files"], MANIFEST, SIGNATURE]:
        src = source / name
        if src.exists():
            dst = fresh / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    shutil.rmtree(old, ignore_errors=True)
    had_old = target.exists()
    if had_old:
        target.rename(old)
    try:
        fresh.rename(target)
    except OSError:
        if had_old:
            old.rename(target)  # put the previous client back as it was
        raise
    return old if had_old else None


def restore(target: Path, old: Path) -> None:
    """Put the previous installation back in place of a failed one."""
    failed = target.with_name(target.name + ".failed")
    shutil.rmtree(failed, ignore_errors=True)
    target.rename(failed)
    old.rename(target)
    shutil.rmtree(failed, ignore_errors=True)


def write_settings(
    config: ClientConfig, platform: Platform, values: dict[str, Any], key: str | None
) -> None:
    """client.json (and the pinned key) in the client dir, SYSTEM and Administrators only."""
    config.client_dir.mkdir(parents=True, exist_ok=True)
    platform.restrict_to_owner(config.client_dir)
    write_config_file(config, values, platform)
    if key and pinned_key(config) is None:
        write_private(config.update_key_file, key + "\n", platform)


def wait_online(
    config: ClientConfig, since: float, timeout: float, previous: object = None
) -> dict[str, Any] | None:
    """The agent's state once it has heard from the server after `since`, or None.

    `previous` is the last contact recorded before the install: a contact equal to it is old.
    """
    deadline = time.monotonic() + timeout
    while True:
        state = read_state(config.state_file)
        if state.get("last_contact") != previous and _contact_after(state, since):
            return state
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.25)


def _contact_after(state: dict[str, Any], since: float) -> bool:
    import datetime as dt

    try:
        contact = dt.datetime.fromisoformat(str(state["last_contact"]))
    except (KeyError, ValueError):
        return False
    return contact.timestamp() >= int(since)  # last_contact has whole seconds


# ---------------------------------------------------------------------------- the steps


def install(args: argparse.Namespace, platform: Platform, service: Any) -> int:
    """Verify, stop, place, configure, start, wait (and with --upgrade, roll back)."""
    started = time.time()
    config = load_config(platform)
    previous = read_state(config.state_file).get("last_contact")
    key = choose_key(pinned_key(config), args.public_key)
    if args.upgrade and key is None:
        raise InstallError("an upgrade needs the key this PC pinned at install")
    manifest = verify_source(args.source, key)
    _say(f"bundle {manifest.get('version')}: {len(manifest['files'])} files verified")
    if service.service_status() not in ("not installed", "stopped"):
        _say("stopping the running client")
        service.stop_service()
    old = place_bundle(args.source, args.target, manifest)
    _say(f"installed into {args.target}")
    values: dict[str, Any] = {"server_url": args.server, "pin": args.pin}
    if args.test_controls:
        values["test_controls"] = True
    write_settings(config, platform, {k: v for k, v in values.items() if v}, key)
    config = load_config(platform)
    python = str(args.target / "python.exe")
    service.install_service(config, python=python)
    _say(f"service {service.SERVICE_NAME}: {service.service_status()}")
    state = wait_online(config, started, args.wait, previous)
    if state is None and args.upgrade and old is not None:
        _say(f"NOT online after {args.wait:.0f} s: putting the previous client back")
        service.stop_service()
        restore(args.target, old)
        service.install_service(config, python=python)
        return ROLLED_BACK
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if state is None:
        _say(f"NOT online yet after {args.wait:.0f} s: see {config.log_file}")
        return NOT_ONLINE
    _say(f"ONLINE: machine_id {state.get('machine_id')} at {state.get('server_url')}")
    return ONLINE


def uninstall(args: argparse.Namespace, platform: Platform, service: Any) -> int:
    """Stop and remove the service, then the client's data and (if not running from it) files."""
    config = load_config(platform)
    service.uninstall_service()
    _say(f"service {service.SERVICE_NAME} removed")
    shutil.rmtree(config.client_dir, ignore_errors=True)
    _say(f"removed {config.client_dir}")
    if Path(sys.executable).resolve().is_relative_to(args.target.resolve()):
        _say(f"{args.target} holds this installer: the script removes it after it exits")
    else:
        shutil.rmtree(args.target, ignore_errors=True)
        _say(f"removed {args.target}")
    return ONLINE


def _say(text: str) -> None:
    log.info("%s", text)
    print(f"wcms installer: {text}", flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="wcms.client.installer", description=__doc__)
    here = Path(sys.executable).parent
    parser.add_argument("--source", type=Path, default=here, help="the unpacked bundle")
    parser.add_argument("--target", type=Path, default=WINDOWS_INSTALL_DIR)
    parser.add_argument("--server", help="http(s)://SERVER:5050")
    parser.add_argument("--pin", help=f"the {PIN_LENGTH}-digit registration PIN")
    parser.add_argument("--public-key", help="ed25519:... (pinned on first install)")
    parser.add_argument("--wait", type=float, default=30.0, help="seconds to wait for online")
    parser.add_argument("--uninstall", action="store_true")
    parser.add_argument("--upgrade", action="store_true", help="roll back if not online")
    parser.add_argument("--test-controls", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(
    argv: list[str] | None = None,
    platform: Platform | None = None,
    service: Any = None,
) -> int:
    """Run the installer; the platform and service module are the real ones unless given."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if platform is None:
        from wcms.client.platform import current

        platform = current()
    if service is None:
        from wcms.client.platform import windows_scm

        service = windows_scm
    step: Callable[[argparse.Namespace, Platform, Any], int] = (
        uninstall if args.uninstall else install
    )
    try:
        return step(args, platform, service)
    except (InstallError, ConfigError) as exc:
        print(f"wcms installer: ERROR {exc}", file=sys.stderr, flush=True)
        return FAILED


if __name__ == "__main__":
    sys.exit(main())
