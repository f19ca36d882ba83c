"""SubtensorChain against an injected fake of the bittensor SDK object.

No subtensor node can run in this environment, so `bt.Subtensor` is replaced by a
fake with the same surface (`block`, `query`, `subnets.*`, `hyperparameters.*`,
`neurons.*`, `execute`). For set_weights the fake runs the SDK's REAL `SetWeights.build`
against fake chain storage, so the commit-reveal choice is the SDK's own code.
"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import bittensor as bt
import pytest

from niche.chain import ChainError
from niche.chain.subtensor import SubtensorChain, parse_axon
from niche.chain.wallets import create_wallet


class FakeStorage:
    """Answers the storage reads SetWeights.build makes (subnet 2, our hotkey at uid 0)."""

    def __init__(self, commit_reveal: bool, last_update: int = 0):
        self.values = {
            "Uids": 0, "CommitRevealWeightsEnabled": commit_reveal, "WeightsSetRateLimit": 100,
            "LastUpdate": [last_update, 0, 0], "MinAllowedWeights": 1,
            "MaxWeightsLimit": 65535, "SubnetEpochConsensus": "Yuma", "Tempo": 360,
            "RevealPeriodEpochs": 1, "LastEpochBlock": 900, "PendingEpochAt": 0,
            "SubnetEpochIndex": 3, "BlocksSinceLastStep": 100,
        }

    async def block_number(self):
        return 1000

    async def block_hash(self, n):
        return f"0x{n:064x}"

    async def block_time(self):
        return 12.0

    async def query(self, *args, block_hash=None):
        return self.values[args[1]]

    async def compose(self, call):
        return call


class FakeSDK:
    def __init__(self, commit_reveal: bool = False, fail_times: int = 0, last_update: int = 0):
        self.fail_times = fail_times
        self.calls: list[str] = []
        self.submitted: list = []
        self.storage = FakeStorage(commit_reveal, last_update)
        self.registered: dict[str, int] = {}
        neuron = SimpleNamespace(
            uid=0, hotkey="5Hot", coldkey="5Cold", total_stake=bt.Balance.from_tao(1234.5),
            validator_permit=True, axon="10.0.0.7:8091", last_update=990, incentive=0.25,
        )
        idle = SimpleNamespace(
            uid=1, hotkey="5Hot2", coldkey="5Cold2", total_stake=bt.Balance.from_tao(0),
            validator_permit=False, axon=None, last_update=10, incentive=0.0,
        )
        self.subnets = SimpleNamespace(
            metagraph=lambda netuid, commitments=True: self._read(
                "metagraph", SimpleNamespace(block=1000, neurons=[neuron, idle])
                if netuid == 2 else None),
            info=lambda netuid: self._read("info", SimpleNamespace(tempo=360)),
            commit_reveal_enabled=lambda netuid: self._read("cr", commit_reveal),
            burn=lambda netuid: self._read("burn", bt.Balance.from_tao(0.5)),
        )
        self.hyperparameters = SimpleNamespace(
            weights_rate_limit=lambda netuid: self._read("rate", 100))
        self.neurons = SimpleNamespace(
            uid=lambda hotkey, netuid: self._read("uid", self.registered.get(hotkey)))

    def _read(self, name, value):
        self.calls.append(name)
        if self.fail_times:
            self.fail_times -= 1
            raise bt.RpcConnectionError("could not connect to any endpoint: refused")
        return value

    @property
    def block(self):
        return self._read("block", 1000)

    def query(self, item, params):
        return self._read(f"query:{item.name}", item.name == "NetworksAdded" and params == [2])

    def execute(self, intent, wallet, **kwargs):
        self._read(f"execute:{type(intent).__name__}", None)
        if isinstance(intent, bt.SetWeights):
            built = asyncio.run(intent.build(self.storage, wallet))
            call = getattr(built, "call", built)
            self.submitted.append(call)
            return bt.ExtrinsicResult(success=True, message="included",
                                      data=getattr(built, "extras", {}))
        if isinstance(intent, bt.BurnedRegister):
            self.registered[wallet.hotkey.ss58_address] = 5
        self.submitted.append(intent)
        return bt.ExtrinsicResult(success=True, message="included")


@pytest.fixture(scope="module")
def wallet(tmp_path_factory):
    return create_wallet("val", "hot", tmp_path_factory.mktemp("w"))


def make(sdk, **kw) -> tuple[SubtensorChain, list[float]]:
    sleeps: list[float] = []
    return SubtensorChain("test", sdk=sdk, sleep=sleeps.append, **kw), sleeps


def test_reads_map_the_sdk_metagraph():
    chain, _ = make(FakeSDK())
    mg = chain.metagraph(2)
    assert mg.block == 1000 and len(mg.neurons) == 2
    n0, n1 = mg.neurons
    assert n0.stake == 1234.5 and n0.validator_permit and n0.incentive == 0.25
    assert n0.endpoint.url == "http://10.0.0.7:8091" and n1.endpoint is None
    assert chain.current_block() == 1000 and chain.tempo(2) == 360
    assert chain.weights_rate_limit(2) == 100 and chain.subnet_exists(2)
    assert not chain.subnet_exists(7)
    with pytest.raises(ChainError, match="subnet 7 does not exist on test"):
        chain.metagraph(7)
    with pytest.raises(ChainError, match="subnet 7 does not exist"):
        chain.tempo(7)


def test_retries_with_bounded_exponential_backoff():
    sdk = FakeSDK(fail_times=3)
    chain, sleeps = make(sdk, retries=4, backoff_s=0.5, max_backoff_s=1.5)
    assert chain.current_block() == 1000
    assert sleeps == [0.5, 1.0, 1.5] and sdk.calls.count("block") == 4


def test_unreachable_node_is_one_clear_error():
    chain, sleeps = make(FakeSDK(fail_times=100), retries=2)
    with pytest.raises(ChainError) as e:
        chain.metagraph(2)
    msg = str(e.value)
    assert "cannot reach subtensor at test" in msg and "after 3 attempts" in msg
    assert "--subtensor.network" in msg and "\n" not in msg and len(sleeps) == 2


def test_plain_set_weights_uses_sdk_set_weights(wallet):
    sdk = FakeSDK(commit_reveal=False)
    chain, _ = make(sdk)
    result = chain.set_weights(2, wallet, [1, 2], [0.25, 0.75], version_key=11)
    assert result.success and result.block == 1000
    call = sdk.submitted[-1]
    assert call.function == "set_mechanism_weights"
    assert call.params["dests"] == [1, 2] and call.params["version_key"] == 11
    assert call.params["weights"] == [21845, 65535]  # SDK's u16 max-upscale


def test_commit_reveal_subnet_commits_timelocked(wallet):
    sdk = FakeSDK(commit_reveal=True)
    chain, _ = make(sdk)
    result = chain.set_weights(2, wallet, [1, 2], [0.5, 0.5], version_key=3)
    assert result.success and "commit-reveal" in result.message
    call = sdk.submitted[-1]
    assert call.function == "commit_timelocked_mechanism_weights"
    assert call.params["netuid"] == 2 and call.params["reveal_round"] > 0
    assert f"round {call.params['reveal_round']}" in result.message


def test_rate_limited_set_weights_is_a_failed_result(wallet):
    chain, _ = make(FakeSDK(last_update=950))  # 50 blocks ago, limit 100
    result = chain.set_weights(2, wallet, [1], [1.0], version_key=0)
    assert not result.success and "rate limit" in result.message


def test_register_and_serve(wallet):
    sdk = FakeSDK()
    chain, _ = make(sdk)
    assert chain.register(2, wallet) == 5
    assert chain.register(2, wallet) == 5  # already registered: no second burn
    assert sum(isinstance(i, bt.BurnedRegister) for i in sdk.submitted) == 1
    chain.serve(2, wallet, "10.1.2.3", 8091)
    serve = sdk.submitted[-1]
    assert isinstance(serve, bt.ServeAxon) and (serve.ip, serve.port) == ("10.1.2.3", 8091)
    with pytest.raises(ChainError, match="btcli stake add"):
        chain.register(2, wallet, stake=5)
    assert chain.burn_cost(2) == 0.5


def test_failed_extrinsic_raises_with_remediation(wallet):
    sdk = FakeSDK()
    error = bt.ChainError("Invalid IP address", name="InvalidIpAddress")
    sdk.execute = lambda intent, wallet, **kw: bt.ExtrinsicResult(
        success=False, message="dispatch failed", error=error)
    chain, _ = make(sdk)
    with pytest.raises(ChainError, match="serve .* failed on chain: dispatch failed"):
        chain.serve(2, wallet, "10.1.2.3", 8091)


def test_unknown_network_and_axon_parsing():
    with pytest.raises(ChainError, match="unknown subtensor network 'moon'"):
        SubtensorChain("moon", sdk=FakeSDK())
    assert parse_axon("[::1]:9000").ip == "::1"
    assert parse_axon("0.0.0.0:0") is None and parse_axon("garbage") is None
