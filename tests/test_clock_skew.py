"""A validator whose clock is off from its miners' (a few seconds ahead, minutes either way)
scores honest miners as honest: a miner's refusal as stale carries its HTTP Date, and the
validator signs for that miner by its clock (one retry, one warning). Real miner servers,
real signatures, a real validator round with audits."""
from __future__ import annotations

import asyncio
import logging
import time

import pytest
from gateway_support import NETUID, Only, make_chain, running_miners
from miner_support import MinerProcess, make_request

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.clock_skew import MAX_OFFSET, ClockOffsets
from niche.devnet.localnet.supervisor import free_port
from niche.validator.client import MinerClient, MinerTarget, QueryStatus
from niche.validator.scoring import ScoringConfig
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState


def _skewed(client: MinerClient, seconds: float) -> MinerClient:
    """`client` signing by a clock `seconds` off this machine's (the validator's box)."""
    client.clock_offsets = ClockOffsets(clock=lambda: time.time_ns() + int(seconds * 1e9))
    return client


@pytest.mark.parametrize("skew", [2.2, 3.0, -45.0, -300.0, 300.0])
def test_a_skewed_validator_clock_is_learnt_from_the_miners_refusal(
        tmp_path, tiny_engine, caplog, skew):
    net = make_chain(tmp_path, miners=1)
    with running_miners(net, {"miner1": Only(tiny_engine, "flux-schnell")}) as miners:
        target = MinerTarget(net.uids["miner1"], miners["miner1"].hotkey, miners["miner1"].url)
        client = _skewed(MinerClient(net.validator), skew)
        caplog.set_level(logging.WARNING, logger="niche.validator")

        async def twice():
            request = make_request("a skewed clock", model="flux-schnell")
            first = await client.query(target, request)
            second = await client.query(target, make_request("again", model="flux-schnell"))
            return first, second

        first, second = asyncio.run(twice())
    assert first.status is QueryStatus.OK, first.reason
    assert second.status is QueryStatus.OK, second.reason
    warnings = [r.getMessage() for r in caplog.records if "refused a signature" in
                r.getMessage()]
    assert len(warnings) == 1  # learnt once, then signed by the miner's clock
    assert ("behind" if skew > 0 else "ahead of") in warnings[0]
    net.chain.close()


def test_a_validator_three_seconds_ahead_scores_and_audits_honest_miners(tmp_path,
                                                                        tiny_engine):
    net = make_chain(tmp_path, miners=2)
    engines = {name: Only(tiny_engine, "flux-schnell") for name in ("miner1", "miner2")}
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), rounds=2, seed=4,
                             state_path=tmp_path / "v.sqlite", round_interval=0,
                             audit_fraction=1.0,
                             scoring=ScoringConfig(model_shares={"flux-schnell": 1.0}))
    with running_miners(net, engines), ValidatorState(config.state_path) as state:
        validator = Validator(config, net.chain, net.validator, tiny_engine,
                              _skewed(MinerClient(net.validator), 3.0), state)
        assert validator.run() == 0
    for report in validator.reports:
        for outcome in report.outcomes:
            assert outcome.status == "ok" and outcome.audit_passed is True, outcome
    net.chain.close()


def test_only_a_stale_refusal_with_a_believable_date_teaches_an_offset():
    now = 1_800_000_000.0
    offsets = ClockOffsets(clock=lambda: int(now * 1e9))
    stale = b'{"reason": "stale_request", "detail": "nonce is more than 2s in the future"}'
    date = "Fri, 15 Jan 2027 07:59:59 GMT"  # 1_800_000_000 is 2027-01-15T08:00:00Z
    later = "Fri, 15 Jan 2027 08:00:10 GMT"
    assert not offsets.learn("5m", 401, stale, date)  # the same clock, within a second
    assert not offsets.learn("5m", 401, b'{"reason": "unsigned"}', later)
    assert not offsets.learn("5m", 403, stale, later)
    assert not offsets.learn("5m", 401, stale, None)
    assert not offsets.learn("5m", 401, stale, "not a date")
    assert not offsets.learn("5m", 401, b"[1, 2]", later)
    assert not offsets.learn("5m", 401, stale + b" " * 5000, later)
    far = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + MAX_OFFSET + 60))
    assert not offsets.learn("5m", 401, stale, far)  # a clock an hour off is not believed
    assert offsets.nonce_ns("5m") == int(now * 1e9)
    assert offsets.learn("5m", 401, stale, later)
    assert offsets.nonce_ns("5m") == pytest.approx((now + 11.2) * 1e9, abs=1e3)
    assert offsets.nonce_ns("5other") == int(now * 1e9)  # per receiver: a liar fools itself


SKEWED_CLOCK = """import os, time
_skew = float(os.environ["NICHE_TEST_CLOCK_SKEW"])
_time, _time_ns = time.time, time.time_ns
time.time = lambda: _time() + _skew
time.time_ns = lambda: _time_ns() + int(_skew * 1e9)
"""


@pytest.mark.slow
@pytest.mark.parametrize("skew", [-4.0, 120.0])
def test_a_miner_box_whose_clock_is_off_is_scored_and_audited(tmp_path, tiny_engine, skew):
    """The miner's whole process runs on a wall clock `skew` seconds off this machine's
    (as a box without NTP does): its signature checks, its Date header, its states store."""
    (tmp_path / "clock").mkdir()
    (tmp_path / "clock" / "sitecustomize.py").write_text(SKEWED_CLOCK)
    wallets = {n: create_wallet(n, "hot", tmp_path / "wallets") for n in ("validator", "miner")}
    chain = LocalChain(tmp_path / "chain.db", create=True)
    chain.create_subnet(NETUID, max_validators=4)
    chain.register(NETUID, wallets["validator"], stake=100.0)
    chain.register(NETUID, wallets["miner"])
    miner = MinerProcess(tmp_path, free_port(), tmp_path / "miner-states.sqlite", env={
        "PYTHONPATH": str(tmp_path / "clock"), "NICHE_TEST_CLOCK_SKEW": str(skew)})
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), rounds=2, seed=5,
                             state_path=tmp_path / "state.db", audit_fraction=1.0,
                             epoch_length=1000, round_interval=0, info_timeout=5.0)
    try:
        miner.start()
        with ValidatorState(config.state_path) as state:
            validator = Validator(config, chain, wallets["validator"], tiny_engine,
                                  MinerClient(wallets["validator"]), state)
            assert validator.run() == 0
    finally:
        miner.kill()
        chain.close()
    for report in validator.reports:
        (outcome,) = report.outcomes
        assert outcome.status == "ok" and outcome.audit_passed is True, outcome.reason


def test_a_miner_flipping_its_date_buys_no_retry_and_no_log_line_per_request(caplog):
    """A liar answering every request stale with a Date +100 s, then -100 s, ...: learnt
    once a minute at most (one retry, one WARNING), not on every request."""
    now = [1_800_000_000.0]
    mono = [0.0]
    offsets = ClockOffsets(clock=lambda: int(now[0] * 1e9), monotonic=lambda: mono[0])
    stale = b'{"reason": "stale_request"}'

    def date(delta: float) -> str:
        return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now[0] + delta))

    caplog.set_level(logging.DEBUG, logger="niche.validator")
    learnt = [offsets.learn("5liar", 401, stale, date(100 if i % 2 else -100))
              for i in range(50)]
    assert learnt.count(True) == 1
    mono[0] += 61.0  # a minute later a real clock may have been corrected
    assert offsets.learn("5liar", 401, stale, date(100))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
