"""The validator's disk fails under it: full, or the state file read-only.

Both are real OS conditions made in a child process, so they cannot leak into pytest:
- disk full: RLIMIT_FSIZE caps how large the process may grow any file, so SQLite's write
  of a big round fails in the kernel (EFBIG) exactly as on a full disk;
- read-only: the child drops from root to `nobody` after its imports, so file permissions
  apply (root ignores them, which is why tests/test_validator_state.py skips that case here).
The parent then checks the file with its own connection: integrity, complete rounds only.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from niche.validator.scoring import OK, Outcome, ScoringConfig, round_rewards
from niche.validator.state import ValidatorState

REPO = Path(__file__).resolve().parents[1]

PLAY = textwrap.dedent("""
    from niche.validator.scoring import OK, Outcome, ScoringConfig, round_rewards
    from niche.validator.state import Answer, StateError, ValidatorState
    CFG = ScoringConfig()

    def play(state, book, r, n=8, reason=""):
        outcomes = [Outcome(u, f"hk{u}", "kolors", (), OK, reason, 1.0 + u, 32.0)
                    for u in range(n)]
        rewards = round_rewards(outcomes, CFG)
        book.apply(r, outcomes, rewards)
        state.save_round(r, book, outcomes, rewards,
                         answers=[Answer(f"{r:064x}", r, 0, r)])
""")

DISK_FULL = PLAY + textwrap.dedent("""
    import os, resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG, not death, past the limit
    path = sys.argv[1]
    state = ValidatorState(path)
    book = state.load_book(CFG)
    for r in range(3):
        play(state, book, r)
    biggest = max(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
    resource.setrlimit(resource.RLIMIT_FSIZE, (biggest + 8192, resource.RLIM_INFINITY))
    try:
        play(state, book, 3, n=2000, reason="x" * 400)   # ~1 MB: does not fit
        print("SAVED?!")
    except StateError as exc:
        print("STATEERROR", exc, flush=True)
    print("ROUND", state.round_index, flush=True)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)  # space freed
    play(state, book, 3)
    print("ROUND", state.round_index, flush=True)
""")

READ_ONLY = textwrap.dedent("""
    import os, sys
    from niche.validator.state import StateError, ValidatorState
    os.setgid(65534)
    os.setuid(65534)  # nobody: permissions apply from here on
    try:
        ValidatorState(sys.argv[1])
        print("OPENED?!")
    except StateError as exc:
        print("STATEERROR", exc)
""")


def _check(path: Path) -> tuple[int, list[int]]:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        done = int(conn.execute("SELECT value FROM meta WHERE key='round'").fetchone()[0])
        rounds = [r for (r,) in conn.execute("SELECT DISTINCT round FROM history ORDER BY round")]
        per_round = {r: n for r, n in conn.execute(
            "SELECT round, COUNT(*) FROM history GROUP BY round")}
    finally:
        conn.close()
    assert rounds == list(range(done)), (done, rounds)
    assert set(per_round.values()) == {8}, per_round  # no half-written round
    return done, rounds


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_disk_full_is_a_clear_error_and_keeps_every_complete_round(tmp_path):
    path = tmp_path / "state.db"
    done = _run(DISK_FULL, str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    error = next(line for line in lines if line.startswith("STATEERROR"))
    assert "saving round 3 failed" in error and "disk is full or failing" in error, error
    assert "SAVED?!" not in done.stdout
    # the failed round left nothing behind, and the same process carried on once space came back
    assert [line for line in lines if line.startswith("ROUND")] == ["ROUND 3", "ROUND 4"]
    assert _check(path) == (4, [0, 1, 2, 3])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to `nobody` in the child")
def test_read_only_state_is_refused_in_one_line_and_left_untouched():
    root = Path(tempfile.mkdtemp(prefix="niche-ro-"))
    try:
        _read_only_case(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _read_only_case(root: Path) -> None:
    root.chmod(0o755)  # nobody may enter, not write
    path = root / "state.db"
    with ValidatorState(path) as state:
        book = state.load_book(ScoringConfig())
        outcomes = [Outcome(u, f"hk{u}", "kolors", (), OK, "", 1.0, 32.0) for u in range(8)]
        state.save_round(0, book, outcomes, round_rewards(outcomes, ScoringConfig()))
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    path.chmod(0o644)
    done = _run(READ_ONLY, str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    message = done.stdout.strip()
    assert message.startswith("STATEERROR") and "read-only" in message, message
    assert "--neuron.state_path" in message and len(message.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before
    assert _check(path) == (1, [0])
