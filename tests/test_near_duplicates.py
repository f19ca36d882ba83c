"""A perceptual near-match is no proof of a copy: distinct honest answers share a 64-bit
dHash within 4 bits about once in a million pairs (3000 tiny-FLUX answers: 4 pairs), and the
validator compares each answer with every answer of 1000 rounds, so zeroing near-matches
paid 5-20 % of honest answers nothing on a busy subnet. Such an answer is audited instead,
whatever the audit fraction draws: the step check tells a replay from a fresh computation
exactly. The same pixels again stay a duplicate (zero, no audit needed).

Real miners on 127.0.0.1 with the tiny FLUX.1-schnell, the validator's client, step check
and scoring; audit_fraction 0, so only the forced audits run."""
from __future__ import annotations

import asyncio

import numpy as np
from PIL import Image
from test_validator_service import NETUID, Only, OtherSeed, miners

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.validator.checks import Answer, fingerprint
from niche.validator.client import MinerClient
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState


class NoisedReplay(OtherSeed):
    """Computes once; then answers with that image lightly noised (new pixels, so a new
    sha256, the same dHash) and the same states: a replay dressed up as new work."""

    first = None

    def generate_with_states(self, params, image=None):
        if self.first is None:
            self.first = self._engine.generate_with_states(params, image)
            return self.first
        picture, states = self.first
        noise = np.random.default_rng(params.seed).integers(-2, 3, (*picture.size[::-1], 3))
        noised = np.clip(np.asarray(picture, dtype=np.int16) + noise, 0, 255)
        return Image.fromarray(noised.astype(np.uint8)), states


class CollidesOnce(Validator):
    """Before the cheap checks, the index gets a distinct earlier answer with the same dHash
    as `honest_uid`'s answer: what a one-in-a-million collision with another honest image
    looks like."""

    honest_uid = -1

    def _cheap_checks(self, challenges, answered, outcomes, round_index):
        for c in challenges:
            result = answered[c.uid][1]
            if c.uid == self.honest_uid and result.image is not None:
                fp = fingerprint(result.image)
                self.answers.add(Answer("0" * 64, fp.phash, uid=99, round=round_index - 1))
        return super()._cheap_checks(challenges, answered, outcomes, round_index)


def test_a_near_match_is_audited_not_zeroed(tiny_engine, tmp_path):
    names = ("validator", "honest", "replay")
    wallets = {n: create_wallet(n, "hot", tmp_path / "wallets") for n in names}
    chain = LocalChain(tmp_path / "chain.db", create=True)
    chain.create_subnet(NETUID, max_validators=4)
    chain.register(NETUID, wallets["validator"], stake=100.0)
    uids = {n: chain.register(NETUID, wallets[n]) for n in names[1:]}
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), rounds=2, seed=3,
                             state_path=tmp_path / "state.db", audit_fraction=0.0,
                             epoch_length=1000, round_interval=0)
    validator = CollidesOnce(config, chain, wallets["validator"], tiny_engine,
                             MinerClient(wallets["validator"]), ValidatorState(config.state_path))
    validator.honest_uid = uids["honest"]
    engines = {"honest": Only(tiny_engine, "flux-schnell"), "replay": NoisedReplay(tiny_engine)}
    try:
        with miners(chain, wallets, engines):
            first = asyncio.run(validator.run_round())
            second = asyncio.run(validator.run_round())
    finally:
        validator.state.close()
        chain.close()
    table = validator.format_report(first) + "\n" + validator.format_report(second)
    for report in (first, second):  # the collision: audited (audit_fraction 0), passed, paid
        honest = {o.uid: o for o in report.outcomes}[uids["honest"]]
        assert honest.status == "ok" and honest.audited and honest.audit_passed, table
        assert report.rewards[honest.uid] > 0, table
    replay_first = {o.uid: o for o in first.outcomes}[uids["replay"]]
    assert replay_first.status == "ok" and not replay_first.audited, table  # nothing to see
    replay = {o.uid: o for o in second.outcomes}[uids["replay"]]
    assert replay.audited and replay.audit_passed is False, table  # the forced audit caught it
    assert "audit_failed" in replay.reason and second.rewards[replay.uid] == 0.0, table
    assert validator.book.is_excluded(wallets["replay"].hotkey.ss58_address, 2)
