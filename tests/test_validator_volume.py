"""Volume probes end to end on the real path (LocalChain, real wallets, real miners on
127.0.0.1 over the tiny FLUX checkpoint, the validator's client, audits, scoring): a miner
that declares concurrency 2 gets two challenges at once, and what it delivers is counted.

The miners' engines are real engines behind wrappers that declare a concurrency or
misbehave after their first answer (which of the two challenges a miner answers first is
up to its threads, so every assertion holds either way)."""
from __future__ import annotations

import threading

import pytest
from test_validator_service import NETUID, Only, OtherSeed, miners

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.validator import scoring
from niche.validator.client import MinerClient
from niche.validator.service import Validator, ValidatorConfig, primaries
from niche.validator.state import ValidatorState


class Claims(Only):
    """Declares `n` replicas; behind it one engine (one generation at a time)."""

    def __init__(self, engine, n):
        super().__init__(engine, "flux-schnell")
        self.concurrency = n

    def live_replicas(self):
        return self.concurrency


class AfterFirst(OtherSeed):
    """Honest for its first generation; then fails (`mode` "fail") or answers with another
    seed's image ("cheat")."""

    def __init__(self, engine, mode):
        super().__init__(engine)
        self.mode, self.count, self.lock = mode, 0, threading.Lock()

    def generate_with_states(self, params, image=None):
        with self.lock:
            self.count += 1
            first = self.count == 1
        if first:
            return self._engine.generate_with_states(params, image)
        if self.mode == "fail":
            raise RuntimeError("out of memory, say")
        return super().generate_with_states(params, image)


class ReplayOnce(OtherSeed):
    """Computes its first answer once (under a lock: two requests arrive together) and
    answers everything with it."""

    def __init__(self, engine):
        super().__init__(engine)
        self.cached, self.lock = None, threading.Lock()

    def generate_with_states(self, params, image=None):
        with self.lock:
            if self.cached is None:
                self.cached = self._engine.generate_with_states(params, image)
            return self.cached


def test_primaries_split_first_challenge_per_uid():
    class C:
        def __init__(self, uid, tag):
            self.uid, self.tag = uid, tag

    cs = [C(1, "a"), C(1, "b"), C(2, "c"), C(1, "d")]
    first, rest = primaries(cs)
    assert [c.tag for c in first] == ["a", "c"] and [c.tag for c in rest] == ["b", "d"]


def test_volume_probes_count_delivered_answers(tiny_engine, tmp_path):
    names = ("validator", "single", "double", "flaky", "cheat", "replay")
    wallets = {n: create_wallet(n, "hot", tmp_path / "wallets") for n in names}
    chain = LocalChain(tmp_path / "chain.db", create=True)
    chain.create_subnet(NETUID, weights_rate_limit=2, max_validators=4)
    chain.register(NETUID, wallets["validator"], stake=100.0)
    uids = {n: chain.register(NETUID, wallets[n]) for n in names[1:]}
    engines = {"single": Only(tiny_engine, "flux-schnell"),
               "double": Claims(tiny_engine, 2),
               "flaky": Claims(AfterFirst(tiny_engine, "fail"), 2),
               "cheat": Claims(AfterFirst(tiny_engine, "cheat"), 9),  # capped at 4
               "replay": Claims(ReplayOnce(tiny_engine), 2)}
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), rounds=1, seed=3,
                             state_path=tmp_path / "state.db", audit_fraction=1.0,
                             epoch_length=1000, round_interval=0, info_timeout=10.0)
    validator = Validator(config, chain, wallets["validator"], tiny_engine,
                          MinerClient(wallets["validator"]), ValidatorState(config.state_path))
    try:
        with miners(chain, wallets, engines):
            assert validator.run() == 0
    finally:
        chain.close()
    (report,) = validator.reports
    table = validator.format_report(report)
    by = {n: next(o for o in report.outcomes if o.uid == uids[n]) for n in names[1:]}
    single, double, flaky, cheat, replay = (by[n] for n in names[1:])
    assert (single.probes, single.status, single.audit_passed) == (1, "ok", True), table
    assert (double.probes, double.verified, double.status) == (2, 2, "ok"), table
    assert double.audit_passed and double.span >= double.latency, table
    # one of the flaky miner's two answers is a 500: one verified, whichever it was
    assert (flaky.probes, flaky.verified) == (2, 1), table
    # a cheating answer among the probes fails the miner like any failed audit
    assert cheat.probes == 4 and cheat.audit_passed is False, table
    assert "audit_failed" in cheat.reason and report.rewards[cheat.uid] == 0.0, table
    # the same image twice: the scored answer is checked first, so the probe is the
    # duplicate (and the scored one fails its audit when it was computed for the probe)
    assert replay.probes == 2 and replay.verified <= 1, table
    # the rewards are the scoring's formula over these outcomes
    cfg = config.scoring
    valid = sorted(o.latency for o in report.outcomes if o.valid)
    median = (valid[len(valid) // 2] if len(valid) % 2
              else (valid[len(valid) // 2 - 1] + valid[len(valid) // 2]) / 2)
    speed = scoring.speed_reward(double.latency, double.timeout, valid[0], cfg)
    assert report.rewards[double.uid] == pytest.approx(speed * scoring.volume_factor(
        2, 2, double.span, median, cfg), abs=1e-12)
    assert report.rewards[single.uid] == scoring.speed_reward(single.latency, single.timeout,
                                                              valid[0], cfg)


def test_capacity_bench_pays_replicas_and_punishes_over_claiming():
    """bench/incentives.py's capacity table with the real scoring: two honest replicas
    earn more than one, and claiming four with one replica earns less than claiming one."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "incentives.py"
    spec = importlib.util.spec_from_file_location("incentives_bench", path)
    bench = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    cfg = scoring.ScoringConfig(model_shares={"flux-schnell": 1.0})
    shares = bench.capacity_shares(300, 3, cfg)
    one, two, four = (shares[n] for n in ("1 replica, declares 1", "2 replicas, declares 2",
                                          "4 replicas, declares 4"))
    over = shares["1 replica, declares 4"]
    assert two > 1.15 * one and four > two
    assert over < 0.7 * one
