"""The `wcms` command. Server commands import the server lazily, so the client needs no Flask."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from wcms.protocol import PIN_LENGTH

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A readable failure: printed as `wcms: <message>` with exit status 1."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["client", "bundle"]:
        from wcms.bundle import main as bundle_main

        return bundle_main(argv[2:])
    if argv[:1] == ["client"]:
        from wcms.client.cli import main as client_main

        return client_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_USAGE
    from wcms.server.config import ConfigError

    try:
        result: int = args.func(args)
        return result
    except (CliError, ConfigError) as exc:
        print(f"wcms: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wcms",
        description="WCMS lab management. Settings come from WCMS_* environment variables.",
    )
    sub = p.add_subparsers(metavar="COMMAND")

    server = sub.add_parser("server", help="run the server").add_subparsers(metavar="ACTION")
    run = server.add_parser("run", help="migrate the database, then serve (gunicorn + gevent)")
    run.add_argument("--host", help="address to listen on (default WCMS_HOST or 0.0.0.0)")
    run.add_argument("--port", type=int, help="port (default WCMS_PORT or 5050)")
    run.add_argument(
        "--workers",
        type=int,
        help="worker processes (default WCMS_WORKERS, else one per core on PostgreSQL and one "
        "on SQLite, which refuses more)",
    )
    run.add_argument("--access-log", action="store_true", help="log every request")
    run.set_defaults(func=_server_run)

    db = sub.add_parser("db", help="database").add_subparsers(metavar="ACTION")
    db.add_parser("upgrade", help="apply migrations").set_defaults(func=_db_upgrade)

    admin = sub.add_parser("admin", help="administrators").add_subparsers(metavar="ACTION")
    create = admin.add_parser("create", help="add an admin (password from a prompt or stdin)")
    create.add_argument("name")
    create.set_defaults(func=_admin_create)
    boot = admin.add_parser("bootstrap", help="create the first admin if none exists")
    boot.add_argument("--name", default="admin")
    boot.set_defaults(func=_admin_bootstrap)
    pw = admin.add_parser("passwd", help="set an admin's password (prompt or stdin)")
    pw.add_argument("name")
    pw.set_defaults(func=_admin_passwd)
    dis = admin.add_parser(
        "disable", help="disable an admin (their sessions end, their API keys stop working)"
    )
    dis.add_argument("name")
    dis.set_defaults(func=_admin_disable)
    ena = admin.add_parser("enable", help="enable a disabled admin again")
    ena.add_argument("name")
    ena.set_defaults(func=_admin_enable)

    pin = sub.add_parser("pin", help="registration PINs").add_subparsers(metavar="ACTION")
    pc = pin.add_parser("create", help=f"create a {PIN_LENGTH}-digit PIN and print it")
    pc.add_argument("--multi", action="store_true", help="usable by many PCs until it expires")
    pc.add_argument("--expires", default="10m", help="lifetime, e.g. 90s, 10m, 2h, 1d")
    pc.add_argument(
        "--approve",
        action="store_true",
        help="approve the PCs it registers at once (else an admin approves each one before "
        "it may get `run` or account commands)",
    )
    pc.set_defaults(func=_pin_create)

    key = sub.add_parser("apikey", help="API keys").add_subparsers(metavar="ACTION")
    kc = key.add_parser(
        "create",
        help="create an API key and print it once: the organisation's, or --owner ADMIN's",
    )
    kc.add_argument("name")
    kc.add_argument(
        "--owner",
        metavar="ADMIN",
        help="the admin whose access the key carries (it stops working while they are "
        "disabled); without it, an organisation key",
    )
    kc.set_defaults(func=_apikey_create)

    pcs = sub.add_parser("pcs", help="list PCs and their state")
    pcs.add_argument("--json", action="store_true", help="machine-readable output")
    pcs.set_defaults(func=_pcs)

    sub.add_parser("client", help="the lab PC agent: run, install, status, bundle (see --help)")
    return p


# ---------------------------------------------------------------- helpers


def _settings(**overrides: Any) -> Any:
    """The settings, with the flags given; a bad value is a ConfigError, which main() prints."""
    from wcms.server.config import load_settings
    from wcms.server.services import accounts

    settings = load_settings({k: v for k, v in overrides.items() if v is not None})
    accounts.configure_hashing(settings)
    return settings


@contextmanager
def _session(migrate_first: bool = False) -> Iterator[Any]:
    """A unit of work on the configured database: committed when the command's block ends,
    rolled back when it raises (docs/ARCHITECTURE.md, the transaction rule)."""
    from wcms.server import migrate
    from wcms.server.config import prepare_data_dir
    from wcms.server.db import make_engine, make_sessionmaker, unit_of_work

    settings = _settings()
    prepare_data_dir(settings)
    engine = make_engine(settings.sqlalchemy_url)
    try:
        if migrate_first:
            migrate.upgrade(engine)
        elif not migrate.is_current(engine):
            raise CliError("the database schema is not current: run `wcms db upgrade` first")
        with unit_of_work(make_sessionmaker(engine)) as session:
            yield session
    finally:
        engine.dispose()


def _read_password(prompt: str) -> str:
    if sys.stdin.isatty():
        first = getpass.getpass(prompt)
        if getpass.getpass("again: ") != first:
            raise CliError("the passwords do not match")
        return first
    return sys.stdin.readline().rstrip("\n")


def _accounts_call(fn: Callable[[], Any]) -> Any:
    """`fn()`; a rule of the domain that refuses it becomes a readable CliError."""
    from wcms.server.services.errors import DomainError

    try:
        return fn()
    except DomainError as exc:
        raise CliError(exc.message) from None


# ---------------------------------------------------------------- commands


def _server_run(args: argparse.Namespace) -> int:
    from wcms.server import migrate
    from wcms.server.config import ensure_secret_key, prepare_data_dir
    from wcms.server.db import make_engine, make_sessionmaker
    from wcms.server.runner import serve
    from wcms.server.services import secretbox

    settings = _settings(host=args.host, port=args.port, workers=args.workers)
    prepare_data_dir(settings)
    engine = make_engine(settings.sqlalchemy_url)
    try:
        if not migrate.is_current(engine):  # one SELECT; Alembic is imported only to migrate
            migrate.upgrade(engine)
        # create_app checks again in the worker; here a refusal is one line, before gunicorn.
        with make_sessionmaker(engine)() as session:
            secretbox.agree_on_secret(session, ensure_secret_key(settings))
    except secretbox.SecretMismatch as exc:
        raise CliError(str(exc)) from None
    finally:
        engine.dispose()
    workers = settings.worker_count
    where = f"http://{settings.host}:{settings.port}"
    print(f"wcms: serving on {where} ({workers} worker{'s' * (workers > 1)})", file=sys.stderr)
    serve(settings, access_log=args.access_log)
    return EXIT_OK


def _db_upgrade(_args: argparse.Namespace) -> int:
    with _session(migrate_first=True):
        pass
    print("database is up to date")
    return EXIT_OK


def _admin_create(args: argparse.Namespace) -> int:
    from wcms.server.db import utcnow
    from wcms.server.services import accounts, audit

    password = _read_password(f"password for {args.name}: ")
    with _session() as s:
        _accounts_call(lambda: accounts.create_admin(s, args.name, password, utcnow()))
        audit.record(s, "cli", "admin.create", utcnow(), args.name)
    print(f"admin {args.name!r} created")
    return EXIT_OK


def _admin_bootstrap(args: argparse.Namespace) -> int:
    from wcms.server.db import utcnow
    from wcms.server.services import accounts, audit

    with _session(migrate_first=True) as s:
        if accounts.any_admin(s):
            print("an admin exists already; nothing to do")
            return EXIT_OK
        password = accounts.generate_password()
        _accounts_call(lambda: accounts.create_admin(s, args.name, password, utcnow()))
        audit.record(s, "cli", "admin.bootstrap", utcnow(), args.name)
    bar = "=" * 64
    print(
        f"{bar}\nFirst admin created. It is shown only this once:\n"
        f"  user:     {args.name}\n  password: {password}\n{bar}",
        flush=True,
    )
    return EXIT_OK


def _find_admin(s: Any, name: str) -> Any:
    from sqlalchemy import select

    from wcms.server.models import Admin

    admin = s.execute(select(Admin).where(Admin.username == name)).scalar_one_or_none()
    if admin is None:
        raise CliError(f"no admin named {name!r}")
    return admin


def _admin_passwd(args: argparse.Namespace) -> int:
    from wcms.server.db import utcnow
    from wcms.server.services import accounts, audit

    password = _read_password(f"new password for {args.name}: ")
    with _session() as s:
        admin = _find_admin(s, args.name)
        ended = _accounts_call(lambda: accounts.set_password(s, admin, password))
        audit.record(s, "cli", "admin.passwd", utcnow(), args.name)
    print(f"password of {args.name!r} changed; {ended} dashboard session(s) ended")
    return EXIT_OK


def _admin_disable(args: argparse.Namespace) -> int:
    from wcms.server.db import utcnow
    from wcms.server.services import accounts, audit

    with _session() as s:
        admin = _find_admin(s, args.name)
        if _accounts_call(lambda: accounts.set_active(s, admin, False)):
            audit.record(s, "cli", "admin.disable", utcnow(), args.name)
    print(f"admin {args.name!r} disabled; their sessions have ended and their API keys stopped")
    return EXIT_OK


def _admin_enable(args: argparse.Namespace) -> int:
    from wcms.server.db import utcnow
    from wcms.server.services import accounts, audit

    with _session() as s:
        if accounts.set_active(s, _find_admin(s, args.name), True):
            audit.record(s, "cli", "admin.enable", utcnow(), args.name)
    print(f"admin {args.name!r} enabled; they can log in again")
    return EXIT_OK


def _pin_create(args: argparse.Namespace) -> int:
    from wcms.server.config import ensure_secret_key
    from wcms.server.db import utcnow
    from wcms.server.services import accounts, audit

    expires = _accounts_call(lambda: accounts.parse_duration(args.expires))
    secret = ensure_secret_key(_settings())
    with _session() as s:
        row, pin = _accounts_call(
            lambda: accounts.create_pin(
                s, secret, "cli", utcnow(), expires, args.multi, auto_approve=args.approve
            )
        )
        details = {"multi": args.multi, "auto_approve": args.approve}
        audit.record(s, "cli", "pin.create", utcnow(), f"****{row.hint}", details)
    kind = "multi-use" if args.multi else "single-use"
    if args.approve:
        kind += ", approves the PCs it registers"
    print(pin)
    print(f"({kind}, expires {row.expires_at:%Y-%m-%d %H:%M} UTC)", file=sys.stderr)
    return EXIT_OK


def _apikey_create(args: argparse.Namespace) -> int:
    from wcms.server.db import utcnow
    from wcms.server.services import accounts, audit

    with _session() as s:
        owner = _find_admin(s, args.owner) if args.owner else None
        if owner is not None and not owner.is_active:
            raise CliError(f"admin {args.owner!r} is disabled; a key of theirs would not work")
        owner_id = owner.id if owner is not None else None
        _row, key = _accounts_call(
            lambda: accounts.create_api_key(s, args.name, utcnow(), owner_id=owner_id)
        )
        details = {"owner": args.owner} if owner is not None else {"organisation": True}
        audit.record(s, "cli", "apikey.create", utcnow(), args.name, details)
    print(key)
    kind = (
        f"owned by admin {args.owner!r}: it stops working while they are disabled"
        if owner is not None
        else "an organisation key, owned by no admin"
    )
    print(
        f"({kind}; shown only this once; send it as 'Authorization: Bearer <key>')", file=sys.stderr
    )
    return EXIT_OK


def _pcs(args: argparse.Namespace) -> int:
    from wcms.server.services.read_models import list_pcs

    with _session() as s:
        pcs = list_pcs(s)
    if args.json:
        print(json.dumps(pcs, indent=2))
        return EXIT_OK
    if not pcs:
        print("no PCs registered yet (create a PIN with `wcms pin create`)")
        return EXIT_OK
    print(f"{'ID':>4}  {'HOSTNAME':<24} {'STATUS':<11} {'SINCE':<20} {'USER':<16} ROOM/SEAT")
    for pc in pcs:
        seat = f"{pc['room'] or '-'}"
        if pc["seat"]:
            seat += f" r{pc['seat']['row']}c{pc['seat']['col']}"
        since = (pc["since"] or "")[:19].replace("T", " ")
        print(
            f"{pc['id']:>4}  {pc['hostname'][:24]:<24} {pc['status']:<11} {since:<20} "
            f"{(pc['current_user'] or '-')[:16]:<16} {seat}"
        )
    return EXIT_OK
