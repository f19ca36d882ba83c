"""Every saved round is in the state file itself, not only in its -wal: a validator killed
with -9 (pm2's kill_timeout, the OOM killer) and then copied without its -wal, or whose -wal
was lost, resumed from round 0 with every score gone (13 rounds lived only in the -wal)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from niche.validator.scoring import ScoringConfig
from niche.validator.state import ValidatorState

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 13

KILLED_AFTER_ROUNDS = textwrap.dedent("""
    import os, sys
    from niche.validator.scoring import Outcome, ScoreBook, ScoringConfig
    from niche.validator.state import ValidatorState

    state = ValidatorState(sys.argv[1])
    state.bind("local", 1, "5validator")
    book = ScoreBook(ScoringConfig())
    for r in range(int(sys.argv[2])):
        outcomes = [Outcome(uid, f"5miner{uid}", "flux-schnell", status="ok", latency=1.0)
                    for uid in range(64)]
        rewards = {uid: (uid + 1) / 64 for uid in range(64)}
        book.apply(r, outcomes, rewards)
        state.save_round(r, book, outcomes, rewards)
    os.kill(os.getpid(), 9)  # no close, no checkpoint at exit
""")


def _killed_validator(path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", KILLED_AFTER_ROUNDS, str(path), str(ROUNDS)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == -9, done.stderr[-2000:]


def test_a_copy_of_the_state_file_alone_has_every_round(tmp_path):
    state_file = tmp_path / "state.sqlite"
    _killed_validator(state_file)
    backup = tmp_path / "backup" / "state.sqlite"
    backup.parent.mkdir()
    shutil.copy(state_file, backup)  # what a backup or `scp state.sqlite` takes
    with ValidatorState(backup) as copy:
        assert copy.round_index == ROUNDS
        assert copy.identity == ("local", 1, "5validator")
        scores = copy.load_book(ScoringConfig()).scores()
        assert len(scores) == 64 and scores[63] > scores[0] > 0


def test_a_lost_wal_after_a_kill_loses_no_round(tmp_path):
    state_file = tmp_path / "state.sqlite"
    _killed_validator(state_file)
    with ValidatorState(state_file, read_only=True) as before:
        kept = before.load_book(ScoringConfig()).scores()
    Path(f"{state_file}-wal").unlink(missing_ok=True)
    Path(f"{state_file}-shm").unlink(missing_ok=True)
    with ValidatorState(state_file) as state:
        assert state.round_index == ROUNDS
        assert state.load_book(ScoringConfig()).scores() == kept
