"""Challenges: fresh, one per miner, deterministic for the validator; cheap answer checks."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from niche.protocol import GenerateRequest, PipelineKind
from niche.validator.challenges import ChallengeFactory, ModelPlan, Target, round_rng
from niche.validator.checks import AnswerIndex, dhash, fingerprint, hamming, shape_problem
from niche.validator.prompts import PromptSource
from niche.validator.state import Answer

T2I = PipelineKind.TXT2IMG
PLANS = {
    "flux-schnell": ModelPlan("flux-schnell", (T2I,), ((64, 64), (96, 64)), (2, 4), 0.0, 24.0),
    "kolors": ModelPlan("kolors", (T2I,), ((64, 64),), (8,), 5.0, 32.0),
}


def targets(n):
    return [Target(uid, f"hk{uid}", "flux-schnell" if uid % 3 else "kolors")
            for uid in range(n)]


def test_prompt_grammar_has_thousands_of_distinct_prompts():
    source = PromptSource()
    assert source.size > 1_000_000
    rng = np.random.default_rng(7)
    prompts = [source.draw(rng) for _ in range(5000)]
    assert len(set(prompts)) > 4900
    assert all(0 < len(p) < 300 for p in prompts)


def test_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\na cat\n\na dog\n")
    source = PromptSource.from_file(path)
    assert source.size == 2
    assert {source.draw(np.random.default_rng(i)) for i in range(20)} == {"a cat", "a dog"}


def test_every_miner_gets_its_own_challenge():
    factory = ChallengeFactory(PLANS)
    challenges = factory.make_round(round_rng(1234, 0), targets(60))
    assert len(challenges) == 60
    assert len({c.params.prompt for c in challenges}) == 60
    assert len({c.params.seed for c in challenges}) == 60
    assert len({c.request_id for c in challenges}) == 60
    for c in challenges:
        plan = PLANS[c.params.model]
        assert (c.params.width, c.params.height) in plan.sizes and c.params.steps in plan.steps
        assert c.params.guidance == plan.guidance and c.timeout == plan.timeout
        assert c.uid % 3 == 0 or c.params.model == "flux-schnell"
        GenerateRequest.model_validate(c.request().model_dump())  # valid on the wire
    # miners of one model share the workload shape, so their latencies compare
    flux = {c.workload for c in challenges if c.params.model == "flux-schnell"}
    assert len(flux) == 1


def test_unique_even_with_a_tiny_prompt_file():
    factory = ChallengeFactory(PLANS, prompts=PromptSource(["only prompt"]))
    challenges = factory.make_round(round_rng(5, 3), targets(10))
    assert len({(c.params.prompt, c.params.seed) for c in challenges}) == 10


def test_deterministic_for_the_validator_fresh_each_round():
    factory = ChallengeFactory(PLANS)
    a = factory.make_round(round_rng(99, 4), targets(8))
    b = factory.make_round(round_rng(99, 4), targets(8))
    assert [c.params for c in a] == [c.params for c in b]
    assert [c.request_id for c in a] == [c.request_id for c in b]
    other_round = factory.make_round(round_rng(99, 5), targets(8))
    other_validator = factory.make_round(round_rng(100, 4), targets(8))
    for other in (other_round, other_validator):
        assert not {(c.params.prompt, c.params.seed) for c in a} & {
            (c.params.prompt, c.params.seed) for c in other}


def test_unknown_models_and_unconditioned_pipelines_are_skipped():
    plans = {"kolors": ModelPlan("kolors", (T2I, PipelineKind.CONTROLNET_CANNY), ((64, 64),),
                                 (8,), 5.0, 32.0)}
    factory = ChallengeFactory(plans)  # no conditioner: only txt2img can be asked
    got = factory.make_round(round_rng(1, 1), [
        Target(0, "a", "kolors", (T2I, PipelineKind.CONTROLNET_CANNY)),
        Target(1, "b", "sdxl", (T2I,)),
        Target(2, "c", "kolors", (PipelineKind.CONTROLNET_CANNY,))])
    assert [(c.uid, c.params.pipeline) for c in got] == [(0, T2I)]


def _picture(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def test_shape_checks():
    assert shape_problem(_picture(0), 64, 64) is None
    assert "wrong_size" in shape_problem(_picture(0, (32, 64)), 64, 64)
    assert "wrong_mode" in shape_problem(_picture(0).convert("L"), 64, 64)


def test_duplicate_answers_are_caught_exact_and_perceptual():
    index = AnswerIndex()
    first = _picture(1)
    index.add(Answer(fingerprint(first).sha256, fingerprint(first).phash, uid=3, round=0))
    # same pixels re-encoded differently: same pixel hash
    buf = io.BytesIO()
    first.save(buf, format="WEBP", lossless=True)
    assert index.match(fingerprint(Image.open(buf))).uid == 3
    # lightly noised copy: the perceptual hash still finds it
    noisy = np.clip(np.asarray(first, dtype=np.int16)
                    + np.random.default_rng(2).integers(-3, 4, (64, 64, 3)), 0, 255)
    assert index.match(fingerprint(Image.fromarray(noisy.astype(np.uint8)))) is not None
    # unrelated images are not duplicates
    assert all(index.match(fingerprint(_picture(s))) is None for s in range(2, 50))
    assert hamming(dhash(_picture(5)), dhash(_picture(5))) == 0
    index.prune(min_round=1)
    assert len(index) == 0 and index.match(fingerprint(first)) is None


def test_canny_challenges_have_edges_to_follow(tiny_engine, monkeypatch):
    """Half the tiny Kolors txt2img images have no Canny edge: the conditioner redraws them,
    so a miner answering with another conditioning image cannot match an empty edge map.
    (More draws than the default make reaching the bar certain on the tiny model.)"""
    from niche.protocol import GenerationParams
    from niche.validator import challenges
    from niche.validator.challenges import MIN_CANNY_EDGE_FRACTION, engine_conditioner

    monkeypatch.setattr(challenges, "SOURCE_DRAWS", 20)
    make = engine_conditioner(tiny_engine)
    params = tiny_engine.resolve(GenerationParams(
        model="kolors", pipeline=PipelineKind.CONTROLNET_CANNY, prompt="edges", seed=0))
    fractions = []
    for seed in range(6):
        image = make("kolors", PipelineKind.CONTROLNET_CANNY, 64, 64, np.random.default_rng(seed))
        edges = np.asarray(tiny_engine.conditioning_image(params, image).convert("L")) > 0
        fractions.append(float(edges.mean()))
    assert min(fractions) >= MIN_CANNY_EDGE_FRACTION, fractions
    # the source draw itself is untouched for the other pipelines (one txt2img image)
    depth = make("kolors", PipelineKind.CONTROLNET_DEPTH, 64, 64, np.random.default_rng(0))
    assert depth.size == (64, 64)
