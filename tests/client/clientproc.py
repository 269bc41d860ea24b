"""The real client process (`python -m wcms client run`) for tests, with a fake `systemctl`.

The fake systemctl stands in for the one OS boundary a test cannot cross: actually powering off
the machine. It answers `is-system-running` and `list-jobs` from two files that a test writes,
so SIGTERM takes the client's real shutdown path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

FAKE_SYSTEMCTL = """#!/bin/sh
here=$(dirname "$0")
case "$1" in
  is-system-running) state=$(cat "$here/state"); echo "$state"; [ "$state" = running ] ;;
  list-jobs) cat "$here/jobs" ;;
  *) echo "fake systemctl: $*" >&2; exit 1 ;;
esac
"""


def new_machine_id() -> str:
    return f"TEST-{uuid.uuid4().hex[:16]}"


class ClientProcess:
    """One client with its own client dir, identity and PATH."""

    def __init__(
        self,
        tmp: Path,
        server_url: str,
        *,
        pin: str | None = None,
        machine_id: str | None = None,
        prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.machine_id = machine_id or new_machine_id()
        self.dir = tmp / f"client-{self.machine_id}"
        self.bin = self.dir / "bin"
        self.bin.mkdir(parents=True)
        systemctl = self.bin / "systemctl"
        systemctl.write_text(FAKE_SYSTEMCTL)
        systemctl.chmod(0o755)
        self.system_going_down(False)
        self.server_url = server_url
        self.pin = pin
        self.prefix = list(prefix)
        self.env = {
            **os.environ,
            "PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "WCMS_CLIENT_DIR": str(self.dir),
            "WCMS_MACHINE_ID": self.machine_id,
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.env.pop("WCMS_PIN", None)
        self.env.pop("WCMS_SERVER_URL", None)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.dir / "logs" / "client.log"

    @property
    def token_path(self) -> Path:
        return self.dir / "token"

    def system_going_down(
        self, down: bool, jobs: str = "1 poweroff.target start waiting\n"
    ) -> None:
        """What the fake systemctl says: 'stopping' with these jobs, or 'running'."""
        (self.bin / "state").write_text("stopping\n" if down else "running\n")
        (self.bin / "jobs").write_text(jobs if down else "")

    def start(self) -> ClientProcess:
        cmd = [*self.prefix, sys.executable, "-m", "wcms", "client", "run"]
        cmd += ["--server", self.server_url] + (["--pin", self.pin] if self.pin else [])
        with (self.dir / "stderr.log").open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.wait_log("Agent started")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def output(self) -> str:
        path = self.dir / "stderr.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_log(self, text: str, timeout: float = 20) -> str:
        """Wait until client.log contains `text`; fail with the log and stderr otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} in client.log:\n{self.log()}\nstderr:\n{self.output()}")

    def terminate(self, timeout: float = 10) -> float:
        """SIGTERM, as systemd sends it; answer the seconds until the process was gone."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=timeout)
        return time.monotonic() - started

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()
