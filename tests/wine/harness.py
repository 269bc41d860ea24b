"""A Wine prefix with the Windows client bundle in it, driven from Linux.

What each step costs and why it is done this way is in docs/CLIENT.md ("## Windows", testing
under Wine). The rules that matter here:

- python.exe under Wine dies at start when its stdio is a regular Linux file, so every Windows
  command here gets /dev/null for stdin and pipes for its output;
- the command that boots the Wine session must not write into a pipe anyone waits on (the
  services it starts inherit it), so `wineboot` writes into a file;
- service processes do not keep a prefix alive: `wineserver -p` during the tests, `-k` after;
- every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

INSTALL_DIR = r"C:\Program Files\WCMS"
PYTHON = INSTALL_DIR + r"\python.exe"
SERVICE = "WCMSClient"
TEST_CONTROL = 0x8F  # wcms.client.platform.windows.TEST_CONTROL_PRESHUTDOWN
# Figures measured by the suite, printed (and written to $WCMS_WINE_TIMINGS) at its end.
TIMINGS: dict[str, float] = {}


def wine_missing() -> str | None:
    """Why the Wine suite cannot run here, or None when it can."""
    for tool in ("wine", "wineserver", "wineboot"):
        if shutil.which(tool) is None:
            return f"{tool} not found: run tools/wine/setup.sh (apt-get install wine wine64)"
    if not any(Path(p).exists() for p in ("/usr/lib/wine/wine64", "/usr/bin/wine64")):
        return "64-bit Wine (wine64) not installed: run tools/wine/setup.sh"
    return None


def wait_for(check: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T | None:
    """Call `check` until it returns something truthy or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


class WinePrefix:
    """One 64-bit prefix under `root`, its own wineserver, and commands run inside it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.prefix = root / "prefix"
        self.bundle: Path | None = None  # the zip `wcms client bundle` built, signed
        self.public_key: str | None = None
        self.key_path: Path | None = None
        self.env = {
            k: v
            for k, v in os.environ.items()
            # Services inherit the booting environment: none of the test's WCMS_* may leak in.
            if not k.startswith(("WCMS_", "WINE", "DISPLAY", "WAYLAND_", "PYTHON"))
        }
        self.env.update(
            WINEPREFIX=str(self.prefix),
            WINEARCH="win64",
            WINEDEBUG="-all",
            WINEDLLOVERRIDES="mscoree,mshtml=",
        )

    def drive_c(self, windows_path: str) -> Path:
        """The Linux path of C:\\something in this prefix."""
        assert windows_path[:3].upper() == "C:\\", windows_path
        return self.prefix / "drive_c" / Path(*windows_path[3:].split("\\"))

    def create(self, timeout: float = 120) -> float:
        """wineboot --init a fresh prefix; returns the seconds it took.

        Once in CI, with five test workers booting their prefixes at the same moment, every
        `wineboot --init` exited 53 with an ordinary log; a prefix that fails is thrown away
        and made once more before the failure counts."""
        started = time.monotonic()
        for attempt in (1, 2):
            try:
                self._to_file(["wineboot", "--init"], "wineboot-init.log", timeout)
                break
            except subprocess.CalledProcessError as exc:
                log = (self.root / "wineboot-init.log").read_text(errors="replace")
                if attempt == 2:
                    raise AssertionError(f"wineboot --init failed twice ({exc}):\n{log}") from exc
                subprocess.run(["wineserver", "-k"], env=self.env, timeout=30, check=False)
                shutil.rmtree(self.prefix, ignore_errors=True)
        subprocess.run(["wineserver", "-w"], env=self.env, timeout=timeout, check=False)
        return time.monotonic() - started

    def boot(self, timeout: float = 60) -> None:
        """Start a persistent wineserver and the session (services.exe) with output to a file."""
        subprocess.run(["wineserver", "-p"], env=self.env, timeout=timeout, check=True)
        self._to_file(["wine", "wineboot"], "session.log", timeout)

    def kill(self) -> None:
        """End every process of the prefix and its wineserver."""
        subprocess.run(["wineserver", "-k"], env=self.env, timeout=30, check=False)
        subprocess.run(["wineserver", "-w"], env=self.env, timeout=30, check=False)

    def _to_file(self, command: list[str], log_name: str, timeout: float) -> None:
        with (self.root / log_name).open("ab") as log:
            subprocess.run(
                command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=True,
            )

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`wine ARGS` with stdin /dev/null and output through pipes."""
        return subprocess.run(
            ["wine", *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def python(self, code: str, timeout: float = 60) -> str:
        """Run Python code with the bundle's python.exe; its stdout, or an AssertionError."""
        result = self.run(PYTHON, "-c", code, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"python.exe failed ({result.returncode}):\n{result.stderr}")
        return result.stdout

    def sc(self, *args: str, timeout: float = 60) -> str:
        """`sc ARGS`, its output going through a file (it may start service processes)."""
        out = self.root / "sc.out"
        with out.open("wb") as log:
            subprocess.run(
                ["wine", "sc", *args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        return out.read_text(errors="replace")

    def unpack(self, bundle: Path, windows_dir: str = INSTALL_DIR) -> Path:
        """Unzip a bundle into the prefix, as the installer's source folder would be."""
        target = self.drive_c(windows_dir)
        with zipfile.ZipFile(bundle) as archive:
            archive.extractall(target)
        return target


class WineClient:
    """The WCMSClient service in the prefix, configured for one live server."""

    def __init__(self, wine: WinePrefix, server: Any) -> None:
        self.wine = wine
        self.server = server
        self.data = wine.drive_c(r"C:\ProgramData\WCMS")
        self.log_file = self.data / "logs" / "client.log"

    def configure(self, *, test_controls: bool) -> None:
        """A fresh client.json (server URL, PIN, the test control) and no token yet."""
        shutil.rmtree(self.data, ignore_errors=True)
        self.data.mkdir(parents=True)
        config = {"server_url": self.server.url, "pin": self.server.create_pin()}
        if test_controls:
            config["test_controls"] = True
        (self.data / "client.json").write_text(json.dumps(config))

    def machine_id(self) -> str:
        code = (
            "from wcms.client.platform.windows import WindowsPlatform;"
            "print(WindowsPlatform().machine_id())"
        )
        return self.wine.python(code).strip()

    def install(self) -> str:
        """install_service() (automatic start, recovery, PreShutdown timeout), not started."""
        code = (
            "from wcms.client.platform.windows_scm import install_service;"
            "from wcms.client.config import load_config;"
            "from wcms.client.platform.windows import WindowsPlatform;"
            "install_service(load_config(WindowsPlatform()), start=False)"
        )
        return self.wine.python(code)

    def status(self) -> tuple[int, int]:
        """(state, controls accepted) as the SCM reports them."""
        code = (
            "import win32serviceutil;"
            f"s = win32serviceutil.QueryServiceStatus({SERVICE!r});"
            "print(s[1], s[2])"
        )
        state, controls = self.wine.python(code).split()
        return int(state), int(controls)

    def wait_state(self, state: int, timeout: float = 20) -> bool:
        return wait_for(lambda: self.status()[0] == state, timeout, interval=0.2) is True

    def control(self, code: int) -> tuple[float, float, str]:
        """ControlService(code) from inside Wine: (time sent, time returned, outcome)."""
        script = (
            "import time, win32serviceutil, pywintypes\n"
            "t0 = time.time()\n"
            "try:\n"
            f"    win32serviceutil.ControlService({SERVICE!r}, {code}); r = 'ok'\n"
            "except pywintypes.error as e:\n"
            "    r = f'error {e.winerror}'\n"
            "print(t0, time.time(), r)\n"
        )
        sent, done, outcome = self.wine.python(script).split(maxsplit=2)
        return float(sent), float(done), outcome.strip()

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def remove(self) -> None:
        code = "from wcms.client.platform.windows_scm import uninstall_service; uninstall_service()"
        self.wine.python(code)
