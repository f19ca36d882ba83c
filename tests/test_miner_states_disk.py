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


class _Disk:
    """A disk of `size` bytes holding only the states file (its -wal and -shm beside it):
    what statvfs would say of a disk that small, from the files' real sizes."""

    def __init__(self, path, size: int):
        self.path, self.size = path, size

    def __call__(self, folder) -> tuple[int, int]:
        used = sum(p.stat().st_size for p in folder.glob(self.path.name + "*"))
        return self.size, self.size - used


def test_auto_cap_keeps_every_answer_for_the_ttl_when_the_disk_has_room(tmp_path):
    """The default (--states.disk_mb auto): no fixed byte count decides how many answers
    keep their states; a miner with many GPUs keeps them all for the ttl."""
    path = tmp_path / "s.sqlite"
    disk = DiskStates(path, None, ttl=600, disk_usage=_Disk(path, 64 * 2**30))
    blob = b"\x01" * (256 * 1024)
    for i in range(40):  # 10 MiB: more than a fixed cap of 8 MiB would hold
        disk.put("hk", f"r{i}", [blob] * 1)
    disk.flush()
    assert all(disk.get("hk", f"r{i}") == (blob,) for i in range(40))
    assert disk.early.count == 0
    assert "cap auto" in disk.describe() and "MiB free" in disk.describe()
    disk.close()


def test_auto_cap_leaves_the_reserve_free_and_says_so(tmp_path, caplog):
    """When the disk runs down to its reserve (10 %, at least 4 GiB), the oldest answers go
    first and the log says what to do; the disk never fills up."""
    path = tmp_path / "s.sqlite"
    reserve = 4 * 2**30
    room = 16 * 2**20  # what the disk has beyond the reserve (the -wal takes up to 4 MiB)
    disk = DiskStates(path, None, ttl=600, disk_usage=_Disk(path, reserve + room))
    blob = b"\x02" * 2**20
    with caplog.at_level("WARNING", logger="niche.miner"):
        for i in range(40):  # 40 MiB into 16 MiB of room
            disk.put("hk", f"r{i}", [blob])
            disk.flush()
    assert disk.get("hk", "r39") == (blob,) and disk.get("hk", "r0") is None
    assert 0 < disk.bytes_held <= room
    used = sum(p.stat().st_size for p in tmp_path.glob("s.sqlite*"))
    assert used <= room + 2 * len(blob)  # the -wal of the last write, at most
    assert disk.early.count > 0
    said = [r.getMessage() for r in caplog.records if "dropped for space" in r.getMessage()]
    assert len(said) == 1 and "--states.disk_mb auto" in said[0] \
        and "free disk space" in said[0]
    disk.close()


@pytest.mark.parametrize(("flag", "expected"), [
    ([], None), (["--states.disk_mb", "auto"], None), (["--states.disk_mb", "AUTO "], None),
    (["--states.disk_mb", "2048"], 2048 * 2**20)])
def test_disk_mb_flag(flag, expected):
    import argparse

    from niche.commands.miner import add_miner_args, config_from_args

    parser = argparse.ArgumentParser()
    add_miner_args(parser)
    config = config_from_args(parser.parse_args(["--netuid", "3", "--axon.ip", "127.0.0.1",
                                                 *flag]))
    assert config.states_disk_max_bytes == expected


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "lots", ""])
def test_bad_disk_mb_is_one_line(value, capsys):
    import argparse

    from niche.commands.miner import add_miner_args

    parser = argparse.ArgumentParser()
    add_miner_args(parser)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--netuid", "3", "--states.disk_mb", value])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--states.disk_mb" in error and "auto" in error


def test_auto_reserve_is_bounded_so_a_big_full_disk_still_keeps_states(tmp_path):
    """2 TB with 150 GB free: 10 % of the disk alone (200 GB) would keep nothing (every
    answer's states deleted as written); the reserve stops at 32 GiB."""
    def big_disk(_folder) -> tuple[int, int]:
        return 2 * 10**12, 150 * 10**9

    disk = DiskStates(tmp_path / "s.sqlite", None, ttl=600, disk_usage=big_disk)
    assert disk.auto_reserve() == 32 * 2**30
    assert disk.cap() == 150 * 10**9 - 32 * 2**30
    blob = b"\x03" * 2**20
    disk.put("hk", "r1", [blob])
    disk.flush()
    assert disk.get("hk", "r1") == (blob,) and disk.problem() is None
    disk.close()


def test_a_store_that_keeps_nothing_says_so(tmp_path):
    def full_disk(_folder) -> tuple[int, int]:
        return 100 * 2**30, 3 * 2**30  # below the 10 GiB it keeps free

    disk = DiskStates(tmp_path / "s.sqlite", None, ttl=600, disk_usage=full_disk)
    problem = disk.problem()
    assert problem is not None and "free disk space" in problem and "\n" not in problem
    disk.close()
    small = DiskStates(tmp_path / "t.sqlite", 16 * 2**20, ttl=600)
    assert small.problem() is None  # the operator's size (a schnell answer is 4 MiB)
    small.close()
