"""Shared fixtures: a real database (SQLite file, or PostgreSQL when WCMS_TEST_DATABASE_URL is
set) and a real server process on 127.0.0.1, started and stopped by each test that needs one."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PG_URL = os.environ.get("WCMS_TEST_DATABASE_URL", "")
# The PostgreSQL that runs on every machine, CI's too: tests of several nodes use it (or
# WCMS_TEST_DATABASE_URL) whatever the run's engine, since several nodes need PostgreSQL.
MACHINE_PG = "postgresql://postgres@127.0.0.1:5432/test"
ROOT = Path(__file__).resolve().parent.parent
# Admin passwords at the least argon2id cost the server accepts (OWASP's: 0.03 s of CPU against
# the default's 0.25 s), in this process and every server and command it starts: the suite
# logs in a few hundred times. The tests of hashing itself (test_login_flood.py, test_web.py)
# ask for the default.
os.environ.update(
    WCMS_ARGON2_MEMORY_KIB="19456", WCMS_ARGON2_TIME_COST="2", WCMS_ARGON2_PARALLELISM="1"
)


# Ports for test servers: each xdist worker has its own range, below the kernel's ephemeral
# ports (32768-60999 here), and takes them in turn. A port the kernel picked for us (bind to 0)
# could be picked again at once for another worker's server; then a test that stops its server
# to see "connection refused" reaches a stranger (seen in CI: a client registered with the
# wrong server's PIN).
PORTS_PER_WORKER = 1000
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
# Two runs at once on one machine (CI runs the Wine suite beside the PostgreSQL pass) need bases
# of their own: WCMS_TEST_PORT_BASE (make test-wine sets 8000: 8000-9999 for its 2 workers).
_PORT_BASE = int(os.environ.get("WCMS_TEST_PORT_BASE", "20000")) + (_WORKER % 12) * PORTS_PER_WORKER
_ports = itertools.count()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on and no other test of this run was given."""
    for _ in range(PORTS_PER_WORKER):
        port = _PORT_BASE + next(_ports) % PORTS_PER_WORKER
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use (another run on this machine)
                continue
            return port
    raise RuntimeError(f"no free port in {_PORT_BASE}-{_PORT_BASE + PORTS_PER_WORKER - 1}")


class Database:
    """One isolated database per test: a SQLite file, or a PostgreSQL schema."""

    def __init__(self, data_dir: Path, pg_url: str = PG_URL) -> None:
        """`pg_url`: the PostgreSQL database to make the schema in (default: the run's, if
        any); tests of several nodes pass MACHINE_PG, as they need PostgreSQL on every run."""
        self.data_dir = data_dir
        self.pg_url = pg_url
        self.schema = f"t_{uuid.uuid4().hex[:12]}" if pg_url else None
        if self.schema:
            self._pg(f'CREATE SCHEMA "{self.schema}"')
            sep = "&" if "?" in pg_url else "?"
            self.url = f"{pg_url}{sep}options=-csearch_path%3D{self.schema}"
        else:
            self.url = f"sqlite:///{data_dir / 'wcms.db'}"

    def _pg(self, sql: str) -> None:
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.pg_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(sql))
        engine.dispose()

    def drop(self) -> None:
        if self.schema:
            self._pg(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')

    def migrate(self) -> None:
        """Bring the database to the newest schema.

        A new SQLite database is a copy of a template file migrated once per test process;
        PostgreSQL schemas are migrated in place (0.1 s), since a database cloned from a
        template costs 0.5-0.7 s to drop (measured on PostgreSQL 15 here)."""
        path = self.data_dir / "wcms.db"
        if self.schema is None and not path.exists():
            shutil.copyfile(_sqlite_template(), path)
            path.chmod(0o600)
            return
        from wcms.server import migrate
        from wcms.server.db import make_engine

        engine = make_engine(self.url)
        try:
            migrate.upgrade(engine)
        finally:
            engine.dispose()


_TEMPLATE: list[Path] = []


def _sqlite_template() -> Path:
    """A SQLite file at the newest migration, made once per test process."""
    if not _TEMPLATE:
        from wcms.server import migrate
        from wcms.server.db import make_engine

        path = Path(tempfile.mkdtemp(prefix="wcms-template-")) / "wcms.db"
        engine = make_engine(f"sqlite:///{path}")
        migrate.upgrade(engine)
        engine.dispose()  # the last connection closes: the WAL is folded into the file
        atexit.register(shutil.rmtree, path.parent, True)
        _TEMPLATE.append(path)
    return _TEMPLATE[0]


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    data = tmp_path / "data"
    data.mkdir()
    db = Database(data)
    yield db
    db.drop()


def read_status(sock: socket.socket) -> int:
    """The HTTP status of the answer on a raw socket (tests that send requests byte by byte),
    which is then closed."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    sock.close()
    return int(data.split(b" ", 2)[1])


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def http(
    method: str,
    url: str,
    body: Any = None,
    token: str | None = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> tuple[int, Any]:
    """One request; returns (status, parsed JSON or text). Never raises for HTTP errors."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None and raw is None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, payload = err.code, err.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode(errors="replace")


class LiveServer:
    """The real `wcms server run` (gunicorn + gevent) in a subprocess on 127.0.0.1."""

    def __init__(self, tmp: Path, database: Database, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.database = database
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        self.env = {
            **os.environ,
            "WCMS_DATA_DIR": str(database.data_dir),
            "WCMS_DATABASE_URL": database.url,
            "WCMS_HOST": "127.0.0.1",
            "WCMS_PORT": str(self.port),
            "PYTHONUNBUFFERED": "1",
            # The suite runs several servers at once on two cores: a niced hashing thread would
            # starve behind the others and slow every login test. The login-flood test, which
            # runs alone, sets the production value.
            "WCMS_HASH_NICE": "0",
            # One worker, as on SQLite, whatever the engine: the tests of several workers and
            # nodes ask for them (tests/server/test_workers.py, test_nodes.py).
            "WCMS_WORKERS": "1",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.api_key = ""

    def cli(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        res = subprocess.run(
            [sys.executable, "-m", "wcms", *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"wcms {' '.join(args)} failed: {res.stderr}")
        return res.stdout.strip()

    def _prepare(self) -> str:
        """Migrate and create the tests' API key in-process (the CLI has its own tests)."""
        from wcms.server.db import make_engine, make_sessionmaker, utcnow
        from wcms.server.services import accounts

        self.database.migrate()
        engine = make_engine(self.database.url)
        try:
            with make_sessionmaker(engine)() as s:
                _row, key = accounts.create_api_key(s, "tests", utcnow())
                s.commit()
        finally:
            engine.dispose()
        return key

    def start(self, timeout: float = 30) -> LiveServer:
        if not self.api_key:
            self.api_key = self._prepare()
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "wcms", "server", "run"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log()}")
            try:
                status, _ = http("GET", self.url + "/healthz", timeout=1)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not ready in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def restart(self) -> LiveServer:
        self.stop()
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ---- the API, as an admin (API key) or as a PC (token)

    def api(
        self, method: str, path: str, body: Any = None, token: str | None = None, **kw: Any
    ) -> tuple[int, Any]:
        return http(method, self.url + path, body, token, **kw)

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        status, data = self.api(method, path, body, token=self.api_key)
        if status >= 400:
            raise ApiError(status, data)
        return data

    def create_pin(self, multi: bool = False, minutes: int = 10, approve: bool = True) -> str:
        """A PIN; by default it approves the PCs it registers (tests/security and
        tests/server/test_registration.py test PINs that do not)."""
        body = {"multi_use": multi, "expires_minutes": minutes, "auto_approve": approve}
        data = self.admin("POST", "/api/pins", body)
        return str(data["pin"])

    def pcs(self) -> list[dict[str, Any]]:
        return list(self.admin("GET", "/api/pcs")["pcs"])

    def get_pc(self, machine_id: str) -> dict[str, Any] | None:
        return next((p for p in self.pcs() if p["machine_id"] == machine_id), None)

    def wait_pc(self, machine_id: str, timeout: float = 10, **expect: Any) -> dict[str, Any]:
        """Poll until the PC exists and its fields equal `expect`; fail with the last seen."""
        deadline = time.monotonic() + timeout
        pc = None
        while time.monotonic() < deadline:
            pc = self.get_pc(machine_id)
            if pc is not None and all(pc.get(k) == v for k, v in expect.items()):
                return pc
            time.sleep(0.05)
        raise AssertionError(f"{machine_id}: wanted {expect}, last saw {pc}")

    def wait_polls(self, count: int, timeout: float = 10) -> None:
        """Wait until `count` command long polls are waiting in the server (/healthz counts the
        doorbell's listeners: a command queued from now on wakes them)."""
        deadline = time.monotonic() + timeout
        waiting = None
        while time.monotonic() < deadline:
            waiting = http("GET", self.url + "/healthz", timeout=2)[1].get("waiting_polls")
            if waiting is not None and waiting >= count:
                return
            time.sleep(0.01)
        raise AssertionError(f"wanted {count} waiting polls, last saw {waiting}")


@pytest.fixture
def make_server(tmp_path: Path, database: Database) -> Iterator[Any]:
    """A factory: make_server(WCMS_OFFLINE_AFTER="2", ...) -> a started LiveServer."""
    servers: list[LiveServer] = []

    def make(start: bool = True, **env: str) -> LiveServer:
        server = LiveServer(tmp_path, database, env)
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.stop(signal.SIGQUIT)  # at teardown nothing waits on a graceful stop (1 s less)


@pytest.fixture
def live_server(make_server: Any) -> LiveServer:
    server: LiveServer = make_server()
    return server


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for a whole module, for tests that only add their own PCs to it."""
    tmp = tmp_path_factory.mktemp("shared")
    data = tmp / "data"
    data.mkdir()
    db = Database(data)
    server = LiveServer(tmp, db, {}).start()
    yield server
    server.stop(signal.SIGQUIT)
    db.drop()


@contextlib.contextmanager
def sql_statements(engine: Any) -> Iterator[list[str]]:
    """The SQL `engine` runs inside the block, in order."""
    from sqlalchemy import event

    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


# ---- in-process: the real app on a real database, no background loop (domain tests)


@pytest.fixture
def app(database: Database) -> Iterator[Any]:
    from wcms.server import create_app

    database.migrate()
    app = create_app(
        {"database_url": database.url, "data_dir": database.data_dir, "background": False}
    )
    yield app
    app.extensions["wcms"].engine.dispose()


@pytest.fixture
def rt(app: Any) -> Any:
    return app.extensions["wcms"]


@pytest.fixture
def session(rt: Any) -> Iterator[Any]:
    with rt.sessions() as s:
        yield s


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


def register_pc(
    server: LiveServer,
    machine_id: str | None = None,
    token: str | None = None,
    approve: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """Register a PC over HTTP as a client would (with its current `token` when it registers
    again); returns the answer plus `machine_id`."""
    machine_id = machine_id or f"TEST-{uuid.uuid4().hex[:16]}"
    pin = server.create_pin(approve=approve)
    body = {"pin": pin, "machine_id": machine_id, "hostname": "lab-pc", **extra}
    status, data = server.api("POST", "/api/client/register", body, token=token)
    assert status == 201, data
    return {**data, "machine_id": machine_id}


# What touches a database of its own: a test that uses none of these fixtures stores nothing.
DB_FIXTURES = frozenset(
    {"database", "live_server", "make_server", "shared_server", "app", "rt", "session", "client"}
)
# Tests whose subject is not the database, though they run a server beside them: the Windows
# client under Wine, the bundle builder, the install scripts, the rhythm of long polls, and the
# connection limits (half-sent requests never reach the database).
DB_INCIDENTAL = (
    "tests/wine/",
    "tests/bundle/",
    "tests/security/test_install_chain.py",
    "tests/security/test_poll_rhythm.py",
    "tests/security/test_slow_connections.py",
)


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Mark the tests whose outcome cannot depend on the database engine `no_database`: CI's
    PostgreSQL pass runs everything else (.ci/run); the SQLite pass runs all."""
    for item in items:
        if item.nodeid.startswith(DB_INCIDENTAL) or not DB_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.no_database)
    # The long tests first, shared out: `make test` runs pytest-xdist's worksteal scheduler,
    # which gives worker k the k-th contiguous share of this list (and lets idle workers take
    # from the end of busy ones' shares). Each share starts with every n-th long test, so no
    # worker starts a 40 s test near the end; the others stay in order, so each module's tests
    # stay together (and start few module-scoped servers).
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    slow = [item for item in items if item.get_closest_marker("slow")]
    rest = [item for item in items if not item.get_closest_marker("slow")]
    shares = [slow[k::workers] for k in range(workers)]
    for k in range(workers):
        shares[k] += rest[len(rest) * k // workers : len(rest) * (k + 1) // workers]
    items[:] = [item for share in shares for item in share]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    """In CI (WCMS_NO_SKIPS=1) a skipped test is a failure: every suite must really run."""
    if os.environ.get("WCMS_NO_SKIPS") != "1":
        return
    skipped = terminalreporter.stats.get("skipped", [])
    if skipped:
        terminalreporter.section("skips are failures in CI (WCMS_NO_SKIPS=1)", red=True)
        for rep in skipped:
            terminalreporter.write_line(f"SKIPPED {rep.nodeid}: {rep.longrepr}")


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    if os.environ.get("WCMS_NO_SKIPS") != "1":
        return
    skipped = session.config.pluginmanager.get_plugin("terminalreporter").stats.get("skipped", [])
    if skipped and exitstatus == 0:
        session.exitstatus = 1
