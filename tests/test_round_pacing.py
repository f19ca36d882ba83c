"""A validator configured to run rounds faster than its miners' advertised rate (for this
hotkey) stretches its round interval to that rate instead of collecting 429s it caused
itself, which scored honest miners zero. Real rate-limited miners, a real validator."""
from __future__ import annotations

import logging
import sqlite3

import pytest
from gateway_support import NETUID, Only, make_chain
from miner_support import announced_miners

from niche.miner.service import MinerConfig
from niche.validator.client import MinerClient
from niche.validator.scoring import ScoringConfig
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState

RATE = 12.0  # requests a minute: a bucket of 2, one more every 5 s


def _fast_validator(tmp_path, *, rounds: int, audit_fraction: float) -> ValidatorConfig:
    """A flux-schnell validator asked for rounds back to back (interval 0)."""
    return ValidatorConfig(netuid=NETUID, models=("flux-schnell",), rounds=rounds, seed=2,
                           state_path=tmp_path / "v.sqlite", round_interval=0,
                           audit_fraction=audit_fraction,
                           scoring=ScoringConfig(model_shares={"flux-schnell": 1.0}))


def test_rounds_faster_than_the_miners_rate_are_paced_not_refused(tmp_path, tiny_engine,
                                                                  caplog):
    net = make_chain(tmp_path, miners=1)
    miner = MinerConfig(netuid=NETUID, requests_per_minute=RATE)
    config = _fast_validator(tmp_path, rounds=3, audit_fraction=0.0)
    caplog.set_level(logging.INFO, logger="niche.validator")
    with announced_miners(net.chain, {"miner1": (Only(tiny_engine, "flux-schnell"),
                                                 net.wallets["miner1"], miner)}), \
            ValidatorState(config.state_path) as state:
        validator = Validator(config, net.chain, net.validator, tiny_engine,
                              MinerClient(net.validator), state)
        assert validator.run() == 0
    statuses = [o.status for report in validator.reports for o in report.outcomes]
    assert statuses == ["ok", "ok", "ok"], [o.reason for r in validator.reports
                                            for o in r.outcomes]
    assert validator.paced_interval == 60.0 / (0.9 * RATE)
    assert "rounds at least 5.6s apart (not 0s): the median miner's advertised rate" in \
        caplog.text
    # the gateway's first guess of the challenges' share (before it has measured two
    # rounds): the pace, not the configured 0
    from niche.gateway.directory import configured_rate

    with sqlite3.connect(config.state_path) as db:
        (interval,) = db.execute("SELECT value FROM meta WHERE key='round_interval'"
                                 ).fetchone()
    assert configured_rate(interval) == pytest.approx(0.9 * RATE)
    net.chain.close()


def test_one_slow_miner_sits_rounds_out_instead_of_slowing_every_round(tmp_path, tiny_engine,
                                                                       caplog):
    """A miner advertising 6 requests a minute (hostile or modest) must not space every
    round 11 s apart: the rounds follow the median miner, and it is asked as often as its
    own rate allows, never refused for the validator's pace."""
    import time

    net = make_chain(tmp_path, miners=3)
    fast = MinerConfig(netuid=NETUID, requests_per_minute=60.0)
    slow = MinerConfig(netuid=NETUID, requests_per_minute=6.0)
    config = _fast_validator(tmp_path, rounds=4, audit_fraction=0.0)
    caplog.set_level(logging.INFO, logger="niche.validator")
    miners = {name: (Only(tiny_engine, "flux-schnell"), net.wallets[name], cfg)
              for name, cfg in (("miner1", fast), ("miner2", fast), ("miner3", slow))}
    with announced_miners(net.chain, miners), ValidatorState(config.state_path) as state:
        validator = Validator(config, net.chain, net.validator, tiny_engine,
                              MinerClient(net.validator), state)
        started = time.monotonic()
        assert validator.run() == 0
        took = time.monotonic() - started
    outcomes = [o for report in validator.reports for o in report.outcomes]
    slow_uid = net.uids["miner3"]
    assert all(o.status == "ok" for o in outcomes if o.uid != slow_uid)
    assert sum(1 for o in outcomes if o.uid != slow_uid) == 8  # the others every round
    # asked once in ~4 s (its rate), never refused; the rounds it sits out pay nothing, so
    # a rate that is never spent cannot freeze a good score
    assert [o.status for o in outcomes if o.uid == slow_uid] == \
        ["ok", "own_rate_limit", "own_rate_limit", "own_rate_limit"]
    assert validator.reports[-1].rewards.get(slow_uid, 0.0) == 0.0
    assert validator.paced_interval == 60.0 / (0.9 * 60.0)
    assert took < 15.0, f"4 rounds took {took:.1f}s: paced to the slowest miner"
    assert f"uids [{slow_uid}] sit out rounds until their advertised rate allows" in \
        caplog.text
    net.chain.close()


def test_a_challenge_refused_for_the_gateways_share_is_asked_again_not_zeroed(
        tmp_path, tiny_engine, caplog):
    """The gateway signs with the validator's hotkey, so its users draw on the same bucket
    at each miner: a challenge refused 429 for that is asked once more 1.2 s later and
    scored on the answer, its latency counted from the first send (no head start)."""
    import asyncio

    from miner_support import make_request

    from niche.validator.client import MinerTarget

    net = make_chain(tmp_path, miners=1)
    miner = MinerConfig(netuid=NETUID, requests_per_minute=60.0)  # a bucket of 10
    config = _fast_validator(tmp_path, rounds=1, audit_fraction=1.0)
    caplog.set_level(logging.INFO, logger="niche.validator")
    with announced_miners(net.chain, {"miner1": (Only(tiny_engine, "flux-schnell"),
                                                 net.wallets["miner1"], miner)}) as running, \
            ValidatorState(config.state_path) as state:
        target = MinerTarget(net.uids["miner1"], running["miner1"].hotkey,
                             running["miner1"].url)
        users = MinerClient(net.validator)  # what the gateway is: the same hotkey

        async def drain():
            return [await users.query(target, make_request(f"user {i}", model="flux-schnell"))
                    for i in range(12)]

        drained = asyncio.run(drain())
        assert drained[-1].http_status == 429  # the bucket is empty now
        validator = Validator(config, net.chain, net.validator, tiny_engine,
                              MinerClient(net.validator), state)
        assert validator.run() == 0
    (outcome,) = validator.reports[0].outcomes
    assert outcome.status == "ok" and outcome.audit_passed is True, outcome.reason
    assert outcome.latency >= 1.2  # counted from the refused first send
    assert "refused a request as over their rate" in caplog.text
    net.chain.close()
