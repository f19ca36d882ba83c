"""A miner restarted between its answer and the validator's audit (a `pm2 restart`, an
upgrade, a crash) is not taken for a cheat: its states are on disk, the restarted process
serves them, the audit passes and nothing excludes it.

Real processes and wire: `niche miner --tiny` on a LocalChain file (SIGKILLed, then started
again on the same port), the validator in this process with its real signed client, step
check and scoring. The restart happens inside the validator's states fetch, the one moment
between an answer and its audit."""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import pytest
from miner_support import MinerProcess

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.devnet.localnet.supervisor import free_port
from niche.validator.audit import AuditConfig
from niche.validator.client import MinerClient
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState

NETUID = 1


class RestartingClient(MinerClient):
    """The validator's client; its first states fetch is preceded by a SIGKILL and a
    restart of the miner (the test's only hook: everything else is the real path)."""

    def __init__(self, wallet, miner: MinerProcess, moved: bool = False):
        super().__init__(wallet)
        self.miner, self.restarts, self.moved = miner, 0, moved

    async def fetch_states(self, target, request_id, *args, **kwargs):
        if self.restarts == 0:
            self.restarts += 1
            # The writer thread puts an answer's states on disk a few ms after the answer
            # (docs/miner.md: a SIGKILL loses at most those): kill once they are there.
            await asyncio.to_thread(self.miner.wait_written, request_id)
            self.miner.kill()
            if self.moved:  # restarted on another port (published on chain at start)
                self.miner.port = free_port()
            await asyncio.to_thread(self.miner.start)
        return await super().fetch_states(target, request_id, *args, **kwargs)


class SkewedClient(RestartingClient):
    """As RestartingClient, on a validator whose clock runs `skew` seconds behind the
    miner's (inside the 40 s a miner accepts): the restarted miner refuses requests signed
    before it started (401 stale_request) until this clock passes its start."""

    def __init__(self, wallet, miner: MinerProcess, skew: float, moved: bool = False):
        super().__init__(wallet, miner, moved)
        self.skew = skew

    async def _exchange(self, *args, **kwargs):
        real = time.time_ns
        behind = int(self.skew * 1e9)
        with pytest.MonkeyPatch.context() as patch:  # what sign_request reads as "now"
            patch.setattr(time, "time_ns", lambda: real() - behind)
            return await super()._exchange(*args, **kwargs)


def _one_miner_subnet(tmp_path, **validator_config):
    """A chain with a validator and one registered miner (a `niche miner` process, not
    started), the validator's config (one round, every answer audited) and state."""
    wallets = {n: create_wallet(n, "hot", tmp_path / "wallets") for n in ("validator", "miner")}
    chain = LocalChain(tmp_path / "chain.db", create=True)
    chain.create_subnet(NETUID, max_validators=4)
    chain.register(NETUID, wallets["validator"], stake=100.0)
    uid = chain.register(NETUID, wallets["miner"])
    miner = MinerProcess(tmp_path, free_port(), tmp_path / "miner-states.sqlite")
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), rounds=1, seed=5,
                             state_path=tmp_path / "state.db", audit_fraction=1.0,
                             epoch_length=1000, round_interval=0, info_timeout=5.0,
                             **validator_config)
    return wallets, chain, uid, miner, config, ValidatorState(config.state_path)


def _audit_passed(validator: Validator, report, uid: int) -> str:
    """The round's table, once `uid`'s answer is checked to be ok, audited and passed."""
    outcome = {o.uid: o for o in report.outcomes}[uid]
    table = validator.format_report(report)
    assert outcome.status == "ok" and outcome.audited and outcome.audit_passed, table
    return table


@pytest.mark.slow
@pytest.mark.parametrize(("skew", "moved"), [(0.0, False), (5.0, False), (0.0, True)])
def test_a_miner_killed_and_restarted_before_the_audit_is_not_excluded(tmp_path, tiny_engine,
                                                                      skew, moved):
    """skew: the validator's clock behind the miner's; with 5 s the restarted miner answers
    401 to the first fetches, which the validator signs again and retries (a refusal that
    re-signing cures is a fault of availability, never a cheat). moved: the miner comes
    back on another port, which it publishes: the fetch follows it there."""
    wallets, chain, uid, miner, config, state = _one_miner_subnet(tmp_path)
    client = SkewedClient(wallets["validator"], miner, skew, moved)
    validator = Validator(config, chain, wallets["validator"], tiny_engine, client, state)
    try:
        miner.start()
        time.sleep(skew)  # the first start is long past, as in production
        report = asyncio.run(validator.run_round())
    finally:
        miner.kill()
        state.close()
        chain.close()
    table = _audit_passed(validator, report, uid)
    assert client.restarts == 1
    assert report.rewards[uid] > 0 and validator.book.scores()[uid] > 0, table
    assert not validator.book.is_excluded(wallets["miner"].hotkey.ss58_address, 1)
    log = miner.log.read_text()
    assert log.count("listening on 127.0.0.1") == 2  # it was really restarted
    assert "states caller=" in log and "status=200" in log.split("listening on")[-1], log
    if skew:
        assert "status=401 stale_request" in log.split("listening on")[-1], log


LOAD_SECONDS = 25.0
"""The restarted miner's loading time: longer than the validator's states budget below."""
FETCH_SECONDS = 15.0


class SlowLoadClient(MinerClient):
    """The validator's client; its first states fetch follows a SIGKILL of the miner and a
    restart whose models take LOAD_SECONDS to load. The fetch starts at once, as a
    validator's does: the restarted miner must serve the states while it loads."""

    def __init__(self, wallet, miner: MinerProcess):
        super().__init__(wallet)
        self.miner, self.restarts = miner, 0

    async def fetch_states(self, target, request_id, *args, **kwargs):
        if self.restarts == 0:
            self.restarts += 1
            await asyncio.to_thread(self.miner.wait_written, request_id)
            self.miner.kill()
            self.miner.env.update({
                "PYTHONPATH": os.pathsep.join(filter(None, [
                    str(Path(__file__).parent / "slow_load"), os.environ.get("PYTHONPATH")])),
                "NICHE_TEST_LOAD_SECONDS": str(LOAD_SECONDS)})
            self.miner.spawn()
        return await super().fetch_states(target, request_id, *args, **kwargs)


@pytest.mark.slow
def test_a_restarted_miner_serves_its_states_while_its_models_load(tmp_path, tiny_engine):
    """Loading FLUX.1-dev and Kolors takes minutes; a validator gives 30 s (here 15) for an
    audited answer's states. The restarted miner serves them from disk meanwhile, answers
    generate and info with 503 `loading`, and its audit passes."""
    wallets, chain, uid, miner, config, state = _one_miner_subnet(
        tmp_path, audit=AuditConfig(fetch_timeout=FETCH_SECONDS))
    port = miner.port
    client = SlowLoadClient(wallets["validator"], miner)
    validator = Validator(config, chain, wallets["validator"], tiny_engine, client, state)
    try:
        miner.start()
        started = time.monotonic()
        report = asyncio.run(validator.run_round())
        audited_in = time.monotonic() - started
        loading = {path: httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10)
                   for path in ("/v1/info", "/healthz")}
        miner.wait_healthy()  # then the loaded miner takes the same port over
        info = httpx.get(f"http://127.0.0.1:{port}/v1/info", timeout=10)
    finally:
        miner.kill()
        state.close()
        chain.close()
    _audit_passed(validator, report, uid)
    assert audited_in < LOAD_SECONDS  # the states came before the models
    assert loading["/v1/info"].status_code == 503
    assert loading["/v1/info"].json()["reason"] == "loading"
    assert loading["/healthz"].status_code == 503
    assert info.status_code == 200 and info.json()["models"]
    log = miner.log.read_text().split("listening on")[1]  # the restarted process's
    assert "while the models load" in log and "states caller=" in log, log
