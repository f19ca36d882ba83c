"""Fresh challenges every round, one per miner, that nobody can answer from a cache.

Each miner gets its OWN prompt and seed (no two miners share a prompt+seed in a round), so
an operator with many hotkeys must compute every answer. Within a round, the miners of one
model share the workload shape (size, steps), so their latencies are comparable and the
validator can regenerate them in one batch. Conditioning images are made by the validator
itself: a text-to-image source, then its canny edges / depth map / the image itself.

Everything random comes from the per-round `np.random.Generator` handed in (derived from the
validator's seed and the round index): a round is reproducible by its validator and by
nobody else. No global RNG anywhere.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from PIL import Image

from niche.errors import InvalidRequest
from niche.imaging import encode_image, to_b64
from niche.protocol import MAX_SEED, GenerateRequest, GenerationParams, PipelineKind
from niche.validator.prompts import PromptSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPlan:
    """What a validator may ask of one model: allowed shapes and its challenge defaults."""

    model: str
    pipelines: tuple[PipelineKind, ...]
    sizes: tuple[tuple[int, int], ...]
    steps: tuple[int, ...]
    guidance: float
    timeout: float


@dataclass(frozen=True)
class Target:
    """A miner to challenge: its uid/hotkey and what its Info says it serves."""

    uid: int
    hotkey: str
    model: str
    pipelines: tuple[PipelineKind, ...] = (PipelineKind.TXT2IMG,)


@dataclass(frozen=True)
class Challenge:
    uid: int
    hotkey: str
    request_id: str
    params: GenerationParams
    """Fully explicit: size, steps and guidance set, so regeneration needs no defaults."""
    timeout: float
    image: Image.Image | None = field(default=None, compare=False, repr=False)
    image_b64: str | None = field(default=None, compare=False, repr=False)

    @property
    def workload(self) -> tuple:
        p = self.params
        return (p.pipeline.value, p.width, p.height, p.steps)

    def request(self) -> GenerateRequest:
        return GenerateRequest(request_id=self.request_id, params=self.params,
                               image=self.image_b64, timeout=self.timeout)


class Conditioner(Protocol):
    """Makes the conditioning image for `pipeline` at the given size."""

    def __call__(self, model: str, pipeline: PipelineKind, width: int, height: int,
                 rng: np.random.Generator) -> Image.Image: ...


def round_rng(validator_seed: int, round_index: int) -> np.random.Generator:
    """The one source of randomness for a round's challenges."""
    return np.random.default_rng([int(validator_seed) & (2**64 - 1), int(round_index)])


def model_rng(validator_seed: int, round_index: int) -> np.random.Generator:
    """The draw of each multi-model miner's model for a round: a stream of its own, so the
    challenges drawn from round_rng do not depend on which models miners serve."""
    return np.random.default_rng([int(validator_seed) & (2**64 - 1), int(round_index) & (
        2**64 - 1), 0x6D6F64656C])


def pick_model(rng: np.random.Generator, offered: Iterable[str], models: Sequence[str],
               shares: Mapping[str, float]) -> str | None:
    """The model to challenge a miner on this round: one that it serves and this validator
    asks (`models`), drawn in proportion to the model shares (uniformly when none of them
    has a share), so over the rounds every model a miner serves is challenged and scored.
    None when they have no model in common; no draw when they have one."""
    served = set(offered)
    both = [m for m in models if m in served]
    if len(both) <= 1:
        return both[0] if both else None
    weights = np.array([max(0.0, float(shares.get(m, 0.0))) for m in both])
    if weights.sum() <= 0:
        weights = np.ones(len(both))
    return both[int(rng.choice(len(both), p=weights / weights.sum()))]


class ChallengeFactory:
    def __init__(self, plans: dict[str, ModelPlan], prompts: PromptSource | None = None,
                 conditioner: Conditioner | None = None,
                 resolve: Callable[[GenerationParams], GenerationParams] | None = None):
        """`resolve` (the engine's) completes and checks each request, so a challenge never
        asks for what the model refuses (e.g. a prompt over its token limit: redrawn)."""
        self.plans = plans
        self.prompts = prompts or PromptSource()
        self.conditioner = conditioner
        self.resolve = resolve

    def make_round(self, rng: np.random.Generator, targets: Sequence[Target]) -> list[Challenge]:
        """One challenge per target whose model this validator knows (others are skipped)."""
        shapes: dict[str, tuple[int, int, int]] = {}
        for model in sorted({t.model for t in targets if t.model in self.plans}):
            shape_plan = self.plans[model]
            width, height = shape_plan.sizes[int(rng.integers(len(shape_plan.sizes)))]
            steps = shape_plan.steps[int(rng.integers(len(shape_plan.steps)))]
            shapes[model] = (width, height, steps)
        used_pairs: set[tuple[str, int]] = set()
        used_prompts: set[str] = set()
        used_seeds: set[int] = set()
        conditions: dict[str, tuple[Image.Image, str]] = {}  # one source image per model
        challenges = []
        for target in sorted(targets, key=lambda t: t.uid):
            plan = self.plans.get(target.model)
            if plan is None:
                continue
            offered = [p for p in plan.pipelines
                       if p in target.pipelines and (not p.needs_image or self.conditioner)]
            if not offered:
                continue
            pipeline = offered[int(rng.integers(len(offered)))]
            width, height, steps = shapes[target.model]
            params = None
            for _ in range(20):
                prompt = self._unique_prompt(rng, used_prompts)
                seed = int(rng.integers(0, MAX_SEED, endpoint=True))
                while seed in used_seeds or (prompt, seed) in used_pairs:
                    seed = int(rng.integers(0, MAX_SEED, endpoint=True))
                params = GenerationParams(model=target.model, pipeline=pipeline, prompt=prompt,
                                          seed=seed, steps=steps, guidance=plan.guidance,
                                          width=width, height=height)
                if self.resolve is None:
                    break
                try:
                    params = self.resolve(params)
                    break
                except InvalidRequest as exc:
                    if exc.field != "prompt":
                        raise
                    used_prompts.add(prompt)  # too long for this model: draw another
                    params = None
            if params is None:
                log.warning("no valid prompt for %s after 20 draws; uid %d skipped",
                            target.model, target.uid)
                continue
            used_prompts.add(params.prompt)
            used_seeds.add(params.seed)
            used_pairs.add((params.prompt, params.seed))
            image = b64 = None
            if pipeline.needs_image and self.conditioner is not None:  # offered ensures it
                if target.model not in conditions:
                    cond = self.conditioner(target.model, pipeline, width, height, rng)
                    conditions[target.model] = (cond, to_b64(encode_image(cond)))
                image, b64 = conditions[target.model]
            # shaped as the gateway's ids (uuid4().hex), so the id does not tell a miner
            # which requests are challenges and which are users'
            request_id = uuid.UUID(bytes=rng.bytes(16), version=4).hex
            challenges.append(Challenge(target.uid, target.hotkey, request_id, params,
                                        plan.timeout, image, b64))
        return challenges

    def _unique_prompt(self, rng: np.random.Generator, used: set[str]) -> str:
        prompt = self.prompts.draw(rng)
        for _ in range(50):  # a short prompt file may run out; the seed still differs
            if prompt not in used:
                break
            prompt = self.prompts.draw(rng)
        return prompt


def plan_from_spec(spec, timeout: float | None = None) -> ModelPlan:
    """A ModelPlan from the engine's ModelSpec: its allowed sizes/steps when the spec lists
    them (limits.allowed_sizes / allowed_steps), else its challenge defaults."""
    d, limits = spec.defaults, spec.limits
    sizes = limits.allowed_sizes or [(d.width, d.height)]
    steps = limits.allowed_steps or [d.steps]
    return ModelPlan(
        model=spec.name,
        pipelines=tuple(PipelineKind(p) for p in spec.pipelines),
        sizes=tuple((int(w), int(h)) for w, h in sizes),
        steps=tuple(int(s) for s in steps),
        guidance=float(d.guidance),
        timeout=float(timeout if timeout is not None else d.timeout),
    )


#: a canny challenge whose source image has fewer edge pixels than this fraction is redrawn:
#: an empty edge map conditions on nothing, so a miner answering with another conditioning
#: image (or none) would match the reference (measured on the tiny Kolors: half its 64x64
#: txt2img images have no Canny edge at thresholds 100/200)
MIN_CANNY_EDGE_FRACTION = 0.01
SOURCE_DRAWS = 8


def engine_conditioner(engine, source_model: str | None = None,
                       prompts: PromptSource | None = None) -> Conditioner:
    """Conditioning images from the validator's own engine: a txt2img source image with a
    fresh prompt and seed. The engine on both sides derives the control signal from it with
    niche.models.conditioning (canny edges, a depth map, or the fitted image itself as the
    IP-Adapter reference), so miner and validator condition on identical pixels. For canny
    the source is redrawn (up to SOURCE_DRAWS times, keeping the most edges) until its edge
    map is not nearly empty."""
    prompts = prompts or PromptSource()

    def source(model: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
        seed = int(rng.integers(0, MAX_SEED, endpoint=True))
        for attempt in range(20):
            params = GenerationParams(model=source_model or model,
                                      pipeline=PipelineKind.TXT2IMG, prompt=prompts.draw(rng),
                                      seed=seed, width=width, height=height)
            try:
                params = engine.resolve(params)
                break
            except InvalidRequest as exc:
                if exc.field != "prompt" or attempt == 19:
                    raise
        return engine.generate(params)

    def make(model: str, pipeline: PipelineKind, width: int, height: int,
             rng: np.random.Generator) -> Image.Image:
        image = source(model, width, height, rng)
        if pipeline is not PipelineKind.CONTROLNET_CANNY:
            return image
        canny = engine.resolve(GenerationParams(  # only its size and Canny thresholds count
            model=model, pipeline=pipeline, prompt="edges", seed=0, width=width, height=height))

        def edge_fraction(image: Image.Image) -> float:
            edges = np.asarray(engine.conditioning_image(canny, image).convert("L"))
            return float((edges > 0).mean())

        best, best_edges = image, edge_fraction(image)
        for _ in range(SOURCE_DRAWS - 1):
            if best_edges >= MIN_CANNY_EDGE_FRACTION:
                break
            image = source(model, width, height, rng)
            edges = edge_fraction(image)
            if edges > best_edges:
                best, best_edges = image, edges
        if best_edges < MIN_CANNY_EDGE_FRACTION:
            log.warning("canny challenge: best of %d source images has %.2f%% edge pixels",
                        SOURCE_DRAWS, 100 * best_edges)
        return best

    return make
