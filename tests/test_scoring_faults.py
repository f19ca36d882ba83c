"""Faults are not fraud in the scoring: an audited answer whose states could not be fetched
earns nothing and costs a bounded penalty (scaled by the audit fraction), never the
exclusion a caught cheat gets; organic answers that passed their audit add to the volume."""
from __future__ import annotations

import pytest

from niche.validator.scoring import (
    UNAVAILABLE,
    Outcome,
    ScoreBook,
    ScoringConfig,
    round_rewards,
    unavailable,
)


def _ok(uid: int, **kw) -> Outcome:
    return Outcome(uid, f"hk{uid}", "flux-schnell", latency=6.0, timeout=24.0, audited=True,
                   audit_passed=True, **kw)


@pytest.mark.parametrize("fraction", [1.0, 0.1])
def test_an_unavailable_answer_earns_nothing_and_is_not_excluded(fraction):
    cfg = ScoringConfig(audit_fraction=fraction)
    book = ScoreBook(cfg=cfg)
    for r in range(30):
        book.apply(r, [_ok(1)], round_rewards([_ok(1)], cfg))
    before = book.scores()[1]
    fault = unavailable(_ok(1), "connection refused")
    assert fault.status == UNAVAILABLE and fault.audit_passed is None and not fault.valid
    assert round_rewards([fault], cfg) == {1: 0.0}
    book.apply(30, [fault], {1: 0.0})
    assert not book.is_excluded("hk1", 31)
    zeros = cfg.unavailable_penalty / fraction  # as many zero rewards, whatever the fraction
    assert book.scores()[1] == pytest.approx(before * (1 - cfg.alpha) ** zeros)
    cheat = Outcome(1, "hk1", "flux-schnell", latency=6.0, audited=True, audit_passed=False)
    book.apply(31, [cheat], {1: 0.0})
    assert book.scores()[1] == 0.0 and book.is_excluded("hk1", 32)  # fraud is excluded


def test_organic_answers_that_passed_add_to_the_volume():
    cfg = ScoringConfig()
    rewards = round_rewards([_ok(1), _ok(2, organic=2), _ok(3, organic=99)], cfg)
    assert rewards[2] == pytest.approx(rewards[1] * (1 + 2 * cfg.organic_weight))
    assert rewards[3] == pytest.approx(rewards[1] * (1 + cfg.volume_cap * cfg.organic_weight))


def test_the_bench_shows_refusing_fetches_does_not_pay():
    """bench/incentives.py with the real scoring: a cheat saving 90 % of the compute that
    refuses every audited fetch earns less than an honest miner at audit fractions 0.1 and
    1; an honest miner whose fetches fail 2 % of the time keeps most of its weight."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "incentives.py"
    spec = importlib.util.spec_from_file_location("incentives_bench", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    cfg = ScoringConfig(model_shares={"flux-schnell": 1.0})
    for fraction in (0.1, 1.0):
        assert bench.dropped_fetch_ratio(0.9, 0.0, fraction, 600, 1, cfg) < 0.9
    assert bench.dropped_fetch_ratio(0.0, 0.02, 1.0, 600, 1, cfg) > 0.85
