"""Scoring properties: what earns, what does not, and what a caught cheat loses."""
from __future__ import annotations

import numpy as np
import pytest

from niche.validator.scoring import (
    OK,
    Outcome,
    ScoreBook,
    ScoringConfig,
    choose_audits,
    compute_weights,
    round_rewards,
    speed_reward,
    weights_due,
)

CFG = ScoringConfig(model_shares={"flux-schnell": 0.5, "kolors": 0.5})
W = ("txt2img", 64, 64, 4)


def ok(uid, latency, model="flux-schnell", hotkey=None, **kw):
    return Outcome(uid, hotkey or f"hk{uid}", model, W, OK, "", latency, 24.0, **kw)


def test_no_answer_error_and_bad_image_score_zero():
    outcomes = [ok(0, 5.0),
                Outcome(1, "hk1", "flux-schnell", W, "timeout", "no answer in 24s", None, 24.0),
                Outcome(2, "hk2", "flux-schnell", W, "http_error", "500", 1.0, 24.0),
                Outcome(3, "hk3", "flux-schnell", W, "bad_image", "not an image", 1.0, 24.0),
                Outcome(4, "hk4", "flux-schnell", W, "duplicate_answer", "", 0.1, 24.0)]
    rewards = round_rewards(outcomes, CFG)
    assert rewards[0] > 0
    assert rewards[1] == rewards[2] == rewards[3] == rewards[4] == 0.0


def test_faster_honest_beats_slower_honest():
    rewards = round_rewards([ok(0, 2.0), ok(1, 6.0), ok(2, 20.0)], CFG)
    assert rewards[0] > rewards[1] > rewards[2] > 0
    assert rewards[0] <= 1.0
    # strictly decreasing in latency for a fixed fastest answer
    values = [speed_reward(t, 24.0, 1.0, CFG) for t in np.linspace(1.0, 24.0, 50)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert speed_reward(25.0, 24.0, 1.0, CFG) == 0.0  # past the deadline


def test_latency_is_relative_to_same_model_only():
    # a very fast kolors miner does not lower a flux miner's relative term
    alone = round_rewards([ok(0, 6.0)], CFG)[0]
    mixed = round_rewards([ok(0, 6.0), ok(1, 0.5, model="kolors")], CFG)[0]
    assert alone == pytest.approx(mixed)


def test_failed_audit_zeroes_score_and_excludes():
    book = ScoreBook(cfg=ScoringConfig(exclusion_rounds=5))
    for r in range(20):
        outcomes = [ok(0, 3.0), ok(1, 3.0)]
        book.apply(r, outcomes, round_rewards(outcomes, book.cfg))
    assert book.scores()[1] > 0.5
    caught = [ok(0, 3.0), ok(1, 0.1, audited=True, audit_passed=False)]
    rewards = round_rewards(caught, book.cfg)
    assert rewards[1] == 0.0
    book.apply(20, caught, rewards)
    assert book.scores()[1] == 0.0
    assert all(book.is_excluded("hk1", r) for r in range(21, 26))
    assert not book.is_excluded("hk1", 26)
    assert not book.is_excluded("hk0", 21)
    weights = compute_weights(book.scores(), book.models(), {"flux-schnell": 1.0})
    assert 1 not in weights and weights[0] == pytest.approx(1.0)


def test_new_hotkey_on_uid_starts_from_zero():
    book = ScoreBook(cfg=CFG)
    outcomes = [ok(0, 3.0)]
    for r in range(10):
        book.apply(r, outcomes, round_rewards(outcomes, CFG))
    assert book.scores()[0] > 0.3
    reset = book.sync_hotkeys({0: "someone-else"})
    assert reset == [0] and book.scores()[0] == 0.0
    assert book.sync_hotkeys({}) == [] and book.scores() == {}


def test_ema_converges_to_reward():
    book = ScoreBook(cfg=ScoringConfig(alpha=0.2))
    outcomes = [ok(0, 3.0)]
    r0 = round_rewards(outcomes, book.cfg)[0]
    for r in range(200):
        book.apply(r, outcomes, {0: r0})
    assert book.scores()[0] == pytest.approx(r0, rel=1e-6)


def test_weights_follow_model_shares_and_normalise():
    scores = {0: 0.5, 1: 0.25, 2: 0.8, 3: 0.0}
    models = {0: "flux-schnell", 1: "flux-schnell", 2: "kolors", 3: "kolors"}
    w = compute_weights(scores, models, {"flux-schnell": 0.25, "kolors": 0.75})
    assert sum(w.values()) == pytest.approx(1.0)
    assert w[0] == pytest.approx(0.25 * 2 / 3) and w[1] == pytest.approx(0.25 / 3)
    assert w[2] == pytest.approx(0.75) and 3 not in w
    # a model with no scoring miner hands its share to the others
    w = compute_weights({0: 0.5}, {0: "flux-schnell"}, {"flux-schnell": 0.25, "kolors": 0.75})
    assert w == {0: pytest.approx(1.0)}
    assert compute_weights({0: 0.0}, {0: "kolors"}, {"kolors": 1.0}) == {}
    # unknown model earns nothing
    assert compute_weights({0: 0.9}, {0: "sdxl"}, {"kolors": 1.0}) == {}


def test_weights_cadence_respects_rate_limit():
    assert weights_due(10, None, 100, 50)
    assert not weights_due(109, 10, 100, 50)
    assert weights_due(110, 10, 100, 50)
    assert not weights_due(110, 10, 20, 150)  # rate limit longer than the epoch wins
    assert weights_due(160, 10, 20, 150)


def test_audit_sample_fraction_and_unpredictability():
    rng = np.random.default_rng(0)
    counts = [len(choose_audits(rng, list(range(10)), 0.25)) for _ in range(4000)]
    assert abs(np.mean(counts) - 2.5) < 0.1
    assert set(counts) == {2, 3}
    picked = np.zeros(10)
    for _ in range(4000):
        for uid in choose_audits(rng, list(range(10)), 0.25):
            picked[uid] += 1
    assert picked.min() > 0.8 * picked.mean()  # uniform over miners
    assert choose_audits(rng, [], 0.5) == [] and choose_audits(rng, [1, 2], 1.0) == [1, 2]


def test_config_validation():
    with pytest.raises(ValueError):
        ScoringConfig(alpha=0.0)
    with pytest.raises(ValueError):
        ScoringConfig(model_shares={"kolors": -1})
