"""The chain goes away for a while: miner and validator keep going and recover.

No subtensor node can run here, so both sides use the real SubtensorChain adapter (its retry
and backoff code) over a FAKE of the SDK object, as tests/test_chain_subtensor.py does. The
fake is backed by a real LocalChain file for its state (neurons, stakes, endpoints, weights)
and can be switched into an outage in which every SDK call raises the SDK's own
RpcConnectionError, as a dead or unreachable node does.
"""
from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import bittensor as bt
import httpx
import pytest
from miner_support import MIN_STAKE, NETUID, StubEngine, build_net, make_request, signed_post

from niche.chain.subtensor import SubtensorChain
from niche.devnet.servers import BackgroundServer
from niche.miner.server import create_app
from niche.miner.service import MinerConfig, MinerService


class LocalBackedSDK:
    """Fake of `bt.Subtensor`'s surface (the part SubtensorChain uses) over a LocalChain.

    `outage(n)`: the next n SDK calls raise bt.RpcConnectionError; `outage(None)`: all do
    until `restore()`. `calls`/`failures` count what the adapter attempted."""

    def __init__(self, local):
        self.local = local
        self.calls = 0
        self.failures = 0
        self._failing: int | None = 0
        self.subnets = SimpleNamespace(
            metagraph=lambda netuid, commitments=True: self._do(lambda: self._metagraph(netuid)),
            info=lambda netuid: self._do(lambda: SimpleNamespace(tempo=local.tempo(netuid))),
            commit_reveal_enabled=lambda netuid: self._do(lambda: False),
            burn=lambda netuid: self._do(lambda: bt.Balance.from_tao(0)),
        )
        self.hyperparameters = SimpleNamespace(weights_rate_limit=lambda netuid: self._do(
            lambda: local.weights_rate_limit(netuid)))
        self.neurons = SimpleNamespace(uid=lambda hotkey, netuid: self._do(
            lambda: getattr(local.metagraph(netuid).by_hotkey(hotkey), "uid", None)))

    def outage(self, calls: int | None = None) -> None:
        self._failing = calls

    def restore(self) -> None:
        self._failing = 0

    def _do(self, fn):
        self.calls += 1
        if self._failing is None or self._failing > 0:
            if self._failing is not None:
                self._failing -= 1
            self.failures += 1
            raise bt.RpcConnectionError("could not connect to any endpoint: refused")
        return fn()

    def _metagraph(self, netuid):
        mg = self.local.metagraph(netuid)
        neurons = [SimpleNamespace(
            uid=n.uid, hotkey=n.hotkey, coldkey=n.coldkey,
            total_stake=bt.Balance.from_tao(n.stake), validator_permit=n.validator_permit,
            axon=f"{n.endpoint.ip}:{n.endpoint.port}" if n.endpoint else None,
            last_update=n.last_update, incentive=n.incentive) for n in mg.neurons]
        return SimpleNamespace(block=mg.block, neurons=neurons)

    @property
    def block(self):
        return self._do(self.local.current_block)

    def query(self, item, params):
        return self._do(lambda: item.name == "NetworksAdded"
                        and self.local.subnet_exists(params[0]))

    def execute(self, intent, wallet, **kwargs):
        def run():
            if isinstance(intent, bt.SetWeights):
                result = self.local.set_weights(intent.netuid, wallet, intent.uids,
                                                intent.weights, intent.version_key)
                return bt.ExtrinsicResult(success=result.success, message=result.message)
            if isinstance(intent, bt.ServeAxon):
                self.local.serve(intent.netuid, wallet, intent.ip, intent.port)
                return bt.ExtrinsicResult(success=True, message="served")
            raise AssertionError(f"unexpected intent {intent!r}")

        return self._do(run)


def adapter(sdk, sleeps=None, retries: int = 2) -> SubtensorChain:
    """The real adapter with tiny real sleeps (the backoff sequence is recorded)."""
    def sleep(seconds):
        if sleeps is not None:
            sleeps.append(seconds)
        time.sleep(seconds / 100)

    return SubtensorChain("test", sdk=sdk, retries=retries, backoff_s=0.5, max_backoff_s=4.0,
                          sleep=sleep)


@pytest.fixture()
def net(tmp_path):
    net = build_net(tmp_path)
    yield net
    net.chain.close()


def test_miner_serves_through_a_chain_outage_and_picks_up_changes_after(net, caplog):
    """The metagraph refresh fails for a while: the miner keeps serving with its last
    snapshot, logs each failure, and applies a stake change made during the outage once the
    chain answers again."""
    sdk = LocalBackedSDK(net.chain)
    sleeps: list[float] = []
    service = MinerService(StubEngine(), net.wallets["miner"], MinerConfig(
        netuid=NETUID, min_stake=MIN_STAKE, requests_per_minute=0, metagraph_refresh=0.1),
        chain=adapter(sdk, sleeps))
    lo = net.wallets["lo"]
    caplog.set_level(logging.WARNING, logger="niche.miner")
    with BackgroundServer(create_app(service)) as server:
        miner = SimpleNamespace(url=server.url, hotkey=service.hotkey)
        body = make_request().model_dump_json(exclude_none=True).encode
        assert signed_post(miner, lo, body()).status_code == 200
        sdk.outage(None)  # the node is gone
        # refreshes run one after another: once one has failed, none still in flight can
        # read the stake change below before the chain is back
        deadline = time.monotonic() + 10
        while sdk.failures < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        net.chain.set_stake(NETUID, lo.hotkey.ss58_address, MIN_STAKE / 2)
        deadline = time.monotonic() + 10
        while sdk.failures < 6 and time.monotonic() < deadline:
            assert signed_post(miner, lo, body()).status_code == 200  # last snapshot
            time.sleep(0.05)
        assert sdk.failures >= 6
        failed = [r for r in caplog.records if "metagraph refresh failed" in r.getMessage()]
        assert failed and "cannot reach subtensor" in failed[0].getMessage()
        assert sleeps[:2] == [0.5, 1.0]  # the adapter backed off between attempts
        assert httpx.get(server.url + "/healthz").json()["ok"]
        sdk.restore()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            resp = signed_post(miner, lo, body())
            if resp.status_code == 403:
                break
            time.sleep(0.05)
        assert resp.status_code == 403 and resp.json()["reason"] == "low_stake"
        assert signed_post(miner, net.wallets["hi"], body()).status_code == 200
    service.close()


def test_adapter_retries_with_backoff_then_recovers(net):
    sdk = LocalBackedSDK(net.chain)
    sleeps: list[float] = []
    chain = adapter(sdk, sleeps, retries=3)
    sdk.outage(3)  # three dropped calls, the fourth attempt gets through
    mg = chain.metagraph(NETUID)
    assert mg.by_hotkey(net.miner_hotkey) is not None
    assert sleeps == [0.5, 1.0, 2.0] and sdk.failures == 3


# ----------------------------------------------------------------------------- validator
def test_validator_rides_out_a_chain_outage(net, tiny_engine, tmp_path, caplog):
    """Round 0 is persisted, then the node drops for longer than the adapter's retries (the
    weights step of round 0 and the first try of round 1 fail): the validator logs it, waits,
    retries, and completes exactly its 3 rounds (exit code 0), each persisted once."""
    from niche.validator.client import MinerClient
    from niche.validator.service import Validator, ValidatorConfig
    from niche.validator.state import ValidatorState

    sdk = LocalBackedSDK(net.chain)
    chain = adapter(sdk, retries=2)  # 3 attempts per call
    validator_wallet = net.wallets["hi"]
    honest = MinerService(_FluxOnly(tiny_engine), net.wallets["miner"], MinerConfig(
        netuid=NETUID, requests_per_minute=0), chain=net.chain)
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",),
                             state_path=tmp_path / "state.db", audit_fraction=0.0, seed=3,
                             rounds=3, round_interval=0, epoch_length=10_000,
                             info_timeout=5.0)
    state = ValidatorState(config.state_path)
    validator = Validator(config, chain, validator_wallet, tiny_engine,
                          MinerClient(validator_wallet), state)
    original = state.save_round

    def save_then_drop(round_index, *args, **kwargs):
        original(round_index, *args, **kwargs)
        if round_index == 0:
            sdk.outage(7)  # > 2 rounds' worth of attempts at the first chain read

    state.save_round = save_then_drop
    caplog.set_level(logging.WARNING, logger="niche.validator")
    with BackgroundServer(create_app(honest, refresh_metagraph=False)) as server:
        honest.announce("127.0.0.1", server.port)
        assert validator.run() == 0
    honest.close()
    assert sdk.failures == 7
    assert state.round_index == 3
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "cannot reach subtensor" in logged
    rows = state.history(limit=100)
    assert sorted({r.round for r in rows}) == [0, 1, 2]
    assert all(r.status == "ok" for r in rows), [(r.round, r.status, r.reason) for r in rows]
    state.close()


class _FluxOnly:
    """An honest miner serving flux-schnell only (the real engine, one model declared)."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def served(self):
        return [m for m in self._engine.served() if m.model == "flux-schnell"]
