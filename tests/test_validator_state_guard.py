"""One writer per validator state file, readers that need no lock and no write access, and
a warning when the network's spelling moves the default state file. Real SQLite files; the
other validator is a real second process (a flock is per process)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.cli import main
from niche.errors import ConfigError
from niche.gateway.directory import read_validator_state
from niche.validator.state import (
    StateError,
    ValidatorState,
    default_state_path,
    lock_path,
    other_network_notice,
)
from niche.validator.status import read_status
from tests.test_validator_state import CFG, play_round

REPO = Path(__file__).resolve().parents[1]
CHEAT = "5Cheater"

HOLD = """
import sys, time
from niche.validator.scoring import ScoringConfig
from niche.validator.state import ValidatorState
state = ValidatorState(sys.argv[1])
book = state.load_book(ScoringConfig())
book.excluded_until["5Cheater"] = 50
state.save_round(state.round_index, book, [], {})
print("held", flush=True)
time.sleep(120)
"""

PROBE = """
import sys
from niche.errors import ConfigError
from niche.validator.state import ValidatorState
try:
    ValidatorState(sys.argv[1]).close()
    print("OPENED")
except ConfigError as exc:
    print("REFUSED", exc)
"""

STATUS_AS_NOBODY = """
import contextlib, io, os, sys
from niche.cli import main
with contextlib.redirect_stderr(io.StringIO()):  # load the command's code while root may
    main(["validator", "status", "--state", sys.argv[1] + ".absent", "--json"])
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)  # nobody: the file's modes apply from here on
sys.exit(main(["validator", "status", "--state", sys.argv[1], "--json"]))
"""


def _holder(path: Path) -> subprocess.Popen:
    """A validator process holding `path` open for writing (it excluded a cheat)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _probe(path: Path) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes but the WAL index (-shm): SQLite's shared memory, where every
    reader, read-only ones included, marks what it reads."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if not p.name.endswith("-shm")}


def test_a_second_validator_process_is_refused_in_one_line_and_the_exclusion_stays(tmp_path):
    path = tmp_path / "state.sqlite"
    first = _holder(path)
    try:
        with pytest.raises(ConfigError) as refused:
            ValidatorState(path)
        message = str(refused.value)
        assert message.startswith(f"validator state {path} is in use by another process "
                                  f"(pid {first.pid}, started "), message
        assert "one validator per state file" in message and "--neuron.state_path" in message
        assert len(message.splitlines()) == 1 and refused.value.exit_code == 2
        with ValidatorState(path, read_only=True) as reader:  # a reader is not a writer
            assert reader.load_book(CFG).excluded_until == {CHEAT: 50}
    finally:
        first.kill()  # SIGKILL: no clean-up runs, the kernel lets go of the lock
        first.wait(timeout=30)
    with ValidatorState(path) as state:  # the holder is gone: the next validator opens it
        assert state.round_index == 1
        assert state.load_book(CFG).excluded_until == {CHEAT: 50}
    assert lock_path(path).exists()


def test_the_lock_is_held_until_the_last_writer_of_this_process_closes(tmp_path):
    """One process may open its own file twice (a restarted Validator in a test, a thread);
    another process waits for the last close."""
    path = tmp_path / "state.sqlite"
    first, second = ValidatorState(path), ValidatorState(path)
    play_round(first, first.load_book(CFG), 0)
    first.close()
    refused = _probe(path)
    assert refused.startswith("REFUSED") and f"(pid {os.getpid()}, started" in refused
    assert second.round_index == 1  # still usable
    second.close()
    second.close()  # twice is harmless
    assert _probe(path) == "OPENED"


def test_the_validator_command_is_refused_before_models_load(tmp_path, capsys):
    """`niche validator` on a file another validator runs on: exit 2, one line, and the
    other's state untouched."""
    wallet = create_wallet("validator", "hot", tmp_path / "wallets")
    chain = LocalChain(tmp_path / "chain.db", create=True, block_time=0.05)
    try:
        chain.create_subnet(1, max_uids=4, immunity_period=0, weights_rate_limit=0,
                            min_validator_stake=1.0)
        chain.register(1, wallet, stake=100.0)
    finally:
        chain.close()
    path = tmp_path / "state.sqlite"
    first = _holder(path)
    try:
        before = path.read_bytes()
        code = main(["validator", "--netuid", "1", "--subtensor.network", "localnet",
                     "--localnet.path", str(tmp_path / "chain.db"), "--wallet.name",
                     "validator", "--wallet.hotkey", "hot", "--wallet.path",
                     str(tmp_path / "wallets"), "--models", "flux-schnell", "--tiny",
                     "--neuron.state_path", str(path), "--neuron.rounds", "1",
                     "--neuron.round_interval", "0"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert len(err) == 1 and f"is in use by another process (pid {first.pid}," in err[0]
        assert path.read_bytes() == before
    finally:
        first.kill()
        first.wait(timeout=30)


def test_a_foreign_or_other_subnets_state_file_is_a_configuration_error(tmp_path, capsys):
    """Exit 2 (pm2 holds it) in one line, not exit 1 (pm2 restarted the validator every
    14 s): another subnet's state file, and an SQLite file that is no validator state; the
    status command says its own flag."""
    wallet = create_wallet("validator", "hot", tmp_path / "wallets")
    chain = LocalChain(tmp_path / "chain.db", create=True, block_time=0.05)
    try:
        for netuid in (1, 2):
            chain.create_subnet(netuid, max_uids=4, immunity_period=0, weights_rate_limit=0,
                                min_validator_stake=1.0)
            chain.register(netuid, wallet, stake=100.0)
    finally:
        chain.close()
    other_subnet = tmp_path / "netuid1.sqlite"
    with ValidatorState(other_subnet) as state:
        state.bind("localnet", 1, wallet.hotkey.ss58_address)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    for path, says in ((other_subnet, "netuid 1"), (foreign, "not a niche validator state")):
        before = path.read_bytes()
        code = main(["validator", "--netuid", "2", "--subtensor.network", "localnet",
                     "--localnet.path", str(tmp_path / "chain.db"), "--wallet.name",
                     "validator", "--wallet.hotkey", "hot", "--wallet.path",
                     str(tmp_path / "wallets"), "--models", "flux-schnell", "--tiny",
                     "--neuron.state_path", str(path), "--neuron.rounds", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and says in err[0], err
        assert path.read_bytes() == before
    code = main(["validator", "status", "--state", str(foreign)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "pass another --state" in err[0] and "--neuron.state_path" not in err[0]


def test_status_and_readers_work_beside_a_running_validator_and_change_nothing(tmp_path,
                                                                               capsys):
    path = tmp_path / "state.sqlite"
    first = _holder(path)
    try:
        before = _snapshot(tmp_path)
        assert main(["validator", "status", "--state", str(path), "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["rounds_completed"] == 1
        assert data["exclusions"] == [{"hotkey": CHEAT, "until_round": 50}]
        assert read_validator_state(path).excluded == frozenset({CHEAT})  # the gateway
        with ValidatorState(path, read_only=True) as reader:
            assert reader.round_index == 1
            with pytest.raises(StateError, match="read-only"):
                reader.save_round(1, reader.load_book(CFG), [], {})
        assert _snapshot(tmp_path) == before  # the state, its WAL and its lock file
        assert set(before) == {path.name, f"{path.name}-wal", lock_path(path).name}
    finally:
        first.kill()
        first.wait(timeout=30)


def test_status_reads_a_read_only_file_in_a_read_only_folder():
    """As root the modes are ignored, so the reader drops to `nobody` (who may read, not
    write). The old status opened it for writing: "the file is read-only"."""
    root = Path(tempfile.mkdtemp(prefix="niche-ro-status-"))
    try:
        path = root / "state.sqlite"
        with ValidatorState(path) as state:
            play_round(state, state.load_book(CFG), 0)
        lock_path(path).unlink(missing_ok=True)
        before = _snapshot(root)
        assert list(before) == ["state.sqlite"]  # closed cleanly: no -wal, no -shm
        path.chmod(0o444)
        root.chmod(0o555)
        done = subprocess.run([sys.executable, "-c", STATUS_AS_NOBODY, str(path)],
                              capture_output=True, text=True, timeout=60, cwd=REPO)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["rounds_completed"] == 1
        assert _snapshot(root) == before  # nothing created, nothing written
    finally:
        root.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)


def test_a_missing_file_is_not_created_by_a_reader(tmp_path):
    path = tmp_path / "none.sqlite"
    with pytest.raises(StateError, match="cannot open"):
        ValidatorState(path, read_only=True)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="no validator state at"):
        read_status(path)


def _rounds(path: Path, n: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with ValidatorState(path) as state:
        book = state.load_book(CFG)
        for r in range(n):
            play_round(state, book, r)


def test_a_new_state_file_warns_of_this_hotkeys_rounds_under_another_network_spelling(
        tmp_path, monkeypatch, caplog):
    from niche.commands.validator import log_resume

    monkeypatch.setenv("HOME", str(tmp_path))
    old = default_state_path("finney", 7, "5Hot").expanduser()
    _rounds(old, 3)
    _rounds(default_state_path("test", 7, "5Hot").expanduser(), 0)  # nothing to keep there
    _rounds(default_state_path("local", 8, "5Hot").expanduser(), 5)  # another netuid
    _rounds(default_state_path("local", 7, "5Other").expanduser(), 5)  # another hotkey
    new = default_state_path("wss://entrypoint-finney.opentensor.ai:443", 7, "5Hot")
    caplog.set_level(logging.INFO, logger="niche.validator")
    with ValidatorState(new) as state:
        log_resume(state, 7, "5Hot")
        assert state.path == new.expanduser() and state.round_index == 0  # no switch
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"found {old} (round 3) for this netuid and hotkey under network "
                        f"finney: pass --neuron.state_path {old} to keep its scores"]
    assert any("new, starting at round 0" in r.getMessage() for r in caplog.records)

    caplog.clear()
    with ValidatorState(old) as state:  # resuming: nothing to say
        log_resume(state, 7, "5Hot")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    # an explicit --neuron.state_path outside the default root is the operator's choice
    assert other_network_notice(tmp_path / "mine" / "state.sqlite", 7, "5Hot") is None


def test_a_symlink_to_a_held_state_file_is_refused_too(tmp_path):
    path = tmp_path / "state.sqlite"
    alias = tmp_path / "alias.sqlite"
    holder = _holder(path)
    try:
        alias.symlink_to(path)
        assert lock_path(alias) == lock_path(path)
        with pytest.raises(ConfigError, match=f"in use by another process \\(pid {holder.pid},"):
            ValidatorState(alias)
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_readers_take_a_path_with_uri_characters_as_a_name(tmp_path):
    """`?`, `#` and `%` in a folder name are part of the path, not of the SQLite URI."""
    folder = tmp_path / "odd?name#with%25"
    folder.mkdir()
    path = folder / "state.sqlite"
    with ValidatorState(path) as state:
        state.bind("localnet", 1, "5hotkey")
    assert read_status(path)["rounds_completed"] == 0
    assert read_validator_state(path).scores == {}
    with ValidatorState(path, read_only=True) as state:
        assert state.round_index == 0
