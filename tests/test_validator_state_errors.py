"""ValidatorState's error paths on real SQLite files: each failure is a StateError that says
what went wrong and what to do, and a refused write leaves the file as it was."""
from __future__ import annotations

import sqlite3

import pytest

from niche.validator.scoring import Outcome, ScoreBook, ScoringConfig
from niche.validator.state import StateError, ValidatorState, _explain


@pytest.mark.parametrize("message, hint", [
    ("attempt to write a readonly database", "read-only; fix permissions"),
    ("database or disk is full", "the disk is full or failing"),
    ("disk I/O error", "the disk is full or failing"),
    ("file is not a database", "not a valid niche state database"),
    ("database disk image is malformed", "not a valid niche state database"),
    ("database is locked", "another process holds the file"),
    ("unable to open database file", "check that its folder exists"),
    ("no such table: nowhere", "(sqlite error)"),
])
def test_every_sqlite_failure_gets_an_operator_hint(tmp_path, message, hint):
    err = _explain(sqlite3.OperationalError(message), tmp_path / "s.db", "saving round 3")
    assert isinstance(err, StateError)
    text = str(err)
    assert text.startswith(f"validator state {tmp_path / 's.db'}: saving round 3 failed: ")
    assert message in text and hint in text and "\n" not in text


def test_a_folder_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    with pytest.raises(StateError, match="cannot create folder .*afile"):
        ValidatorState(blocker / "sub" / "state.db")


def test_a_state_without_schema_version_is_refused(tmp_path):
    path = tmp_path / "s.db"
    ValidatorState(path).close()
    db = sqlite3.connect(str(path))
    db.execute("UPDATE meta SET value='0' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="no schema version; move it aside"):
        ValidatorState(path)


def test_a_locked_file_refuses_the_weights_record_and_keeps_the_file(tmp_path):
    path = tmp_path / "s.db"
    with ValidatorState(path) as state:
        state.record_weights(1, 10, {0: 1.0}, True, "ok")
        state._conn.execute("PRAGMA busy_timeout = 50")
        holder = sqlite3.connect(str(path), isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StateError, match="recording weights failed: database is "
                                                 "locked .another process holds the file"):
                state.record_weights(2, 20, {0: 0.5, 1: 0.5}, True, "ok")
            assert not state._conn.in_transaction
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert state.last_weights().round == 1  # the refused record is not there
        state.record_weights(2, 20, {0: 0.5, 1: 0.5}, True, "ok")  # and the file works
        assert state.last_weights().round == 2
    db = sqlite3.connect(str(path))
    assert db.execute("SELECT round, block FROM weights ORDER BY id").fetchall() == [(1, 10),
                                                                                    (2, 20)]
    db.close()


def test_reading_scores_from_a_closed_state_is_a_state_error(tmp_path):
    state = ValidatorState(tmp_path / "s.db")
    state.close()
    with pytest.raises(StateError, match="reading scores failed"):
        state.load_book(ScoringConfig())
    state.close()  # closing twice is harmless


def test_a_damaged_page_is_refused_in_one_line(tmp_path):
    """SQLite's integrity report spans several lines ('*** in database main ***', 'On tree
    page 2 cell 5: ...'): the refusal is still one line, naming what it found."""

    path = tmp_path / "state.sqlite"
    with ValidatorState(path) as state:
        book = ScoreBook(ScoringConfig())
        for r in range(3):
            outcomes = [Outcome(uid, f"5m{uid}", "kolors", status="ok") for uid in range(30)]
            book.apply(r, outcomes, {uid: 0.5 for uid in range(30)})
            state.save_round(r, book, outcomes, {uid: 0.5 for uid in range(30)})
    conn = sqlite3.connect(path)
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name='meta'").fetchone()[0]
    conn.close()
    with open(path, "r+b") as f:  # the meta table's page: its cell pointers overwritten
        f.seek((root - 1) * 4096 + 8)
        f.write(b"\xff" * 64)
    with pytest.raises(StateError) as refused:
        ValidatorState(path)
    message = str(refused.value)
    assert "\n" not in message, message
    # the damage shows at the integrity check, or sooner, as SQLite first reads the page
    # (whether the last checkpoint left it in the -wal decides which): one line either way
    assert "integrity check failed (" in message or "malformed" in message, message
    assert "aside" in message and "start fresh" in message, message
