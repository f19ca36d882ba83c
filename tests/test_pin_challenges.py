"""Challenge construction with fake `resolve`, conditioner and engine: redraws of refused
prompts, skips, unique seeds, shared conditioning, plan_from_spec and the canny source
redraws. No model is loaded; everything is seeded."""
from __future__ import annotations

import base64
import io
import logging
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from niche.errors import InvalidRequest
from niche.imaging import encode_image, to_b64
from niche.protocol import MAX_SEED, PipelineKind
from niche.validator import challenges as ch
from niche.validator.challenges import (
    Challenge,
    ChallengeFactory,
    ModelPlan,
    Target,
    engine_conditioner,
    plan_from_spec,
    round_rng,
)
from niche.validator.prompts import PromptSource

T2I, CANNY, DEPTH = PipelineKind.TXT2IMG, PipelineKind.CONTROLNET_CANNY, \
    PipelineKind.CONTROLNET_DEPTH
PLAN = ModelPlan("kolors", (T2I, CANNY), ((64, 64),), (8,), 5.0, 32.0)
PROMPT_LIST = [f"prompt {i}" for i in range(40)]
PROMPTS = PromptSource(PROMPT_LIST)


def factory(**kw):
    kw.setdefault("prompts", PROMPTS)
    return ChallengeFactory({"kolors": PLAN}, **kw)


class Refuser:
    """A resolve that refuses the prompts in `bad` (field=prompt) and records every call."""

    def __init__(self, bad=(), field="prompt", always=False):
        self.bad, self.field, self.always = set(bad), field, always
        self.calls = []

    def __call__(self, params):
        self.calls.append(params.prompt)
        if self.always or params.prompt in self.bad:
            raise InvalidRequest("too long", field=self.field)
        return params.model_copy(update={"negative_prompt": "resolved"})


def test_round_rng_masks_the_seed_to_64_bits():
    def first(rng):
        return rng.integers(0, 2**62, size=4).tolist()

    assert first(round_rng(5, 2)) == first(np.random.default_rng([5, 2]))
    assert first(round_rng(-1, 0)) == first(np.random.default_rng([2**64 - 1, 0]))
    assert first(round_rng(2**64 + 7, 3)) == first(np.random.default_rng([7, 3]))
    assert first(round_rng(5, 2)) != first(round_rng(5, 3))


def encode_png(image: Image.Image) -> str:
    """What a challenge must carry: the one lossless encoder's bytes, in base64."""
    return to_b64(encode_image(image))


def test_encode_png_round_trips_pixels():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    raw = base64.b64decode(encode_png(image))
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    back = Image.open(io.BytesIO(raw))
    assert np.array_equal(np.asarray(back), np.asarray(image))


def test_challenge_workload_and_wire_request():
    fac = factory()
    (c,) = fac.make_round(round_rng(1, 1), [Target(7, "hk7", "kolors")])
    assert c.workload == ("txt2img", 64, 64, 8)
    req = c.request()
    assert (req.request_id, req.params, req.image, req.timeout) == (
        c.request_id, c.params, None, 32.0)
    # a uuid4's hex, as the gateway's ids: a miner cannot tell challenges from users
    assert uuid.UUID(hex=c.request_id).version == 4 and len(c.request_id) == 32
    assert (c.uid, c.hotkey, c.timeout) == (7, "hk7", 32.0)
    p = c.params
    assert (p.model, p.pipeline, p.width, p.height, p.steps, p.guidance) == (
        "kolors", T2I, 64, 64, 8, 5.0)
    assert 0 <= p.seed <= MAX_SEED and p.prompt in {f"prompt {i}" for i in range(40)}


def test_refused_prompts_are_redrawn_and_never_used():
    probe = factory().make_round(round_rng(3, 0), [Target(u, f"hk{u}", "kolors")
                                                   for u in range(4)])
    bad = {c.params.prompt for c in probe[:2]}  # prompts this seed would have drawn first
    resolve = Refuser(bad)
    out = factory(resolve=resolve).make_round(
        round_rng(3, 0), [Target(u, f"hk{u}", "kolors") for u in range(4)])
    assert [c.uid for c in out] == [0, 1, 2, 3]
    assert not {c.params.prompt for c in out} & bad
    assert len({c.params.prompt for c in out}) == 4
    assert all(c.params.negative_prompt == "resolved" for c in out)  # resolved params kept
    refused = [p for p in resolve.calls if p in bad]
    assert probe[0].params.prompt in refused  # uid 0's first draw, the same stream so far
    assert len(refused) == len(set(refused))  # a refused prompt is never offered again
    assert len(resolve.calls) == 4 + len(refused)


def test_a_model_that_refuses_every_prompt_skips_the_uid_after_twenty_draws(caplog):
    resolve = Refuser(always=True)
    with caplog.at_level(logging.WARNING, logger="niche.validator.challenges"):
        out = factory(resolve=resolve).make_round(round_rng(3, 0), [Target(4, "hk4", "kolors")])
    assert out == []
    assert len(resolve.calls) == 20
    assert [r.getMessage() for r in caplog.records] == [
        "no valid prompt for kolors after 20 draws; uid 4 skipped"]


def test_the_twentieth_draw_may_still_succeed():
    class LateYes(Refuser):
        def __call__(self, params):
            self.calls.append(params.prompt)
            if len(self.calls) < 20:
                raise InvalidRequest("too long", field="prompt")
            return params

    resolve = LateYes()
    out = factory(resolve=resolve).make_round(round_rng(3, 0), [Target(4, "hk4", "kolors")])
    assert len(out) == 1 and len(resolve.calls) == 20
    assert out[0].params.prompt == resolve.calls[-1]


def test_a_refusal_of_anything_but_the_prompt_propagates():
    with pytest.raises(InvalidRequest, match="too long"):
        factory(resolve=Refuser(always=True, field="steps")).make_round(
            round_rng(3, 0), [Target(4, "hk4", "kolors")])
    with pytest.raises(InvalidRequest):
        factory(resolve=Refuser(always=True, field=None)).make_round(
            round_rng(3, 0), [Target(4, "hk4", "kolors")])


class ScriptedSeeds:
    """A Generator whose seed draws (integers(0, MAX_SEED, endpoint=True)) follow a script."""

    def __init__(self, seeds, seed=0):
        self._rng = np.random.default_rng(seed)
        self._seeds = list(seeds)

    def integers(self, *args, **kwargs):
        if args == (0, MAX_SEED) and kwargs == {"endpoint": True}:
            return self._seeds.pop(0)
        return self._rng.integers(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._rng, name)


def test_seeds_are_unique_in_a_round():
    rng = ScriptedSeeds([11, 11, 11, 12, 12, 11, 13])
    out = factory().make_round(rng, [Target(u, f"hk{u}", "kolors") for u in range(3)])
    assert [c.params.seed for c in out] == [11, 12, 13]


def test_same_prompt_and_seed_pair_is_redrawn():
    rng = ScriptedSeeds([5, 5, 6])
    fac = ChallengeFactory({"kolors": PLAN}, prompts=PromptSource(["only"]))
    out = fac.make_round(rng, [Target(0, "a", "kolors"), Target(1, "b", "kolors")])
    assert [(c.params.prompt, c.params.seed) for c in out] == [("only", 5), ("only", 6)]


def test_targets_are_served_in_uid_order_and_unknown_ones_skipped():
    targets = [Target(9, "hk9", "kolors"), Target(2, "hk2", "sdxl"), Target(4, "hk4", "kolors"),
               Target(6, "hk6", "kolors", pipelines=(DEPTH,))]
    out = factory().make_round(round_rng(8, 8), targets)
    assert [c.uid for c in out] == [4, 9]


def test_image_pipelines_need_a_conditioner_and_share_one_source_per_model():
    calls = []

    def conditioner(model, pipeline, width, height, rng):
        calls.append((model, pipeline, width, height))
        return Image.new("RGB", (width, height), (len(calls), 0, 0))

    only_canny = [Target(u, f"hk{u}", "kolors", pipelines=(CANNY,)) for u in (1, 2, 3)]
    assert factory().make_round(round_rng(1, 0), only_canny) == []  # no conditioner
    out = factory(conditioner=conditioner).make_round(round_rng(1, 0), only_canny)
    assert [c.params.pipeline for c in out] == [CANNY] * 3
    assert calls == [("kolors", CANNY, 64, 64)]
    assert all(c.image is out[0].image for c in out)
    assert out[0].image.getpixel((0, 0)) == (1, 0, 0)
    assert out[0].image_b64 == encode_png(out[0].image)
    assert out[0].request().image == out[0].image_b64
    assert out[0].workload == ("controlnet-canny", 64, 64, 8)


def test_pipeline_is_drawn_from_what_both_sides_offer():
    plan = ModelPlan("kolors", (T2I, CANNY, DEPTH), ((64, 64),), (8,), 5.0, 32.0)
    fac = ChallengeFactory({"kolors": plan}, prompts=PROMPTS,
                           conditioner=lambda m, p, w, h, rng: Image.new("RGB", (w, h)))
    seen = set()
    for r in range(30):
        for c in fac.make_round(round_rng(2, r), [Target(0, "a", "kolors",
                                                         pipelines=(T2I, CANNY))]):
            seen.add(c.params.pipeline)
    assert seen == {T2I, CANNY}


def test_one_shape_per_model_drawn_from_its_plan():
    plans = {"flux-schnell": ModelPlan("flux-schnell", (T2I,), ((64, 64), (96, 64)), (2, 4),
                                       0.0, 24.0),
             "kolors": PLAN}
    fac = ChallengeFactory(plans, prompts=PROMPTS)
    shapes = set()
    for r in range(40):
        out = fac.make_round(round_rng(4, r), [Target(u, f"h{u}", "flux-schnell")
                                               for u in range(3)])
        assert len({c.workload for c in out}) == 1
        shapes.add(out[0].workload)
    assert shapes == {("txt2img", w, 64, s) for w in (64, 96) for s in (2, 4)}


def test_challenge_image_fields_do_not_take_part_in_equality():
    c = factory().make_round(round_rng(1, 1), [Target(7, "hk7", "kolors")])[0]
    twin = Challenge(c.uid, c.hotkey, c.request_id, c.params, c.timeout,
                     Image.new("RGB", (1, 1)), "xx")
    assert twin == c


# ----------------------------------------------------------------------------- plan_from_spec
def _spec(sizes=None, steps=None, pipelines=("txt2img",)):
    return SimpleNamespace(
        name="kolors", pipelines=pipelines,
        defaults=SimpleNamespace(width=64, height=48, steps=8, guidance=5, timeout=30),
        limits=SimpleNamespace(allowed_sizes=sizes, allowed_steps=steps))


def test_plan_from_spec_defaults_and_lists():
    plan = plan_from_spec(_spec())
    assert plan == ModelPlan("kolors", (T2I,), ((64, 48),), (8,), 5.0, 30.0)
    assert isinstance(plan.guidance, float) and isinstance(plan.timeout, float)
    plan = plan_from_spec(_spec(sizes=[(32.0, 32), (64, 64)], steps=[2, 4],
                                pipelines=("txt2img", "controlnet-canny")), timeout=12)
    assert plan == ModelPlan("kolors", (T2I, CANNY), ((32, 32), (64, 64)), (2, 4), 5.0, 12.0)
    assert type(plan.sizes[0][0]) is int
    assert plan_from_spec(_spec(), timeout=0).timeout == 0.0  # 0 is a timeout, not "unset"


# ----------------------------------------------------------------------------- conditioner
class FakeEngine:
    """resolve / generate / conditioning_image, with edge fractions scripted per source."""

    def __init__(self, edge_fractions=(), refuse=0, refuse_field="prompt"):
        self.edge_fractions = list(edge_fractions)
        self.refuse, self.refuse_field = refuse, refuse_field
        self.resolved, self.generated, self.conditioned = [], [], []

    def resolve(self, params):
        self.resolved.append(params)
        if params.pipeline is T2I and self.refuse:
            self.refuse -= 1
            raise InvalidRequest("too long", field=self.refuse_field)
        return params

    def generate(self, params):
        self.generated.append(params)
        return Image.new("RGB", (params.width, params.height), (len(self.generated), 0, 0))

    def conditioning_image(self, params, image):
        self.conditioned.append(params)
        index = image.getpixel((0, 0))[0] - 1
        pixels = np.zeros(1000, dtype=np.uint8)
        pixels[: round(self.edge_fractions[index] * 1000)] = 1  # a faint edge is an edge
        return Image.fromarray(pixels.reshape(25, 40), "L")


def test_txt2img_source_for_non_canny_pipelines():
    engine = FakeEngine(refuse=2)
    make = engine_conditioner(engine, prompts=PROMPTS)
    image = make("kolors", DEPTH, 64, 48, np.random.default_rng(0))
    assert image.size == (64, 48) and len(engine.generated) == 1
    p = engine.generated[0]
    assert (p.model, p.pipeline, p.width, p.height) == ("kolors", T2I, 64, 48)
    assert len(engine.resolved) == 3
    assert len({r.seed for r in engine.resolved}) == 1  # only the prompt is redrawn
    assert all(r.prompt in PROMPT_LIST for r in engine.resolved)  # the prompts given
    # the seed is the generator's first draw over the whole seed range [0, MAX_SEED]
    assert p.seed == int(np.random.default_rng(0).integers(0, MAX_SEED + 1))
    engine = FakeEngine()
    engine_conditioner(engine)("kolors", DEPTH, 64, 48, np.random.default_rng(0))
    assert engine.generated[0].prompt not in PROMPT_LIST  # the default grammar
    engine = FakeEngine()
    engine_conditioner(engine, source_model="flux-schnell", prompts=PROMPTS)(
        "kolors", PipelineKind.IP_ADAPTER, 32, 32, np.random.default_rng(0))
    assert engine.generated[0].model == "flux-schnell"


def test_source_gives_up_after_twenty_refused_prompts():
    engine = FakeEngine(refuse=20)
    with pytest.raises(InvalidRequest):
        engine_conditioner(engine, prompts=PROMPTS)("kolors", DEPTH, 64, 64,
                                                    np.random.default_rng(0))
    assert len(engine.resolved) == 20 and engine.generated == []
    engine = FakeEngine(refuse=19)
    engine_conditioner(engine, prompts=PROMPTS)("kolors", DEPTH, 64, 64,
                                                np.random.default_rng(0))
    assert len(engine.resolved) == 20 and len(engine.generated) == 1
    engine = FakeEngine(refuse=1, refuse_field="width")
    with pytest.raises(InvalidRequest):
        engine_conditioner(engine, prompts=PROMPTS)("kolors", DEPTH, 64, 64,
                                                    np.random.default_rng(0))
    assert len(engine.resolved) == 1


def test_canny_source_with_enough_edges_is_kept(caplog):
    assert ch.MIN_CANNY_EDGE_FRACTION == 0.01 and ch.SOURCE_DRAWS == 8
    engine = FakeEngine(edge_fractions=[0.01])
    with caplog.at_level(logging.WARNING, logger="niche.validator.challenges"):
        image = engine_conditioner(engine, prompts=PROMPTS)("kolors", CANNY, 64, 48,
                                                            np.random.default_rng(0))
    assert caplog.records == []  # exactly the minimum is enough: no warning
    assert image.getpixel((0, 0)) == (1, 0, 0) and len(engine.generated) == 1
    canny = [p for p in engine.resolved if p.pipeline is CANNY]
    assert len(canny) == 1
    assert (canny[0].model, canny[0].width, canny[0].height) == ("kolors", 64, 48)
    assert engine.conditioned == canny  # the edge map is computed with those parameters


def test_canny_source_is_redrawn_until_it_has_edges():
    engine = FakeEngine(edge_fractions=[0.0, 0.0, 0.05, 0.5])
    image = engine_conditioner(engine, prompts=PROMPTS)("kolors", CANNY, 64, 64,
                                                        np.random.default_rng(0))
    assert image.getpixel((0, 0)) == (3, 0, 0) and len(engine.generated) == 3
    assert len({p.seed for p in engine.generated}) == 3  # each source a fresh seed


def test_canny_keeps_the_best_of_eight_and_warns(caplog):
    engine = FakeEngine(edge_fractions=[0.0, 0.003, 0.0, 0.005, 0.005, 0.0, 0.002, 0.0, 0.9])
    with caplog.at_level(logging.WARNING, logger="niche.validator.challenges"):
        image = engine_conditioner(engine, prompts=PROMPTS)("kolors", CANNY, 64, 64,
                                                            np.random.default_rng(0))
    assert len(engine.generated) == 8  # never the ninth
    assert image.getpixel((0, 0)) == (4, 0, 0)  # the first of the two 0.5 % ones
    assert [r.getMessage() for r in caplog.records] == [
        "canny challenge: best of 8 source images has 0.50% edge pixels"]


def test_canny_with_a_good_first_source_does_not_warn(caplog):
    engine = FakeEngine(edge_fractions=[0.0, 0.2])
    with caplog.at_level(logging.WARNING, logger="niche.validator.challenges"):
        engine_conditioner(engine, prompts=PROMPTS)("kolors", CANNY, 64, 64,
                                                    np.random.default_rng(0))
    assert len(engine.generated) == 2
    assert "canny challenge" not in caplog.text


def test_a_refused_prompt_is_not_offered_again():
    for seed in range(10):
        resolve = Refuser({"bad"})
        # "bad" is three draws in four: once refused it must count as used
        fac = ChallengeFactory({"kolors": PLAN},
                               prompts=PromptSource(["bad", "bad", "bad", "good"]),
                               resolve=resolve)
        (c,) = fac.make_round(round_rng(seed, 0), [Target(0, "a", "kolors")])
        assert c.params.prompt == "good"
        assert resolve.calls.count("bad") <= 1, seed


def test_prompts_stay_distinct_while_the_file_has_unused_ones():
    for seed in range(10):
        fac = ChallengeFactory({"kolors": PLAN}, prompts=PromptSource(["a", "b", "c"]))
        out = fac.make_round(round_rng(seed, 0), [Target(u, f"h{u}", "kolors")
                                                  for u in range(3)])
        assert sorted(c.params.prompt for c in out) == ["a", "b", "c"], seed


def test_a_skipped_uid_does_not_end_the_round():
    class FirstTwentyRefused(Refuser):
        def __call__(self, params):
            self.calls.append(params.prompt)
            if len(self.calls) <= 20:
                raise InvalidRequest("too long", field="prompt")
            return params

    out = factory(resolve=FirstTwentyRefused()).make_round(
        round_rng(3, 0), [Target(1, "a", "kolors"), Target(2, "b", "kolors")])
    assert [c.uid for c in out] == [2]


class ScriptedPrompts:
    def __init__(self, draws):
        self.draws, self.count = list(draws), 0

    def draw(self, rng):
        self.count += 1
        return self.draws.pop(0)


def test_a_used_prompt_is_redrawn_fifty_times_then_reused():
    prompts = ScriptedPrompts(["used"] * 52 + ["fresh"])
    fac = ChallengeFactory({"kolors": PLAN}, prompts=prompts)
    out = fac.make_round(round_rng(1, 0), [Target(0, "a", "kolors"), Target(1, "b", "kolors")])
    assert [c.params.prompt for c in out] == ["used", "used"]
    assert prompts.count == 1 + 51  # the first target's draw, then 1 + 50 for the second
    assert out[0].params.seed != out[1].params.seed


def test_the_conditioner_draws_from_the_rounds_generator():
    seen = []

    def conditioner(model, pipeline, width, height, rng):
        seen.append(rng)
        return Image.new("RGB", (width, height))

    rng = round_rng(1, 0)
    factory(conditioner=conditioner).make_round(rng, [Target(0, "a", "kolors",
                                                             pipelines=(CANNY,))])
    assert len(seen) == 1 and seen[0] is rng


def test_text_challenges_carry_no_image_even_with_a_conditioner():
    calls = []

    def conditioner(model, pipeline, width, height, rng):
        calls.append(pipeline)
        return Image.new("RGB", (width, height), (9, 9, 9))

    text_only = [Target(u, f"hk{u}", "kolors", pipelines=(T2I,)) for u in (1, 2)]
    out = factory(conditioner=conditioner).make_round(round_rng(3, 0), text_only)
    assert [c.params.pipeline for c in out] == [T2I, T2I]
    assert [(c.image, c.image_b64) for c in out] == [(None, None), (None, None)]
    assert calls == [] and all(c.request().image is None for c in out)
