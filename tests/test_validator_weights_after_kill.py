"""Weights that landed on the chain just before the validator was killed (never recorded in
its state file) do not make every later round call set_weights and be refused: after one
refusal the validator counts from the chain's own record of its last update."""
from __future__ import annotations

import sqlite3

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.validator.client import MinerClient
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState

NETUID = 1
RATE_LIMIT = 100


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_weights_set_before_a_kill_are_not_retried_every_round(tmp_path, tiny_engine):
    clock = _Clock()
    chain = LocalChain(tmp_path / "chain.db", create=True, block_time=1.0, clock=clock)
    chain.create_subnet(NETUID, weights_rate_limit=RATE_LIMIT, max_validators=4)
    wallet = create_wallet("validator", "hot", tmp_path / "wallets")
    uid = chain.register(NETUID, wallet, stake=1000.0)
    clock.now += 150  # past the rate limit counted from the registration
    # the previous run's weights: on the chain, killed before its state file recorded them
    assert chain.set_weights(NETUID, wallet, [uid], [1.0], 0).success
    landed = chain.current_block()
    clock.now += 10
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), rounds=4, seed=1,
                             state_path=tmp_path / "v.sqlite", round_interval=0,
                             epoch_length=1)
    with ValidatorState(config.state_path) as state:
        assert state.last_weights() is None
        validator = Validator(config, chain, wallet, tiny_engine, MinerClient(wallet), state)
        assert validator.run() == 0
    with sqlite3.connect(config.state_path) as db:
        attempts = db.execute("SELECT success, message FROM weights").fetchall()
    messages = [r.weights_message for r in validator.reports]
    assert "rate limited" in messages[0]  # the one refusal that teaches it
    wait = RATE_LIMIT - (chain.current_block() - landed)
    assert all(m == f"next weights in {wait} blocks" for m in messages[1:]), messages
    assert validator.last_weights_block == landed
    assert len(attempts) == 1 and attempts[0][0] == 0  # one refused call, not one per round
    chain.close()
