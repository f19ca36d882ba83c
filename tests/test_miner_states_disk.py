"""The miner's on-disk states store: what a restarted miner can still serve, and its caps."""
from __future__ import annotations

import sqlite3

import pytest
import torch

from niche.errors import ConfigError
from niche.miner.state_store import DiskStates, StateStore


def _states(seed: int, n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((1, 4, 8, 8), generator=gen) for _ in range(n)]


def test_states_survive_a_new_store_on_the_same_file(tmp_path):
    path = tmp_path / "states.sqlite"
    first = StateStore(path=path)
    first.put("hk", "r1", _states(1))
    kept = first.get("hk", "r1")
    assert kept is not None and len(kept) == 3
    first.disk.flush()  # the writer thread's few milliseconds after the answer
    # no close(): a SIGKILLed process never gets to close its connection
    again = StateStore(path=path)  # the restarted miner: nothing in memory
    assert len(again) == 0
    assert again.get("hk", "r1") == kept  # same bytes, state by state
    assert again.get("other", "r1") is None  # only the caller that asked
    assert again.get("hk", "r2") is None


def test_disk_ttl_and_byte_cap(tmp_path):
    now = [1000.0]
    one = 3 * 1024  # bytes of one answer below
    disk = DiskStates(tmp_path / "s.sqlite", max_bytes=2 * one, ttl=60, clock=lambda: now[0])
    blobs = [bytes([i]) * 256 * 4 for i in range(3)]
    disk.put("hk", "r1", blobs)
    disk.put("hk", "r2", blobs)
    disk.flush()
    assert disk.bytes_held == 2 * one
    disk.put("hk", "r3", blobs)  # over the cap: the oldest goes
    disk.flush()
    assert disk.get("hk", "r1") is None and disk.get("hk", "r3") == tuple(blobs)
    assert disk.bytes_held == 2 * one
    now[0] += 61  # past the ttl: gone, and pruned from the file on the next write
    assert disk.get("hk", "r3") is None
    disk.put("hk", "r4", blobs[:1])
    disk.close()  # a clean stop writes what is queued
    rows = sqlite3.connect(tmp_path / "s.sqlite").execute("SELECT request_id FROM states")
    assert [r[0] for r in rows] == ["r4"]
    assert disk.bytes_held == len(blobs[0])


def test_an_unwritable_path_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="--states.path"):
        StateStore(path=blocker / "states.sqlite")


def test_where_the_states_go_by_default(tmp_path):
    import argparse
    from pathlib import Path

    from niche.commands.miner import add_miner_args, states_path_from_args

    parser = argparse.ArgumentParser()
    add_miner_args(parser)
    local = parser.parse_args(["--netuid", "3", "--subtensor.network", "localnet",
                               "--localnet.path", str(tmp_path / "chain.db")])
    assert states_path_from_args(local, "5hk") == \
        tmp_path / "miner-states" / "netuid3-5hk.sqlite"  # a local subnet keeps its own
    real = parser.parse_args(["--netuid", "3", "--subtensor.network", "finney"])
    assert states_path_from_args(real, "5hk") == \
        Path("~/.niche/miner/finney/netuid3/5hk/states.sqlite").expanduser()
    memory = parser.parse_args(["--netuid", "3", "--states.memory_only"])
    assert states_path_from_args(memory, "5hk") is None


def test_the_disk_keeps_what_memory_evicts(tmp_path):
    """At production sizes memory holds minutes of answers, the disk the ttl: an answer
    evicted from a small memory store is still served from disk."""
    import torch

    from niche.miner.state_store import StateStore

    store = StateStore(max_bytes=3 * 4096, ttl=600.0, path=tmp_path / "s.sqlite",
                       disk_max_bytes=1024 * 1024)
    states = [torch.full((1, 1024), float(i)) for i in range(3)]  # 3 x 4 KiB per answer
    store.put("5validator", "first-answer", states)
    store.put("5validator", "second-answer", states)  # evicts the first from memory
    store.disk.flush()
    assert len(store) == 1
    kept = store.get("5validator", "first-answer")
    assert kept is not None and len(kept) == 3 and kept[2] == states[2].numpy().tobytes()
    store.close()
