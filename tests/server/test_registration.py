"""Registration PINs: single and multi use, expiry, revocation, and the wrong-PIN rate limit."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from sqlalchemy.orm import Session

from tests.conftest import LiveServer
from wcms.server.errors import http_status
from wcms.server.models import RegistrationPin
from wcms.server.runtime import Runtime
from wcms.server.services import accounts, ratelimit
from wcms.server.services.errors import DomainError

T0 = dt.datetime(2026, 11, 26, 9, 0, tzinfo=dt.UTC)


def register(server: LiveServer, pin: str, machine_id: str | None = None) -> tuple[int, dict]:  # type: ignore[type-arg]
    body = {
        "pin": pin,
        "machine_id": machine_id or f"TEST-{uuid.uuid4().hex[:16]}",
        "hostname": "lab",
    }
    return server.api("POST", "/api/client/register", body)


def test_single_use_pin_works_once(live_server: LiveServer) -> None:
    pin = live_server.create_pin()
    assert register(live_server, pin)[0] == 201
    status, body = register(live_server, pin)
    # The same answer as a wrong PIN: a guesser must not learn which PINs exist.
    assert status == 403 and body["error"]["code"] == "invalid_pin"
    assert "already used" in body["error"]["message"]


def test_multi_use_pin_registers_a_room(live_server: LiveServer) -> None:
    pin = live_server.create_pin(multi=True)
    for _ in range(5):
        assert register(live_server, pin)[0] == 201
    pins = live_server.admin("GET", "/api/pins")["pins"]
    assert pins[0]["uses"] == 5 and pins[0]["live"] is True
    assert pin not in str(pins)  # the list never shows a PIN again


def test_wrong_and_revoked_pins_are_refused(live_server: LiveServer) -> None:
    pin = live_server.create_pin()
    wrong = f"{(int(pin) + 1) % 1_000_000:06d}"
    status, body = register(live_server, wrong)
    assert status == 403 and body["error"]["code"] == "invalid_pin"
    pin_id = live_server.admin("GET", "/api/pins")["pins"][0]["id"]
    live_server.admin("DELETE", f"/api/pins/{pin_id}")
    status, body = register(live_server, pin)
    assert status == 403 and body["error"]["code"] == "invalid_pin"
    assert live_server.pcs() == []


def test_expired_pin_is_refused_like_a_wrong_one(session: Session, rt: Runtime) -> None:
    row, pin = accounts.create_pin(session, rt.secret_key, "t", T0, dt.timedelta(minutes=10))
    session.commit()
    assert (
        accounts.consume_pin(session, rt.secret_key, pin, T0 + dt.timedelta(minutes=9)).id == row.id
    )
    session.rollback()
    with pytest.raises(DomainError) as err:
        accounts.consume_pin(session, rt.secret_key, pin, T0 + dt.timedelta(minutes=10))
    assert (http_status(err.value), err.value.code) == (403, "invalid_pin")


def test_pins_are_kept_only_as_hmacs(session: Session, rt: Runtime) -> None:
    row, pin = accounts.create_pin(session, rt.secret_key, "t", T0, dt.timedelta(minutes=10))
    session.commit()
    stored = session.get(RegistrationPin, row.id)
    assert stored is not None and pin not in (stored.pin_hmac, stored.hint)
    assert len(stored.pin_hmac) == 64 and stored.hint == pin[-2:]


def test_default_pin_expiry_is_ten_minutes(live_server: LiveServer) -> None:
    data = live_server.admin("POST", "/api/pins", {})
    created = dt.datetime.fromisoformat(data["created_at"].replace("Z", "+00:00"))
    expires = dt.datetime.fromisoformat(data["expires_at"].replace("Z", "+00:00"))
    assert expires - created == dt.timedelta(minutes=10)
    assert len(data["pin"]) == 6 and data["pin"].isdigit()


def test_guessing_is_rate_limited_but_a_room_behind_one_address_is_not(
    live_server: LiveServer,
) -> None:
    # 60 PCs of one room, all behind the same address, registering with the right PIN.
    pin = live_server.create_pin(multi=True)
    assert all(register(live_server, pin)[0] == 201 for _ in range(60))
    # Someone guessing from that address is stopped after the burst...
    statuses = [
        register(live_server, "000000" if pin != "000000" else "111111")[0] for _ in range(40)
    ]
    assert statuses[:30] == [403] * 30 and set(statuses[30:]) == {429}
    status, body = register(live_server, "123123")
    assert status == 429 and body["error"]["code"] == "rate_limited"


def test_shared_limit_takes_atomically_gives_back_and_refills(rt: Runtime) -> None:
    rule = ratelimit.Rule(per_minute=6, burst=3)
    for _ in range(3):
        assert rt.limiters.rates.take("a", rule, now=1000.0) == 0
    assert rt.limiters.rates.take("a", rule, now=1000.0) == pytest.approx(10.0)
    assert rt.limiters.rates.take("b", rule, now=1000.0) == 0  # other keys are untouched
    rt.limiters.rates.give_back("a", rule)  # a success gives its try back
    assert rt.limiters.rates.take("a", rule, now=1000.0) == 0
    assert rt.limiters.rates.take("a", rule, now=1000.0) > 0
    assert rt.limiters.rates.take("a", rule, now=1010.0) == 0  # one failure's worth refilled
    assert rt.limiters.rates.prune(now=2000.0) == 2  # refilled buckets hold nothing: forgotten
