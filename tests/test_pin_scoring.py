"""Scoring pinned to numbers worked out by hand from the formulas in scoring.py's docstring.

reward = base + (1 - base) * (w * (1 - latency / timeout) + (1 - w) * min(1, fastest / latency))
score  = (1 - alpha) * score + alpha * reward
weight = share[m] / sum(live shares) * score / sum(score of m's uids), normalised

Every expected value below is written out as arithmetic on literals, never by calling the
code under test. A fast file: no engine, no network.
"""
from __future__ import annotations

import numpy as np
import pytest

from niche.validator import scoring
from niche.validator.scoring import (
    OK,
    Outcome,
    ScoreBook,
    ScoringConfig,
    UidScore,
    choose_audits,
    compute_weights,
    round_rewards,
    speed_reward,
    weights_due,
)

W64 = ("txt2img", 64, 64, 4)
W96 = ("txt2img", 96, 64, 4)


def cfg(**kw) -> ScoringConfig:
    base = {"alpha": 0.1, "base": 0.2, "speed_weight": 0.5, "exclusion_rounds": 50,
                "model_shares": {"flux-schnell": 0.5, "kolors": 0.5}}
    base.update(kw)
    return ScoringConfig(**base)


def ok(uid, latency, model="flux-schnell", workload=W64, timeout=20.0, **kw):
    return Outcome(uid, f"hk{uid}", model, workload, OK, "", latency, timeout, **kw)


# ----------------------------------------------------------------------------- constants
def test_wire_words_and_defaults_are_pinned():
    # the client's QueryResult status for a good answer, and the reasons stored in state
    assert OK == "ok"
    assert (scoring.AUDIT_FAILED, scoring.EXCLUDED, scoring.NO_MODEL) == (
        "audit_failed", "excluded", "no_supported_model")
    c = ScoringConfig()
    assert (c.alpha, c.base, c.speed_weight, c.exclusion_rounds) == (0.1, 0.2, 0.5, 50)
    assert dict(c.model_shares) == {"flux-schnell": 0.5, "kolors": 0.5}
    o = Outcome(3, "hk", "kolors")
    assert (o.workload, o.status, o.reason, o.latency, o.timeout) == ((), "ok", "", None, 30.0)
    assert (o.audited, o.audit_passed, o.similarity) == (False, None, None)
    u = UidScore("hk")
    assert (u.hotkey, u.score, u.model) == ("hk", 0.0, None)
    book = ScoreBook()
    assert book.cfg == ScoringConfig() and book.uids == {} and book.excluded_until == {}


@pytest.mark.parametrize("kw", [{"alpha": 1.0}, {"alpha": 1e-9}, {"base": 0.0},
                                {"base": 1.0}, {"speed_weight": 0.0},
                                {"speed_weight": 1.0}, {"exclusion_rounds": 0},
                                {"model_shares": {"kolors": 0.0}}])
def test_config_accepts_its_boundaries(kw):
    ScoringConfig(**kw)


@pytest.mark.parametrize("kw, message", [
    ({"alpha": 0.0}, "alpha must be in \\(0, 1\\]"),
    ({"alpha": -0.5}, "alpha must be in \\(0, 1\\]"),
    ({"alpha": 1.0001}, "alpha must be in \\(0, 1\\]"),
    ({"base": -0.01}, "base and speed_weight must be in \\[0, 1\\]"),
    ({"base": 1.01}, "base and speed_weight must be in \\[0, 1\\]"),
    ({"speed_weight": -0.01}, "base and speed_weight must be in \\[0, 1\\]"),
    ({"speed_weight": 1.01}, "base and speed_weight must be in \\[0, 1\\]"),
    ({"exclusion_rounds": -1}, "exclusion_rounds must be >= 0"),
    ({"model_shares": {"kolors": 0.5, "flux-schnell": -0.01}}, "model shares must be >= 0"),
])
def test_config_refuses_out_of_range(kw, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        ScoringConfig(**kw)


# ----------------------------------------------------------------------------- validity
def test_what_counts_as_a_valid_answer():
    assert ok(0, 1.0).valid
    assert ok(0, 1.0, audited=True, audit_passed=True).valid
    assert ok(0, 1.0, audited=True, audit_passed=None).valid  # audit still pending
    assert not ok(0, 1.0, audited=True, audit_passed=False).valid
    assert not ok(0, None).valid  # "ok" with no latency is no answer
    assert not Outcome(0, "hk0", "kolors", W64, "bad_image", "", 1.0, 20.0).valid
    assert not Outcome(0, "hk0", "kolors", W64, "timeout", "", None, 20.0).valid


# ----------------------------------------------------------------------------- speed_reward
def test_reward_at_the_deadline_is_base_when_only_the_deadline_counts():
    c = cfg(base=0.2, speed_weight=1.0)
    assert speed_reward(20.0, 20.0, 1.0, c) == pytest.approx(0.2, abs=1e-12)
    c = cfg(base=0.35, speed_weight=1.0)
    assert speed_reward(20.0, 20.0, 20.0, c) == pytest.approx(0.35, abs=1e-12)


def test_reward_at_the_deadline_with_the_relative_term():
    # w = 0.5: absolute = 0, relative = fastest / timeout = 2 / 20
    assert speed_reward(20.0, 20.0, 2.0, cfg()) == pytest.approx(
        0.2 + 0.8 * (0.5 * 0.0 + 0.5 * 0.1), abs=1e-12)
    # alone at the deadline: relative = 1
    assert speed_reward(20.0, 20.0, 20.0, cfg()) == pytest.approx(0.2 + 0.8 * 0.5, abs=1e-12)


def test_instant_answer_earns_one():
    for c in (cfg(), cfg(base=0.0, speed_weight=1.0), cfg(base=0.9, speed_weight=0.0)):
        assert speed_reward(0.0, 20.0, 0.0, c) == pytest.approx(1.0, abs=1e-6)
    # latency is floored at 1e-6 s: the absolute term loses 1e-6 / timeout, no more
    assert speed_reward(0.0, 1e-5, 0.0, cfg(base=0.0, speed_weight=1.0)) == pytest.approx(
        0.9, abs=1e-9)


def test_midpoint_values():
    # latency 10 of 20, fastest 5: absolute 0.5, relative 0.5 -> speed 0.5
    assert speed_reward(10.0, 20.0, 5.0, cfg()) == pytest.approx(0.2 + 0.8 * 0.5, abs=1e-12)
    # latency 10 of 20, fastest 2: absolute 0.5, relative 0.2; w = 0.25
    assert speed_reward(10.0, 20.0, 2.0, cfg(speed_weight=0.25)) == pytest.approx(
        0.2 + 0.8 * (0.25 * 0.5 + 0.75 * 0.2), abs=1e-12)
    # base 0.6 is honoured, not replaced by a constant
    assert speed_reward(10.0, 20.0, 5.0, cfg(base=0.6)) == pytest.approx(
        0.6 + 0.4 * 0.5, abs=1e-12)
    assert speed_reward(10.0, 20.0, 5.0, cfg(base=0.0)) == pytest.approx(0.5, abs=1e-12)
    assert speed_reward(10.0, 20.0, 5.0, cfg(base=1.0)) == pytest.approx(1.0, abs=1e-12)
    # sub-second latencies against a sub-second timeout
    assert speed_reward(0.5, 1.0, 0.25, cfg()) == pytest.approx(
        0.2 + 0.8 * (0.5 * 0.5 + 0.5 * 0.5), abs=1e-12)


def test_relative_term_is_capped_and_floored():
    # fastest > latency (impossible within a round, possible by a direct call): capped at 1
    assert speed_reward(10.0, 20.0, 15.0, cfg()) == pytest.approx(
        0.2 + 0.8 * (0.5 * 0.5 + 0.5 * 1.0), abs=1e-12)
    # fastest 0 is floored at 1e-6 s: relative = 1e-6 / 0.5
    assert speed_reward(0.5, 1.0, 0.0, cfg(base=0.0, speed_weight=0.0)) == pytest.approx(
        2e-6, rel=1e-9)


def test_past_or_without_a_deadline_earns_nothing():
    assert speed_reward(20.0001, 20.0, 1.0, cfg()) == 0.0
    assert speed_reward(0.5, 0.0, 0.5, cfg()) == 0.0
    assert speed_reward(0.5, -1.0, 0.5, cfg()) == 0.0
    assert speed_reward(0.0, 0.0, 0.0, cfg()) == 0.0


# ----------------------------------------------------------------------------- round_rewards
def test_fastest_is_per_model_and_workload():
    outcomes = [ok(0, 4.0, workload=W64), ok(1, 8.0, workload=W64),
                ok(2, 10.0, workload=W96),
                ok(3, 1.0, model="kolors", workload=W64),
                ok(4, 5.0, model="kolors", workload=W64)]
    r = round_rewards(outcomes, cfg())
    # uid 0 is its workload's fastest: absolute 0.8, relative 1
    assert r[0] == pytest.approx(0.2 + 0.8 * (0.5 * 0.8 + 0.5 * 1.0), abs=1e-12)
    # uid 1 against uid 0: absolute 0.6, relative 0.5
    assert r[1] == pytest.approx(0.2 + 0.8 * (0.5 * 0.6 + 0.5 * 0.5), abs=1e-12)
    # uid 2 alone in the 96x64 workload of the same model: relative 1, not 4/10
    assert r[2] == pytest.approx(0.2 + 0.8 * (0.5 * 0.5 + 0.5 * 1.0), abs=1e-12)
    # kolors' fastest (1 s) is its own; it lowers no flux answer
    assert r[4] == pytest.approx(0.2 + 0.8 * (0.5 * 0.75 + 0.5 * 0.2), abs=1e-12)
    assert r[3] == pytest.approx(0.2 + 0.8 * (0.5 * 0.95 + 0.5 * 1.0), abs=1e-12)


def test_invalid_answers_earn_zero_and_set_no_fastest():
    outcomes = [ok(0, 10.0),
                ok(1, 0.5, audited=True, audit_passed=False),  # a caught cheat's latency
                Outcome(2, "hk2", "flux-schnell", W64, "bad_image", "", 0.1, 20.0),
                ok(3, None)]
    r = round_rewards(outcomes, cfg())
    assert r == {0: pytest.approx(0.2 + 0.8 * (0.5 * 0.5 + 0.5 * 1.0), abs=1e-12),
                 1: 0.0, 2: 0.0, 3: 0.0}
    assert round_rewards([], cfg()) == {}


def test_each_answer_keeps_its_own_timeout():
    r = round_rewards([ok(0, 5.0, timeout=10.0), ok(1, 5.0, timeout=40.0)], cfg())
    assert r[0] == pytest.approx(0.2 + 0.8 * (0.5 * 0.5 + 0.5 * 1.0), abs=1e-12)
    assert r[1] == pytest.approx(0.2 + 0.8 * (0.5 * 0.875 + 0.5 * 1.0), abs=1e-12)


# ----------------------------------------------------------------------------- ScoreBook
def test_ema_step_by_step():
    book = ScoreBook(cfg=cfg(alpha=0.25))
    book.apply(0, [ok(0, 1.0)], {0: 0.8})
    assert book.scores() == {0: pytest.approx(0.25 * 0.8, abs=1e-12)}
    book.apply(1, [ok(0, 1.0)], {0: 0.4})
    assert book.scores()[0] == pytest.approx(0.75 * 0.2 + 0.25 * 0.4, abs=1e-12)
    # an outcome with no reward entry counts as reward 0
    book.apply(2, [ok(0, 1.0)], {})
    assert book.scores()[0] == pytest.approx(0.75 * 0.25, abs=1e-12)
    assert book.models() == {0: "flux-schnell"}


def test_apply_two_workloads_of_one_model_in_one_round():
    c = cfg(alpha=0.5)
    book = ScoreBook(cfg=c)
    outcomes = [ok(0, 4.0, workload=W64), ok(1, 8.0, workload=W96), ok(2, 16.0, workload=W96)]
    book.apply(0, outcomes, round_rewards(outcomes, c))
    s = book.scores()
    assert s[0] == pytest.approx(0.5 * (0.2 + 0.8 * (0.5 * 0.8 + 0.5 * 1.0)), abs=1e-12)
    assert s[1] == pytest.approx(0.5 * (0.2 + 0.8 * (0.5 * 0.6 + 0.5 * 1.0)), abs=1e-12)
    assert s[2] == pytest.approx(0.5 * (0.2 + 0.8 * (0.5 * 0.2 + 0.5 * 0.5)), abs=1e-12)


def test_apply_creates_and_resets_entries_and_keeps_the_last_known_model():
    book = ScoreBook(cfg=cfg(alpha=0.5))
    book.apply(0, [ok(0, 1.0)], {0: 1.0})
    # same uid, new hotkey: a fresh entry, EMA from 0
    book.apply(1, [Outcome(0, "new", "kolors", W64, OK, "", 1.0, 20.0)], {0: 0.5})
    assert book.uids[0].hotkey == "new"
    assert book.scores()[0] == pytest.approx(0.25, abs=1e-12)
    assert book.models()[0] == "kolors"
    # a round with no model (no supported model) keeps the model learnt before
    book.apply(2, [Outcome(0, "new", None, (), "no_supported_model")], {0: 0.0})
    assert book.models()[0] == "kolors"
    assert book.scores()[0] == pytest.approx(0.125, abs=1e-12)
    book.apply(3, [Outcome(0, "new", "", (), "no_supported_model")], {0: 0.0})
    assert book.models()[0] == "kolors"


def test_failed_audit_zeroes_excludes_and_does_not_stop_the_round():
    book = ScoreBook(cfg=cfg(alpha=0.5, exclusion_rounds=3))
    book.apply(0, [ok(0, 1.0), ok(1, 1.0)], {0: 1.0, 1: 1.0})
    caught = [ok(0, 1.0, audited=True, audit_passed=False), ok(1, 1.0)]
    book.apply(10, caught, {0: 0.9, 1: 1.0})
    assert book.scores()[0] == 0.0  # not the EMA of 0.5 and 0.9
    assert book.scores()[1] == pytest.approx(0.75, abs=1e-12)  # processed after the cheat
    assert book.excluded_until == {"hk0": 10 + 1 + 3}
    # excluded in rounds 11, 12, 13; queried again from round 14
    assert [book.is_excluded("hk0", r) for r in (10, 11, 12, 13, 14, 15)] == [
        True, True, True, True, False, False]
    assert not book.is_excluded("hk1", 11)
    assert not book.is_excluded("never-seen", 0)


def test_exclusion_entries_expire_on_the_round_they_end():
    book = ScoreBook(cfg=cfg(exclusion_rounds=2))
    book.apply(5, [ok(0, 1.0, audited=True, audit_passed=False)], {0: 0.0})
    assert book.excluded_until == {"hk0": 8}
    book.apply(7, [], {})
    assert book.excluded_until == {"hk0": 8}
    book.apply(8, [], {})  # until == round: forgotten now, not a round later
    assert book.excluded_until == {}


def test_zero_exclusion_rounds_excludes_for_no_later_round():
    book = ScoreBook(cfg=cfg(exclusion_rounds=0))
    book.apply(4, [ok(0, 1.0, audited=True, audit_passed=False)], {0: 0.7})
    assert book.excluded_until == {"hk0": 5}
    assert book.is_excluded("hk0", 4) and not book.is_excluded("hk0", 5)
    assert book.scores()[0] == 0.0


def test_sync_hotkeys_forgets_resets_and_adds():
    book = ScoreBook(cfg=cfg(alpha=1.0))
    book.apply(0, [ok(0, 1.0), ok(1, 1.0), ok(2, 1.0)], {0: 0.3, 1: 0.6, 2: 0.9})
    reset = book.sync_hotkeys({0: "hk0", 1: "other", 3: "hk3"})
    assert reset == [1]  # uid 3 is new, not reset; uid 2 left
    assert book.scores() == {0: pytest.approx(0.3), 1: 0.0, 3: 0.0}
    assert book.models() == {0: "flux-schnell", 1: None, 3: None}
    assert book.uids[1].hotkey == "other" and book.uids[3].hotkey == "hk3"


# ----------------------------------------------------------------------------- weights
def test_weights_two_models_shares_summing_to_one():
    w = compute_weights({0: 0.6, 1: 0.2, 2: 0.5},
                        {0: "flux-schnell", 1: "flux-schnell", 2: "kolors"},
                        {"flux-schnell": 0.3, "kolors": 0.7})
    assert w == {0: pytest.approx(0.3 * 0.6 / 0.8), 1: pytest.approx(0.3 * 0.2 / 0.8),
                 2: pytest.approx(0.7)}
    assert list(w) == [0, 1, 2]


def test_weights_shares_not_summing_to_one():
    w = compute_weights({5: 0.4, 2: 0.4, 9: 0.1},
                        {5: "flux-schnell", 2: "kolors", 9: "kolors"},
                        {"flux-schnell": 0.2, "kolors": 0.6})
    assert w == {5: pytest.approx(0.2 / 0.8), 2: pytest.approx(0.6 / 0.8 * 0.4 / 0.5),
                 9: pytest.approx(0.6 / 0.8 * 0.1 / 0.5)}
    assert list(w) == [2, 5, 9]  # sorted by uid
    w = compute_weights({0: 0.5, 1: 0.5}, {0: "flux-schnell", 1: "kolors"},
                        {"flux-schnell": 3.0, "kolors": 1.0})
    assert w == {0: pytest.approx(0.75), 1: pytest.approx(0.25)}


def test_model_with_no_scoring_uid_hands_on_its_share():
    scores = {0: 0.3, 1: 0.1, 2: 0.0}
    models = {0: "flux-schnell", 1: "flux-schnell", 2: "kolors"}
    w = compute_weights(scores, models, {"flux-schnell": 0.25, "kolors": 0.75})
    assert w == {0: pytest.approx(0.75), 1: pytest.approx(0.25)}


def test_share_zero_model_gets_nothing_and_takes_nothing():
    scores = {0: 0.9, 1: 0.3}
    models = {0: "kolors", 1: "flux-schnell"}
    w = compute_weights(scores, models, {"flux-schnell": 0.5, "kolors": 0.0})
    assert w == {1: pytest.approx(1.0)}
    # only share-0 models scoring: nothing to set
    assert compute_weights({0: 0.9}, {0: "kolors"}, {"kolors": 0.0}) == {}


def test_weights_all_zero_unknown_or_missing():
    assert compute_weights({0: 0.0, 1: 0.0}, {0: "kolors", 1: "flux-schnell"},
                           {"kolors": 0.5, "flux-schnell": 0.5}) == {}
    assert compute_weights({}, {}, {"kolors": 1.0}) == {}
    assert compute_weights({0: 0.9}, {}, {"kolors": 1.0}) == {}  # no model known
    assert compute_weights({0: 0.9}, {0: None}, {"kolors": 1.0}) == {}
    # an unknown model's uid earns nothing, the known one takes everything
    w = compute_weights({0: 0.9, 1: 0.1}, {0: "sdxl", 1: "kolors"}, {"kolors": 0.4})
    assert w == {1: pytest.approx(1.0)}
    # a zero score next to a positive one is left out, not weighted 0
    w = compute_weights({0: 0.0, 1: 0.2}, {0: "kolors", 1: "kolors"}, {"kolors": 1.0})
    assert w == {1: pytest.approx(1.0)}
    # scores below 1 are weighted in proportion (not dropped by a threshold)
    w = compute_weights({0: 0.5, 1: 0.25}, {0: "kolors", 1: "kolors"}, {"kolors": 1.0})
    assert w == {0: pytest.approx(2 / 3), 1: pytest.approx(1 / 3)}


def test_weights_with_small_shares():
    w = compute_weights({0: 0.2, 1: 0.6}, {0: "kolors", 1: "flux-schnell"},
                        {"kolors": 0.5, "flux-schnell": 0.5})
    assert w == {0: pytest.approx(0.5), 1: pytest.approx(0.5)}
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------- audits
def _untouched(rng: np.random.Generator, seed: int) -> bool:
    return rng.random() == np.random.default_rng(seed).random()


def test_choose_audits_nothing_to_pick_draws_nothing():
    for candidates, fraction in (([], 0.5), ([], 1.0), ([1, 2, 3], 0.0), ([1, 2], -0.5)):
        rng = np.random.default_rng(3)
        assert choose_audits(rng, candidates, fraction) == []
        assert _untouched(rng, 3), (candidates, fraction)


def test_choose_audits_everything_draws_nothing():
    for fraction in (1.0, 1.5):
        rng = np.random.default_rng(4)
        assert choose_audits(rng, [9, 4, 7], fraction) == [9, 4, 7]
        assert _untouched(rng, 4)


def test_choose_audits_k_zero_and_one():
    # fraction * n = 0.5: k = 0 + (u < 0.5) for the first uniform u of the generator
    hits = {0: 0, 1: 0}
    for seed in range(40):
        u = np.random.default_rng(seed).random()
        picked = choose_audits(np.random.default_rng(seed), [10, 20], 0.25)
        expected_k = 1 if u < 0.5 else 0
        assert len(picked) == expected_k, (seed, u, picked)
        assert set(picked) <= {10, 20}
        hits[expected_k] += 1
    assert hits[0] > 0 and hits[1] > 0  # both branches ran


def test_choose_audits_count_is_floor_plus_stochastic_rounding():
    candidates = list(range(100, 110))
    for seed in range(30):
        u = np.random.default_rng(seed).random()
        picked = choose_audits(np.random.default_rng(seed), candidates, 0.93)
        k = 9 + (1 if u < 0.3 else 0)  # 0.93 * 10 = 9.3
        assert len(picked) == k
        assert len(set(picked)) == k and picked == sorted(picked)
        assert set(picked) <= set(candidates)
    # a fraction with no fractional part: exactly that many
    for seed in range(10):
        picked = choose_audits(np.random.default_rng(seed), list(range(8)), 0.5)
        assert len(picked) == 4 and len(set(picked)) == 4


def test_choose_audits_returns_candidates_not_indices():
    picked = choose_audits(np.random.default_rng(0), [1000, 2000, 3000, 4000], 0.75)
    assert len(picked) == 3 and set(picked) <= {1000, 2000, 3000, 4000}


# ----------------------------------------------------------------------------- cadence
def test_weights_due_boundaries():
    assert weights_due(0, None, 100, 100)
    assert not weights_due(199, 100, 100, 50)
    assert weights_due(200, 100, 100, 50)
    assert not weights_due(219, 100, 100, 120)
    assert weights_due(220, 100, 100, 120)
    # zero epoch and rate limit: still at most once per block
    assert not weights_due(100, 100, 0, 0)
    assert weights_due(101, 100, 0, 0)
    assert weights_due(101, 100, 1.9, 0)  # lengths are whole blocks
    assert weights_due(102, 100, 0, 2.9)


# ----------------------------------------------------------------------------- volume
def test_volume_factor_pinned():
    import math

    c = cfg()
    assert ScoringConfig().volume_cap == 4
    o = Outcome(3, "hk", "kolors")
    assert (o.probes, o.verified, o.span) == (1, 0, None)
    vf = scoring.volume_factor
    # one challenge: the speed term alone measures the miner
    assert vf(1, 1, 2.0, 1.0, c) == 1.0 and vf(1, 0, None, 1.0, c) == 1.0
    assert vf(0, 0, None, 1.0, c) == 1.0
    # nothing verified or no span: nothing delivered
    assert vf(2, 0, 1.0, 1.0, c) == 0.0 and vf(2, 2, None, 1.0, c) == 0.0
    # two in one fastest-answer time: sqrt(2)
    assert vf(2, 2, 1.0, 1.0, c) == pytest.approx(2 / math.sqrt(2), abs=1e-12)
    # two in 1.6 fastest-answer times: 1.25 answers per fastest time, over sqrt 2
    assert vf(2, 2, 1.6, 1.0, c) == pytest.approx(1.25 / math.sqrt(2), abs=1e-12)
    # claimed 4, delivered one at a time: 4 answers in 4 fastest times -> 1 / sqrt(4)
    assert vf(4, 4, 4.0, 1.0, c) == pytest.approx(0.5, abs=1e-12)
    # delivered can never exceed what was sent (a fastest slower than the span)
    assert vf(2, 2, 1.0, 3.0, c) == pytest.approx(2 / math.sqrt(2), abs=1e-12)
    # probes above the cap count as the cap; tiny spans and fastests are floored at 1e-6
    assert vf(9, 4, 1.0, 1.0, c) == pytest.approx(4 / 2, abs=1e-12)
    assert vf(4, 1, 0.0, 0.0, c) == pytest.approx(1 / 2, abs=1e-12)
    assert vf(4, 2, 1.0, 1e-9, c) == pytest.approx(2 * 1e-6 / 2, abs=1e-15)
    assert vf(2, 1, 2.0, 1.0, cfg(volume_cap=1)) == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError, match=r"^volume_cap must be >= 1$"):
        cfg(volume_cap=0)


def test_round_rewards_multiply_speed_by_volume():
    import math

    c = cfg()
    # uid 1: one challenge, 1 s; uid 2: two at once, both valid, the last at 2 s;
    # uid 3: claimed 4, four answers, the last at 8 s (one replica doing all four).
    # fastest scored answer 1 s, median 2 s
    outs = [ok(1, 1.0), ok(2, 2.0, probes=2, verified=2, span=2.0),
            ok(3, 4.0, probes=4, verified=4, span=8.0)]
    r = round_rewards(outs, c)
    assert r[1] == pytest.approx(0.2 + 0.8 * (0.5 * (1 - 1.0 / 20.0) + 0.5 * 1.0), abs=1e-12)
    assert r[2] == pytest.approx((0.2 + 0.8 * (0.5 * (1 - 2.0 / 20.0) + 0.5 * (1.0 / 2.0)))
                                 * (2 * 2.0 / 2.0) / math.sqrt(2), abs=1e-12)
    assert r[3] == pytest.approx((0.2 + 0.8 * (0.5 * (1 - 4.0 / 20.0) + 0.5 * (1.0 / 4.0)))
                                 * (4 * 2.0 / 8.0) / 2, abs=1e-12)
    # the median, not the fastest, is the volume's unit: an even count takes the mean of
    # the middle two (1 s and 3 s -> 2 s)
    outs = [ok(1, 1.0), ok(2, 3.0, probes=2, verified=2, span=3.0)]
    r = round_rewards(outs, c)
    assert r[2] == pytest.approx((0.2 + 0.8 * (0.5 * (1 - 3.0 / 20.0) + 0.5 * (1.0 / 3.0)))
                                 * (2 * 2.0 / 3.0) / math.sqrt(2), abs=1e-12)
    # an invalid scored answer earns nothing whatever its probes did
    bad = Outcome(4, "hk4", "flux-schnell", W64, "timeout", "", None, 20.0, probes=2,
                  verified=1, span=3.0)
    assert round_rewards([bad], c) == {4: 0.0}

