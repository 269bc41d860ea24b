"""Delete each named guard in turn and show that a test fails for it (tools/mutants.sh).

Each guard is the exact source text of a check (a unique snippet of one file) and what is left
when the check is deleted. The script copies the repository's files (tracked, and untracked but
not ignored) to a temporary directory, runs the guards' tests there once unchanged (they must
pass), then for each guard: applies the deletion, runs only that guard's tests, and restores the
file. A guard is "killed" when a test fails, "SURVIVED" when they all pass. The exit status is 1
when any guard survived, its snippet is not found exactly once (the code moved: update the list),
or a run went wrong. The working tree is never touched.

    bash tools/mutants.sh                 # every guard
    bash tools/mutants.sh deliver ack     # only these
    bash tools/mutants.sh --list
    bash tools/mutants.sh --each          # every named test must fail on its own
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RACES = "tests/server/test_races.py"
CQ = "src/wcms/server/services/command_queue.py"
PCS = "src/wcms/server/services/pc_service.py"
NODES = "tests/server/test_nodes.py"
RUNTIME = "src/wcms/server/runtime.py"
REVOKED_ON_B = "test_a_token_revoked_or_a_mode_changed_through_one_node_holds_on_the_other_at_once"
TIMEOUT = 900  # seconds for one guard's tests


@dataclass(frozen=True)
class Guard:
    name: str
    path: str
    snippet: str  # the guard as it is in the source, exactly once in `path`
    deleted: str  # the same text with the guard deleted
    tests: tuple[str, ...]  # node ids; one of them must fail without the guard


GUARDS = [
    Guard(
        "lost-checker",
        PCS,
        """                .where(
                    pc_table.c.id == pc_id,
                    pc_table.c.state == PcState.ONLINE,
                    pc_table.c.offline_after < now,
                )""",
        "                .where(pc_table.c.id == pc_id)",
        (
            f"{RACES}::test_two_checkers_flip_a_late_pc_lost_once",
            "tests/server/test_presence.py::test_two_processes_never_double_flip",
        ),
    ),
    Guard(
        "mark-online",
        PCS,
        "guard = [pc_table.c.id == pc_id, pc_table.c.state == PcState.OFFLINE]",
        "guard = [pc_table.c.id == pc_id]",
        (f"{RACES}::test_two_heartbeats_bring_an_offline_pc_back_once",),
    ),
    Guard(
        "signed-off-return",
        PCS,
        "        guard.append(pc_table.c.reason.not_in(SHUTDOWN_REASONS))\n",
        "        pass\n",
        (
            f"{RACES}::test_a_poll_reviving_a_lost_pc_racing_its_shutdown_signal_ends_off",
            "tests/server/test_client_api.py::"
            "test_a_late_heartbeat_or_poll_of_an_agent_that_signed_off_does_not_revive_it",
        ),
    ),
    Guard(
        "contact-online-only",
        PCS,
        "update(_PC).where(_PC.c.id == pc_id, _PC.c.state == PcState.ONLINE).values(contact)",
        "update(_PC).where(_PC.c.id == pc_id).values(contact)",
        (f"{RACES}::test_a_plain_heartbeat_racing_the_shutdown_signal_never_outlives_it",),
    ),
    Guard(
        "signal-reason-offline-only",
        PCS,
        "offline = (_PC.c.machine_id == machine_id, _PC.c.state == PcState.OFFLINE)",
        "offline = (_PC.c.machine_id == machine_id,)",
        (
            "tests/server/test_presence.py::"
            "test_a_pc_back_online_between_the_signals_two_statements_goes_off",
            f"{RACES}::test_a_poll_reviving_a_lost_pc_racing_its_shutdown_signal_ends_off",
        ),
    ),
    Guard(
        "migration-lock",
        "src/wcms/server/migrate.py",
        'if conn.dialect.name == "postgresql":',
        "if False:",
        (
            "tests/server/test_migrations.py::"
            "test_two_nodes_migrating_one_postgresql_database_at_once_both_succeed",
        ),
    ),
    Guard(
        "secret-agreement",
        "src/wcms/server/services/secretbox.py",
        "if row is None or not hmac.compare_digest(row.value, mine):",
        "if row is None:",
        (
            "tests/server/test_nodes.py::test_a_node_with_another_secret_is_refused_before_it_serves",
        ),
    ),
    Guard(
        "announce-only-when-running",
        "src/wcms/client/main.py",
        """            if self._final is not None or self._sleeping:
                return
""",
        "",
        (
            "tests/client/test_decisions.py::"
            "test_signed_off_answers_a_late_heartbeat_quietly_and_a_running_agent_by_announcing",
        ),
    ),
    Guard(
        "shutdown-signal",
        PCS,
        '.where(_PC.c.machine_id == bindparam("b_mid"), _PC.c.state == PcState.ONLINE)',
        '.where(_PC.c.machine_id == bindparam("b_mid"))',
        (
            "tests/server/test_presence.py::"
            "test_shutdown_signal_is_idempotent_and_keeps_the_freshest_reason",
        ),
    ),
    Guard(
        "deliver",
        CQ,
        """            Command.status == cmd.status,
            Command.attempts == cmd.attempts,
""",
        "",
        (f"{RACES}::test_two_polls_deliver_a_command_once",),
    ),
    Guard(
        "acknowledge",
        CQ,
        """.where(Command.id == cmd.id, Command.status.in_(OPEN))
            .values(status=CommandStatus.RUNNING""",
        """.where(Command.id == cmd.id)
            .values(status=CommandStatus.RUNNING""",
        (
            f"{RACES}::test_two_acks_start_a_command_once",
            f"{RACES}::test_an_ack_racing_a_cancel_either_runs_or_cancels",
        ),
    ),
    Guard(
        "record_result",
        CQ,
        """            or_(
                not_(Command.status.in_(FINAL_COMMAND_STATUSES)),
                and_(Command.status == CommandStatus.FAILED, Command.error == NO_RESULT),
            ),
""",
        "",
        (f"{RACES}::test_two_copies_of_a_result_are_stored_once",),
    ),
    Guard(
        "cancel-and-expire",  # _finish_open(): cancel(), expire_overdue(), deliver()'s refusals
        CQ,
        """.where(Command.id == cmd.id, Command.status.in_(OPEN))
        .values(status=status,""",
        """.where(Command.id == cmd.id)
        .values(status=status,""",
        (
            f"{RACES}::test_two_cancels_cancel_once",
            f"{RACES}::test_an_ack_racing_a_cancel_either_runs_or_cancels",
            f"{RACES}::test_an_ack_racing_the_expiry_sweep_either_runs_or_expires",
        ),
    ),
    Guard(
        "expire-silent",
        CQ,
        ".where(Command.id == cmd.id, Command.status == CommandStatus.RUNNING)",
        ".where(Command.id == cmd.id)",
        (f"{RACES}::test_a_result_racing_the_silence_sweep_is_kept",),
    ),
    Guard(
        "outbox-mark",
        "src/wcms/server/services/outbox.py",
        '.where(_C.c.id == bindparam("b_id"), _C.c.status == CommandStatus.QUEUED)',
        '.where(_C.c.id == bindparam("b_id"))',
        (f"{RACES}::test_an_ack_racing_the_outbox_mark_counts_one_delivery",),
    ),
    Guard(
        "apply_kept-state",
        "src/wcms/server/services/spool.py",
        ".where(*same_pc, quiet_since, _PC.c.state == PcState.ONLINE)",
        ".where(*same_pc, quiet_since)",
        (f"{RACES}::test_a_kept_shutdown_signal_replayed_twice_at_once_applies_once",),
    ),
    Guard(
        "apply_kept-no-contact-since",
        "src/wcms/server/services/spool.py",
        ".where(*same_pc, quiet_since, _PC.c.state == PcState.ONLINE)",
        ".where(*same_pc, _PC.c.state == PcState.ONLINE)",
        (f"{RACES}::test_a_kept_signal_replayed_as_its_pc_comes_back_never_turns_it_off",),
    ),
    Guard(
        "pin-consumption",
        "src/wcms/server/services/accounts.py",
        "table(RegistrationPin).c.multi_use | (table(RegistrationPin).c.uses == 0),",
        "True,",
        (f"{RACES}::test_two_pcs_racing_for_a_single_use_pin_one_wins",),
    ),
    Guard(
        "rate-limit-take",
        "src/wcms/server/services/ratelimit.py",
        '_RL.c.tat - bindparam("rl_now") <= bindparam("rl_tau")',
        "True",
        (f"{RACES}::test_two_requests_racing_for_the_last_token_of_a_limit_one_passes",),
    ),
    Guard(
        "reregister-with-token",
        PCS,
        ".where(_CRED.c.pc_id == pc_id, _CRED.c.token_hash == sha256(token))",
        ".where(_CRED.c.pc_id == pc_id)",
        (
            "tests/security/test_machine_takeover.py::"
            "test_two_registrations_racing_with_the_current_token_cannot_both_win",
            "tests/security/test_machine_takeover.py::"
            "test_a_live_pin_cannot_take_over_a_known_machine",
        ),
    ),
    Guard(
        "reregister-window",
        PCS,
        ".where(_PC.c.id == pc_id, _PC.c.reregister_until > now)",
        ".where(_PC.c.id == pc_id)",
        (
            "tests/security/test_machine_takeover.py::"
            "test_two_registrations_racing_in_one_allowed_window_cannot_both_win",
            "tests/security/test_machine_takeover.py::"
            "test_a_live_pin_cannot_take_over_a_known_machine",
        ),
    ),
    Guard(
        "approval-at-queue",
        CQ,
        "select(PcInfo.id).where(PcInfo.id.in_(pc_ids), PcInfo.approved.is_(False))",
        "select(PcInfo.id).where(PcInfo.id.in_(pc_ids), False)",
        (
            "tests/security/test_machine_takeover.py::"
            "test_a_pc_registered_by_pin_alone_gets_no_secret_until_approved",
        ),
    ),
    Guard(
        "approval-at-delivery",
        CQ,
        "approved = exists().where(PcInfo.id == pc_id, PcInfo.approved.is_(True))",
        "approved = exists().where(PcInfo.id == pc_id)",
        (
            "tests/security/test_machine_takeover.py::"
            "test_an_admin_allows_one_reregistration_and_the_newcomer_starts_unapproved",
        ),
    ),
    Guard(
        "token-of-another-pc",
        "src/wcms/server/services/agent.py",
        """        rt.tokens.remember(digest, *hit)
    if not hmac.compare_digest(hit[1], machine_id):""",
        """        rt.tokens.remember(digest, *hit)
    if False:""",
        ("tests/server/test_client_api.py::test_token_is_bound_to_its_machine",),
    ),
    Guard(
        "last-active-admin",
        "src/wcms/server/services/accounts.py",
        "if session.execute(count).scalar_one() <= 1:",
        "if False:",
        (
            "tests/server/test_rooms.py::test_disable_enable_and_the_last_active_admin",
            "tests/server/test_cli.py::"
            "test_admin_disable_keeps_one_active_admin_and_enable_undoes_it",
        ),
    ),
    Guard(
        "limit-first-insert-race",
        "src/wcms/server/services/ratelimit.py",
        """                if wait > 0:
                    return wait""",
        "                return max(0.001, wait)",
        (f"{RACES}::test_the_first_requests_of_a_key_racing_its_insert_all_pass",),
    ),
    # What one node tells the others (server/notifier.py): each message, deleted.
    Guard(
        "notify-wake",
        "src/wcms/server/api/commands.py",
        "    rt.wake(s, pc_ids)  # the other processes' polls, woken when this commits\n",
        "",
        (f"{NODES}::test_a_command_queued_through_one_node_wakes_a_poll_waiting_on_the_other",),
    ),
    Guard(
        "notify-live",
        RUNTIME,
        """        self.bus.publish(message)
        self.notifier.post(message)""",
        "        self.bus.publish(message)",
        (
            f"{NODES}::test_a_shutdown_signal_through_one_node_reaches_a_dashboard_stream_on_the_other",
        ),
    ),
    Guard(
        "notify-revoke-on-register",
        "src/wcms/server/api/client.py",
        "        rt.revoke(s, pc.id)  # its old token dies in the other processes on commit\n",
        "",
        (f"{NODES}::{REVOKED_ON_B}",),
    ),
    Guard(
        "notify-revoke-on-delete",
        "src/wcms/server/api/management.py",
        "    rt.revoke(s, pc_id)  # the other processes forget its token when this commits\n",
        "",
        (f"{NODES}::{REVOKED_ON_B}",),
    ),
    Guard(
        "notify-settings",
        "src/wcms/server/api/management.py",
        "    rt.settings_changed(s, PresenceMode(req.presence_mode))  # the others, on commit\n",
        "",
        (f"{NODES}::{REVOKED_ON_B}",),
    ),
    Guard(
        "leader-lease",
        "src/wcms/server/lease.py",
        '_TAKE = text(f"SELECT pg_try_advisory_lock({_KEY})")',
        '_TAKE = text("SELECT true")',
        (
            f"{NODES}::test_exactly_one_node_leads_and_a_standby_takes_over_when_it_dies",
            "tests/server/test_workers.py::"
            "test_two_workers_deliver_a_bulk_command_once_to_polls_held_by_either",
        ),
    ),
    Guard(
        "sqlite-one-worker",
        "src/wcms/server/config.py",
        "if settings.workers > 1 and settings.on_sqlite:",
        "if False:",
        (
            "tests/server/test_workers.py::test_more_than_one_worker_on_sqlite_is_refused_in_one_line",
        ),
    ),
    Guard(
        "shared-data-dir",
        "src/wcms/server/config.py",
        "    if info.st_mode & (stat.S_ISVTX | stat.S_IWOTH):",
        "    if False:",
        (
            "tests/security/test_file_modes.py::"
            "test_a_data_dir_every_user_may_write_to_is_refused_and_left_as_it_was",
        ),
    ),
    Guard(
        "resync-on-reconnect",
        "src/wcms/server/notifier.py",
        """                        log.warning("notifier connected again: caches resync")
                        self.resync()""",
        """                        log.warning("notifier connected again: caches resync")""",
        (f"{NODES}::test_a_listener_that_lost_its_connection_resyncs_and_hears_again",),
    ),
    # What several processes keep in the database (issue 12), deleted.
    Guard(
        "sample-per-slot",
        "src/wcms/server/migrations/versions/0004_scale_out.py",
        '["pc_id", "slot"], unique=True',
        '["pc_id", "slot"], unique=False',
        (
            "tests/server/test_heartbeat_writer.py::"
            "test_two_processes_write_one_history_sample_per_pc_and_slot",
        ),
    ),
    Guard(
        "lists-compared-with-db",
        "src/wcms/server/services/heartbeats.py",
        "            held = stored.get(pc_id, (None, None))",
        "            held = (None, None)",
        (
            "tests/server/test_heartbeat_writer.py::"
            "test_lists_another_process_wrote_are_replaced_and_unchanged_ones_not_rewritten",
        ),
    ),
    Guard(
        "pin-wrong-tries",
        "src/wcms/server/services/accounts.py",
        """    for row in worn:
        row.revoked_at = now
""",
        "",
        (
            "tests/security/test_pin_race.py::"
            "test_a_live_pin_is_revoked_after_its_budget_of_wrong_pins_from_anywhere",
        ),
    ),
    Guard(
        "group-commit-gather",
        PCS,
        "            time.sleep(0)  # under gevent: the requests ready to run queue",
        "            pass  # (deleted)",
        (
            "tests/server/test_group_commit.py::"
            "test_signals_that_arrive_together_share_commits_and_each_answer_follows_its_commit",
        ),
    ),
    Guard(
        # Killed in about 3 runs of 4: which node leads after the restart is a race.
        "no-lost-right-after-outage",
        RUNTIME,
        "may_check = not db_away and mono >= checks_from  # not in the first tick back",
        "may_check = True",
        (
            "tests/security/test_db_outage.py::"
            "test_two_nodes_ride_out_a_database_restart_under_load",
        ),
    ),
    Guard(
        "heartbeats-kept-through-outage",
        "src/wcms/server/services/heartbeats.py",
        """                with self._lock:  # keep what was not written, unless a newer one came in
                    for pc_id, p in items[start:]:
                        self._pending.setdefault(pc_id, p)""",
        "                pass",
        (
            "tests/security/test_db_outage.py::"
            "test_heartbeats_taken_while_the_database_is_away_are_written_once_it_returns",
        ),
    ),
    Guard(
        "argon2-floor",
        "src/wcms/server/config.py",
        "    if settings.argon2_memory_kib < ARGON2_FLOOR[0]"
        " or settings.argon2_time_cost < ARGON2_FLOOR[1]:",
        "    if False:",
        ("tests/server/test_web.py::test_argon2_cost_below_owasps_least_is_refused",),
    ),
    Guard(
        "dummy-hash-at-cost",
        "src/wcms/server/services/accounts.py",
        "    _dummy[:] = [DUMMY_HASH] if not _hasher.check_needs_rehash(DUMMY_HASH) else []",
        "    pass",
        ("tests/server/test_web.py::test_an_unknown_name_costs_a_hash_with_the_real_parameters",),
    ),
    Guard(
        "idle-mark-needs-listener",
        "src/wcms/server/services/agent.py",
        "        idle = rt.doorbell.is_idle(who.pc_id) and rt.notifier.trusted",
        "        idle = rt.doorbell.is_idle(who.pc_id)",
        (f"{NODES}::test_a_poll_does_not_believe_an_idle_mark_while_the_listener_is_away",),
    ),
    Guard(
        "idle-mark-expires",
        "src/wcms/server/services/doorbell.py",
        "        return marked is not None and time.monotonic() - marked < IDLE_TTL",
        "        return marked is not None",
        (
            "tests/server/test_commands_api.py::"
            "test_an_idle_mark_is_believed_for_idle_ttl_seconds_at_most",
        ),
    ),
]


def repo_files(root: Path) -> list[str]:
    """Tracked files, and untracked ones git does not ignore (work not committed yet)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    return sorted({f for f in out.decode().split("\0") if f and (root / f).is_file()})


def copy_tree(root: Path, dest: Path) -> None:
    for name in repo_files(root):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)


def pytest(copy: Path, tests: tuple[str, ...], basetemp: Path) -> tuple[int, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(copy / "src"), str(copy)]),
        "PYTHONDONTWRITEBYTECODE": "1",  # a mutant must never be run from a stale .pyc
    }
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    cmd += ["--basetemp", str(basetemp), *tests]
    try:
        res = subprocess.run(
            cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TIMEOUT} s"
    lines = (res.stdout + res.stderr).strip().splitlines()
    failed = [
        line.split(" - ")[0].rsplit("::", 1)[-1] for line in lines if line.startswith("FAILED")
    ]
    return res.returncode, (f"by {failed[0]}" if failed else lines[-1] if lines else "")


def run_mutant(copy: Path, g: Guard, tests: tuple[str, ...], label: str, basetemp: Path) -> bool:
    """Apply the guard's deletion in the copy, run `tests`, restore; answer whether killed."""
    path = copy / g.path
    original = path.read_text()
    path.write_text(original.replace(g.snippet, g.deleted))
    started = time.monotonic()
    try:
        code, last = pytest(copy, tests, basetemp)
    finally:
        path.write_text(original)
    took = f"({time.monotonic() - started:.0f} s)"
    if code == 1:
        print(f"{label:28} killed   {took} {last}", flush=True)
    elif code == -1:
        print(f"{label:28} killed   {took} {last} (a hang is not a clean kill)", flush=True)
    elif code == 0:
        print(f"{label:28} SURVIVED {took} every test passed without the guard", flush=True)
    else:
        print(f"{label:28} ERROR    {took} pytest exited {code}: {last}", flush=True)
    return code in (1, -1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="only these guards")
    parser.add_argument("--list", action="store_true", help="list the guards and their tests")
    parser.add_argument("--each", action="store_true", help="run each named test on its own")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (a git work tree)")
    args = parser.parse_args()
    root: Path = args.root.resolve()
    guards = [g for g in GUARDS if not args.names or g.name in args.names]
    if args.list:
        for g in guards:
            print(f"{g.name:28} {g.path}\n{'':28} " + f"\n{'':28} ".join(g.tests))
        return 0
    unknown = set(args.names) - {g.name for g in GUARDS}
    if unknown:
        print(f"unknown guards: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    failed = False
    runnable = []
    for g in guards:
        count = (root / g.path).read_text().count(g.snippet)
        if count != 1:
            print(f"{g.name:28} MOVED: its snippet is in {g.path} {count} times, not once")
            failed = True
        else:
            runnable.append(g)
    with tempfile.TemporaryDirectory(prefix="wcms-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        copy_tree(root, copy)
        probe = subprocess.run(
            [sys.executable, "-c", "import wcms; print(wcms.__file__)"],
            env={**os.environ, "PYTHONPATH": str(copy / "src")},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not probe.startswith(str(copy)):
            print(f"the copy's wcms is not the one imported ({probe})", file=sys.stderr)
            return 2
        every = tuple(dict.fromkeys(t for g in runnable for t in g.tests))
        started = time.monotonic()
        code, last = pytest(copy, every, Path(tmp) / "bt-baseline")
        if code != 0:
            print(f"the guards' tests fail without any mutation: {last}", file=sys.stderr)
            return 1
        took = f"({time.monotonic() - started:.0f} s)"
        print(f"{'baseline':28} {len(every)} tests pass unchanged {took}")
        for i, g in enumerate(runnable):
            # --each: every named test on its own (each must fail); else all at once, -x.
            runs = [(t,) for t in g.tests] if args.each else [g.tests]
            for j, tests in enumerate(runs):
                label = f"{g.name}:{tests[0].rsplit('::', 1)[-1]}" if args.each else g.name
                failed |= not run_mutant(copy, g, tests, label, Path(tmp) / f"bt-{i}-{j}")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
