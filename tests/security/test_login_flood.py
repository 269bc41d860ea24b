"""Issue 10, High 1: a login flood must not stall the server, and every login limit holds.

Each login runs argon2 (about 0.2 s of CPU). The server checks passwords in a low-priority OS
thread with a bounded queue, and takes a failure's worth of three shared limits (per address,
per user name, global) before checking, giving it back on success.
"""

from __future__ import annotations

import http.client
import re
import statistics
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlencode

import pytest
import sqlalchemy

from tests.conftest import LiveServer, register_pc
from wcms.server.hashpool import MAX_IN_FLIGHT, PER_ADDRESS

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def login(
    server: LiveServer, username: str, password: str, source: str = "127.0.0.1"
) -> tuple[int, str]:
    """The login form as a browser submits it, from `source`; (status, page text)."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", server.port, timeout=120, source_address=(source, 0)
    )
    try:
        conn.request("GET", "/login")
        resp = conn.getresponse()
        page = resp.read().decode()
        cookies = [v.split(";")[0] for k, v in resp.getheaders() if k.lower() == "set-cookie"]
        match = _CSRF.search(page)
        assert match, page[:500]
        form = {"username": username, "password": password, "csrf_token": match.group(1)}
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Cookie": "; ".join(cookies),
        }
        conn.request("POST", "/login", urlencode(form), headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def busy(page: str) -> bool:
    return "checking many logins" in page


# The tests of the hashing itself run at the server's default argon2 cost (conftest sets the
# least one the server accepts, for every other test's logins).
DEFAULT_COST = {
    "WCMS_ARGON2_MEMORY_KIB": "65536",
    "WCMS_ARGON2_TIME_COST": "3",
    "WCMS_ARGON2_PARALLELISM": "4",
}


def limited(page: str) -> bool:
    return "Too many failed attempts" in page


def address(n: int) -> str:
    """A distinct loopback source address for the n-th simulated client."""
    return f"127.{10 + n // 60000 % 200}.{n // 250 % 240}.{n % 250 + 2}"


def make_admin(server: LiveServer, name: str = "alice") -> None:
    server.cli("admin", "create", name, stdin=PASSWORD + "\n")


def shutdown_latency(server: LiveServer, pc: dict[str, Any]) -> float:
    """One shutdown signal as the client sends it (a fresh connection); seconds to answer."""
    body = f'{{"machine_id": "{pc["machine_id"]}", "reason": "shutdown"}}'
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=2)
    try:
        conn.request(
            "POST",
            "/api/client/shutdown",
            body,
            {"Content-Type": "application/json", "Authorization": f"Bearer {pc['token']}"},
        )
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    finally:
        conn.close()
    return time.perf_counter() - start


@pytest.mark.serial  # a latency bound: measured with nothing else running
def test_shutdown_signal_answers_fast_with_24_logins_in_flight(make_server: Any) -> None:
    # The production values (conftest sets nice 0 and the least argon2 cost).
    server = make_server(WCMS_HASH_NICE="10", **DEFAULT_COST)
    pc = register_pc(server)
    for _ in range(5):  # warm the token cache and the connection pool
        shutdown_latency(server, pc)
    # A running server has compiled its login page and started its hashing thread: the first
    # login of a fresh process does that once (about 0.2 s of CPU), which is not the flood.
    assert login(server, "nobody", "wrong password", address(10**5))[0] == 401
    stop = threading.Event()
    statuses: list[tuple[int, str]] = []
    counter = iter(range(10**6))
    lock = threading.Lock()

    def flood() -> None:
        while not stop.is_set():
            with lock:
                n = next(counter)
            # A new name from a new address each time: no per-name or per-address limit helps.
            result = login(server, f"nobody-{uuid.uuid4().hex[:8]}", "wrong password", address(n))
            with lock:
                statuses.append(result)

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(24)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the flood fills the hashing queue (and the database pool grows to match)
    latencies = []
    # 8 s of signals, about 250: with the 130 of 5 s, "p99" was the second-worst value, and one
    # stall of the machine alone decided the test (CI once saw p50 13 ms, p99 100.8 ms).
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        latencies.append(shutdown_latency(server, pc))
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    evaluated = sum(1 for status, _ in statuses if status == 401)
    p99 = statistics.quantiles(latencies, n=100)[98]
    print(
        f"shutdown p50 {statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
        f"{len(latencies)} signals; {len(statuses)} logins, {evaluated} checked"
    )
    assert evaluated >= 8, (
        f"the flood checked only {evaluated} passwords: it did not load the server"
    )
    assert p99 < 0.100, f"shutdown signal p99 {p99 * 1000:.0f} ms during the login flood"


def test_the_hashing_queue_is_bounded_in_all_and_per_address(make_server: Any) -> None:
    server = make_server(**DEFAULT_COST)
    results: list[tuple[int, str]] = []

    def at_once(sources: list[str]) -> None:
        barrier = threading.Barrier(len(sources))

        def one(n: int, source: str) -> None:
            barrier.wait()
            results.append(login(server, f"nobody-{n}-{source}", "wrong password", source))

        threads = [threading.Thread(target=one, args=(n, s)) for n, s in enumerate(sources)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(results) == len(sources)

    # 44 at once from 44 addresses: the queue takes MAX_IN_FLIGHT (a few more as the first
    # ones finish); the others are refused at once, without a hash.
    at_once([address(n) for n in range(MAX_IN_FLIGHT + 12)])
    refused = [r for r in results if r[0] == 429 and busy(r[1])]
    checked = [r for r in results if r[0] == 401]
    odd = [
        (status, re.sub(r"<[^>]+>|\s+", " ", page)[-300:])
        for status, page in results
        if (status, page) not in checked + refused
    ]
    assert len(refused) >= 8, (len(checked), len(refused), odd)
    assert not odd, odd

    # 9 at once from one address: at most PER_ADDRESS wait.
    results.clear()
    at_once(["127.0.0.9"] * (PER_ADDRESS + 5))
    refused = [r for r in results if r[0] == 429 and busy(r[1])]
    assert len(refused) >= 3, [r[0] for r in results]


def test_failed_logins_are_limited_per_address_whatever_the_name(make_server: Any) -> None:
    server = make_server()
    statuses = [login(server, f"nobody-{n}", "wrong password", "127.0.0.7") for n in range(11)]
    assert [s for s, _ in statuses[:10]] == [401] * 10
    assert statuses[10][0] == 429 and limited(statuses[10][1])


def test_failed_logins_are_limited_per_user_from_any_address(make_server: Any) -> None:
    server = make_server()
    make_admin(server)
    statuses = [login(server, "alice", "wrong password", address(n)) for n in range(11)]
    assert [s for s, _ in statuses[:10]] == [401] * 10
    assert statuses[10][0] == 429 and limited(statuses[10][1])
    other = login(server, "ALICE", "wrong password", address(50))  # names fold case
    assert other[0] == 429


def test_a_global_budget_limits_failed_logins_from_everywhere(make_server: Any) -> None:
    server = make_server()
    engine = sqlalchemy.create_engine(server.database.url)
    with engine.begin() as conn:  # as if 60 failures had just come from all over
        conn.execute(
            sqlalchemy.text("INSERT INTO rate_limits (key, tat) VALUES ('login:global', :tat)"),
            {"tat": time.time() + 600},
        )
    engine.dispose()
    status, page = login(server, "somebody", "wrong password", "127.0.0.8")
    assert status == 429 and limited(page)


def test_successful_logins_do_not_count_against_the_limits(make_server: Any) -> None:
    server = make_server()
    make_admin(server)
    statuses = [login(server, "alice", PASSWORD, "127.0.0.6")[0] for _ in range(14)]
    assert statuses == [302] * 14
