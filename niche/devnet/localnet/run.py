"""Run a prepared local subnet: miners first (until they answer /healthz), then validators;
show progress; stop everything on completion, Ctrl-C or the death of any child."""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from niche.devnet.localnet.plan import LocalnetPlan, ProcessPlan
from niche.devnet.localnet.supervisor import Child, ChildFailed, Supervisor
from niche.errors import NicheError


class LocalnetFailed(NicheError):
    exit_code = 3


def niche_command() -> list[str]:
    """How to start `niche` in a child: the console script next to this Python, else -m."""
    script = Path(sys.executable).with_name("niche")
    if script.exists():
        return [str(script)]
    found = shutil.which("niche")
    return [found] if found else [sys.executable, "-m", "niche.cli"]


def _child(proc: ProcessPlan, log_dir: Path) -> Child:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return Child(name=proc.name, argv=niche_command() + proc.args,
                 log_path=Path(proc.log_path or log_dir / f"{proc.name}.log"),
                 expected_to_exit=proc.role == "validator", env=env,
                 stage=0 if proc.role == "miner" else 1)  # stopped before the miners


def _wait_healthy(sup: Supervisor, miners: list[ProcessPlan], timeout: float,
                  say: Callable[[str], None]) -> None:
    pending = {m.name: f"http://127.0.0.1:{m.port}/healthz" for m in miners}
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while pending:
            sup.check()
            for name, url in list(pending.items()):
                try:
                    if client.get(url).status_code == 200:
                        del pending[name]
                        say(f"{name} is up")
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise LocalnetFailed(f"miners not healthy after {timeout:.0f}s: "
                                     f"{', '.join(sorted(pending))} (see their logs)")
            time.sleep(0.5)


def _read_state(validator: ProcessPlan, sql: str, args: tuple = ()) -> list[tuple]:
    """Read the validator's state file without ever taking a write lock on it."""
    import contextlib
    import sqlite3

    from niche.sqlite_files import connect_read_only

    if not validator.state_path or not Path(validator.state_path).exists():
        return []
    try:
        with contextlib.closing(connect_read_only(validator.state_path, timeout=1)) as db:
            return db.execute(sql, args).fetchall()
    except sqlite3.Error:
        return []


def _rounds_done(validator: ProcessPlan) -> int:
    rows = _read_state(validator, "SELECT value FROM meta WHERE key='round'")
    try:
        return int(rows[0][0]) if rows else 0
    except ValueError:
        return 0


def round_summary(validator: ProcessPlan, round_index: int, names: dict[str, str]) -> str:
    """One line per finished round: answers, audits, and every zero with its reason."""
    rows = _read_state(validator, "SELECT hotkey, status, reason, audited, audit_passed "
                       "FROM history WHERE round=?", (round_index,))
    ok = sum(1 for r in rows if r[1] == "ok")
    audited = sum(1 for r in rows if r[3])
    failed = [f"{names.get(r[0], r[0][:8])}: {r[2] or r[1]}" for r in rows
              if r[1] != "ok" or r[4] == 0]
    line = f"{validator.name} round {round_index}: {ok}/{len(rows)} answered, " \
           f"{audited} audited"  # numbered as the dashboard and `validator status` do
    return line + (f"; zero for {'; '.join(failed)}" if failed else "; all passed")


def run(plan: LocalnetPlan, *, say: Callable[[str], None] = print,
        startup_timeout: float = 180.0, duration: float | None = None) -> int:
    """Run until every validator finished its rounds (or `duration` seconds, or Ctrl-C)."""
    log_dir = Path(plan.workdir) / "logs"
    started = time.monotonic()
    interrupted = False

    def on_term(signum, frame):  # SIGTERM behaves like Ctrl-C: stop children, exit.
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C must stop localnet even when it was started with SIGINT ignored (a background
    # job of a non-interactive shell or CI runner inherits SIG_IGN, and Python keeps it):
    # otherwise the interrupt is silently dropped and the validators run on.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with Supervisor() as sup:
            miners, validators = plan.role("miner"), plan.role("validator")
            for proc in miners:
                sup.start(_child(proc, log_dir))
                say(f"started {proc.name} ({proc.model}{', ' + proc.cheat if proc.cheat else ''}) "
                    f"on 127.0.0.1:{proc.port}, log {proc.log_path}")
            _wait_healthy(sup, miners, startup_timeout, say)
            for proc in validators:
                sup.start(_child(proc, log_dir))
                say(f"started {proc.name}, log {proc.log_path}")
            if plan.dashboard_url:
                say(f"dashboard (miners, scores, weights, failures, rounds; live): "
                    f"{plan.dashboard_url}")
            for proc in plan.role("gateway"):
                sup.start(_child(proc, log_dir))
                _wait_healthy(sup, [proc], startup_timeout, say)
                say(f"gateway (OpenAI images API): {plan.gateway_url}/v1  playground: "
                    f"{plan.gateway_url}/  API key: {plan.gateway_key}")
                from niche.commands.gateway import localnet_keys_line

                say(localnet_keys_line(proc.args))
            names = {p.hotkey: p.name for p in plan.processes}
            # --keep resumes a workdir: rounds done before are neither replayed nor counted
            # against this run's --rounds, which each validator runs on top of them
            last = [_rounds_done(v) for v in validators]
            goals = [f"/{first + plan.rounds}" if plan.rounds else "" for first in last]
            say(f"[{time.monotonic() - started:5.0f}s] rounds done: " + ", ".join(
                f"{v.name} {d}{g}" for v, d, g in zip(validators, last, goals, strict=True)))
            while True:
                sup.check()
                done = [_rounds_done(v) for v in validators]
                if done != last:
                    for validator, before, now in zip(validators, last, done, strict=False):
                        for index in range(before, now):
                            say("  " + round_summary(validator, index, names))
                    say(f"[{time.monotonic() - started:5.0f}s] rounds done: " + ", ".join(
                        f"{v.name} {d}{g}" for v, d, g in zip(validators, done, goals,
                                                               strict=True)))
                    last = done
                if plan.rounds and not sup.running(only_expected_to_exit=True):
                    break
                if duration is not None and time.monotonic() - started > duration:
                    break
                time.sleep(0.5)
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: stopped every child process")
    except ChildFailed as exc:
        raise LocalnetFailed(f"{exc} (stopped the other processes)") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    return 130 if interrupted else 0

