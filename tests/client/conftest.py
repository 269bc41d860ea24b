"""Fixtures for the client's unit tests: a platform rooted in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port


class TmpPlatform:
    """The Platform contract with its directories in a temporary folder."""

    name = "test"

    def __init__(self, root: Path, machine_id: str = "test-machine-0001") -> None:
        self.root = root
        self._machine_id = machine_id

    def default_client_dir(self) -> Path:
        return self.root / "lib"

    def default_log_dir(self) -> Path:
        return self.root / "log"

    def machine_id(self) -> str:
        return self._machine_id

    def console_user(self) -> str | None:
        return "alice"

    def os_info(self) -> dict[str, Any]:
        return {"os_name": "TestOS", "os_version": "1", "os_edition": "TestOS 1", "cpu_model": "x"}

    def restrict_to_owner(self, path: Path) -> None:
        os.chmod(path, 0o600)


@pytest.fixture
def plat(tmp_path: Path) -> TmpPlatform:
    return TmpPlatform(tmp_path)


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: connections are refused."""
    return free_port()
