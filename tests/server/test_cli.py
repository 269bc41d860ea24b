"""The `wcms` command, as an administrator runs it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from unittest import mock

from tests.conftest import Database
from wcms.cli import main


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def wcms(database: Database, *args: str, stdin: str = "", **env: str) -> Ran:
    """The command's own main(), as `python -m wcms` calls it, in this process: its settings
    from the environment, the password from stdin, the answer on stdout and stderr, the exit
    status returned. (A new interpreter per call cost 0.7 s of CPU; the first test runs the
    real `python -m wcms`.)"""
    full_env = {"WCMS_DATA_DIR": str(database.data_dir), "WCMS_DATABASE_URL": database.url, **env}
    out, err = io.StringIO(), io.StringIO()
    with (
        mock.patch.dict(os.environ, full_env),
        mock.patch.object(sys, "stdin", io.StringIO(stdin)),
        redirect_stdout(out),
        redirect_stderr(err),
    ):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return Ran(code, out.getvalue(), err.getvalue())


def wcms_process(database: Database, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "WCMS_DATA_DIR": str(database.data_dir),
        "WCMS_DATABASE_URL": database.url,
    }
    return subprocess.run(
        [sys.executable, "-m", "wcms", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bootstrap_creates_one_admin_with_a_random_password(database: Database) -> None:
    first = wcms_process(database, "admin", "bootstrap")  # the real entry point
    assert first.returncode == 0, first.stderr
    password = next(
        line.split(":", 1)[1].strip() for line in first.stdout.splitlines() if "password:" in line
    )
    assert len(password) >= 16 and password.lower() not in {"admin", "password"}
    second = wcms(database, "admin", "bootstrap")
    assert second.returncode == 0 and "nothing to do" in second.stdout
    assert password not in second.stdout


def test_admin_create_pin_apikey_and_pcs(database: Database) -> None:
    assert wcms(database, "db", "upgrade").returncode == 0
    made = wcms(database, "admin", "create", "kim", stdin="correct horse battery\n")
    assert made.returncode == 0 and "created" in made.stdout
    dup = wcms(database, "admin", "create", "kim", stdin="correct horse battery\n")
    assert dup.returncode == 1 and "already exists" in dup.stderr and "Traceback" not in dup.stderr
    short = wcms(database, "admin", "create", "lee", stdin="short\n")
    assert short.returncode == 1 and "at least 10" in short.stderr
    pin = wcms(database, "pin", "create", "--multi", "--expires", "2h")
    assert pin.returncode == 0 and pin.stdout.strip().isdigit() and len(pin.stdout.strip()) == 6
    assert "multi-use" in pin.stderr
    bad = wcms(database, "pin", "create", "--expires", "soon")
    assert bad.returncode == 1 and "cannot read the duration" in bad.stderr
    key = wcms(database, "apikey", "create", "ci")
    assert key.returncode == 0 and key.stdout.strip().startswith("wcms_ak_")
    assert "an organisation key" in key.stderr
    listed = wcms(database, "pcs", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    assert "no PCs registered" in wcms(database, "pcs").stdout


def test_bad_settings_and_unmigrated_database_read_clearly(database: Database) -> None:
    bad = wcms(database, "pcs", WCMS_PRESENCE_MODE="turbo")
    assert bad.returncode == 1 and "WCMS_PRESENCE_MODE='turbo'" in bad.stderr
    bad = wcms(database, "pcs", WCMS_HASH_NICE="20")
    assert bad.returncode == 1 and "WCMS_HASH_NICE=20 is not between 0 and 19" in bad.stderr
    empty = wcms(database, "pcs")
    assert empty.returncode == 1 and "wcms db upgrade" in empty.stderr


def test_admin_disable_keeps_one_active_admin_and_enable_undoes_it(database: Database) -> None:
    """The rule lives in the service (accounts.set_active), so the command line keeps it too."""
    assert wcms(database, "db", "upgrade").returncode == 0
    for name in ("kim", "lee"):
        assert (
            wcms(database, "admin", "create", name, stdin="correct horse battery\n").returncode == 0
        )
    assert wcms(database, "admin", "disable", "kim").returncode == 0
    last = wcms(database, "admin", "disable", "lee")
    assert last.returncode != 0 and "Traceback" not in last.stderr
    assert "the last active admin cannot be disabled" in last.stderr
    enabled = wcms(database, "admin", "enable", "kim")
    assert enabled.returncode == 0 and "enabled" in enabled.stdout
    assert wcms(database, "admin", "disable", "lee").returncode == 0


def test_apikey_owner_is_explicit(database: Database) -> None:
    from sqlalchemy import select

    from wcms.server.db import make_engine, make_sessionmaker
    from wcms.server.models import Admin, ApiKey

    assert wcms(database, "db", "upgrade").returncode == 0
    assert wcms(database, "admin", "create", "kim", stdin="correct horse battery\n").returncode == 0
    owned = wcms(database, "apikey", "create", "kim's backup", "--owner", "kim")
    assert owned.returncode == 0 and owned.stdout.strip().startswith("wcms_ak_")
    assert "owned by admin 'kim'" in owned.stderr
    org = wcms(database, "apikey", "create", "monitoring")
    assert org.returncode == 0 and "an organisation key" in org.stderr
    nobody = wcms(database, "apikey", "create", "x", "--owner", "nobody")
    assert nobody.returncode == 1 and "no admin named 'nobody'" in nobody.stderr
    assert wcms(database, "admin", "create", "lee", stdin="correct horse battery\n").returncode == 0
    assert wcms(database, "admin", "disable", "kim").returncode == 0
    disabled = wcms(database, "apikey", "create", "y", "--owner", "kim")
    assert disabled.returncode == 1 and "is disabled" in disabled.stderr
    engine = make_engine(database.url)
    try:
        with make_sessionmaker(engine)() as s:
            kim = s.execute(select(Admin.id).where(Admin.username == "kim")).scalar_one()
            keys = s.execute(select(ApiKey.name, ApiKey.owner_id).order_by(ApiKey.id)).all()
    finally:
        engine.dispose()
    assert [tuple(k) for k in keys] == [("kim's backup", kim), ("monitoring", None)]
