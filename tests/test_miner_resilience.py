"""A miner that recovers by itself from what a reliability review found blocking it:

- a corrupt states store (garbage over the SQLite file, a malformed page, another schema) is a
  disposable cache: moved aside to `<name>.corrupt-<UTC time>` with one WARNING line, and the
  miner starts with an empty one; what moving aside cannot fix (a folder, someone else's
  database) still stops it with one ConfigError line;
- another process on the same hotkey that published its endpoint and stopped: the original
  miner sees the chain showing the other endpoint at its next metagraph refresh, says so once
  and publishes its own again (within the chain's serving rate limit).

Real SQLite files, real LocalChain files, real wallets, real miner services on 127.0.0.1."""
from __future__ import annotations

import functools
import json
import logging
import socket
import sqlite3
import time
from pathlib import Path

import httpx
import miner_support
import pytest
from miner_support import (
    MIN_STAKE,
    NETUID,
    StubEngine,
    build_net,
    make_request,
    running_miner,
    signed_post,
)

from niche.chain.base import Endpoint
from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.cli import main
from niche.devnet.servers import BackgroundServer
from niche.errors import ConfigError
from niche.miner.server import create_app
from niche.miner.service import MinerConfig, MinerService
from niche.miner.state_store import DiskStates, StateStore

GARBAGE = b"garbagegarbage!!"


def _scribble(path: Path, offset: int, data: bytes = GARBAGE) -> None:
    """`printf 'garbagegarbage!!' | dd of=PATH seek=OFFSET bs=1 conv=notrunc`."""
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def _stored(path: Path) -> None:
    """A states file with one answer in it, closed as a clean stop leaves it."""
    store = DiskStates(path, None, 600.0)
    store.put("5caller", "old-answer", [b"\x01" * 4096, b"\x02" * 4096])
    store.close()


def _garbage_header(path: Path) -> None:
    _scribble(path, 0)  # "file is not a database"


def _garbage_page(path: Path) -> None:
    page = int(sqlite3.connect(path).execute("PRAGMA page_size").fetchone()[0])
    _scribble(path, page)  # the states table's root: "database disk image is malformed"


def _other_schema(path: Path) -> None:
    path.unlink()
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE states (hotkey TEXT, request_id TEXT, blob BLOB)")
        db.execute("INSERT INTO states VALUES ('5caller', 'old-answer', x'00')")


def _aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".corrupt-*"))


def _moved_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "niche.miner" and "moved aside" in r.getMessage()]


@pytest.mark.parametrize(("spoil", "why"), [
    (_garbage_header, "file is not a database"),
    (_garbage_page, "malformed"),
    (_other_schema, "columns hotkey, request_id, blob"),
])
def test_an_unusable_states_file_is_moved_aside_and_the_store_starts_empty(
        tmp_path, caplog, spoil, why):
    path = tmp_path / "states.sqlite"
    _stored(path)
    spoil(path)
    spoiled = path.read_bytes()
    junk = b"a killed process's leftover log" * 64
    path.with_name(path.name + "-wal").write_bytes(junk)
    caplog.set_level(logging.WARNING, logger="niche.miner")

    store = DiskStates(path, None, 600.0)  # no ConfigError
    try:
        (aside,) = _aside(path)
        assert aside.read_bytes() == spoiled  # kept for a look, not deleted
        stamp = aside.name.rsplit(".corrupt-", 1)[1]
        assert time.strptime(stamp, "%Y%m%dT%H%M%SZ")  # a UTC time
        wal = path.with_name(path.name + "-wal")
        assert not wal.exists() or wal.read_bytes() != junk  # the old log went with it
        (line,) = _moved_lines(caplog)
        assert str(path) in line and str(aside) in line and why in line and "\n" not in line
        assert store.bytes_held == 0 and store.get("5caller", "old-answer") is None
        store.put("5caller", "new-answer", [b"\x03" * 4096])
        store.flush()
        assert store.get("5caller", "new-answer") == (b"\x03" * 4096,)
    finally:
        store.close()
    again = DiskStates(path, None, 600.0)  # the fresh file is a good store: nothing moved
    assert again.get("5caller", "new-answer") == (b"\x03" * 4096,)
    again.close()
    assert len(_aside(path)) == 1 and len(_moved_lines(caplog)) == 1


def test_what_moving_aside_cannot_fix_is_still_one_config_error(tmp_path):
    folder = tmp_path / "states.sqlite"
    folder.mkdir()  # a folder where the file should be: not corrupt, just wrong
    with pytest.raises(ConfigError, match="--states.memory_only") as caught:
        StateStore(path=folder)
    assert "\n" not in str(caught.value) and folder.is_dir() and not _aside(folder)

    theirs = tmp_path / "chain.db"  # someone's database given as --states.path by mistake
    with sqlite3.connect(theirs) as db:
        db.execute("CREATE TABLE neurons (uid INTEGER)")
        db.execute("CREATE TABLE states (uid INTEGER)")
    before = theirs.read_bytes()
    with pytest.raises(ConfigError, match="not a states store"):
        StateStore(path=theirs)
    assert theirs.read_bytes() == before and not _aside(theirs)


def _states_body(request_id: str) -> bytes:
    return json.dumps({"request_id": request_id, "indices": [1, 2]}).encode()


def test_a_miner_on_a_corrupt_states_file_starts_and_keeps_states_again(tmp_path, caplog):
    """The reviewer's repro, through real miner services and HTTP: garbage over the states
    file used to stop the miner at start (exit 2, 'cannot open the states store'); now it
    starts, and a restart after an answer still serves that answer's states from disk."""
    net = build_net(tmp_path)
    path = tmp_path / "states.sqlite"
    _stored(path)
    _garbage_page(path)
    caplog.set_level(logging.WARNING, logger="niche.miner")
    request = make_request(seed=7)
    try:
        with running_miner(net, StubEngine(), states_path=path) as miner:
            answer = signed_post(miner, net.wallets["hi"], request.model_dump_json().encode())
            assert answer.status_code == 200, answer.text
        with running_miner(net, StubEngine(), states_path=path) as restarted:
            fetched = signed_post(restarted, net.wallets["hi"],
                                  _states_body(request.request_id), path="/v1/states")
            assert fetched.status_code == 200, fetched.text
            assert [s["index"] for s in fetched.json()["states"]] == [1, 2]
    finally:
        net.chain.close()
    assert len(_aside(path)) == 1 and len(_moved_lines(caplog)) == 1


def test_niche_miner_gets_past_a_corrupt_states_file(tmp_path, caplog, capsys):
    """`niche miner` itself: its configuration checks no longer stop at the states file (the
    busy port after it is what stops this run, before any model loads)."""
    net = build_net(tmp_path)
    net.chain.close()
    path = tmp_path / "states.sqlite"
    _stored(path)
    _garbage_header(path)
    caplog.set_level(logging.WARNING, logger="niche.miner")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        flags = {"--netuid": str(NETUID), "--subtensor.network": "localnet",
                 "--localnet.path": str(tmp_path / "chain.db"), "--wallet.name": "miner",
                 "--wallet.hotkey": "hot", "--wallet.path": str(tmp_path / "wallets"),
                 "--axon.ip": "127.0.0.1", "--axon.port": str(busy.getsockname()[1]),
                 "--model": "flux-schnell", "--states.path": str(path)}
        code = main(["miner", "--tiny", *[x for pair in flags.items() for x in pair]])
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, errors
    assert "states" not in errors[0] and "axon" in errors[0].lower(), errors
    assert len(_aside(path)) == 1 and len(_moved_lines(caplog)) == 1
    fresh = DiskStates(path, None, 600.0)  # a usable store: nothing more moved aside
    assert fresh.bytes_held == 0 and len(_aside(path)) == 1
    fresh.close()


# ---------------------------------------------------------------------- the endpoint


wait_for = functools.partial(miner_support.wait_for, timeout=15.0)


def _other_process_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
            and "another process may serve this hotkey" in r.getMessage()]


def test_the_endpoint_comes_back_after_another_process_on_the_hotkey_stops(tmp_path, caplog):
    """A second miner process on the same hotkey publishes its port, then stops: the first
    publishes its own again at its next refresh, with one WARNING naming both."""
    net = build_net(tmp_path)
    caplog.set_level(logging.INFO, logger="niche.miner")
    try:
        with running_miner(net, StubEngine(), metagraph_refresh=0.1) as first:
            first.service.announce("127.0.0.1", first.server.port)
            ours = Endpoint("127.0.0.1", first.server.port)
            assert net.chain.endpoint_of(NETUID, first.hotkey) == ours

            second = MinerService(StubEngine(), net.wallets["miner"],
                                  MinerConfig(netuid=NETUID, min_stake=MIN_STAKE),
                                  chain=net.chain)
            with BackgroundServer(create_app(second, refresh_metagraph=False)) as server:
                second.announce("127.0.0.1", server.port)
            second.close()  # stopped: its port is dead, the chain still points at it

            wait_for(lambda: net.chain.endpoint_of(NETUID, first.hotkey) == ours,
                     "the first miner's endpoint on chain again")
            assert httpx.get(ours.url + "/healthz", timeout=10).json()["ok"] is True
            time.sleep(0.5)  # a few more refreshes: nothing more to say
            (line,) = _other_process_lines(caplog)
            assert f"is 127.0.0.1:{server.port}, this miner serves {ours.ip}:{ours.port}" \
                in line and first.hotkey in line
    finally:
        net.chain.close()


def test_publishing_again_respects_the_serving_rate_limit(tmp_path, caplog):
    """Inside the chain's serving rate limit the publication is deferred and retried at
    each refresh, with the one WARNING about the other endpoint said once."""
    wallet = create_wallet("miner", "hot", tmp_path / "wallets")
    chain = LocalChain(tmp_path / "chain.db", create=True, block_time=0.2)
    chain.create_subnet(NETUID, serving_rate_limit=5)  # a second serve waits ~1 s
    chain.register(NETUID, wallet)
    service = MinerService(StubEngine(), wallet, MinerConfig(
        netuid=NETUID, metagraph_refresh=0.1, requests_per_minute=0), chain=chain)
    caplog.set_level(logging.INFO, logger="niche.miner")
    try:
        with BackgroundServer(create_app(service)) as server:
            service.announce("127.0.0.1", server.port)
            ours = Endpoint("127.0.0.1", server.port)
            # the other process: its serve lands once the limit allows it, and restarts it
            wait_for(lambda: _serve_or_none(chain, wallet, 1), "the other process's serve")
            wait_for(lambda: chain.endpoint_of(NETUID, service.hotkey) == ours,
                     "the endpoint published again once the limit allows")
        limited = [r for r in caplog.records if "serving rate limit" in r.getMessage()]
        assert limited, "the first retry should have been inside the rate limit"
        assert len(_other_process_lines(caplog)) == 1
    finally:
        service.close()
        chain.close()


def _serve_or_none(chain: LocalChain, wallet, port: int) -> bool:
    from niche.chain.base import RateLimitedError

    try:
        chain.serve(NETUID, wallet, "127.0.0.1", port)
    except RateLimitedError:
        return False
    return True
