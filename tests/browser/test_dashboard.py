"""The dashboard in real headless Chromium against the real server (and real client processes)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.browser.conftest import (
    Dashboard,
    add_pc,
    heartbeat,
    make_room,
    seat,
    shutdown,
)
from tests.client.clientproc import ClientProcess

HOSTILE = "<img src=x onerror=alert(1)>"


def seat_selector(pc_id: int) -> str:
    return f"#grid .seat[data-pc='{pc_id}']"


def test_login_wrong_password_then_right_then_logout(dash: Dashboard) -> None:
    page = dash.page
    page.goto(dash.url("/rooms/1"))
    assert "/login" in page.url  # not logged in: sent to the login page
    page.fill("#username", "alice")
    page.fill("#password", "not the password")
    page.click("button[type=submit]")
    assert page.text_content(".error") == "Wrong user name or password."
    page.fill("#username", "nobody")
    page.fill("#password", "not the password")
    page.click("button[type=submit]")
    assert page.text_content(".error") == "Wrong user name or password."  # same words
    dash.login()
    page.wait_for_selector("body[data-ready='1']")
    assert page.text_content("header .who") == "alice"
    page.click("form.logout button")
    page.wait_for_url(dash.url("/login"))
    page.goto(dash.url("/"))
    assert "/login" in page.url


def test_room_grid_shows_registered_pcs_in_their_seats(dash: Dashboard) -> None:
    server = dash.server
    room = make_room(server, "Lab 301", 2, 3)
    a = add_pc(server, "lab301-01")
    b = add_pc(server, "lab301-06")
    loose = add_pc(server, "spare-pc")
    seat(server, a["pc_id"], room, 1, 1)
    seat(server, b["pc_id"], room, 2, 3)
    heartbeat(server, a, cpu_percent=42.0, ram_percent=61.0, current_user="kim")
    dash.login()
    dash.open(f"/rooms/{room}")
    page = dash.page
    cells = page.locator("#grid > .seat")
    assert cells.count() == 6
    assert cells.nth(0).get_attribute("data-pc") == str(a["pc_id"])
    assert cells.nth(5).get_attribute("data-pc") == str(b["pc_id"])
    assert page.locator("#grid > .seat.empty").count() == 4
    assert page.text_content(seat_selector(a["pc_id"]) + " .host") == "lab301-01"
    assert page.get_attribute(seat_selector(a["pc_id"]), "data-status") == "online"
    assert page.text_content(".count.st-online b") == "2"
    # The spare PC is listed apart, not in the grid.
    assert page.text_content(f"#unassigned .seat[data-pc='{loose['pc_id']}'] .host") == "spare-pc"
    # Load and user arrive with the next metrics frame, without a reload.
    user = seat_selector(a["pc_id"]) + " .user"
    page.wait_for_function(
        f"() => document.querySelector(\"{user}\").textContent === 'kim'", timeout=10_000
    )


def test_shutdown_of_a_real_client_turns_its_seat_off_within_a_second(
    dash: Dashboard, tmp_path: Path
) -> None:
    server = dash.server
    room = make_room(server, "Lab 302", 1, 2)
    client = ClientProcess(tmp_path, server.url, pin=server.create_pin()).start()
    try:
        client.wait_log("Heartbeat sent with event=boot")
        pc_id = server.wait_pc(client.machine_id, state="online")["id"]
        seat(server, pc_id, room, 1, 2)
        dash.login()
        dash.open(f"/rooms/{room}")
        page = dash.page
        sel = seat_selector(pc_id)
        assert page.get_attribute(sel, "data-status") == "online"
        # Note the browser's wall-clock time of the change, then power the PC "off".
        page.evaluate(
            """sel => new Promise(ready => {
                const node = document.querySelector(sel);
                new MutationObserver(() => {
                    if (node.dataset.status === 'off' && !window.offAt) window.offAt = Date.now();
                }).observe(node, {attributes: true});
                ready();
            })""",
            sel,
        )
        client.system_going_down(True)
        signalled = time.time()
        assert client.proc is not None
        client.proc.send_signal(15)
        page.wait_for_function("() => window.offAt !== undefined", timeout=5_000)
        latency = page.evaluate("window.offAt") / 1000 - signalled
        print(f"\nseat turned off {latency * 1000:.0f} ms after SIGTERM to the client")
        assert latency < 1.0
        assert page.text_content(sel + " .label") == "Off"
        assert page.text_content(".count.st-off b") == "1"
        client.proc.wait(timeout=10)
    finally:
        client.kill()


def test_shutdown_signal_over_http_turns_the_seat_off_within_a_second(dash: Dashboard) -> None:
    server = dash.server
    room = make_room(server, "Lab 303", 1, 1)
    pc = add_pc(server, "lab303-01")
    seat(server, pc["pc_id"], room, 1, 1)
    dash.login()
    dash.open(f"/rooms/{room}")
    sel = seat_selector(pc["pc_id"])
    started = time.monotonic()
    shutdown(server, pc, reason="restart")
    dash.page.wait_for_function(
        f'() => document.querySelector("{sel}").dataset.status === "restarting"',
        polling="raf",
        timeout=5_000,
    )
    latency = time.monotonic() - started
    print(f"\nseat turned 'restarting' {latency * 1000:.0f} ms after the shutdown signal")
    assert latency < 1.0


def test_drag_select_two_pcs_and_send_a_message_shows_the_result_per_pc(
    dash: Dashboard, tmp_path: Path
) -> None:
    server = dash.server
    room = make_room(server, "Lab 304", 2, 3)
    pin = server.create_pin(multi=True)
    # Three real client processes (power commands only recorded); the message itself is real.
    clients = [
        ClientProcess(tmp_path, server.url, pin=pin, env={"WCMS_DRY_RUN_POWER": "1"})
        for _ in range(3)
    ]
    try:
        for client in clients:
            client.start()
        pcs = [server.wait_pc(c.machine_id, timeout=30, state="online") for c in clients]
        for col, pc in enumerate(pcs, start=1):
            seat(server, pc["id"], room, 1, col)
        for client in clients:  # each holds its command poll open
            client.wait_log("Command channel")
        dash.login()
        dash.open(f"/rooms/{room}")
        page = dash.page
        first = page.locator(seat_selector(pcs[0]["id"])).bounding_box()
        second = page.locator(seat_selector(pcs[1]["id"])).bounding_box()
        assert first and second
        page.mouse.move(first["x"] + 8, first["y"] + first["height"] - 6)
        page.mouse.down()
        page.mouse.move(second["x"] + second["width"] - 8, second["y"] + 20, steps=8)
        page.mouse.move(second["x"] + second["width"] - 8, second["y"] + 25, steps=2)
        page.mouse.up()
        assert page.locator("#grid .seat.selected").count() == 2
        assert page.text_content("#selection-info") == "2 selected"
        page.click("#actions button[data-action='message']")
        page.fill("#arg-text", "Class ends in 5 minutes")
        page.click("dialog.action-dialog button[type=submit]")
        rows = page.locator("#batch .batch-rows li")
        done = "#batch .batch-rows li[data-status=succeeded]"
        page.wait_for_function(
            f"() => document.querySelectorAll('{done}').length === 2", timeout=15_000
        )
        assert rows.count() == 2
        shown = sorted(int(rows.nth(i).get_attribute("data-pc") or 0) for i in range(2))
        assert shown == sorted([pcs[0]["id"], pcs[1]["id"]])
        assert "2 of 2 finished" in (page.text_content("#batch .batch-summary") or "")
        for client in clients[:2]:
            client.wait_log("(message)")
        assert "Running command" not in clients[2].log()  # the third PC was not selected
    finally:
        for client in clients:
            if client.returncode is None:
                client.terminate()


def test_layout_editor_moves_a_pc_to_a_seat_and_to_another_room(dash: Dashboard) -> None:
    server = dash.server
    a_room = make_room(server, "Lab A", 2, 2)
    b_room = make_room(server, "Lab B", 2, 2)
    pc = add_pc(server, "mover-01")
    seat(server, pc["pc_id"], a_room, 1, 1)
    dash.login()
    dash.open(f"/layout?room={a_room}")
    page = dash.page
    chip = f".slot .chip[data-pc='{pc['pc_id']}']"
    page.drag_and_drop(chip, ".slot[data-row='2'][data-col='2']")
    page.wait_for_selector(f".slot[data-row='2'][data-col='2'] .chip[data-pc='{pc['pc_id']}']")
    moved = server.admin("GET", f"/api/pcs/{pc['pc_id']}")
    assert (moved["room_id"], moved["seat"]) == (a_room, {"row": 2, "col": 2})
    # To another room: drop it on that room in the list.
    page.drag_and_drop(chip, f"#room-list li[data-room='{b_room}']")
    page.wait_for_function(
        f"() => !document.querySelector(\".slot .chip[data-pc='{pc['pc_id']}']\")", timeout=5_000
    )
    moved = server.admin("GET", f"/api/pcs/{pc['pc_id']}")
    assert (moved["room_id"], moved["seat"]) == (b_room, None)
    entries = server.admin("GET", "/api/audit")["entries"]
    assert [e["action"] for e in entries[:2]] == ["pc.seat", "pc.seat"]


def test_layout_editor_tap_to_pick_then_tap_a_seat(dash: Dashboard) -> None:
    server = dash.server
    room = make_room(server, "Lab T", 1, 3)
    pc = add_pc(server, "tapped-01")
    dash.login()
    dash.open(f"/layout?room={room}")
    page = dash.page
    page.click(f"#pool .chip[data-pc='{pc['pc_id']}']")
    page.wait_for_selector("#picked-hint:not([hidden])")
    page.click(".slot[data-row='1'][data-col='3']")
    page.wait_for_selector(f".slot[data-col='3'] .chip[data-pc='{pc['pc_id']}']")
    assert server.admin("GET", f"/api/pcs/{pc['pc_id']}")["seat"] == {"row": 1, "col": 3}


def wait_written(server: Any, pc_id: int, timeout: float = 10) -> None:
    """Until the PC's buffered heartbeat (with its process list) is in the database."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = server.admin("GET", f"/api/pcs/{pc_id}")["metrics"]
        if metrics and metrics["processes"]:
            return
        time.sleep(0.05)
    raise AssertionError(f"PC {pc_id}: no process list written within {timeout}s")


def test_a_hostile_hostname_and_room_name_show_as_text(dash: Dashboard) -> None:
    server = dash.server
    room = make_room(server, "<script>alert(2)</script>", 1, 2)
    pc = add_pc(server, HOSTILE)
    seat(server, pc["pc_id"], room, 1, 1)
    heartbeat(server, pc, current_user="<b>bold</b>", processes=["<svg onload=alert(3)>"])
    wait_written(server, pc["pc_id"])  # heartbeats are written in batches
    dash.login()
    page = dash.page
    dash.open("/")
    assert page.text_content(".tile h2") == "<script>alert(2)</script>"
    dash.open(f"/rooms/{room}")
    assert page.text_content(seat_selector(pc["pc_id"]) + " .host") == HOSTILE
    assert page.text_content("#room-name") == "<script>alert(2)</script>"
    assert page.locator("#grid img, #grid b, main script").count() == 0
    dash.open(f"/pcs/{pc['pc_id']}")
    assert page.text_content("#pc-host") == HOSTILE
    page.wait_for_selector("#pc-processes .pname")
    assert page.text_content("#pc-processes .pname") == "<svg onload=alert(3)>"
    assert page.locator("main img, main svg [onload]").count() == 0
    dash.open("/layout")
    assert page.locator(".chip .host").first.text_content() == HOSTILE
    page.wait_for_timeout(300)  # give any injected handler the chance to fire (it must not)
    assert dash.dialogs == []


def test_pages_carry_a_csp_without_inline_scripts(dash: Dashboard) -> None:
    dash.login()
    for path in ("/", "/layout", "/admin"):
        resp = dash.open(path)
        csp = resp.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert "unsafe-eval" not in csp
    # The session cookie is HttpOnly and SameSite=Lax.
    cookie = next(c for c in dash.page.context.cookies() if c["name"] == "wcms_session")
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Lax"


def test_language_follows_the_browser_and_the_switch_is_remembered(
    live_server: Any, chromium: Any
) -> None:
    from tests.browser.conftest import create_admin

    create_admin(live_server)
    context = chromium.new_context(locale="ko-KR", extra_http_headers={"Accept-Language": "ko-KR"})
    try:
        page = context.new_page()
        page.goto(live_server.url + "/login")
        assert page.text_content("h1") == "WCMS 로그인"
        page.click("a[lang='en']")
        assert page.text_content("h1") == "Sign in to WCMS"
        page.goto(live_server.url + "/login")
        assert page.text_content("h1") == "Sign in to WCMS"  # remembered in a cookie
    finally:
        context.close()


def test_admin_creates_a_pin_and_an_admin(dash: Dashboard) -> None:
    dash.login()
    dash.open("/admin")
    page = dash.page
    page.click("#pin-form button[type=submit]")
    page.wait_for_selector("#pin-new .secret")
    pin = page.text_content("#pin-new .secret") or ""
    assert len(pin) == 6 and pin.isdigit()
    page.wait_for_function("() => document.querySelectorAll('#pins tbody tr').length === 1")
    page.fill("#admin-username", "bob")
    page.click("#admin-form button[type=submit]")
    page.wait_for_selector("#admin-new .secret")
    password = page.text_content("#admin-new .secret") or ""
    assert len(password) >= 10
    names = [a["username"] for a in dash.server.admin("GET", "/api/admins")["admins"]]
    assert names == ["alice", "bob"]
