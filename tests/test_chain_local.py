"""LocalChain on real SQLite files with real bittensor wallets."""
from __future__ import annotations

import multiprocessing
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from niche.chain import ChainError, connect
from niche.chain.local import SCHEMA_VERSION, LocalChain, yuma_incentive
from niche.chain.wallets import create_wallet
from niche.errors import NicheError


class Clock:
    """Wall time the test moves by hand, so block arithmetic is exact and instant."""

    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance_blocks(self, n: int, block_time: float = 1.0) -> None:
        self.t += n * block_time


@pytest.fixture(scope="module")
def wallets(tmp_path_factory):
    root = tmp_path_factory.mktemp("wallets")
    return {name: create_wallet(name, "hot", root) for name in ("val", "val2", "m1", "m2", "m3")}


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def chain(tmp_path, clock):
    c = LocalChain(tmp_path / "chain.db", create=True, block_time=1.0, clock=clock)
    c.create_subnet(1, tempo=10, weights_rate_limit=5, max_validators=2, min_validator_stake=10)
    yield c
    c.close()


def test_chaineerror_is_a_nicheerror():
    assert issubclass(ChainError, NicheError)


def test_block_clock_follows_wall_time(tmp_path, clock):
    c = LocalChain(tmp_path / "c.db", create=True, block_time=12.0, clock=clock)
    assert c.current_block() == 0
    clock.t += 12 * 7 + 5
    assert c.current_block() == 7
    # block time is a property of the file: a second opener with another value keeps 12 s
    other = LocalChain(tmp_path / "c.db", create=True, block_time=1.0, clock=clock)
    assert other.block_time == 12.0 and other.current_block() == 7


def test_subnet_lifecycle(chain):
    assert chain.subnet_exists(1) and not chain.subnet_exists(2)
    assert chain.tempo(1) == 10 and chain.weights_rate_limit(1) == 5
    assert chain.create_subnet() == 2
    with pytest.raises(ChainError, match="already exists"):
        chain.create_subnet(1)
    assert chain.create_subnet(1, exist_ok=True) == 1
    with pytest.raises(ChainError, match="subnet 9 does not exist.*create-subnet"):
        chain.metagraph(9)
    with pytest.raises(ChainError, match="tempo"):
        chain.create_subnet(5, tempo=0)


def test_register_serve_metagraph(chain, wallets, clock):
    v, m1 = wallets["val"], wallets["m1"]
    assert chain.register(1, v, stake=100) == 0
    clock.advance_blocks(3)
    assert chain.register(1, m1) == 1
    assert chain.register(1, m1) == 1  # idempotent
    chain.serve(1, m1, "127.0.0.1", 8091)
    mg = chain.metagraph(1)
    assert mg.block == 3 and [n.uid for n in mg.neurons] == [0, 1]
    val, miner = mg.by_uid(0), mg.by_hotkey(m1.hotkey.ss58_address)
    assert val.coldkey == v.coldkeypub.ss58_address and val.stake == 100
    assert val.validator_permit and not miner.validator_permit
    assert miner.endpoint.url == "http://127.0.0.1:8091" and val.endpoint is None
    assert miner.last_update == 3
    with pytest.raises(ChainError, match="not an IP"):
        chain.serve(1, m1, "localhost", 80)
    with pytest.raises(ChainError, match="port"):
        chain.serve(1, m1, "127.0.0.1", 0)


def test_unregistered_wallet_cannot_act(chain, wallets):
    chain.register(1, wallets["val"], stake=100)
    with pytest.raises(ChainError, match="not registered on subnet 1"):
        chain.serve(1, wallets["m2"], "127.0.0.1", 9000)
    with pytest.raises(ChainError, match="not registered"):
        chain.set_weights(1, wallets["m2"], [0], [1.0], 0)


def test_hotkey_belongs_to_one_coldkey(chain, wallets, tmp_path):
    chain.register(1, wallets["m1"])
    # the same hotkey file placed under another coldkey must not be registrable by it
    thief = create_wallet("thief", "hot", tmp_path / "w2")
    hot = Path(wallets["m1"].hotkey_file.path)
    Path(thief.hotkey_file.path).write_bytes(hot.read_bytes())
    thief = create_wallet("thief", "hot", tmp_path / "w2")
    assert thief.hotkey.ss58_address == wallets["m1"].hotkey.ss58_address
    with pytest.raises(ChainError, match="already owned by coldkey"):
        chain.register(1, thief)


def test_validator_permits_top_k_with_min_stake(chain, wallets):
    stakes = {"val": 50, "val2": 30, "m1": 20, "m2": 5}
    uids = {name: chain.register(1, wallets[name], stake=s) for name, s in stakes.items()}
    permits = {n.uid for n in chain.metagraph(1).neurons if n.validator_permit}
    assert permits == {uids["val"], uids["val2"]}  # K=2; m1 is third, m2 below min stake
    chain.set_stake(1, wallets["m1"].hotkey.ss58_address, 40)
    permits = {n.uid for n in chain.metagraph(1).neurons if n.validator_permit}
    assert permits == {uids["val"], uids["m1"]}


def test_weights_rate_limit_history_and_version(chain, wallets, clock):
    v = wallets["val"]
    chain.register(1, v, stake=100)
    m1, m2 = chain.register(1, wallets["m1"]), chain.register(1, wallets["m2"])
    first = chain.set_weights(1, v, [m1, m2], [3.0, 1.0], version_key=7)
    assert first.success, first.message
    clock.advance_blocks(4)
    limited = chain.set_weights(1, v, [m1, m2], [1.0, 1.0], version_key=7)
    assert not limited.success
    assert "rate limited" in limited.message and "1 blocks" in limited.message
    clock.advance_blocks(1)
    assert chain.set_weights(1, v, [m1, m2], [1.0, 3.0], version_key=8).success
    history = chain.weights_history(1, v.hotkey.ss58_address)
    assert [h["version_key"] for h in history] == [7, 8]
    assert history[0]["weights"] == [0.75, 0.25] and history[1]["block"] == 5
    assert len(bytes.fromhex(history[0]["signature"])) == 64
    assert chain.metagraph(1).by_uid(0).last_update == 5
    # a miner (no permit) is refused; malformed vectors raise
    clock.advance_blocks(10)
    refused = chain.set_weights(1, wallets["m1"], [m2], [1.0], 8)
    assert not refused.success and "validator permit" in refused.message
    for uids, ws, msg in (([m1], [1.0, 2.0], "1 uids but 2"), ([m1], [-1.0], "non-negative"),
                          ([m1], [0.0], "all weights are zero"), ([42], [1.0], r"\[42\]")):
        with pytest.raises(ChainError, match=msg):
            chain.set_weights(1, v, uids, ws, 8)


def test_required_version_key(tmp_path, wallets):
    c = LocalChain(tmp_path / "v.db", create=True)
    c.create_subnet(1, weights_version=5)
    c.register(1, wallets["val"], stake=100)
    old = c.set_weights(1, wallets["val"], [0], [1.0], version_key=4)
    assert not old.success and "older than" in old.message


def test_incentive_sums_to_one_and_follows_weights(chain, wallets, clock):
    chain.register(1, wallets["val"], stake=60)
    chain.register(1, wallets["val2"], stake=40)
    m1, m2, m3 = (chain.register(1, wallets[n]) for n in ("m1", "m2", "m3"))
    assert all(n.incentive == 0 for n in chain.metagraph(1).neurons)  # nobody voted yet
    chain.set_weights(1, wallets["val"], [m1, m2, m3], [0.6, 0.3, 0.1], 1)
    chain.set_weights(1, wallets["val2"], [m1, m2, m3], [0.5, 0.4, 0.1], 1)
    inc = {n.uid: n.incentive for n in chain.metagraph(1).neurons}
    assert sum(inc.values()) == pytest.approx(1.0)
    assert inc[m1] > inc[m2] > inc[m3] > 0 and inc[0] == inc[1] == 0
    # the minority validator alone cannot lift a miner: its weight is clipped to consensus
    clock.advance_blocks(5)
    chain.set_weights(1, wallets["val2"], [m1, m2, m3], [0.0, 0.0, 1.0], 1)
    inc2 = {n.uid: n.incentive for n in chain.metagraph(1).neurons}
    assert sum(inc2.values()) == pytest.approx(1.0)
    assert inc2[m3] < inc2[m2] < inc2[m1]


def test_yuma_incentive_clips_to_stake_weighted_median():
    # validator A (70% stake) gives all to uid 0; B (30%) gives all to uid 1
    assert yuma_incentive([70, 30], [[1.0, 0.0], [0.0, 1.0]]) == pytest.approx([1.0, 0.0])
    # both agree: proportional
    assert yuma_incentive([1, 1], [[0.25, 0.75], [0.25, 0.75]]) == pytest.approx([0.25, 0.75])
    assert yuma_incentive([], []) == []
    assert yuma_incentive([0.0], [[0.5, 0.5]]) == [0.0, 0.0]


def test_full_subnet_replaces_lowest_incentive_non_immune(tmp_path, wallets, clock):
    c = LocalChain(tmp_path / "full.db", create=True, clock=clock)
    c.create_subnet(1, max_uids=3, immunity_period=10, min_validator_stake=1)
    c.register(1, wallets["val"], stake=100)
    m1, m2 = c.register(1, wallets["m1"]), c.register(1, wallets["m2"])
    with pytest.raises(ChainError, match="immune"):
        c.register(1, wallets["m3"])
    clock.advance_blocks(10)
    assert c.set_weights(1, wallets["val"], [m1, m2], [0.2, 0.8], 1).success
    clock.advance_blocks(1)
    assert c.register(1, wallets["m3"]) == m1  # lowest incentive, not immune
    mg = c.metagraph(1)
    assert mg.by_uid(m1).hotkey == wallets["m3"].hotkey.ss58_address
    # weights set before the uid changed hands do not count for the newcomer
    assert mg.by_uid(m1).incentive == 0 and mg.by_uid(m2).incentive == pytest.approx(1.0)


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(ChainError, match="no localnet chain file.*create-subnet"):
        LocalChain(tmp_path / "absent.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 200)
    with pytest.raises(ChainError, match="not a readable niche chain file.*create-subnet") as e:
        LocalChain(junk)
    assert "\n" not in str(e.value)
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(ChainError, match="not a niche chain file"):
        LocalChain(foreign)
    old = tmp_path / "old.db"
    LocalChain(old, create=True).close()
    db = sqlite3.connect(old)
    db.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(ChainError, match=f"schema version 999.*version {SCHEMA_VERSION}"):
        LocalChain(old)


def test_connect_factory(tmp_path):
    path = tmp_path / "f.db"
    LocalChain(path, create=True).close()
    assert isinstance(connect("localnet", path), LocalChain)
    with pytest.raises(ChainError, match="needs --localnet.path"):
        connect("localnet", None)
    with pytest.raises(ChainError, match="unknown network 'mainnet'.*localnet, finney, test"):
        connect("mainnet")
    assert connect("ws://127.0.0.1:9944").network == "ws://127.0.0.1:9944"  # lazy: no I/O


_WORKER = """
import sys
from niche.chain.local import LocalChain
from niche.chain.wallets import load_wallet

path, wallet_root, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
chain = LocalChain(path)
for name in names:
    wallet = load_wallet(name, "hot", wallet_root, interactive=False)
    chain.register(1, wallet, stake=1.0)
    for port in range(50):
        chain.serve(1, wallet, "127.0.0.1", 9000 + port)
        chain.metagraph(1)
chain.close()
seen = sorted(n.uid for n in LocalChain(path).metagraph(1).neurons)
print("ok", len(seen))
"""


def test_two_processes_write_one_file(tmp_path):
    """Two neuron processes (as pm2 starts them: separate interpreters, not forks, which
    SQLite forbids carrying a connection across) register and serve into one chain file at
    once; every write of both lands."""
    root = tmp_path / "w"
    names = [f"p{i}" for i in range(8)]
    for name in names:
        create_wallet(name, "hot", root)
    path = tmp_path / "shared.db"
    creator = LocalChain(path, create=True)
    creator.create_subnet(1)
    creator.close()
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(path), str(root),
                               ",".join(names[i::2])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0 and out.startswith("ok"), err[-2000:]
    mg = LocalChain(path).metagraph(1)
    assert sorted(n.uid for n in mg.neurons) == list(range(8)), outputs
    assert len({n.hotkey for n in mg.neurons}) == 8
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert all(n.endpoint and n.endpoint.port == 9049 for n in mg.neurons)


def _use_inherited(chain: LocalChain, wallet_root: str, queue) -> None:
    from niche.chain.wallets import load_wallet

    outcome = []
    try:
        chain.register(1, load_wallet("late", "hot", wallet_root, interactive=False))
        outcome.append("inherited chain wrote")
    except ChainError as exc:
        outcome.append(str(exc))
    fresh = LocalChain(chain.path)
    outcome.append(fresh.register(1, load_wallet("late", "hot", wallet_root, interactive=False)))
    queue.put(outcome)


def test_a_chain_inherited_through_fork_is_refused_and_a_new_one_works(chain, wallets,
                                                                       tmp_path):
    chain.register(1, wallets["val"], stake=100)
    create_wallet("late", "hot", tmp_path / "late")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_use_inherited, args=(chain, str(tmp_path / "late"), queue))
    child.start()
    refusal, uid = queue.get(timeout=60)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert "inherited by fork()" in refusal and "open a new LocalChain" in refusal
    assert uid == 1
    assert [n.uid for n in chain.metagraph(1).neurons] == [0, 1]  # the parent's still works


def test_a_locked_file_is_a_chain_error_and_leaves_the_chain_usable(chain, wallets, tmp_path):
    """Another process holding the write lock past the busy timeout: callers get ChainError
    (which the miner and validator retry), not a raw sqlite3 error, and nothing is left held."""
    v = wallets["val"]
    chain.register(1, v, stake=100)
    chain._db.execute("PRAGMA busy_timeout = 50")  # the default waits 10 s
    holder = sqlite3.connect(str(tmp_path / "chain.db"), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(ChainError, match="unavailable.*locked"):
            chain.register(1, wallets["m1"])
        assert [n.uid for n in chain.metagraph(1).neurons] == [0]  # WAL: readers go on
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert chain.register(1, wallets["m1"]) == 1  # the lock and the connection are free again
    assert [n.uid for n in chain.metagraph(1).neurons] == [0, 1]
