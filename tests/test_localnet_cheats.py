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


def _reuse_at(module, step: int):
    """A forward hook that answers denoiser call `step` with call `step - 1`'s output: the
    cheapest way to fake one step (one network evaluation saved)."""
    seen: list = []

    def hook(mod, args, output):
        seen.append(output)
        if len(seen) - 1 == step:
            return seen[-2]
        return None

    return module.register_forward_hook(hook)


def _plan_detection(failing: set[int], n: int, k: int) -> float:
    """Probability that a plan of step 0 plus k of the N-1 others (without replacement)
    contains a failing step."""
    from math import comb

    if 0 in failing:
        return 1.0
    bad = len(failing)
    return 1.0 - comb(n - 1 - bad, k) / comb(n - 1, k)


def test_random_steps_needed_meets_the_bar_for_any_faked_share():
    from math import ceil

    from niche.validator.audit import MIN_DETECTION, MIN_SAVING, random_steps_needed

    assert {n: random_steps_needed(n) for n in (1, 4, 8, 30)} == {1: 0, 4: 1, 8: 3, 30: 6}
    for n in range(2, 60):
        k = random_steps_needed(n)
        faked = set(range(1, 1 + max(1, ceil(MIN_SAVING * n))))
        assert _plan_detection(faked, n, k) >= MIN_DETECTION, n
        if k > 1:  # and it is the fewest such
            assert _plan_detection(faked, n, k - 1) < MIN_DETECTION, n


@pytest.mark.slow
@pytest.mark.parametrize("model", ["flux-schnell", "kolors"])
def test_one_faked_step_anywhere_is_caught_on_a_third_of_audits(tiny_engine, model):
    """Faking a single step (12.5 % of Kolors' 8, 25 % of FLUX's 4) fails exactly that step,
    so the default plan size is what makes it caught often enough."""
    from niche.devnet.step_cheats import denoiser
    from niche.validator.audit import MIN_DETECTION, random_steps_needed

    checker = StepChecker(tiny_engine)
    params = tiny_engine.resolve(GenerationParams(model=model, prompt="a yellow square",
                                                  seed=5))
    n = int(params.steps)
    for step in range(1, n):
        handle = _reuse_at(denoiser(tiny_engine, model), step)
        try:
            picture, states = tiny_engine.generate_with_states(params)
        finally:
            handle.remove()
        claimed = {i + 1: s for i, s in enumerate(states)}
        verdict = checker.check(params, None, claimed, list(range(n)), dtype="float32",
                                answer=picture)
        failing = {k for k, e in verdict.errors.items() if not e <= verdict.thresholds[k]}
        assert failing == {step}, (step, verdict.errors)
        assert _plan_detection(failing, n, random_steps_needed(n)) >= MIN_DETECTION
        assert _plan_detection(failing, n, 1) < MIN_DETECTION or n <= 4  # one would not do
