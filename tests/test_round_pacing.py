"""A validator configured to run rounds faster than its miners' advertised rate (for this
hotkey) stretches its round interval to that rate instead of collecting 429s it caused
itself, which scored honest miners zero. Real rate-limited miners, a real validator."""
from __future__ import annotations

import logging

from gateway_support import NETUID, Only, make_chain
from miner_support import announced_miners

from niche.miner.service import MinerConfig
from niche.validator.client import MinerClient
from niche.validator.scoring import ScoringConfig
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState

RATE = 12.0  # requests a minute: a bucket of 2, one more every 5 s


def test_rounds_faster_than_the_miners_rate_are_paced_not_refused(tmp_path, tiny_engine,
                                                                  caplog):
    net = make_chain(tmp_path, miners=1)
    miner = MinerConfig(netuid=NETUID, requests_per_minute=RATE)
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), rounds=3, seed=2,
                             state_path=tmp_path / "v.sqlite", round_interval=0,
                             audit_fraction=0.0,
                             scoring=ScoringConfig(model_shares={"flux-schnell": 1.0}))
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
    assert (f"rounds at least 5.6s apart (not 0s): uid {net.uids['miner1']} allows 12 "
            "requests a minute (its /v1/info) and a round sends it 1") in caplog.text
    net.chain.close()
