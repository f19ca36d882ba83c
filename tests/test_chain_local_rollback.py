"""LocalChain's refusals and rollbacks on real SQLite files with real bittensor wallets.

Every ChainError branch of niche/chain/local.py is driven here, and for each refusal that
happens inside a write transaction the file is read back through a separate sqlite3
connection: the refused write left no row behind, and the chain still works afterwards.
"""
from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from niche.chain import ChainError
from niche.chain.local import LocalChain, yuma_incentive
from niche.chain.wallets import create_wallet


class Clock:
    def __init__(self, t: float = 2_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def wallets(tmp_path_factory):
    root = tmp_path_factory.mktemp("rbwallets")
    return {name: create_wallet(name, "hot", root) for name in ("val", "m1", "m2", "m3")}


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def chain(tmp_path, clock):
    c = LocalChain(tmp_path / "chain.db", create=True, clock=clock)
    c.create_subnet(1, max_uids=3, immunity_period=10, weights_rate_limit=2,
                    min_validator_stake=10)
    yield c
    c.close()


def dump(path: Path) -> list[str]:
    """The file's whole logical content, read by a connection of its own."""
    db = sqlite3.connect(str(path))
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return list(db.iterdump())
    finally:
        db.close()


def rows(path: Path, sql: str, args: tuple = ()) -> list[tuple]:
    db = sqlite3.connect(str(path))
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


# -- opening files -------------------------------------------------------------------------


@pytest.mark.parametrize("block_time", [0.0, -1.0, math.nan, math.inf])
def test_bad_block_time_is_refused_and_creates_no_chain(tmp_path, block_time):
    path = tmp_path / "bt.db"
    with pytest.raises(ChainError, match="block_time must be positive seconds"):
        LocalChain(path, create=True, block_time=block_time)
    assert rows(path, "SELECT name FROM sqlite_master") == []  # no table was written
    good = LocalChain(path, create=True, block_time=2.0)  # and the name is still usable
    assert good.block_time == 2.0
    good.close()


@pytest.mark.parametrize("damage", [
    "DELETE FROM meta WHERE key='genesis_time'",
    "DELETE FROM meta WHERE key='block_time'",
    "UPDATE meta SET value='soon' WHERE key='block_time'",
    "UPDATE meta SET value='' WHERE key='genesis_time'",
])
def test_damaged_meta_table_is_a_chain_error(tmp_path, damage):
    path = tmp_path / "meta.db"
    LocalChain(path, create=True).close()
    db = sqlite3.connect(str(path))
    db.execute(damage)
    db.commit()
    db.close()
    with pytest.raises(ChainError, match="damaged meta table.*create-subnet") as exc:
        LocalChain(path)
    assert "\n" not in str(exc.value)


def test_missing_schema_version_names_none(tmp_path):
    path = tmp_path / "nover.db"
    LocalChain(path, create=True).close()
    db = sqlite3.connect(str(path))
    db.execute("DELETE FROM meta WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(ChainError, match="schema version None"):
        LocalChain(path)


def _open_fds_to(path) -> list[str]:
    import os

    fds = Path("/proc/self/fd")
    found = []
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(path)):
            found.append(target)
    return found


@pytest.mark.parametrize("refusal", ["schema", "not_ours", "not_sqlite"])
def test_a_refused_file_leaves_no_connection_open(tmp_path, refusal):
    """Every refusal of a file closes what it opened: a process retrying an open (the
    validator at start-up) must not pile up descriptors, or hold a lock, on a bad file."""
    path = tmp_path / f"{refusal}.db"
    if refusal == "schema":
        LocalChain(path, create=True).close()
        db = sqlite3.connect(str(path))
        db.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
        db.commit()
        db.close()
    elif refusal == "not_ours":
        db = sqlite3.connect(str(path))
        db.execute("CREATE TABLE other (x)")
        db.commit()
        db.close()
    else:
        path.write_bytes(b"this is not a database file at all, just text" * 100)
    for _ in range(3):
        with pytest.raises(ChainError, match="create-subnet"):
            LocalChain(path)
    assert _open_fds_to(path) == []


def test_a_chain_path_that_is_a_folder_is_a_chain_error(tmp_path):
    with pytest.raises(ChainError, match="cannot open the chain file|not a readable"):
        LocalChain(tmp_path, create=True)


# -- argument checks (refused before any transaction) --------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"tempo": 0}, "tempo must be an integer >= 1, got 0"),
    ({"tempo": 2.5}, "tempo must be an integer >= 1, got 2.5"),
    ({"weights_rate_limit": -1}, "weights_rate_limit must be an integer >= 0"),
    ({"max_uids": 0}, "max_uids must be an integer >= 1"),
    ({"immunity_period": -3}, "immunity_period must be an integer >= 0"),
    ({"max_validators": 0}, "max_validators must be an integer >= 1"),
    ({"weights_version": -1}, "weights_version must be an integer >= 0"),
    ({"min_validator_stake": -0.5}, "min_validator_stake must be >= 0, got -0.5"),
    ({"min_validator_stake": math.nan}, "min_validator_stake must be >= 0, got nan"),
    ({"min_validator_stake": math.inf}, "min_validator_stake must be >= 0, got inf"),
    ({"netuid": -1}, "netuid must be in 0..65535, got -1"),
    ({"netuid": 65536}, "netuid must be in 0..65535, got 65536"),
])
def test_create_subnet_refuses_bad_parameters(chain, kwargs, message):
    before = dump(chain.path)
    with pytest.raises(ChainError, match=message.replace(".", r"\.")):
        chain.create_subnet(**{"netuid": 7, **kwargs})
    assert dump(chain.path) == before and chain.subnets() == [1]


def test_netuid_bounds_are_inclusive(chain):
    assert chain.create_subnet(0) == 0 and chain.create_subnet(65535) == 65535
    assert chain.subnets() == [0, 1, 65535]


@pytest.mark.parametrize("stake", [-1.0, math.nan, math.inf])
def test_register_and_set_stake_refuse_bad_stakes(chain, wallets, stake):
    before = dump(chain.path)
    with pytest.raises(ChainError, match="stake must be a non-negative number"):
        chain.register(1, wallets["m1"], stake=stake)
    with pytest.raises(ChainError, match="stake must be a non-negative number"):
        chain.set_stake(1, wallets["m1"].hotkey.ss58_address, stake)
    assert dump(chain.path) == before


def test_set_weights_refuses_duplicate_uids(chain, wallets):
    chain.register(1, wallets["val"], stake=100)
    m1 = chain.register(1, wallets["m1"])
    before = dump(chain.path)
    with pytest.raises(ChainError, match="duplicate uids"):
        chain.set_weights(1, wallets["val"], [m1, m1], [0.5, 0.5], 0)
    with pytest.raises(ChainError, match="finite and non-negative"):
        chain.set_weights(1, wallets["val"], [m1], [math.nan], 0)
    with pytest.raises(ChainError, match="subnet 4 does not exist"):
        chain.set_weights(4, wallets["val"], [m1], [1.0], 0)
    assert dump(chain.path) == before


# -- wallets whose keys cannot be used -------------------------------------------------------


def test_wallet_without_a_hotkey_file(chain, tmp_path):
    w = create_wallet("nohot", "hot", tmp_path / "w")
    Path(w.hotkey_file.path).unlink()
    broken = _fresh_wallet("nohot", tmp_path / "w")
    before = dump(chain.path)
    with pytest.raises(ChainError, match="cannot read the hotkey of wallet"):
        chain.register(1, broken)
    with pytest.raises(ChainError, match="cannot read the hotkey of wallet"):
        chain.serve(1, broken, "127.0.0.1", 9000)
    assert dump(chain.path) == before


def test_wallet_without_a_coldkeypub_file(chain, tmp_path):
    w = create_wallet("nocold", "hot", tmp_path / "w")
    Path(w.coldkeypub_file.path).unlink()
    broken = _fresh_wallet("nocold", tmp_path / "w")
    before = dump(chain.path)
    with pytest.raises(ChainError, match="cannot read the coldkey of wallet"):
        chain.register(1, broken)
    assert dump(chain.path) == before


def _fresh_wallet(name: str, root: Path):
    """A bittensor Wallet object that has not cached its keys yet (reads the files on use)."""
    import bittensor

    return bittensor.Wallet(name=name, hotkey="hot", path=str(root))


def test_a_hotkey_that_signs_for_another_address_is_refused(chain, wallets):
    """Keyfile damage: the public address says m1, the private key is m2's."""
    m1, m2 = wallets["m1"], wallets["m2"]
    forged = SimpleNamespace(
        hotkey=SimpleNamespace(ss58_address=m1.hotkey.ss58_address, sign=m2.hotkey.sign),
        coldkeypub=m1.coldkeypub)
    before = dump(chain.path)
    with pytest.raises(ChainError, match="register: the signature does not match hotkey"):
        chain.register(1, forged)
    assert dump(chain.path) == before
    assert chain.metagraph(1).by_hotkey(m1.hotkey.ss58_address) is None


def test_a_hotkey_that_cannot_sign_is_refused(chain, wallets):
    def refuse(_message):
        raise RuntimeError("keyfile is locked")

    w = wallets["m1"]
    chain.register(1, w)
    locked = SimpleNamespace(
        hotkey=SimpleNamespace(ss58_address=w.hotkey.ss58_address, sign=refuse),
        coldkeypub=w.coldkeypub)
    before = dump(chain.path)
    with pytest.raises(ChainError, match="serve: could not sign with the hotkey.*locked"):
        chain.serve(1, locked, "127.0.0.1", 9000)
    assert dump(chain.path) == before


# -- refusals inside a write transaction: rolled back ---------------------------------------


def test_refusals_inside_transactions_leave_the_file_unchanged(chain, wallets, tmp_path, clock):
    v, m1, m2, m3 = (wallets[n] for n in ("val", "m1", "m2", "m3"))
    chain.register(1, v, stake=100)
    u1, u2 = chain.register(1, m1), chain.register(1, m2)
    assert chain.set_weights(1, v, [u1, u2], [1.0, 1.0], 0).success
    before = dump(chain.path)
    thief = create_wallet("thief", "hot", tmp_path / "thief")
    Path(thief.hotkey_file.path).write_bytes(Path(m1.hotkey_file.path).read_bytes())
    thief = _fresh_wallet("thief", tmp_path / "thief")
    refusals = [
        (lambda: chain.create_subnet(1), "subnet 1 already exists"),
        (lambda: chain.register(1, thief), "already owned by coldkey"),
        (lambda: chain.register(1, m3), "full .3 uids. and every neuron is still immune"),
        (lambda: chain.set_stake(1, m3.hotkey.ss58_address, 5.0), "not registered on subnet 1"),
        (lambda: chain.serve(1, m3, "127.0.0.1", 9000), "not registered on subnet 1"),
        (lambda: chain.set_weights(1, v, [u1, 9], [1.0, 1.0], 0), r"uids \[9\] are not on"),
        (lambda: chain.set_weights(1, m3, [u1], [1.0], 0), "not registered on subnet 1"),
    ]
    for call, message in refusals:
        with pytest.raises(ChainError, match=message):
            call()
        assert dump(chain.path) == before, message
    # the connection is not left inside a transaction: the next write goes through
    assert not chain._db.in_transaction
    chain.serve(1, m1, "127.0.0.1", 9100)
    assert rows(chain.path, "SELECT port FROM neurons WHERE uid=?", (u1,)) == [(9100,)]


def test_refused_set_weights_writes_nothing(chain, wallets, clock):
    """Rate limit, missing permit and old version key are answers, not errors, and record
    no weight set and no last-update."""
    v, m1 = wallets["val"], wallets["m1"]
    chain.register(1, v, stake=100)
    u1 = chain.register(1, m1, stake=1)  # below min_validator_stake: no permit
    assert chain.set_weights(1, v, [u1], [1.0], 0).success
    before = dump(chain.path)
    limited = chain.set_weights(1, v, [u1], [1.0], 0)
    assert not limited.success and "retry in 2 blocks" in limited.message
    clock.t += 1
    assert "retry in 1 blocks" in chain.set_weights(1, v, [u1], [1.0], 0).message
    no_permit = chain.set_weights(1, m1, [0], [1.0], 0)
    assert not no_permit.success and "no validator permit" in no_permit.message
    assert dump(chain.path) == before
    # a neuron without a permit may still set weights on itself alone (self-weight)
    assert chain.set_weights(1, m1, [u1], [1.0], 0).success
    assert len(rows(chain.path, "SELECT id FROM weight_sets")) == 2


def test_failed_commit_rolls_every_write_back(tmp_path, wallets, clock):
    """COMMIT itself fails (a reader holds the file in rollback-journal mode past the busy
    timeout): the transaction's writes are rolled back, not left pending for the next
    call to commit, and the caller gets a ChainError."""
    path = tmp_path / "journal.db"
    c = LocalChain(path, create=True, clock=clock)
    c.create_subnet(1)
    c.register(1, wallets["val"], stake=100)
    m1 = c.register(1, wallets["m1"])
    c.close()
    db = sqlite3.connect(str(path))
    assert db.execute("PRAGMA journal_mode = DELETE").fetchone() == ("delete",)
    db.close()
    c = LocalChain(path, clock=clock)
    c._db.execute("PRAGMA busy_timeout = 50")
    before = dump(path)
    reader = sqlite3.connect(str(path), isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM neurons").fetchone()  # holds a SHARED lock
    try:
        with pytest.raises(ChainError, match="unavailable.*locked"):
            c.set_weights(1, wallets["val"], [m1], [1.0], 3)  # INSERT + UPDATE, then COMMIT
        assert not c._db.in_transaction
    finally:
        reader.execute("ROLLBACK")
        reader.close()
    assert dump(path) == before  # neither the weight set nor the last-update survived
    assert c.set_weights(1, wallets["val"], [m1], [1.0], 3).success  # and nothing is stuck
    assert [h["version_key"] for h in c.weights_history(1)] == [3]
    c.close()


def test_begin_that_cannot_get_the_lock_releases_the_thread_lock(chain, wallets, tmp_path):
    """BEGIN IMMEDIATE fails: the chain's own lock is released, so other threads go on."""
    import threading

    chain._db.execute("PRAGMA busy_timeout = 50")
    holder = sqlite3.connect(str(chain.path), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(ChainError, match="unavailable"):
            chain.set_stake(1, "nobody", 1.0)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    got = []

    def other_thread():
        got.append(chain._lock.acquire(timeout=10))
        if got[-1]:
            chain._lock.release()

    t = threading.Thread(target=other_thread)
    t.start()
    t.join(20)
    assert got == [True]


# -- the remaining branches of register and consensus ---------------------------------------


def test_reregistering_with_stake_replaces_the_stake(chain, wallets):
    uid = chain.register(1, wallets["m1"], stake=3.0)
    assert chain.register(1, wallets["m1"], stake=0.0) == uid  # zero keeps the stake
    assert chain.metagraph(1).by_uid(uid).stake == 3.0
    assert chain.register(1, wallets["m1"], stake=12.5) == uid
    assert rows(chain.path, "SELECT stake FROM neurons WHERE uid=?", (uid,)) == [(12.5,)]


def test_weights_only_on_a_uid_that_changed_hands_count_for_nobody(tmp_path, wallets, clock):
    c = LocalChain(tmp_path / "hands.db", create=True, clock=clock)
    c.create_subnet(1, max_uids=2, immunity_period=0, min_validator_stake=1)
    c.register(1, wallets["val"], stake=100)
    m1 = c.register(1, wallets["m1"])
    assert c.set_weights(1, wallets["val"], [m1], [1.0], 0).success
    assert c.metagraph(1).by_uid(m1).incentive == pytest.approx(1.0)
    clock.t += 1
    assert c.register(1, wallets["m2"]) == m1  # the validator's permit protects it
    mg = c.metagraph(1)
    assert mg.by_uid(m1).hotkey == wallets["m2"].hotkey.ss58_address
    assert [n.incentive for n in mg.neurons] == [0.0, 0.0]
    c.close()


def test_yuma_with_kappa_above_all_stake_gives_nothing():
    assert yuma_incentive([1.0, 1.0], [[0.5, 0.5], [0.5, 0.5]], kappa=1.5) == [0.0, 0.0]
    assert yuma_incentive([1.0], [[1.0, 0.0]], kappa=1.0) == pytest.approx([1.0, 0.0])
