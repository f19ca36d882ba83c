"""The localnet's cheating miners against the validator's step check, on the tiny real
checkpoints: every cheat is caught with probability >= 1/3 per audited answer under the
validator's own random step choice (step 0 plus one random step), and honest answers pass."""
from __future__ import annotations

import pytest

from niche.devnet.localnet.cheats import CHEATS, CheatingEngine
from niche.protocol import GenerationParams
from niche.validator.steps import StepChecker

MIN_DETECTION = 1 / 3
"""Issue 15's bar: a cheat that saves compute is caught on at least a third of its audits."""


def _detection(checker, params, picture, states, dtype="float32") -> float:
    """Share of the validator's possible step plans ([0, k], k = 1..N-1) that fail the
    answer (every plan is equally likely), computed from all steps' errors at once."""
    n = len(states)
    claimed = {i + 1: s for i, s in enumerate(states)}
    verdict = checker.check(params, None, claimed, list(range(n)), dtype=dtype,
                            answer=picture)
    over = {k for k, e in verdict.errors.items() if not e <= verdict.thresholds[k]}
    if not verdict.passed and not over:  # failed on the decoded image: every plan sees it
        return 1.0
    if 0 in over:
        return 1.0
    return sum(1 for k in range(1, n) if k in over) / max(1, n - 1)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["flux-schnell", "kolors"])
def test_every_localnet_cheat_is_caught_often_enough(tiny_engine, model):
    checker = StepChecker(tiny_engine)
    params = tiny_engine.resolve(GenerationParams(model=model, prompt="a red circle on a "
                                                  "blue background", seed=11))
    honest_picture, honest_states = tiny_engine.generate_with_states(params)
    assert _detection(checker, params, honest_picture, honest_states) == 0.0
    caught = {}
    for cheat in CHEATS:
        picture, states = CheatingEngine(tiny_engine, cheat).generate_with_states(params)
        assert len(states) == params.steps  # the commitment looks honest
        caught[cheat] = _detection(checker, params, picture, states)
    assert {c: p for c, p in caught.items() if p < MIN_DETECTION} == {}
