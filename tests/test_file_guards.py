"""Files a process must not take for its own, or create before its start is known good, on
real SQLite files and real `niche` processes: the gateway's key database refuses another
program's SQLite file (application_id, as the validator's state file) and the read-only key
commands create nothing; the gateway says when the validator state it routes by is missing;
`niche miner` creates no states file before its network, chain file and netuid are checked,
and two miners on one states file (one hotkey) are refused."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_support import NICHE, ROOT, one_line_error
from gateway_support import make_chain
from miner_support import NETUID, MinerProcess, build_net

from niche import sqlite_files
from niche.errors import ConfigError
from niche.gateway import db as gateway_db
from niche.gateway.db import GatewayDB
from niche.gateway.directory import MinerDirectory
from niche.gateway.keys import KeyStore
from niche.miner.state_store import DiskStates
from niche.validator.client import MinerClient
from niche.validator.state import APPLICATION_ID as VALIDATOR_ID
from niche.validator.state import ValidatorState


def niche(*args: str, timeout: float = 300, cwd: Path = ROOT,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*NICHE, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _app_id(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA application_id").fetchone()[0])


# ------------------------------------------------------------ 1: the gateway's database
def test_keys_create_refuses_a_validator_state_file(tmp_path):
    """The review's repro: `keys create` on a copy of a validator state file added the
    gateway's tables to it and printed "created key"."""
    state = tmp_path / "state.sqlite"
    ValidatorState(state).close()
    copy = tmp_path / "copy.sqlite"
    shutil.copy(state, copy)
    before_tables, before_bytes = _tables(copy), copy.read_bytes()
    done = niche("gateway", "keys", "create", "--name", "bob", "--gateway.db", str(copy))
    line = one_line_error(done)
    assert str(copy) in line and "validator state" in line, line
    assert "created key" not in done.stdout
    assert _tables(copy) == before_tables and "keys" not in _tables(copy)
    assert copy.read_bytes() == before_bytes


def test_other_sqlite_files_are_refused_naming_what_they_seem_to_be(tmp_path):
    states = tmp_path / "states.sqlite"
    DiskStates(states, None, 600.0).close()
    chain = tmp_path / "chain.db"
    make_chain(tmp_path, miners=0).chain.close()
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE keys (id TEXT)")  # a `keys` table of another program
        db.execute("CREATE TABLE notes (body TEXT)")
    marked = tmp_path / "marked.sqlite"
    with sqlite3.connect(marked) as db:
        db.execute("PRAGMA application_id=1234")  # another program's empty database
    for path, seems in ((states, "miner states store"), (chain, "localnet chain file"),
                        (other, "tables: keys, notes"), (marked, "application_id 0x4d2")):
        before = path.read_bytes()
        with pytest.raises(ConfigError) as caught:
            GatewayDB(path)
        message = str(caught.value)
        assert str(path) in message and seems in message and "\n" not in message, message
        assert path.read_bytes() == before, path
    assert sqlite_files.VALIDATOR_STATE_ID == VALIDATOR_ID  # the same as the validator's
    assert gateway_db.APPLICATION_ID != VALIDATOR_ID


def test_a_new_database_is_marked_and_an_old_one_is_adopted(tmp_path):
    new = tmp_path / "new" / "gw.sqlite"
    KeyStore(GatewayDB(new)).create("alice")
    assert _app_id(new) == gateway_db.APPLICATION_ID

    empty = tmp_path / "empty.sqlite"
    empty.touch()  # an empty file is a new database
    GatewayDB(empty).close()
    assert _app_id(empty) == gateway_db.APPLICATION_ID

    old = tmp_path / "old.sqlite"  # as a release before the mark wrote it
    with sqlite3.connect(old) as db:
        db.executescript(gateway_db._SCHEMA)
        db.execute("INSERT INTO keys VALUES ('k1', 'bob', 'h', 1.0, NULL, 60, 1000)")
    assert _app_id(old) == 0
    store = KeyStore(GatewayDB(old))
    assert [k.name for k in store.list()] == ["bob"]
    assert _app_id(old) == gateway_db.APPLICATION_ID
    assert [k.name for k in KeyStore(GatewayDB(old)).list()] == ["bob"]  # and reopened


def test_a_missing_database_is_not_created_by_the_read_only_opening(tmp_path):
    missing = tmp_path / "nowhere" / "g.sqlite"
    with pytest.raises(ConfigError) as caught:
        GatewayDB(missing, create=False)
    assert str(caught.value) == (f"no gateway database at {missing}: pass the --gateway.db "
                                 "the gateway uses")
    assert not missing.parent.exists()


def test_keys_list_and_revoke_on_a_missing_database_create_nothing(tmp_path):
    """`keys list` and `keys revoke` open the database with `create=False`."""
    missing = tmp_path / "nonexistent" / "g.sqlite"
    for args in (("list",), ("revoke", "deadbeef")):
        line = one_line_error(niche("gateway", "keys", *args, "--gateway.db", str(missing)))
        assert line == (f"error: no gateway database at {missing}: pass the --gateway.db the "
                        "gateway uses"), line
        assert not missing.parent.exists()


# ------------------------------------------------------- 2: a missing validator state
def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "niche.gateway" and r.levelno == logging.WARNING
            and "validator state" in r.getMessage()]


def test_a_missing_validator_state_is_said_once_and_again_when_it_changes(tmp_path, caplog):
    net = make_chain(tmp_path, miners=0)
    state = tmp_path / "validator" / "state.sqlite"
    directory = MinerDirectory(net.chain, NETUID, MinerClient(net.validator),
                               own_hotkey=net.validator_hotkey, validator_state=state)
    caplog.set_level(logging.INFO, logger="niche.gateway")
    try:
        for _ in range(3):
            asyncio.run(directory.refresh())
        said = _warnings(caplog)
        assert len(said) == 1, said
        assert str(state) in said[0]
        assert ("no scores or exclusions: routing to every miner; pass the validator's "
                "--neuron.state_path") in said[0]

        ValidatorState(state).close()  # the validator starts: it appears
        for _ in range(2):
            asyncio.run(directory.refresh())
        assert len(_warnings(caplog)) == 1
        assert any("is there now" in r.getMessage() for r in caplog.records)

        state.unlink()  # and goes away again: said once more
        for _ in range(3):
            asyncio.run(directory.refresh())
        assert len(_warnings(caplog)) == 2
    finally:
        net.chain.close()


def test_no_validator_state_configured_says_nothing(tmp_path, caplog):
    net = make_chain(tmp_path, miners=0)
    directory = MinerDirectory(net.chain, NETUID, MinerClient(net.validator),
                               own_hotkey=net.validator_hotkey, validator_state=None)
    caplog.set_level(logging.INFO, logger="niche.gateway")
    try:
        asyncio.run(directory.refresh())
    finally:
        net.chain.close()
    assert _warnings(caplog) == []


# ------------------------------------------- 3: nothing created before the chain checks
@pytest.fixture
def miner_net(tmp_path):
    net = build_net(tmp_path)
    net.chain.close()
    return net


def _miner_flags(root: Path, port: int, change: dict[str, str | None] | None = None
                 ) -> list[str]:
    """`niche miner`'s flags on the test chain; a flag changed to None is left out."""
    flags: dict[str, str | None] = {"--netuid": str(NETUID), "--subtensor.network": "localnet",
             "--localnet.path": str(root / "chain.db"), "--wallet.name": "miner",
             "--wallet.hotkey": "hot", "--wallet.path": str(root / "wallets"),
             "--axon.ip": "127.0.0.1", "--axon.port": str(port), "--tiny": "",
             "--model": "flux-schnell", "--device": "cpu", **(change or {})}
    return [x for key, value in flags.items() if value is not None
            for x in ((key,) if value == "" else (key, value))]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("mistake", ["network", "chain file", "netuid"])
def test_a_refused_miner_start_creates_no_states_file(miner_net, tmp_path, mistake):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    change: dict[str, str | None] = {
        "network": {"--subtensor.network": "finnny", "--localnet.path": None},
        "chain file": {"--localnet.path": "nosuch.db"},
        "netuid": {"--netuid": "-1"}}[mistake]
    flags = _miner_flags(miner_net.root, 8091, change)
    before = _files(miner_net.root)
    done = niche("miner", *flags, cwd=work, env={"HOME": str(home)})
    one_line_error(done)
    assert "answers' states kept" not in done.stderr + done.stdout
    assert not (home / ".niche").exists(), _files(home)
    assert _files(work) == set(), _files(work)
    assert _files(miner_net.root) == before


# -------------------------------------------------------- 4: one miner per states file
HOLD = """
import sys, time
from pathlib import Path
from niche.miner.state_store import StatesLock
held = StatesLock(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


class Holder:
    """Another process holding the states file's lock, as a running miner does."""

    def __init__(self, path: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)],
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "held\n"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


def test_a_states_file_in_use_is_refused_and_never_moved_aside(tmp_path):
    from niche.miner.state_store import lock_path

    path = tmp_path / "states.sqlite"
    path.write_bytes(b"garbage, not a database" * 100)  # would be moved aside if unlocked
    before = path.read_bytes()
    holder = Holder(path)
    try:
        with pytest.raises(ConfigError) as caught:
            DiskStates(path, None, 600.0)
        message = str(caught.value)
        assert message.startswith(f"states store {path} is in use by another miner (pid "
                                  f"{holder.proc.pid}, started "), message
        assert message.endswith("one miner per hotkey; stop it, or give this one its own "
                                "--wallet.hotkey / --states.path"), message
        assert path.read_bytes() == before
        assert not list(tmp_path.glob("states.sqlite.corrupt-*"))
    finally:
        holder.stop()
    store = DiskStates(path, None, 600.0)  # the holder gone (even killed): usable again
    try:
        assert len(list(tmp_path.glob("states.sqlite.corrupt-*"))) == 1
        info = json.loads(lock_path(path).read_text())
        assert info["pid"] == os.getpid() and abs(info["started"] - time.time()) < 60
    finally:
        store.close()
    holder = Holder(path)  # closed: another process can take it
    holder.stop()


def test_the_lock_is_reentrant_in_one_process_and_let_go_on_close(tmp_path):
    from niche.miner.state_store import StatesLock

    path = tmp_path / "states.sqlite"
    first = DiskStates(path, None, 600.0)
    second = StatesLock(path)  # the miner's start-up check, then its service
    first.close()
    probe = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", ""),
                            str(path)], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert probe.returncode == 1 and "in use by another miner" in probe.stderr
    second.release()
    second.release()  # once only
    probe = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", ""),
                            str(path)], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert probe.returncode == 0 and probe.stdout == "held\n", probe.stderr


def test_a_second_miner_on_the_same_hotkey_exits_2(miner_net, tmp_path, tiny_root):
    """The review's repro: a copied pm2 config without WALLET_HOTKEY, two `niche miner`
    processes on one hotkey and one states file."""
    states = tmp_path / "states.sqlite"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    first = MinerProcess(miner_net.root, port, states)
    first.start()  # serving: its states file locked
    try:
        assert first.proc is not None
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            flags = _miner_flags(miner_net.root, busy.getsockname()[1])
            line = one_line_error(niche("miner", *flags, "--states.path", str(states)))
            assert line.startswith(f"error: states store {states} is in use by another "
                                   f"miner (pid {first.proc.pid}, started "), line
            assert "one miner per hotkey" in line and "--wallet.hotkey / --states.path" in line
            # --states.memory_only keeps nothing on disk: no lock; the busy port stops it
            line = one_line_error(niche("miner", *flags, "--states.path", str(states),
                                        "--states.memory_only"))
            assert "states" not in line and "--axon.port" in line, line
        assert first.proc.poll() is None  # the first one keeps serving
    finally:
        first.kill()
    DiskStates(states, None, 600.0).close()  # let go when it stopped
