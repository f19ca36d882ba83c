"""Weight copying: a subnet running commit-reveal hides each validator's weights until the
chain reveals them, so a lazy validator cannot copy the honest ones. The validator's weights
must therefore go through the SDK's SetWeights intent, which commits when the subnet has
commit-reveal enabled and sets plainly when it has not.

The adapter itself is covered by tests/test_chain_subtensor.py::
test_commit_reveal_subnet_commits_timelocked (the SDK's REAL SetWeights.build against fake
chain storage). Here the whole validator is run end to end through that adapter: a real
round against a real miner, then the weights extrinsic the SDK built is inspected. No
subtensor node can run here; the SDK object is the fake of tests/test_faults_chain.py over a
LocalChain file, with SetWeights built by the SDK's own code against test_chain_subtensor's
fake storage.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import bittensor as bt
import pytest
from miner_support import NETUID, module_net
from test_chain_subtensor import FakeStorage
from test_faults_chain import LocalBackedSDK, _FluxOnly, adapter

from niche.devnet.servers import BackgroundServer
from niche.miner.server import create_app
from niche.miner.service import MinerConfig, MinerService
from niche.validator.client import MinerClient
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState


class SetWeightsSDK(LocalBackedSDK):
    """Builds SetWeights with the SDK's own code (commit-reveal decided by the SDK)."""

    def __init__(self, local, commit_reveal: bool):
        super().__init__(local)
        self.storage = FakeStorage(commit_reveal)
        self.built: list = []
        self.subnets.commit_reveal_enabled = lambda netuid: self._do(lambda: commit_reveal)

    def execute(self, intent, wallet, **kwargs):
        if not isinstance(intent, bt.SetWeights):
            return super().execute(intent, wallet, **kwargs)

        def run():
            # like bt.Subtensor, run the SDK coroutine on a private loop (the caller may be
            # inside its own event loop)
            with ThreadPoolExecutor(1) as pool:
                built = pool.submit(asyncio.run, intent.build(self.storage, wallet)).result()
            self.built.append(getattr(built, "call", built))
            return bt.ExtrinsicResult(success=True, message="included",
                                      data=getattr(built, "extras", {}))

        return self._do(run)


net = module_net("weightsnet")


@pytest.mark.parametrize("commit_reveal, function", [
    (True, "commit_timelocked_mechanism_weights"),
    (False, "set_mechanism_weights"),
])
def test_validator_weights_follow_the_subnets_commit_reveal_setting(
        net, tiny_engine, tmp_path, commit_reveal, function):
    sdk = SetWeightsSDK(net.chain, commit_reveal)
    chain = adapter(sdk)
    honest = MinerService(_FluxOnly(tiny_engine), net.wallets["miner"],
                          MinerConfig(netuid=NETUID, requests_per_minute=0), chain=net.chain)
    wallet = net.wallets["hi"]
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), timeout=20.0,
                             state_path=tmp_path / "state.db", audit_fraction=0.0, seed=1,
                             epoch_length=1, round_interval=0)
    state = ValidatorState(config.state_path)
    validator = Validator(config, chain, wallet, tiny_engine, MinerClient(wallet), state)
    try:
        with BackgroundServer(create_app(honest, refresh_metagraph=False)) as server:
            honest.announce("127.0.0.1", server.port)
            report = asyncio.run(validator.run_round())
    finally:
        honest.close()
        state.close()
    miner_uid = net.chain.metagraph(NETUID).by_hotkey(net.miner_hotkey).uid
    assert report.weights and miner_uid in report.weights, report.weights_message
    assert len(sdk.built) == 1
    call = sdk.built[0]
    assert call.function == function
    if commit_reveal:  # nothing readable on chain until the drand round reveals it
        assert "commit-reveal" in report.weights_message
        assert call.params["reveal_round"] > 0 and "weights" not in call.params
    else:
        assert call.params["dests"] == [miner_uid]
