"""`wcms client run | install | uninstall | status`: the client's command line.

The top-level `wcms` command routes `wcms client ...` here. Expected failures (no server URL, no
root, the server away) print one readable line and exit non-zero; they never print tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType
from typing import Any

from wcms.client import CLIENT_VERSION, http
from wcms.client import platform as platforms
from wcms.client.config import ClientConfig, ConfigError, load_config, write_config_file
from wcms.client.identity import IdentityError, TokenStore, machine_id, read_state
from wcms.client.main import Agent, configure_logging
from wcms.client.platform.base import Platform
from wcms.protocol import PIN_LENGTH, PowerReason

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
STATUS_TIMEOUT = 3.0

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_USAGE
    try:
        result: int = args.func(args)
    except (ConfigError, IdentityError) as exc:
        _say(f"wcms client: {exc}")
        return EXIT_USAGE
    except (platforms.ServiceError, OSError) as exc:
        _say(f"wcms client: {exc}")
        return EXIT_ERROR
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wcms client",
        description="The WCMS client: reports this PC to the WCMS server. Settings come from "
        "client.json in the client dir, then WCMS_* environment variables, then options.",
    )
    p.add_argument("--version", action="version", version=f"wcms-client {CLIENT_VERSION}")
    sub = p.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent in the foreground (what the service runs)")
    _server_options(run)
    run.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.set_defaults(func=_run)

    install = sub.add_parser("install", help="save the settings, install and start the service")
    _server_options(install)
    install.set_defaults(func=_install)

    sub.add_parser("uninstall", help="stop and remove the service").set_defaults(func=_uninstall)
    sub.add_parser("status", help="settings, identity, registration, server").set_defaults(
        func=_status
    )
    return p


def _server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", metavar="URL", help="the server, e.g. http://wcms.lab:5050")
    p.add_argument(
        "--pin", help=f"a {PIN_LENGTH}-digit registration PIN from an admin (`wcms pin create`)"
    )


def _overrides(args: argparse.Namespace) -> dict[str, str | None]:
    return {
        "server_url": args.server,
        "pin": args.pin,
        "log_level": getattr(args, "log_level", None),
    }


def _run(args: argparse.Namespace) -> int:
    plat = platforms.current()
    overrides = _overrides(args)
    config = load_config(plat, overrides=overrides)
    if not config.server_url:
        raise ConfigError("no server URL: pass --server URL or set WCMS_SERVER_URL")
    configure_logging(config, console=True)
    agent = Agent(config, plat, reload_config=lambda: load_config(plat, overrides=overrides))
    _watch_events(plat, agent)
    agent.run()
    return EXIT_OK


def _watch_events(plat: Platform, agent: Agent) -> None:
    """Let the platform turn OS events into agent calls; Ctrl-C at least, everywhere."""
    watch = getattr(plat, "watch_events", None)  # optional beyond platform/base.py's contract
    if watch is not None:
        watch(agent)
        return

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        agent.stop(PowerReason.AGENT_STOPPED, source="Ctrl-C")

    signal.signal(signal.SIGINT, on_interrupt)


def _install(args: argparse.Namespace) -> int:
    plat = platforms.current()
    config = load_config(plat, overrides=_overrides(args))
    if not config.server_url:
        raise ConfigError("no server URL: pass --server URL")
    write_config_file(config, {"server_url": config.server_url, "pin": args.pin}, plat)
    print(f"Saved settings in {config.config_file}")
    print(platforms.install_service(config))
    print(f"Logs: {config.log_file}. Check with `wcms client status`.")
    return EXIT_OK


def _uninstall(args: argparse.Namespace) -> int:
    print(platforms.uninstall_service())
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    plat = platforms.current()
    config = load_config(plat)
    lines, healthy = status_report(config, plat)
    for key, value in lines:
        print(f"{key + ':':<16}{value}")
    return EXIT_OK if healthy else EXIT_ERROR


def status_report(config: ClientConfig, plat: Platform) -> tuple[list[tuple[str, str]], bool]:
    """What `status` prints, as (label, value) pairs, and whether all is well."""
    lines = [
        ("client", f"wcms-client {CLIENT_VERSION} on {plat.name}"),
        ("config file", f"{config.config_file}{'' if config.config_file.exists() else ' (none)'}"),
        ("server", config.server_url or "not set"),
        ("log file", str(config.log_file)),
    ]
    healthy = bool(config.server_url)
    try:
        mid = machine_id(config, plat)
        lines.append(("machine_id", f"{mid.value} (from {mid.source})"))
    except IdentityError as exc:
        lines.append(("machine_id", f"unavailable: {exc}"))
        healthy = False
    try:
        registered = TokenStore(config.token_file, plat).load() is not None
    except OSError as exc:
        lines.append(("registered", f"unknown: cannot read {config.token_file}: {exc.strerror}"))
        registered = False
    else:
        lines.append(("registered", "yes" if registered else "no (needs a PIN)"))
    healthy = healthy and registered
    state = read_state(config.state_file)
    pc = f" (PC {state['pc_id']})" if state.get("pc_id") else ""
    lines.append(("last contact", f"{state.get('last_contact') or 'never'}{pc}"))
    lines.append(("service", platforms.service_state()))
    if config.server_url:
        reachable, detail = probe_server(config.server_url)
        lines.append(("server reach", detail))
        healthy = healthy and reachable
    return lines, healthy


def probe_server(server_url: str) -> tuple[bool, str]:
    """GET /healthz with a short total deadline."""
    try:
        answer = http.request("GET", f"{server_url}/healthz", timeout=STATUS_TIMEOUT)
    except http.HttpError as exc:
        return False, f"unreachable: {exc}"
    body: dict[str, Any] = answer.body
    return True, f"ok (server {body.get('version', '?')}, mode {body.get('presence_mode', '?')})"


def _say(text: str) -> None:
    print(text, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
