"""`make demo`: a live lab on this machine in a minute.

Starts the real server on a temporary data directory, creates an admin with a fresh random
password, a room and a registration PIN, then starts a few real clients (`python -m wcms client
run`), each with its own identity and client directory, in dry-run power mode: a shutdown or
restart command is recorded by the client instead of powering off this machine. Each client is
seated in the room as it registers. Prints the address and the password; Ctrl-C stops it all.

    .venv/bin/python scripts/demo.py [--clients 6] [--port 5050]
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Demo:
    def __init__(self, clients: int, port: int, keep: bool) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="wcms-demo-"))
        self.data = self.tmp / "data"
        self.data.mkdir()
        self.port = port if port_free(port) else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.count = clients
        self.keep = keep
        self.procs: list[subprocess.Popen[bytes]] = []
        self.api_key = ""
        self.env = {
            **os.environ,
            "WCMS_DATA_DIR": str(self.data),
            "WCMS_HOST": "127.0.0.1",
            "WCMS_PORT": str(self.port),
            "WCMS_PRESENCE_MODE": "fast",
            "PYTHONUNBUFFERED": "1",
        }

    # ---- the server

    def prepare(self) -> str:
        """Migrate; create the admin (random password) and an API key for this script."""
        from wcms.server import migrate
        from wcms.server.config import load_settings
        from wcms.server.db import make_engine, make_sessionmaker, utcnow
        from wcms.server.services import accounts

        settings = load_settings({"data_dir": self.data})
        engine = make_engine(settings.sqlalchemy_url)
        try:
            migrate.upgrade(engine)
            with make_sessionmaker(engine)() as s:
                password = accounts.generate_password()
                accounts.create_admin(s, "admin", password, utcnow())
                _row, self.api_key = accounts.create_api_key(s, "demo script", utcnow())
                s.commit()
        finally:
            engine.dispose()
        return password

    def start_server(self) -> None:
        log = (self.tmp / "server.log").open("ab")
        cmd = [sys.executable, "-m", "wcms", "server", "run"]
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"the server did not start; see {self.tmp / 'server.log'}")

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.api_key}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    # ---- the clients

    def start_clients(self, pin: str) -> list[str]:
        machine_ids = []
        for i in range(1, self.count + 1):
            machine_id = f"DEMO-PC-{i:02d}-{os.getpid()}"
            client_dir = self.tmp / f"client-{i:02d}"
            client_dir.mkdir()
            env = {
                **os.environ,
                "WCMS_MACHINE_ID": machine_id,
                "WCMS_CLIENT_DIR": str(client_dir),
                "WCMS_DRY_RUN_POWER": "1",
                "PYTHONUNBUFFERED": "1",
            }
            cmd = [sys.executable, "-m", "wcms", "client", "run", "--server", self.url]
            cmd += ["--pin", pin]
            log = (client_dir / "stdout.log").open("ab")
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log))
            machine_ids.append(machine_id)
        return machine_ids

    def seat_clients(self, room_id: int, cols: int, machine_ids: list[str]) -> int:
        """Seat each client as it registers, in the order they were started."""
        seated: set[str] = set()
        deadline = time.monotonic() + 60
        while len(seated) < len(machine_ids) and time.monotonic() < deadline:
            for pc in self.api("GET", "/api/pcs")["pcs"]:
                mid = pc["machine_id"]
                if mid in machine_ids and mid not in seated:
                    i = machine_ids.index(mid)
                    seat = {"room_id": room_id, "row": i // cols + 1, "col": i % cols + 1}
                    self.api("PUT", f"/api/pcs/{pc['id']}/seat", seat)
                    seated.add(mid)
            time.sleep(0.3)
        return len(seated)

    def stop(self) -> None:
        for proc in reversed(self.procs):  # clients first (they say goodbye), then the server
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description="Run a demo lab: the server and a few real clients.")
    p.add_argument("--clients", type=int, default=6, help="how many clients (default 6)")
    p.add_argument("--port", type=int, default=5050, help="preferred port (default 5050)")
    p.add_argument("--keep", action="store_true", help="keep the data directory afterwards")
    args = p.parse_args()
    demo = Demo(max(1, min(args.clients, 40)), args.port, args.keep)
    try:
        password = demo.prepare()
        demo.start_server()
        cols = 4
        rows = (demo.count + 1) // cols + 1  # one row to spare: empty seats show too
        room = demo.api("POST", "/api/rooms", {"name": "Demo lab", "rows": rows, "cols": cols})
        pin = demo.api(
            "POST", "/api/pins", {"multi_use": True, "expires_minutes": 30, "auto_approve": True}
        )["pin"]
        seated = demo.seat_clients(room["id"], cols, demo.start_clients(pin))
        bar = "=" * 64
        print(
            f"{bar}\nWCMS demo: {seated} clients online in 'Demo lab' (dry-run power)\n"
            f"  open      {demo.url}/rooms/{room['id']}\n"
            f"  user      admin\n  password  {password}\n"
            f"  PIN       {pin} (multi-use, 30 min) for more clients\n"
            f"  data      {demo.tmp}\nCtrl-C stops the clients and the server.\n{bar}",
            flush=True,
        )
        while all(proc.poll() is None for proc in demo.procs[:1]):
            time.sleep(1)
        print("the server stopped; see", demo.tmp / "server.log", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except urllib.error.HTTPError as exc:
        print(f"demo: the server refused a request: {exc.code} {exc.read()[:300]!r}")
        return 1
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
