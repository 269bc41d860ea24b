"""The transaction rule's helper for work outside a request (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from wcms.server.db import unit_of_work
from wcms.server.models import Setting
from wcms.server.runtime import Runtime


def _stored(rt: Runtime, key: str) -> str | None:
    with rt.sessions() as s:
        return s.execute(select(Setting.value).where(Setting.key == key)).scalar()


def test_a_unit_of_work_commits_when_its_block_ends(rt: Runtime) -> None:
    with unit_of_work(rt.sessions) as s:
        s.add(Setting(key="uow-ok", value="kept"))
    assert _stored(rt, "uow-ok") == "kept"


def test_a_unit_of_work_that_raises_keeps_nothing(rt: Runtime) -> None:
    with pytest.raises(RuntimeError), unit_of_work(rt.sessions) as s:
        s.add(Setting(key="uow-fail", value="lost"))
        s.flush()
        raise RuntimeError("refused halfway")
    assert _stored(rt, "uow-fail") is None
