"""Schemathesis against the served OpenAPI document: no 5xx, and no answer outside the schema.

A real server (gunicorn + gevent, SQLite or PostgreSQL) serves /api/openapi.json; schemathesis
generates requests for every operation from it, valid ones (positive) and invalid ones
(negative), with the test's API key on admin routes and a registered PC's token on the agent's.
Every answer must be a documented status code, with the documented content type and body
schema, and never a server error. The run is bounded and reproducible: a fixed number of
examples per operation and mode, derandomized generation, a total time budget.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import LiveServer, register_pc

pytestmark = pytest.mark.slow

# Examples per operation: valid requests, then invalid ones (generation costs ~50-100 ms an
# example, most of the run).
EXAMPLES = {GenerationMode.POSITIVE: 10, GenerationMode.NEGATIVE: 8}
BUDGET_SECONDS = 80.0  # the whole run, per database; negative cases stop when it is spent
REQUEST_TIMEOUT = 10.0
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Not fuzzed: the live stream never ends by design (it is a server-sent event stream that
# only closes when the admin loses access or the server stops), so a request to it cannot
# answer within a test. Its authentication is tested in tests/server/test_rooms.py.
EXCLUDED = {("GET", "/api/events")}


class Fuzz:
    """Per-case set-up: who calls, and the small changes that keep a case meaningful."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        pc = register_pc(server, machine_id="FUZZ-PC-0000-0001")
        self.pc_token = str(pc["token"])
        self.machine_id = str(pc["machine_id"])
        keys = server.admin("GET", "/api/apikeys")["apikeys"]
        self.own_key_id = next(k["id"] for k in keys if k["name"] == "tests")
        # Rows for small ids to find: a room, and a command queued for the fuzzer's PC (so
        # `ack` and `result` with id 1 reach the command itself).
        server.admin("POST", "/api/rooms", {"name": "Fuzz lab", "rows": 2, "cols": 2})
        target = {"pc_ids": [pc["pc_id"]]}
        server.admin("POST", "/api/commands", {"type": "lock", "target": target})
        self.session = requests.Session()

    def headers(self, case: Any) -> dict[str, str]:
        security = case.operation.definition.raw.get("security") or []
        schemes = {name for req in security for name in req}
        if "pcToken" in schemes:
            return {"Authorization": f"Bearer {self.pc_token}"}
        if "apiKey" in schemes:
            return {"Authorization": f"Bearer {self.server.api_key}"}
        return {}

    def adjust(self, case: Any, mode: GenerationMode) -> None:
        """Keep a case from cutting the fuzzer off from the API or waiting for minutes."""
        path, method = case.operation.path, case.method.upper()
        if mode == GenerationMode.POSITIVE and path.startswith("/api/client/"):
            # The PC's own machine id, so a valid case passes authentication and reaches the
            # model's other fields and the database (a random one is only a 403).
            for part in (case.body, case.query):
                if isinstance(part, dict) and "machine_id" in part:
                    part["machine_id"] = self.machine_id
        if path == "/api/apikeys/{key_id}" and case.path_parameters.get("key_id") == (
            self.own_key_id
        ):
            # Revoking the fuzzer's own key would make every later admin case a plain 401.
            case.path_parameters["key_id"] = self.own_key_id + 1000
        if (method, path) == ("GET", "/api/client/commands"):
            # The long poll waits up to poll_timeout (tens of seconds) when nothing is queued:
            # a short wait keeps every case quick; the value's validation is still fuzzed.
            query = case.query if isinstance(case.query, dict) else {}
            timeout = query.get("timeout")
            if timeout is None or _number(timeout) is not None:
                query["timeout"] = "0.05"
            case.query = query


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def run_operation(
    fuzz: Fuzz, operation: Any, mode: GenerationMode, examples: int, deadline: float
) -> list[str]:
    """Fuzz one operation in one mode; the failures found, as readable lines."""
    failures: list[str] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: the budget is for finding
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        if time.monotonic() > deadline or len(failures) >= 3:
            return
        fuzz.adjust(case, mode)
        headers = fuzz.headers(case)
        response = case.call(
            base_url=fuzz.server.url,
            session=fuzz.session,
            headers=headers,
            timeout=REQUEST_TIMEOUT,
        )
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (AssertionError, FailureGroup) as exc:  # every failure, not only the first
            failures.append(f"{case.method} {case.formatted_path} [{mode}]: {exc}"[:3000])

    try:
        check()
    except Unsatisfiable:
        # Negative mode on an operation with nothing to make invalid (no parameters, no body).
        assert mode == GenerationMode.NEGATIVE, operation.label
    return failures


def fuzz_server(server: LiveServer) -> None:
    fuzz = Fuzz(server)
    schema = schemathesis.openapi.from_url(server.url + "/api/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    operations = [op for op in operations if (op.method.upper(), op.path) not in EXCLUDED]
    # Agent routes first, then the admin's: an admin case may delete the fuzzer's PC.
    operations.sort(key=lambda op: (not op.path.startswith("/api/client/"), op.path, op.method))
    assert len(operations) >= 30, [op.label for op in operations]
    deadline = time.monotonic() + BUDGET_SECONDS
    failures: list[str] = []
    done: dict[GenerationMode, int] = {}
    for mode, examples in EXAMPLES.items():
        done[mode] = 0
        for op in operations:
            if time.monotonic() > deadline:
                break
            failures += run_operation(fuzz, op, mode, examples, deadline)
            done[mode] += 1
    assert not failures, "\n\n".join(failures)
    # Valid requests to every operation are the core of the run: the budget must cover them.
    # Invalid ones are sent to as many operations as the rest of the budget allows.
    assert done[GenerationMode.POSITIVE] == len(operations), done
    print(f"fuzzed {len(operations)} operations: {done}")
    assert "Traceback" not in server.log(), server.log()[-5000:]


@pytest.mark.timeout(BUDGET_SECONDS + 90)
# Hypothesis warns when the global `random` state moves while it draws a case. The server runs in
# another process; what moves it here is another test's leftover thread in this process (the
# full suite runs many), not a strategy of ours: not a reason to fail the fuzzing.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
def test_every_operation_answers_within_its_schema(make_server: Any) -> None:
    fuzz_server(make_server())
