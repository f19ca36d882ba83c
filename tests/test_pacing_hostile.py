"""Hostile miners against the validator's pacing and endpoint lookups: an infinite or a
tiny advertised rate, a sybil majority of tiny rates, and many fetches failing at once."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
from gateway_support import NETUID, make_chain
from pydantic import ValidationError

from niche.protocol import InfoResponse, ModelInfo
from niche.validator.challenges import Target
from niche.validator.client import MinerClient
from niche.validator.pacing import MAX_PACED_INTERVAL, RateBudgets, caller_rate
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState


def _info(hotkey: str, rate: float | None) -> InfoResponse:
    return InfoResponse.model_construct(
        hotkey=hotkey, models=[ModelInfo(model="flux-schnell", pipelines=["txt2img"])],
        concurrency=4, requests_per_minute=rate, stake_proportional=False)


def test_an_infinite_rate_is_refused_at_parsing_and_never_trusted():
    body = ('{"hotkey": "5m", "models": [], "capacity_per_minute": 1, "miner_version": "x", '
            '"requests_per_minute": 1e999}')
    with pytest.raises(ValidationError):
        InfoResponse.model_validate_json(body)
    assert caller_rate(_info("5m", float("inf")), 1.0) is None  # no limit, no OverflowError
    budgets = RateBudgets()
    assert budgets.allowance("5m", 1e308) is not None  # huge but finite: a number
    assert budgets.allowance("5tiny", 1e-300) == 1  # one request, then it sits out
    budgets.spend("5tiny", 1)
    assert budgets.allowance("5tiny", 1e-300) == 0


def test_a_refusal_for_rate_empties_our_copy_of_the_bucket():
    """Ours said 9 tokens, the miner said 429 (its gateway drew on the same hotkey): ours
    starts again from empty, the retry spent from it, so retries cannot keep the miner's
    bucket empty round after round."""
    now = [0.0]
    budgets = RateBudgets(clock=lambda: now[0])
    assert budgets.allowance("5m", 60.0) == 9
    budgets.drained("5m")
    budgets.spend("5m", 1)  # the retry
    assert budgets.allowance("5m", 60.0) == 0
    now[0] += 60.0 / (0.9 * 60.0) * 2  # two requests' worth of our refill later
    assert budgets.allowance("5m", 60.0) == 1


@pytest.fixture
def validator(tmp_path, tiny_engine):
    net = make_chain(tmp_path, miners=5)
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), rounds=1,
                             state_path=tmp_path / "v.sqlite", round_interval=0)
    with ValidatorState(config.state_path) as state:
        yield net, Validator(config, net.chain, net.validator, tiny_engine,
                             MinerClient(net.validator), state)
    net.chain.close()


@pytest.mark.parametrize("tiny", [1e-3, 1e-9, 5e-324])
def test_a_sybil_majority_of_tiny_rates_cannot_stop_the_rounds(validator, tiny):
    net, v = validator
    metagraph = net.chain.metagraph(NETUID)
    targets, declared, outcomes = [], {}, {}
    for i, name in enumerate(["miner1", "miner2", "miner3", "miner4", "miner5"]):
        hotkey = net.wallets[name].hotkey.ss58_address
        uid = net.uids[name]
        v._advertised[uid] = _info(hotkey, 60.0 if i < 2 else tiny)  # 3 of 5 hostile
        targets.append(Target(uid, hotkey, "flux-schnell"))
        declared[uid] = 4
    kept = v._pace(metagraph, targets, declared, outcomes)
    assert v.paced_interval == MAX_PACED_INTERVAL  # bounded: not 18 hours, not inf
    assert len(kept) == 5 and all(declared[t.uid] == 1 for t in kept[2:])
    again = v._pace(metagraph, targets, dict.fromkeys(declared, 4), outcomes)
    assert [t.uid for t in again] == [t.uid for t in targets[:2]]  # the rest sit out, paid 0
    assert {outcomes[t.uid].status for t in targets[2:]} == {"own_rate_limit"}


def test_endpoint_lookups_of_fetches_failing_at_once_share_one_chain_read(validator):
    net, v = validator
    reads = []
    real = net.chain.metagraph

    def slow_metagraph(netuid):
        reads.append(threading.get_ident())
        time.sleep(0.5)
        return real(netuid)

    net.chain.metagraph = slow_metagraph  # type: ignore[method-assign]
    net.chain.serve(NETUID, net.wallets["miner1"], "127.0.0.1", 4321)

    async def eight():
        return await asyncio.gather(*[v._endpoint_of(net.wallets["miner1"].hotkey.ss58_address)
                                      for _ in range(8)])

    urls = asyncio.run(eight())
    assert urls == ["http://127.0.0.1:4321"] * 8
    assert len(reads) == 1
