"""Shared by the benchmarks: the real server in a subprocess, a lean HTTP/1.1 client, figures.

The server is the production command (`python -m wcms server run`: gunicorn, one gevent
worker) on 127.0.0.1 with its own data directory, database and free port. On a machine with two
or more cores the server is pinned to one core and the load generator (this process) to the
others, so neither steals the other's CPU; the pinning is part of every summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

HOST = "127.0.0.1"


# ---------------------------------------------------------------------------- the generator


@contextlib.contextmanager
def generator_gc_paused() -> Iterator[None]:
    """The load generator's own garbage collector off while it measures. A full collection
    over its tens of thousands of objects stopped it for over 100 ms in the middle of a run,
    which showed up as server latency (seen in the per-second worst latencies)."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


# ---------------------------------------------------------------------------- cores


def plan_cores(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(server cores, load generator cores): the last core for the server, the rest for load."""
    cores = sorted(os.sched_getaffinity(0))
    if not pin or len(cores) < 2:
        return None, None
    return {cores[-1]}, set(cores[:-1])


def pin_self(cores: set[int] | None) -> None:
    if cores:
        os.sched_setaffinity(0, cores)


def machine() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load1, load5, load15 = os.getloadavg()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_avg_before": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", default="", help="PostgreSQL URL (a temporary schema is used)")
    p.add_argument("--no-pin", action="store_true", help="do not pin server and load to cores")
    p.add_argument("--keep", action="store_true", help="keep the temporary data dir and log")
    p.add_argument(
        "--profile",
        metavar="FILE",
        default="",
        help="record the server worker with py-spy (collapsed stacks) during the measurement",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="WCMS_X=V",
        help="extra environment for the server (repeatable)",
    )


# ---------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _pg(url: str, sql: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(sql))
    engine.dispose()


class Server:
    """`python -m wcms server run` on 127.0.0.1 with a temporary data dir (and PG schema)."""

    def __init__(
        self,
        database_url: str = "",
        env: dict[str, str] | None = None,
        cores: set[int] | None = None,
        keep: bool = False,
        peer: Server | None = None,
    ) -> None:
        """`peer`: another node of the same database (PostgreSQL) and secret, started first;
        this one shares its schema and API key and leaves the schema to it to drop."""
        self.tmp = Path(tempfile.mkdtemp(prefix="wcms-bench-"))
        self.data_dir = self.tmp / "data"
        self.data_dir.mkdir()
        self.pg_url = database_url
        self.peer = peer
        self.schema = f"bench_{uuid.uuid4().hex[:12]}" if database_url and not peer else None
        if peer is not None:
            if not peer.pg_url:
                raise ValueError("several nodes need PostgreSQL (--database-url)")
            self.url = peer.url
        elif database_url:
            _pg(database_url, f'CREATE SCHEMA "{self.schema}"')
            sep = "&" if "?" in database_url else "?"
            self.url = f"{database_url}{sep}options=-csearch_path%3D{self.schema}"
        else:
            self.url = f"sqlite:///{self.data_dir / 'wcms.db'}"
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.cores = cores
        self.keep = keep
        self.log_path = self.tmp / "server.log"
        self.env = {
            **os.environ,
            "WCMS_DATA_DIR": str(self.data_dir),
            "WCMS_DATABASE_URL": self.url,
            "WCMS_HOST": HOST,
            "WCMS_PORT": str(self.port),
            "PYTHONUNBUFFERED": "1",
            # Every node of one database needs the same secret (one node: any will do).
            "WCMS_SECRET_KEY": peer.env["WCMS_SECRET_KEY"] if peer else secrets.token_urlsafe(32),
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.profiler: subprocess.Popen[bytes] | None = None
        self.api_key = ""

    @property
    def database(self) -> str:
        return "postgresql" if self.pg_url else "sqlite"

    def kill(self) -> None:
        """kill -9 the node: its master and workers at once, nothing said to anyone."""
        procs = self.processes()
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        assert self.proc is not None
        self.proc.wait(5)

    def _prepare(self) -> None:
        """Migrate and create an admin API key in-process, as the tests do (a peer's node:
        its key)."""
        if self.peer is not None:
            self.api_key = self.peer.api_key
            return
        from wcms.server import migrate
        from wcms.server.db import make_engine, make_sessionmaker, utcnow
        from wcms.server.services import accounts

        engine = make_engine(self.url)
        try:
            migrate.upgrade(engine)
            with make_sessionmaker(engine)() as s:
                _row, self.api_key = accounts.create_api_key(s, "bench", utcnow())
                s.commit()
        finally:
            engine.dispose()

    def start(self, timeout: float = 60) -> Server:
        self._prepare()
        cores = self.cores

        def _pin() -> None:
            if cores:
                os.sched_setaffinity(0, cores)

        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "wcms", "server", "run"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_pin,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early; log: {self.log_path}\n{self.log()}")
            try:
                with urllib.request.urlopen(self.base + "/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready in {timeout}s; log: {self.log_path}")

    def processes(self) -> list[psutil.Process]:
        """The gunicorn master and its worker(s)."""
        assert self.proc is not None
        master = psutil.Process(self.proc.pid)
        return [master, *master.children(recursive=True)]

    def cpu_seconds(self) -> float:
        user, system = self.cpu_split()
        return user + system

    def cpu_split(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the server's processes so far."""
        user = system = 0.0
        for p in self.processes():
            try:
                t = p.cpu_times()
                user, system = user + t.user, system + t.system
            except psutil.NoSuchProcess:
                pass
        return user, system

    def rss_mib(self) -> float:
        return sum(p.memory_info().rss for p in self.processes()) / 2**20

    def start_profile(self, path: str) -> None:
        """py-spy on the worker until stop(); sampling without pausing it (--nonblocking)."""
        if not path:
            return
        exe = shutil.which("py-spy")
        if exe is None:
            raise RuntimeError("--profile needs py-spy on PATH (pip install py-spy)")
        worker = self.processes()[-1].pid
        cmd = [exe, "record", "-p", str(worker), "-r", "250", "-f", "raw", "-o", path]
        self.profiler = subprocess.Popen([*cmd, "--nonblocking"], stdout=subprocess.DEVNULL)

    def stop_profile(self) -> None:
        if self.profiler is not None:
            self.profiler.send_signal(signal.SIGINT)
            self.profiler.wait(timeout=30)
            self.profiler = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def errors_in_log(self) -> int:
        return sum(1 for line in self.log().splitlines() if "Traceback" in line)

    def stop(self) -> None:
        self.stop_profile()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if self.schema:
            _pg(self.pg_url, f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            self.schema = None
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def server_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        env[key] = value
    return env


# ---------------------------------------------------------------------------- HTTP/1.1


class HttpError(Exception):
    pass


def build_request(
    method: str,
    path: str,
    body: bytes | None = None,
    token: str | None = None,
    keep_alive: bool = True,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, server keeps the connection) of one response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = None
    chunked = False
    keep = lines[0].startswith("HTTP/1.1")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
        elif name == "connection":
            keep = value.strip().lower() == "keep-alive" or (
                keep and value.strip().lower() != "close"
            )
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(data[:-2])
        return status, b"".join(parts), keep
    if length is None:
        return status, await reader.read(), False
    return status, await reader.readexactly(length), keep


class Conn:
    """One client's HTTP/1.1 connection: keep-alive, or a new connection per request."""

    def __init__(self, port: int, keep_alive: bool = True) -> None:
        self.port = port
        self.keep_alive = keep_alive
        self._rw: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.connects = 0

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._rw is None:
            self._rw = await asyncio.open_connection(HOST, self.port, limit=1 << 20)
            self.connects += 1
        return self._rw

    async def request(
        self, method: str, path: str, body: bytes | None = None, token: str | None = None
    ) -> tuple[int, bytes]:
        for attempt in (0, 1):
            reused = self._rw is not None
            reader, writer = await self._open()
            try:
                writer.write(build_request(method, path, body, token, self.keep_alive))
                status, data, keep = await read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                self.close()
                if reused and attempt == 0:
                    continue  # the server closed an idle keep-alive connection: once more
                raise HttpError(f"{method} {path}: {exc!r}") from exc
            if not (keep and self.keep_alive):
                self.close()
            return status, data
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._rw is not None:
            self._rw[1].close()
            self._rw = None


async def get_json(
    port: int, path: str, token: str | None = None, body: Any = None, method: str = ""
) -> tuple[int, Any]:
    conn = Conn(port, keep_alive=False)
    raw = None if body is None else json.dumps(body).encode()
    status, data = await conn.request(
        method or ("GET" if raw is None else "POST"), path, raw, token
    )
    return status, json.loads(data) if data else None


# ---------------------------------------------------------------------------- PCs


def machine_id(i: int, run: str) -> str:
    return f"BENCH-{run}-{i:06d}"


def heartbeat_body(mid: str, i: int, event: str | None = None) -> dict[str, Any]:
    """A heartbeat as the real client sends it: load, disks, ~80 process names, the user."""
    body: dict[str, Any] = {
        "machine_id": mid,
        "hostname": f"lab-{i:04d}",
        "ip_address": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
        "current_user": f"student{i % 300:03d}",
        "client_version": "1.0.0",
        "cpu_percent": float(5 + i % 90),
        "ram_percent": float(20 + i % 70),
        "ram_used": 4_000_000_000 + i,
        "ram_total": 16_000_000_000,
        "uptime": 3600.0 + i,
        "boot_time": 1_700_000_000.0 + i,
        "disks": [
            {"mount": "C:\\", "fstype": "NTFS", "total": 500_107_862_016, "used": 200_000_000_000},
            {"mount": "D:\\", "fstype": "NTFS", "total": 1_000_204_886_016, "used": 10_000_000},
        ],
        "processes": PROCESSES,
    }
    if event is not None:
        body["event"] = event
    return body


PROCESSES = sorted(
    [f"{n}.exe" for n in ("svchost", "explorer", "chrome", "msedge", "Code", "python", "teams")]
    + [f"service{i:02d}.exe" for i in range(60)]
    + [f"app{i:02d}.exe" for i in range(13)]
)
assert len(PROCESSES) == 80


async def register_pcs(
    server: Server, count: int, run: str, concurrency: int = 16
) -> list[tuple[str, str]]:
    """Register `count` PCs over HTTP with one multi-use PIN; returns (machine_id, token)."""
    status, pin = await get_json(
        server.port,
        "/api/pins",
        server.api_key,
        {"multi_use": True, "expires_minutes": 60},
    )
    if status != 201 and status != 200:
        raise HttpError(f"creating a PIN: {status} {pin}")
    result: list[tuple[str, str]] = [("", "")] * count
    queue = iter(range(count))

    async def worker() -> None:
        conn = Conn(server.port, keep_alive=True)
        for i in queue:
            mid = machine_id(i, run)
            body = {
                "pin": pin["pin"],
                "machine_id": mid,
                "hostname": f"lab-{i:04d}",
                "client_version": "1.0.0",
                "hardware": {"os_name": "Windows", "cpu_cores": 4, "ram_total": 16_000_000_000},
            }
            status, data = await conn.request(
                "POST", "/api/client/register", json.dumps(body).encode()
            )
            if status != 201:
                raise HttpError(f"register {mid}: {status} {data[:200]!r}")
            result[i] = (mid, json.loads(data)["token"])
        conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return result


async def heartbeat_all(
    server: Server, creds: list[tuple[str, str]], concurrency: int = 16
) -> None:
    """One heartbeat from every PC, as live PCs send before anything else happens to them."""
    queue = iter(range(len(creds)))

    async def worker() -> None:
        conn = Conn(server.port, keep_alive=True)
        for i in queue:
            mid, token = creds[i]
            body = json.dumps(heartbeat_body(mid, i)).encode()
            status, data = await conn.request("POST", "/api/client/heartbeat", body, token)
            if status != 200:
                raise HttpError(f"heartbeat {mid}: {status} {data[:200]!r}")
        conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


# ---------------------------------------------------------------------------- figures


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def latency_ms(values: Iterable[float]) -> dict[str, Any]:
    """p50/p95/p99/max in milliseconds of latencies given in seconds."""
    v = sorted(values)
    if not v:
        return {"n": 0}
    return {
        "n": len(v),
        "p50": round(percentile(v, 50) * 1000, 2),
        "p95": round(percentile(v, 95) * 1000, 2),
        "p99": round(percentile(v, 99) * 1000, 2),
        "max": round(v[-1] * 1000, 2),
    }


def emit(name: str, figures: dict[str, Any]) -> None:
    """The machine-readable line: one JSON object, prefixed so it is easy to grep."""
    print(f"BENCH {name} " + json.dumps(figures, sort_keys=True), flush=True)


async def open_loop(
    schedule: Iterable[float], fire: Any, drain_timeout: float = 30
) -> tuple[float, list[float]]:
    """Call `fire(index, due)` (a coroutine) at each offset of `schedule`, without waiting for
    earlier calls: a fixed arrival rate. Returns (seconds spent sending, lateness of each send).
    """
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[Any]] = set()
    late: list[float] = []
    start = loop.time() + 0.1
    for i, offset in enumerate(schedule):
        due = start + offset
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        late.append(max(0.0, loop.time() - due))
        task = asyncio.create_task(fire(i, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sent_for = loop.time() - start
    if tasks:
        await asyncio.wait(tasks, timeout=drain_timeout)
    return sent_for, late
