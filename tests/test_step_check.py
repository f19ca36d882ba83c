"""The step check: honest chains pass (float32, a bfloat16 miner), every cheat of the
calibration fails on the steps it changes, malformed states fail cleanly. Thresholds are the
calibrated defaults (niche.validator.steps.DEFAULT_STEP_BANDS, docs/step-check.md)."""
from __future__ import annotations

import math
import random

import pytest
import torch
from test_models_engine import photo

from niche.devnet import step_cheats
from niche.protocol import GenerationParams
from niche.validator.steps import (
    DEFAULT_STEP_BANDS,
    Band,
    StepChecker,
    StepThresholds,
    choose_steps,
    step_error,
)

MODELS = ["flux-schnell", "kolors"]


def req(model, pipeline="txt2img", **kw) -> GenerationParams:
    kw.setdefault("prompt", "a lighthouse on a cliff at sunset")
    kw.setdefault("seed", 21)
    return GenerationParams(model=model, pipeline=pipeline, **kw)


def all_steps(engine, params) -> list[int]:
    return list(range(engine.resolve(params).steps))


@pytest.fixture(scope="module")
def checker(tiny_engine, tiny_engine_bf16):
    """The validator holds float32 and (for FLUX and Kolors txt2img) bfloat16 engines."""
    return StepChecker(tiny_engine, extra_engines=[tiny_engine_bf16])


# ------------------------------------------------------------------ the pieces
def test_step_error_is_relative_to_the_steps_own_update():
    x = torch.zeros(1, 4)
    claimed = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert step_error(x, claimed, claimed) == 0.0
    assert step_error(x, claimed, torch.tensor([[1.0, 0.1, 0.0, 0.0]])) == pytest.approx(0.1)
    assert step_error(x, x, x) == 0.0  # a zero update recomputed as zero
    assert step_error(x, x, claimed) == math.inf  # a claimed "step" that does not move


def test_choose_steps_always_starts_at_zero():
    rng = random.Random(5)
    for _ in range(50):
        steps = choose_steps(rng, 8, k=3)
        assert steps[0] == 0 and len(set(steps)) == 4 and all(0 < s < 8 for s in steps[1:])
    assert choose_steps(rng, 1, k=2) == [0]
    assert choose_steps(rng, 3, k=5) == [0, 1, 2]


def test_the_calibrated_thresholds():
    """As in docs/step-check.md: FLUX one band, Kolors five growing along the schedule;
    same-dtype recomputation, so FLUX bfloat16 is 5e-3 (below every cheat at N = 28)."""
    for model in ("flux-schnell", "flux-dev", "flux-mini"):
        assert DEFAULT_STEP_BANDS[model] == (Band(1.0, 3e-4, 5e-3, 1.25e-3),)
    kolors = DEFAULT_STEP_BANDS["kolors"]
    assert [b.upto for b in kolors] == [0.25, 0.5, 0.75, 0.875, 1.0]
    assert [b.bfloat16 for b in kolors] == [3e-3, 1.6e-2, 3.2e-2, 4.2e-2, 7.4e-2]
    assert [b.float16 for b in kolors] == [1.5e-3, 8e-3, 1.6e-2, 2.1e-2, 3.7e-2]
    assert [b.float32 for b in kolors] == [4e-4, 2e-3, 4e-3, 5.2e-3, 9.2e-3]
    t = StepThresholds()
    assert t.threshold("kolors", "controlnet-depth", "bfloat16", 0, 8) == 3e-3  # 1/8
    assert t.threshold("kolors", "txt2img", "bfloat16", 3, 8) == 1.6e-2  # 4/8
    assert t.threshold("kolors", "txt2img", "float16", 7, 8) == 3.7e-2  # the last step
    assert t.threshold("kolors", "txt2img", "float16", 29, 30) == 3.7e-2
    assert t.threshold("kolors", "txt2img", "float16", 0, 30) == 1.5e-3  # first of 30
    assert t.threshold("kolors", "txt2img", "float16", 7, 30) == 8e-3  # 8/30 > 1/4
    assert t.threshold("flux-dev", "txt2img", "bfloat16", 27, 28) == 5e-3
    with pytest.raises(ValueError):
        t.threshold("kolors", "txt2img", "int8", 0, 8)
    with pytest.raises(KeyError):
        t.threshold("sdxl", None, "float32", 0, 8)


# ------------------------------------------------------------------ honest chains pass
@pytest.mark.parametrize("model", MODELS)
def test_honest_chains_pass_at_every_step(tiny_engine, tiny_engine_bf16, checker, model):
    """Recomputed in the miner's own dtype, honest chains are bit-exact in float32 and in
    bfloat16 alike."""
    params = req(model)
    steps = all_steps(tiny_engine, params)
    exact = checker.check(params, None, step_cheats.honest(tiny_engine, params, None), steps,
                          dtype="float32")
    assert exact.passed and set(exact.errors.values()) == {0.0}, exact.reason
    answer, states = tiny_engine_bf16.generate_with_states(params)
    half = checker.check(params, None, step_cheats.as_chain(states), steps,
                         dtype="bfloat16", answer=answer)
    assert half.passed and set(half.errors.values()) == {0.0}, half.reason


def test_a_dtype_no_engine_holds_is_unreproducible(tiny_engine, tiny_engine_bf16):
    """A float32-only validator does not judge a bfloat16 chain against float32 noise: it
    says it cannot reproduce it, and how to."""
    only32 = StepChecker(tiny_engine)
    problem = only32.unreproducible("flux-schnell", "bfloat16")
    assert problem and "declared dtype bfloat16" in problem and "--verify.dtypes" in problem
    assert only32.unreproducible("flux-schnell", "float32") is None
    params = req("flux-schnell")
    chain = step_cheats.as_chain(tiny_engine_bf16.generate_with_states(params)[1])
    with pytest.raises(ValueError, match="cannot reproduce"):
        only32.check(params, None, chain, [0], dtype="bfloat16")


def test_declared_kernels_are_reproduced_and_undeclared_ones_fail(tiny_root, checker):
    """A miner on the math attention backend passes exactly when it declares it (the
    validator switches backend per call); the same chain declared as the default is off
    by the backend's rounding, above the same-dtype threshold."""
    from niche.models.engine import Engine

    math_miner = Engine(models=["flux-schnell"], model_root=tiny_root, dtype="bfloat16",
                        attention="math")
    assert math_miner.kernels("flux-schnell") == {"attention": "math"}
    params = req("flux-schnell")
    chain = step_cheats.as_chain(math_miner.generate_with_states(params)[1])
    steps = all_steps(math_miner, params)
    declared = checker.check(params, None, chain, steps, dtype="bfloat16",
                             kernels={"attention": "math"})
    assert declared.passed and set(declared.errors.values()) == {0.0}, declared.errors
    undeclared = checker.check(params, None, chain, steps, dtype="bfloat16", kernels={})
    assert not undeclared.passed and max(undeclared.errors.values()) > 5e-3
    assert "cannot reproduce the declared kernels" in checker.unreproducible(
        "flux-schnell", "bfloat16", {"attention": "cudnn"})
    assert "compile=max-autotune" in checker.unreproducible(
        "flux-schnell", "bfloat16", {"attention": "default", "compile": "max-autotune"})


def test_an_honest_controlnet_chain_passes_with_its_conditioning(tiny_engine, checker):
    params, image = req("kolors", "controlnet-canny"), photo(2)
    answer, states = tiny_engine.generate_with_states(params, image)
    verdict = checker.check(params, image, step_cheats.as_chain(states), [0, 5],
                            dtype="float32", answer=answer)
    assert verdict.passed and verdict.errors == {0: 0.0, 5: 0.0}
    other = checker.check(params, photo(3), step_cheats.as_chain(states), [0, 5])
    assert not other.passed  # another control image is another update


# ------------------------------------------------------------------ cheats fail
def failing_steps(checker, params, chain, image=None) -> set[int]:
    steps = all_steps(checker.engine, params)
    verdict = checker.check(params, image, chain, steps)  # the most lenient thresholds
    assert set(verdict.errors) == set(steps)
    return {k for k in steps if verdict.errors[k] > verdict.thresholds[k]}


@pytest.mark.parametrize("model", MODELS)
def test_another_prompt_and_fewer_steps_fail_at_every_step(tiny_engine, checker, model):
    params = req(model)
    everything = set(all_steps(tiny_engine, params))
    assert failing_steps(checker, params, step_cheats.other_prompt(tiny_engine, params,
                                                                    None)) == everything
    assert failing_steps(checker, params, step_cheats.fewer_steps(tiny_engine, params,
                                                                   None)) == everything


@pytest.mark.parametrize("model", MODELS)
def test_another_seeds_chain_fails_only_at_step_zero(tiny_engine, checker, model):
    params = req(model)
    assert failing_steps(checker, params,
                         step_cheats.other_seed(tiny_engine, params, None)) == {0}


@pytest.mark.parametrize("model", MODELS)
def test_a_reused_prediction_fails_where_it_was_reused(tiny_engine, checker, model):
    """Odd steps reuse the previous prediction; the honest even steps cannot tell (why the
    audit draws random steps every time). For FLUX, a half-length schedule resampled onto
    the grid is the same cheat: Euler steps are linear in the step size."""
    params = req(model)
    odd = {k for k in all_steps(tiny_engine, params) if k % 2}
    assert failing_steps(checker, params,
                         step_cheats.reused_prediction(tiny_engine, params, None)) == odd
    resampled = step_cheats.fewer_steps(tiny_engine, params, None, resample=True)
    if model == "flux-schnell":
        assert failing_steps(checker, params, resampled) == odd
    else:
        assert failing_steps(checker, params, resampled) == set(all_steps(tiny_engine, params))


def test_dropping_guidance_fails_at_every_step(tiny_engine, checker):
    params = req("kolors")
    assert failing_steps(checker, params, step_cheats.no_cfg(tiny_engine, params, None)) == \
        set(all_steps(tiny_engine, params))


# ------------------------------------------------------------------ malformed states
def test_malformed_states_fail_with_a_reason(tiny_engine, checker):
    params = req("flux-schnell")
    chain = step_cheats.honest(tiny_engine, params, None)
    nan = chain[2].clone()
    nan[0, 0, 0] = math.nan
    inf = chain[2].clone()
    inf[0, 1, 1] = math.inf
    cases = {
        "state 2 missing": {1: chain[1], 3: chain[3]},
        "dtype float64": {**chain, 2: chain[2].double()},
        "dtype bfloat16": {**chain, 2: chain[2].bfloat16()},
        "shape": {**chain, 2: chain[2][:, :4]},
        "NaN or inf": {**chain, 2: nan},
        "not a tensor": {**chain, 2: chain[2].tolist()},
    }
    for reason, claimed in cases.items():
        verdict = checker.check(params, None, claimed, [0, 1])
        assert not verdict.passed and reason in verdict.reason, (reason, verdict.reason)
    verdict = checker.check(params, None, {**chain, 2: inf}, [1])
    assert not verdict.passed and "NaN or inf" in verdict.reason
    other_answer = tiny_engine.generate(req("flux-schnell", seed=99))
    verdict = checker.check(params, None, chain, [0, 2], answer=other_answer)
    assert not verdict.passed and "decoded x_4" in verdict.reason


def test_an_image_that_is_not_the_decode_fails_the_decode_check(tiny_engine, checker):
    """An honest chain sent with an image that is not its decode (a cheap decoder's blur, or
    the decode plus noise that keeps the structural similarity) fails: similarity AND the
    PSNR floor."""
    import numpy as np
    from PIL import Image

    params = req("kolors")
    answer, states = tiny_engine.generate_with_states(params)
    chain = step_cheats.as_chain(states)
    assert checker.check(params, None, chain, [0], dtype="float32", answer=answer).passed
    w, h = answer.size
    blurred = answer.resize((w // 2, h // 2), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(np.clip(np.asarray(answer, dtype=np.float32)
                                    + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))
    for image in (blurred, noisy):
        verdict = checker.check(params, None, chain, [0], dtype="float32", answer=image)
        assert not verdict.passed and "decoded x_8 is not the answer" in verdict.reason
