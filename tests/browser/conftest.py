"""Real headless Chromium (Debian's /usr/bin/chromium) driven by Playwright against the real
server process. Without Chromium every browser test skips and says why (CI fails on skips)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import LiveServer, register_pc

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# `make screenshots` writes docs/screenshots; `make test` writes into the test's own directory,
# so a test run never rewrites tracked files.
SCREENSHOTS_ENV = "WCMS_SCREENSHOTS_DIR"
PASSWORD = "a long test password"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(
            f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` to run browser tests"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        yield browser
        browser.close()


def create_admin(server: LiveServer, name: str = "alice", password: str = PASSWORD) -> None:
    """Add an admin straight to the server's database (the CLI has its own tests)."""
    from wcms.server.db import make_engine, make_sessionmaker, utcnow
    from wcms.server.services import accounts

    engine = make_engine(server.database.url)
    try:
        with make_sessionmaker(engine)() as s:
            accounts.create_admin(s, name, password, utcnow())
            s.commit()
    finally:
        engine.dispose()


class Dashboard:
    """One browser page on one live server, with what the page did wrong collected."""

    def __init__(self, server: LiveServer, page: Any) -> None:
        self.server = server
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.shots = Path("screenshots")  # set by the `dash` fixture
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", self._console)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _console(self, msg: Any) -> None:
        # A CSP violation or an uncaught error shows up here as an error; a 401 or 404 that a
        # test asks for on purpose shows up as a failed resource, which is not the page's fault.
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            self.errors.append(f"console: {msg.text}")

    def url(self, path: str) -> str:
        return self.server.url + path

    def login(self, name: str = "alice", password: str = PASSWORD) -> None:
        self.page.goto(self.url("/login"))
        self.page.fill("#username", name)
        self.page.fill("#password", password)
        self.page.click("button[type=submit]")
        self.page.wait_for_url(self.url("/"))

    def open(self, path: str) -> Any:
        resp = self.page.goto(self.url(path))
        self.page.wait_for_selector("body[data-ready='1']", timeout=10_000)
        return resp

    def screenshot(self, name: str) -> Path:
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / name
        self.page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 10_000, f"{name}: an empty-looking screenshot"
        return path


@pytest.fixture
def dash(live_server: LiveServer, chromium: Any, tmp_path: Path) -> Iterator[Dashboard]:
    create_admin(live_server)
    context = chromium.new_context(viewport={"width": 1366, "height": 900}, locale="en-US")
    board = Dashboard(live_server, context.new_page())
    board.shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path / "screenshots")
    yield board
    context.close()  # before the server stops, so no event stream holds it up
    assert not board.dialogs, f"a dialog fired: {board.dialogs}"
    assert not board.errors, "\n".join(board.errors)


# ---------------------------------------------------------------- building a lab


def make_room(server: LiveServer, name: str, rows: int, cols: int) -> int:
    return int(server.admin("POST", "/api/rooms", {"name": name, "rows": rows, "cols": cols})["id"])


def seat(server: LiveServer, pc_id: int, room_id: int, row: int, col: int) -> None:
    server.admin("PUT", f"/api/pcs/{pc_id}/seat", {"room_id": room_id, "row": row, "col": col})


def heartbeat(server: LiveServer, pc: dict[str, Any], **fields: Any) -> None:
    body = {"machine_id": pc["machine_id"], **fields}
    status, data = server.api("POST", "/api/client/heartbeat", body, token=pc["token"])
    assert status == 200, data


def shutdown(server: LiveServer, pc: dict[str, Any], reason: str = "shutdown") -> None:
    body = {"machine_id": pc["machine_id"], "reason": reason}
    status, data = server.api("POST", "/api/client/shutdown", body, token=pc["token"])
    assert status == 200, data


def add_pc(server: LiveServer, hostname: str, **hardware: Any) -> dict[str, Any]:
    return register_pc(server, hostname=hostname, client_version="1.0.0", hardware=hardware)


class FakeAgent(threading.Thread):
    """The agent's side of the command protocol over real HTTP: poll, ack, report success.

    Used to fill screenshots with finished commands quickly; the message test runs real clients.
    """

    def __init__(self, server: LiveServer, pc: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.server, self.pc = server, pc
        self.stop = threading.Event()
        self.ran: list[dict[str, Any]] = []

    def run(self) -> None:
        mid = self.pc["machine_id"]
        while not self.stop.is_set():
            status, data = self.server.api(
                "GET", f"/api/client/commands?machine_id={mid}&timeout=1", token=self.pc["token"]
            )
            if status != 200:
                time.sleep(0.2)
                continue
            for cmd in data["commands"]:
                path = f"/api/client/commands/{cmd['id']}"
                self.server.api("POST", path + "/ack", {"machine_id": mid}, token=self.pc["token"])
                self.ran.append(cmd)
                result = {"machine_id": mid, "status": "succeeded", "exit_code": 0, "stdout": "ok"}
                self.server.api("POST", path + "/result", result, token=self.pc["token"])
