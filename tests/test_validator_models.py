"""A miner serving several models is challenged, and scored, on each of them in proportion
to the model shares; the validator's log says which models each miner is scored on."""
from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.devnet.servers import BackgroundServer
from niche.miner.server import create_app
from niche.miner.service import MinerConfig, MinerService
from niche.validator.challenges import pick_model
from niche.validator.client import MinerClient
from niche.validator.scoring import ScoringConfig
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState

NETUID = 1


def test_pick_model_follows_the_shares():
    rng = np.random.default_rng(0)
    models = ("flux-schnell", "kolors")
    shares = {"flux-schnell": 0.75, "kolors": 0.25}
    picks = [pick_model(rng, {"kolors", "flux-schnell"}, models, shares) for _ in range(2000)]
    assert 0.70 < picks.count("flux-schnell") / len(picks) < 0.80
    assert pick_model(rng, {"kolors"}, models, shares) == "kolors"  # one in common: no draw
    assert pick_model(rng, {"sdxl"}, models, shares) is None
    assert {pick_model(rng, set(models), models, {}) for _ in range(50)} == set(models)


def test_a_two_model_miner_is_challenged_on_both(tmp_path, tiny_engine, caplog):
    wallets = {n: create_wallet(n, "hot", tmp_path / "wallets") for n in ("validator", "both")}
    chain = LocalChain(tmp_path / "chain.db", create=True)
    chain.create_subnet(NETUID, max_validators=4)
    chain.register(NETUID, wallets["validator"], stake=100.0)
    uid = chain.register(NETUID, wallets["both"])
    service = MinerService(tiny_engine, wallets["both"], MinerConfig(
        netuid=NETUID, requests_per_minute=0), chain=chain)  # serves FLUX and Kolors
    server = BackgroundServer(create_app(service, refresh_metagraph=False)).start()
    service.announce("127.0.0.1", server.port)
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell", "kolors"), seed=11,
                             state_path=tmp_path / "state.db", audit_fraction=0.0,
                             epoch_length=1000, round_interval=0, info_timeout=5.0,
                             scoring=ScoringConfig(model_shares={"flux-schnell": 0.5,
                                                                 "kolors": 0.5}))
    state = ValidatorState(config.state_path)
    validator = Validator(config, chain, wallets["validator"], tiny_engine,
                          MinerClient(wallets["validator"]), state)
    challenged = []
    try:
        with caplog.at_level(logging.INFO, logger="niche.validator"):
            for _ in range(4):
                report = asyncio.run(validator.run_round())
                outcome = {o.uid: o for o in report.outcomes}[uid]
                assert outcome.status == "ok", validator.format_report(report)
                challenged.append(outcome.model)
    finally:
        server.stop()
        service.close()
        state.close()
        chain.close()
    assert set(challenged) == {"flux-schnell", "kolors"}, challenged
    said = [r.getMessage() for r in caplog.records if f"uid {uid} serves" in r.getMessage()]
    assert said == [f"uid {uid} serves flux-schnell, kolors; scored on flux-schnell "
                    "(share 0.5), kolors (share 0.5)"]  # once, not every round
    # a restarted validator splits the miner's score over both groups from its first
    # weights, before it has asked the miner again
    chain = LocalChain(tmp_path / "chain.db")
    try:
        with ValidatorState(config.state_path) as again:
            restarted = Validator(config, chain, wallets["validator"], tiny_engine,
                                  MinerClient(wallets["validator"]), again)
            assert restarted._scored_on == {uid: ("flux-schnell", "kolors")}
            again._conn.execute("UPDATE meta SET value='{not json' WHERE key='scored_on'")
            assert again.load_scored_on(restarted.book) == {}  # damaged: relearnt
    finally:
        chain.close()


def test_a_two_model_miner_is_weighted_in_both_groups():
    from niche.validator.scoring import compute_weights

    shares = {"flux-schnell": 0.5, "kolors": 0.5}
    scores = {1: 0.6, 2: 0.6, 3: 0.6}
    models = {1: "flux-schnell", 2: "kolors", 3: "kolors"}  # 3 was last asked for Kolors
    alone = compute_weights(scores, models, shares)
    both = compute_weights(scores, models, shares, {3: ("flux-schnell", "kolors")})
    assert alone == pytest.approx({1: 0.5, 2: 0.25, 3: 0.25})
    # half of 3's score competes with uid 1 for FLUX, half with uid 2 for Kolors
    assert both == pytest.approx({1: 0.5 / 1.5, 2: 0.5 / 1.5, 3: 0.5 * (0.5 / 1.5) * 2})
    assert sum(both.values()) == pytest.approx(1.0)
