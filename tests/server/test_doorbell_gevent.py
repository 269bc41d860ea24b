"""The doorbell under gevent as the server runs it: the module is imported before the worker
patches the standard library (gunicorn's master imports the app first), and ringing a bulk
command's polls must only schedule them, not run them inside the admin's request."""

from __future__ import annotations

import json
import subprocess
import sys

# Imported first, patched after: the order of gunicorn's master and its gevent worker.
SCRIPT = """
import wcms.server.services.doorbell as doorbell
from gevent import monkey
monkey.patch_all()
import gevent

bell = doorbell.Doorbell()
order = []

def poll(pc_id):
    with bell.listen(pc_id) as waiting:
        if waiting.wait(5):
            order.append(pc_id)

polls = [gevent.spawn(poll, pc_id) for pc_id in range(50)]
gevent.sleep(0.05)
assert bell.waiting == 50, bell.waiting
rung = bell.ring(range(50))
order.append("rang %d" % rung)
gevent.joinall(polls, timeout=5)
import json
print(json.dumps(order))
"""


def test_a_ring_schedules_the_woken_polls_and_returns_before_any_of_them_runs() -> None:
    """With a Bell derived from threading.Event at import (before patching), set() switched to
    each woken poll at once: a bulk command's 1,000 deliveries ran inside ring(), and the
    admin's request answered after all of them (bench/bulk_command.py: p99 2.1 s)."""
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    order = json.loads(out)
    assert order[0] == "rang 50", order
    assert sorted(order[1:]) == list(range(50)), order
