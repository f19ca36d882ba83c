"""State files keyed by network + netuid + hotkey: the default path includes them, a file of
another network/netuid/hotkey is refused in one line, an old unbound file is adopted, and
the old default path is explained rather than silently continued."""
from __future__ import annotations

from pathlib import Path

import pytest

from niche.validator.state import (
    StateError,
    ValidatorState,
    default_state_path,
    legacy_state_notice,
)


def test_default_path_is_per_network_netuid_and_hotkey():
    path = default_state_path("finney", 23, "5Hot", root=Path("/r"))
    assert path == Path("/r/finney/netuid23/5Hot/state.sqlite")
    assert default_state_path("finney", 2, "5Hot", root=Path("/r")) != path
    assert default_state_path("ws://127.0.0.1:9944", 1, "5H", root=Path("/r")) == \
        Path("/r/ws_127.0.0.1_9944/netuid1/5H/state.sqlite")
    assert default_state_path("///", 1, "5H", root=Path("/r")).parts[2] == "network"


def test_a_file_of_another_netuid_is_refused(tmp_path):
    path = tmp_path / "state.db"
    with ValidatorState(path) as state:
        assert state.identity is None
        state.bind("localnet", 1, "5Hot")
        state.bind("localnet", 1, "5Hot")  # the same validator again: fine
        assert state.identity == ("localnet", 1, "5Hot")
    with ValidatorState(path) as state:
        for network, netuid, hotkey in (("localnet", 2, "5Hot"), ("finney", 1, "5Hot"),
                                        ("localnet", 1, "5Other")):
            with pytest.raises(StateError, match="belongs to network localnet, netuid 1, "
                                                 "hotkey 5Hot") as e:
                state.bind(network, netuid, hotkey)
            assert "\n" not in str(e.value) and "--neuron.state_path" in str(e.value)
        assert state.identity == ("localnet", 1, "5Hot")


def test_a_file_from_before_the_keys_is_adopted(tmp_path):
    path = tmp_path / "old.db"
    with ValidatorState(path) as state:  # what an older niche left: rounds, no identity
        state._conn.execute("UPDATE meta SET value='7' WHERE key='round'")
    with ValidatorState(path) as state:
        state.bind("finney", 23, "5Hot")
        assert state.round_index == 7 and state.identity == ("finney", 23, "5Hot")


def test_a_read_only_file_cannot_be_bound(tmp_path):
    path = tmp_path / "ro.db"
    ValidatorState(path).close()
    with ValidatorState(path) as state:
        state._conn.execute("PRAGMA query_only = ON")
        with pytest.raises(StateError, match="recording the network, netuid and hotkey"):
            state.bind("localnet", 1, "5Hot")


def test_the_old_default_path_is_explained(tmp_path):
    legacy, new = tmp_path / "state.sqlite", tmp_path / "finney/netuid1/5H/state.sqlite"
    assert legacy_state_notice(new, legacy) is None  # nothing there
    legacy.write_bytes(b"")
    notice = legacy_state_notice(new, legacy)
    assert notice is not None and "NOT used" in notice
    assert f"mv {legacy} {new}" in notice
    assert legacy_state_notice(legacy, legacy) is None  # told to use the old path itself
    new.parent.mkdir(parents=True)
    new.write_bytes(b"")
    assert legacy_state_notice(new, legacy) is None  # already moved
