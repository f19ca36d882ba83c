"""A validator asked to stop mid-round finishes the round without zeroing anyone: miners that
are going down beside it (unreachable, timing out, states unavailable) are not scored in that
round; in any other round they are."""
from __future__ import annotations

import asyncio

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.devnet.localnet.supervisor import free_port
from niche.validator.client import MinerClient
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState

NETUID = 1


def test_a_stop_mid_round_zeroes_no_miner_going_down(tmp_path, tiny_engine):
    wallets = {n: create_wallet(n, "hot", tmp_path / "wallets") for n in ("validator", "gone")}
    chain = LocalChain(tmp_path / "chain.db", create=True)
    chain.create_subnet(NETUID, max_validators=4)
    chain.register(NETUID, wallets["validator"], stake=100.0)
    uid = chain.register(NETUID, wallets["gone"])
    port = free_port()  # a miner that has just stopped: nobody listens on its port
    chain.serve(NETUID, wallets["gone"], "127.0.0.1", port)
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), seed=1,
                             state_path=tmp_path / "state.db", epoch_length=1000,
                             round_interval=0, info_timeout=2.0)
    with ValidatorState(config.state_path) as state:
        validator = Validator(config, chain, wallets["validator"], tiny_engine,
                              MinerClient(wallets["validator"]), state)
        validator.book.sync_hotkeys({uid: wallets["gone"].hotkey.ss58_address})
        validator.book.uids[uid].score = 0.5
        validator.stop()  # the signal arrives while the round runs
        stopped = asyncio.run(validator.run_round())
        assert uid not in stopped.rewards and validator.book.scores()[uid] == 0.5
        validator._stop.clear()  # a round nobody stopped: the dead miner is scored
        normal = asyncio.run(validator.run_round())
        assert {o.uid: o.status for o in normal.outcomes}[uid] == "unreachable"
        assert validator.book.scores()[uid] < 0.5
    chain.close()
