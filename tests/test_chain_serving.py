"""Serving an endpoint against the chain's serving rate limit, on the real LocalChain file
and on SubtensorChain over the fake SDK (tests/test_chain_subtensor.py's)."""
from __future__ import annotations

import bittensor as bt
import pytest

from niche.chain import ChainError, Endpoint, RateLimitedError, UncertainWriteError
from niche.chain.local import LocalChain
from niche.chain.publish import RATE_LIMITED, SERVED, UNCHANGED, publish_endpoint
from niche.chain.wallets import create_wallet
from tests.test_chain_subtensor import FakeSDK, make


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def wallets(tmp_path_factory):
    root = tmp_path_factory.mktemp("wallets")
    return {name: create_wallet(name, "hot", root) for name in ("miner", "other")}


@pytest.fixture
def chain(tmp_path, wallets):
    clock = Clock()
    c = LocalChain(tmp_path / "chain.db", create=True, clock=clock)
    c.create_subnet(1, serving_rate_limit=10)
    c.register(1, wallets["miner"])
    c.clock = clock  # type: ignore[attr-defined]
    yield c
    c.close()


def test_local_chain_rate_limits_serving(chain, wallets):
    w = wallets["miner"]
    chain.serve(1, w, "10.0.0.1", 8091)
    with pytest.raises(RateLimitedError, match="ServingRateLimitExceeded.*retry in 10 blocks") as e:
        chain.serve(1, w, "10.0.0.2", 8091)
    assert e.value.retry_in_blocks == 10
    assert chain.endpoint_of(1, w.hotkey.ss58_address) == Endpoint("10.0.0.1", 8091)
    chain.clock.t += 9
    with pytest.raises(RateLimitedError, match="retry in 1 blocks"):
        chain.serve(1, w, "10.0.0.1", 8091)  # the same endpoint counts too, as on subtensor
    chain.clock.t += 1
    chain.serve(1, w, "10.0.0.2", 8092)
    assert chain.endpoint_of(1, w.hotkey.ss58_address) == Endpoint("10.0.0.2", 8092)
    assert chain.subnet(1).serving_rate_limit == 10
    assert chain.endpoint_of(1, wallets["other"].hotkey.ss58_address) is None


def test_serving_rate_limit_must_be_a_non_negative_integer(tmp_path):
    c = LocalChain(tmp_path / "c.db", create=True)
    with pytest.raises(ChainError, match="serving_rate_limit must be an integer >= 0"):
        c.create_subnet(1, serving_rate_limit=-1)
    c.close()


def test_publish_skips_an_unchanged_endpoint_and_waits_out_the_rate_limit(chain, wallets):
    w = wallets["miner"]
    first = publish_endpoint(chain, 1, w, "10.0.0.1", 8091)
    assert first.status == SERVED and first.published
    # a restart inside the rate-limit window: the same endpoint is not served again
    again = publish_endpoint(chain, 1, w, "10.0.0.1", 8091)
    assert again.status == UNCHANGED and "already served" in again.message
    # a new port inside the window: "retry later", not an exception
    moved = publish_endpoint(chain, 1, w, "10.0.0.1", 9000)
    assert moved.status == RATE_LIMITED and not moved.published
    assert "retry in 10 blocks" in moved.message
    chain.clock.t += 10
    assert publish_endpoint(chain, 1, w, "10.0.0.1", 9000).status == SERVED
    assert chain.endpoint_of(1, w.hotkey.ss58_address) == Endpoint("10.0.0.1", 9000)


class DroppingChain(LocalChain):
    """The real local chain whose connection 'drops' on the next serve, after (landed=True)
    or before (landed=False) the write reaches the chain."""

    landed = True
    drops = 0

    def serve(self, netuid, wallet, ip, port):
        if self.drops:
            self.drops -= 1
            if self.landed:
                super().serve(netuid, wallet, ip, port)
            raise UncertainWriteError("connection lost while the write was in flight")
        super().serve(netuid, wallet, ip, port)


@pytest.mark.parametrize("landed", [True, False])
def test_a_dropped_serve_is_checked_on_chain_before_it_is_resubmitted(tmp_path, wallets,
                                                                      landed):
    w = wallets["miner"]
    c = DroppingChain(tmp_path / "drop.db", create=True)
    c.create_subnet(1, serving_rate_limit=100)
    c.register(1, w)
    c.landed, c.drops = landed, 1
    outcome = publish_endpoint(c, 1, w, "10.0.0.5", 8091)
    # landed: resubmitting would hit the rate limit; it is confirmed instead
    assert outcome.status == SERVED
    assert ("confirmed on chain" in outcome.message) is landed
    assert c.endpoint_of(1, w.hotkey.ss58_address) == Endpoint("10.0.0.5", 8091)
    c.close()


def test_resubmission_inside_the_rate_limit_is_retry_later(tmp_path, wallets):
    w = wallets["miner"]
    c = DroppingChain(tmp_path / "drop2.db", create=True)
    c.create_subnet(1, serving_rate_limit=100)
    c.register(1, w)
    c.serve(1, w, "10.0.0.1", 1)
    c.landed, c.drops = False, 1
    assert publish_endpoint(c, 1, w, "10.0.0.5", 8091).status == RATE_LIMITED
    c.close()


# -------------------------------------------------------------------- subtensor adapter
def test_sdk_serve_rate_limit_is_a_rate_limited_error(wallets):
    sdk = FakeSDK()
    error = bt.ChainError("Custom error: ServingRateLimitExceeded",
                          name="ServingRateLimitExceeded")
    sdk.execute = lambda intent, wallet, **kw: bt.ExtrinsicResult(
        success=False, message="dispatch failed", error=error)
    chain, _ = make(sdk)
    with pytest.raises(RateLimitedError, match="serve 10.1.2.3:8091"):
        chain.serve(2, wallets["miner"], "10.1.2.3", 8091)


def test_sdk_raising_a_rate_limit_is_a_rate_limited_error(wallets):
    sdk = FakeSDK()

    def execute(intent, wallet, **kw):
        raise bt.ChainError("Custom error: ServingRateLimitExceeded",
                            name="ServingRateLimitExceeded")
    sdk.execute = execute
    chain, _ = make(sdk)
    with pytest.raises(RateLimitedError):
        chain.serve(2, wallets["miner"], "10.1.2.3", 8091)


def test_sdk_writes_use_the_sdks_retries_and_are_not_resubmitted_blindly(wallets):
    sdk = FakeSDK()
    seen: list[dict] = []
    execute = sdk.execute

    def dropping(intent, wallet, **kw):
        seen.append(kw)
        execute(intent, wallet, **kw)  # lands on chain, then the socket closes
        raise ConnectionError("socket closed")
    sdk.execute = dropping
    chain, _ = make(sdk, write_retries=4)
    with pytest.raises(UncertainWriteError, match="may have landed"):
        chain.serve(2, wallets["miner"], "10.1.2.3", 8091)
    assert len(seen) == 1  # no blind resubmission by the read-retry loop
    assert seen[0]["retries"] == 4 and seen[0]["wait_for_inclusion"] is True


def test_sdk_unchanged_endpoint_is_not_served(wallets):
    sdk = FakeSDK()  # the fake metagraph shows 5Hot at 10.0.0.7:8091
    chain, _ = make(sdk)

    class Wallet:
        hotkey = type("K", (), {"ss58_address": "5Hot"})()
    outcome = publish_endpoint(chain, 2, Wallet(), "10.0.0.7", 8091)
    assert outcome.status == UNCHANGED
    assert not any(isinstance(i, bt.ServeAxon) for i in sdk.submitted)


@pytest.mark.parametrize("last_update, landed", [(1000, True), (990, False)])
def test_sdk_dropped_set_weights_checks_last_update_first(wallets, last_update, landed):
    """The connection drops on the first submission; the adapter reads the hotkey's last
    update (block 1000 = at the submission: it landed) before submitting again."""
    wallet = wallets["miner"]
    sdk = FakeSDK()
    calls = []
    execute = sdk.execute

    def dropping_once(intent, wallet, **kw):
        calls.append(intent)
        if len(calls) == 1:
            raise ConnectionError("socket closed")
        return execute(intent, wallet, **kw)
    sdk.execute = dropping_once
    original = sdk.subnets.metagraph

    def metagraph(netuid, commitments=True):
        mg = original(netuid, commitments)
        mg.neurons[0].hotkey = wallet.hotkey.ss58_address
        mg.neurons[0].last_update = last_update
        return mg
    sdk.subnets.metagraph = metagraph
    chain, _ = make(sdk)
    result = chain.set_weights(2, wallet, [1], [1.0], version_key=0)
    assert result.success
    assert ("confirmed on chain" in result.message) is landed
    assert len(calls) == (1 if landed else 2)
