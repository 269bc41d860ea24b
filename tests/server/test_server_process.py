"""The production server process: a graceful stop is quick even with polls and streams open,
and it writes the heartbeats it still holds."""

from __future__ import annotations

import threading
import time
import urllib.request
from typing import Any

import pytest

from tests.conftest import LiveServer, http, register_pc


@pytest.mark.slow
def test_sigterm_ends_open_polls_and_streams_and_keeps_buffered_heartbeats(
    make_server: Any,
) -> None:
    # A long flush interval: the heartbeat below is still in memory when SIGTERM comes.
    server: LiveServer = make_server(WCMS_POLL_TIMEOUT="60", WCMS_FLUSH_INTERVAL="30")
    pc = register_pc(server)
    answers: list[int] = []
    streaming = threading.Event()

    def long_poll() -> None:
        status, _ = http(
            "GET",
            f"{server.url}/api/client/commands?machine_id={pc['machine_id']}&timeout=60",
            token=pc["token"],
            timeout=90,
        )
        answers.append(status)

    def stream() -> None:
        req = urllib.request.Request(f"{server.url}/api/events")
        req.add_header("Authorization", f"Bearer {server.api_key}")
        with urllib.request.urlopen(req, timeout=90) as resp:
            resp.readline()  # the first frame: the server has subscribed this stream
            streaming.set()
            resp.read()  # until the server ends the stream
        answers.append(resp.status)

    threads = [threading.Thread(target=f, daemon=True) for f in (long_poll, stream)]
    for t in threads:
        t.start()
    status, _ = server.api(
        "POST",
        "/api/client/heartbeat",
        {"machine_id": pc["machine_id"], "cpu_percent": 77.0},
        token=pc["token"],
    )
    assert status == 200
    server.wait_polls(1)  # the poll is waiting on the server's doorbell
    assert streaming.wait(10), "the event stream never started"
    t0 = time.monotonic()
    server.stop()
    stopped_in = time.monotonic() - t0
    for t in threads:
        t.join(timeout=5)
    assert sorted(answers) == [200, 200], answers
    # Well under gunicorn's graceful_timeout (10 s, runner.py), which is what a stop that
    # waited for the open poll and stream to end by themselves would take.
    assert stopped_in < 6.0, f"graceful stop took {stopped_in:.1f}s"
    server.start()
    assert server.get_pc(pc["machine_id"])["cpu_percent"] == 77.0
