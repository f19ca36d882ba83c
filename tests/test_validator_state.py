"""The validator's state file: atomic rounds, survival of SIGKILL, clear errors."""
from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from niche.validator.scoring import OK, Outcome, ScoreBook, ScoringConfig, round_rewards
from niche.validator.state import Answer, StateError, ValidatorState

CFG = ScoringConfig()


def play_round(state: ValidatorState, book: ScoreBook, r: int, n: int = 5) -> None:
    outcomes = [Outcome(u, f"hk{u}", "kolors", (), OK, "", 1.0 + u, 32.0) for u in range(n)]
    outcomes.append(Outcome(n, f"hk{n}", "kolors", (), "timeout", "no answer in 32s", None, 32.0))
    rewards = round_rewards(outcomes, CFG)
    book.apply(r, outcomes, rewards)
    state.save_round(r, book, outcomes, rewards,
                     answers=[Answer(f"{r:064x}", r * 7919, 0, r)])


def test_roundtrip(tmp_path):
    path = tmp_path / "state.db"
    with ValidatorState(path) as state:
        assert state.round_index == 0 and state.schema_version == 1
        book = state.load_book(CFG)
        for r in range(3):
            play_round(state, book, r)
        book.excluded_until["cheater"] = 40
        play_round(state, book, 3)
        state.record_weights(3, 120, {0: 0.75, 2: 0.25}, True, "ok")
        state.record_weights(3, 121, {0: 1.0}, False, "rate limited")
    with ValidatorState(path) as state:
        assert state.round_index == 4
        again = state.load_book(CFG)
        assert again.scores() == pytest.approx(book.scores())
        assert again.excluded_until == {"cheater": 40}
        last = state.last_weights()
        assert last.weights == {0: 0.75, 2: 0.25} and last.block == 120
        rows = state.history(uid=5)
        assert len(rows) == 4 and rows[0].status == "timeout"
        assert rows[0].reason == "no answer in 32s" and rows[0].reward == 0.0
        answers = state.recent_answers(since_round=2)
        assert [a.round for a in answers] == [2, 3] and answers[1].phash == 3 * 7919
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_large_phash_roundtrip(tmp_path):
    with ValidatorState(tmp_path / "s.db") as state:
        book = state.load_book(CFG)
        big = (1 << 64) - 3
        state.save_round(0, book, [], {}, answers=[Answer("ab" * 32, big, 1, 0)])
        assert state.recent_answers(0)[0].phash == big


LOOP = textwrap.dedent("""
    import sys
    from niche.validator.scoring import OK, Outcome, ScoreBook, ScoringConfig, round_rewards
    from niche.validator.state import Answer, ValidatorState
    state = ValidatorState(sys.argv[1])
    cfg = ScoringConfig()
    book = state.load_book(cfg)
    start = state.round_index
    stop = start + int(sys.argv[2])
    for r in range(start, stop):
        outcomes = [Outcome(u, f"hk{u}", "kolors", (), OK, "", 1.0 + u * 0.01, 32.0)
                    for u in range(64)]
        rewards = round_rewards(outcomes, cfg)
        book.apply(r, outcomes, rewards)
        state.save_round(r, book, outcomes, rewards,
                         answers=[Answer(f"{r:064x}", r, u, r) for u in range(8)])
        print(r, flush=True)
""")


def check_consistent(path):
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rounds = int(conn.execute("SELECT value FROM meta WHERE key='round'").fetchone()[0])
    per_round = conn.execute("SELECT round, COUNT(*) FROM history GROUP BY round").fetchall()
    conn.close()
    # every persisted round is complete, and the round counter matches what is stored
    assert [r for r, _ in per_round] == list(range(rounds))
    assert all(n == 64 for _, n in per_round)
    return rounds


def test_survives_sigkill_mid_loop_and_resumes(tmp_path):
    path = tmp_path / "state.db"
    proc = subprocess.Popen([sys.executable, "-c", LOOP, str(path), "100000"],
                            stdout=subprocess.PIPE, text=True)
    try:
        seen = 0
        deadline = time.monotonic() + 60
        while seen < 30 and time.monotonic() < deadline:
            if proc.stdout.readline():
                seen += 1
        assert seen == 30, "the writer did not get going"
        time.sleep(0.05)  # land the kill somewhere inside a later round
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    rounds = check_consistent(path)
    assert rounds >= 30
    # resume: the next process continues at the next round, same scores
    done = subprocess.run([sys.executable, "-c", LOOP, str(path), "3"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(r) for r in range(rounds, rounds + 3)]
    assert check_consistent(path) == rounds + 3


def test_disk_full_keeps_last_complete_round(tmp_path):
    path = tmp_path / "state.db"
    state = ValidatorState(path)
    book = state.load_book(CFG)
    play_round(state, book, 0)
    pages = state._conn.execute("PRAGMA page_count").fetchone()[0]
    state._conn.execute(f"PRAGMA max_page_count={pages}")  # the disk is now "full"
    many = [Outcome(u, f"hk{u}", "kolors", (), OK, "x" * 500, 1.0, 32.0) for u in range(500)]
    with pytest.raises(StateError, match="full"):
        state.save_round(1, book, many, round_rewards(many, CFG))
    state.close()
    with ValidatorState(path) as state:
        assert state.round_index == 1
        assert len(state.history(limit=1000)) == 6


def test_corrupt_file_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "state.db"
    garbage = b"this is not sqlite at all" * 100
    path.write_bytes(garbage)
    with pytest.raises(StateError, match="not a valid niche state"):
        ValidatorState(path)
    assert path.read_bytes() == garbage


def test_foreign_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="not a niche validator state"):
        ValidatorState(path)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "state.db"
    ValidatorState(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="newer niche"):
        ValidatorState(path)


@contextlib.contextmanager
def read_only(path):
    """chmod 444; as root (who ignores modes) the immutable attribute instead."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(0o644)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("running as root and chattr +i is not available: cannot make a file "
                    "read-only for root")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_file_is_refused(tmp_path):
    path = tmp_path / "state.db"
    with ValidatorState(path) as state:
        play_round(state, state.load_book(CFG), 0)
    before = path.read_bytes()
    with read_only(path):
        with pytest.raises(StateError, match="read-only"):
            ValidatorState(path)
    assert path.read_bytes() == before
    with ValidatorState(path) as state:  # untouched and usable again
        assert state.round_index == 1


def test_sqlite_errors_become_actionable_messages(tmp_path):
    from niche.validator.state import _explain
    ro = _explain(sqlite3.OperationalError("attempt to write a readonly database"),
                  tmp_path / "s.db", "saving round 3")
    assert "read-only" in str(ro) and "--neuron.state_path" in str(ro)
    full = _explain(sqlite3.OperationalError("database or disk is full"), tmp_path / "s.db", "x")
    assert "free space" in str(full)


def test_weight_settings_are_kept_bounded_with_the_last_success(tmp_path):
    path = tmp_path / "state.db"
    with ValidatorState(path) as state:
        state.record_weights(0, 100, {0: 1.0}, True, "ok")
        for i in range(30):  # a long run of failures keeps the last success
            state.record_weights(1 + i, 200 + i, {1: 1.0}, False, "rate limited", keep=10)
        assert state.last_weights().block == 100
        for i in range(30):
            state.record_weights(40 + i, 300 + i, {2: 1.0}, True, "ok", keep=10)
        assert state.last_weights().block == 329
    rows = sqlite3.connect(path).execute("SELECT block FROM weights ORDER BY id").fetchall()
    assert [r[0] for r in rows] == list(range(320, 330))
