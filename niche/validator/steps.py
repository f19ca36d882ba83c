"""The step check: did the miner really run every denoising step of the request?

An image metric can be gamed: skip steps, then post-process until the metric passes. So the
miner's answer also commits to its float32 sampler states x_1..x_N (x_i after denoising
step i-1), and the validator, once the answer has arrived, recomputes a few of the steps
itself from the miner's own states with the same networks and schedule (`Engine.recompute_steps`):

- step 0 always, from x_0 drawn from the request's seed by the validator (a chain grown from
  another seed or another x_0 is consistent with itself at every later step, not at step 0);
- at least one random step k (`choose_steps`), drawn after the answer arrived, from claimed
  x_k to claimed x_{k+1}.

Each recomputed step is compared with the claimed next state relative to the step's own
update, ``||recomputed - claimed|| / ||claimed - x_k||`` (`step_error`). Honest numeric noise
(a half-precision miner, another thread count or GPU) moves one step by a small fraction of
its update; another prompt, another seed, a shorter schedule, dropped guidance or a reused
prediction change the update itself. Thresholds (`StepThresholds`) depend on the model and
pipeline, on the miner's declared network dtype and on how far along the schedule the step is;
they were calibrated on the tiny checkpoints by bench/calibrate_steps.py (docs/step-check.md)
and must be recalibrated with production weights and hardware before a real network trusts them.
"""
from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import PIL.Image
import torch

from niche.models.engine import ImageEngine
from niche.protocol import GenerationParams
from niche.validator.verify import Verifier, VerifyConfig, compare

STATE_DTYPES = ("float32", "bfloat16", "float16")


def step_error(x_k: torch.Tensor, x_next_claimed: torch.Tensor,
               x_next_recomputed: torch.Tensor) -> float:
    """||recomputed - claimed|| / ||claimed - x_k|| in float64. A claimed step that does not
    move (zero update) is infinitely wrong unless the recomputed one does not move either."""
    x_k, claimed, recomputed = (t.detach().to("cpu", torch.float64)
                                for t in (x_k, x_next_claimed, x_next_recomputed))
    update = float(torch.linalg.vector_norm(claimed - x_k))
    diff = float(torch.linalg.vector_norm(recomputed - claimed))
    if update == 0.0 or not math.isfinite(update):
        return 0.0 if diff == 0.0 else math.inf
    return diff / update


@dataclass(frozen=True)
class Band:
    """Thresholds for the steps that end at most `upto` of the way along the schedule
    ((k + 1) / N <= upto), one per declared network dtype."""

    upto: float
    float32: float
    bfloat16: float
    float16: float

    def for_dtype(self, dtype: str) -> float:
        if dtype not in STATE_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(STATE_DTYPES)})")
        return float(getattr(self, dtype))


_KOLORS = (  # the four Kolors pipelines measured alike (docs/step-check.md)
    Band(0.25, float32=1.1e-3, bfloat16=1.45e-2, float16=4.4e-3),
    Band(0.5, float32=2e-3, bfloat16=3.4e-2, float16=8e-3),
    Band(0.75, float32=4e-3, bfloat16=6.8e-2, float16=1.6e-2),
    Band(0.875, float32=5.2e-3, bfloat16=9.3e-2, float16=2.1e-2),
    Band(1.0, float32=9.2e-3, bfloat16=1.8e-1, float16=3.7e-2),
)
# flux-dev and flux-mini (guidance 3.5, 6 tiny steps): bench/calibrate_steps.py --models
# flux-dev flux-mini --requests 3. Honest bfloat16 reached 4.43e-2 (dev, step 0) and 4.10e-2
# (mini), above schnell's 4.0e-2; the smallest cheat error 7.16e-2 (reused prediction /
# resampled steps): bfloat16 is their geometric mean (margins 1.27x either side, thinner
# than schnell's); float16 4x its largest honest 1.62e-3; float32 float16's / 4.
_FLUX_GUIDED = (Band(1.0, float32=1.6e-3, bfloat16=5.6e-2, float16=6.5e-3),)
DEFAULT_STEP_BANDS: dict[str, tuple[Band, ...]] = {
    "flux-schnell": (Band(1.0, float32=1.75e-3, bfloat16=4.0e-2, float16=7e-3),),
    "flux-dev": _FLUX_GUIDED,
    "flux-mini": _FLUX_GUIDED,
    "kolors": _KOLORS,
}
"""Calibrated on the tiny checkpoints (bench/calibrate_steps.py; FLUX 4 steps, Kolors 8)
against a float32 validator, 6 requests per pipeline. bfloat16: the geometric mean of the
band's largest honest error and smallest cheat error (margins 2.0x-2.6x either side);
float16: 4x its largest honest error (7x-12x below the cheats); float32: float16's / 4
(another thread count moves a step by at most 5e-6, 1900x below; float32 on other hardware
was not measured). Recalibrate
with production weights, step counts and hardware (`--model-path`) before a real network
trusts them."""


@dataclass
class StepThresholds:
    """Per `model/pipeline` (then `model`) bands along the schedule; the largest allowed
    step_error for step k of N under the miner's declared dtype."""

    bands: Mapping[str, Sequence[Band]] = field(
        default_factory=lambda: dict(DEFAULT_STEP_BANDS))

    def bands_for(self, model: str, pipeline: str | None = None) -> Sequence[Band]:
        pipeline = getattr(pipeline, "value", pipeline)
        for key in (f"{model}/{pipeline}" if pipeline else None, model):
            if key and key in self.bands:
                return self.bands[key]
        raise KeyError(f"no step thresholds for {model}" + (f"/{pipeline}" if pipeline else ""))

    def threshold(self, model: str, pipeline: str | None, dtype: str, step: int,
                  n_steps: int) -> float:
        if not 0 <= step < n_steps:
            raise ValueError(f"step {step} not in [0, {n_steps})")
        where = (step + 1) / n_steps
        bands = sorted(self.bands_for(model, pipeline), key=lambda b: b.upto)
        for band in bands:
            if where <= band.upto + 1e-12:
                return band.for_dtype(dtype)
        return bands[-1].for_dtype(dtype)


@dataclass(frozen=True)
class StepVerdict:
    passed: bool
    errors: dict[int, float]
    thresholds: dict[int, float]
    reason: str


def states_needed(steps: Sequence[int], n_steps: int, decode: bool = True) -> list[int]:
    """Claimed state indices (1..N) that recomputing `steps` needs (x_k and x_k+1; x_0 is
    the validator's own), plus x_N when the final state is decoded against the image."""
    wanted = {n_steps} if decode else set()
    for k in steps:
        wanted.update(i for i in (k, k + 1) if 1 <= i <= n_steps)
    return sorted(wanted)


def looser_dtype(a: str, b: str) -> str:
    """The dtype whose numeric noise bounds a comparison of an `a` computation with a `b`
    one: a float32 miner checked by a bfloat16 validator is as noisy as the reverse."""
    order = ("float32", "float16", "bfloat16")
    return max(a, b, key=lambda d: order.index(d) if d in order else len(order))


def choose_steps(rng: random.Random, n_steps: int, k: int = 1) -> list[int]:
    """Step 0 (recomputed from the validator's own x_0) plus `k` distinct others at random
    (fewer when the schedule is shorter). Draw them after the answer has arrived."""
    if n_steps < 1:
        raise ValueError("a schedule has at least one step")
    others = rng.sample(range(1, n_steps), min(k, n_steps - 1))
    return [0, *sorted(others)]


def _bad_state(value: object, shape: tuple[int, ...]) -> str | None:
    if not isinstance(value, torch.Tensor):
        return f"not a tensor ({type(value).__name__})"
    if value.dtype != torch.float32:
        return f"dtype {str(value.dtype).removeprefix('torch.')}, not float32"
    if tuple(value.shape) != shape:
        return f"shape {tuple(value.shape)}, not {shape}"
    if not bool(torch.isfinite(value).all()):
        return "NaN or inf in it"
    return None


class StepChecker:
    """Recompute chosen steps of a miner's chain with the validator's engine and judge them."""

    def __init__(self, engine: ImageEngine, thresholds: StepThresholds | None = None,
                 verify_config: VerifyConfig | None = None):
        self.engine = engine
        self.thresholds = thresholds or StepThresholds()
        self.verifier = Verifier(engine, verify_config)  # image thresholds for `answer`

    def check(self, params: GenerationParams, image: PIL.Image.Image | None,
              claimed: Mapping[int, torch.Tensor], steps: Sequence[int],
              dtype: str | None = None, answer: PIL.Image.Image | None = None,
              ) -> StepVerdict:
        """`claimed` maps state index i (1..N) to the miner's x_i (index 0 is never taken
        from the miner); `steps` are the steps k to recompute, from claimed x_k (the
        validator's own x_0 for k = 0) to claimed x_{k+1}. `image` is the request's
        conditioning image; `dtype` the miner's declared network dtype (None: the most
        lenient of them). With `answer` (the miner's image), claimed x_N is decoded too and
        must look like it (`verify.compare` at the model's image threshold). Malformed or
        missing states give a failed verdict, never an exception."""
        full = self.engine.resolve(params)
        n = int(full.steps or 0)
        pipeline = full.pipeline.value
        wanted = sorted(set(steps))
        for k in wanted:
            if not 0 <= k < n:
                raise ValueError(f"step {k} not in [0, {n})")
        dtypes = [dtype] if dtype is not None else list(STATE_DTYPES)
        thresholds = {k: max(self.thresholds.threshold(full.model, pipeline, d, k, n)
                             for d in dtypes) for k in wanted}
        shape = self.engine.state_shape(full)
        for i in states_needed(wanted, n, decode=answer is not None):
            if i not in claimed:
                return StepVerdict(False, {}, thresholds, f"state {i} missing")
            bad = _bad_state(claimed[i], shape)
            if bad:
                return StepVerdict(False, {}, thresholds, f"state {i}: {bad}")
        inputs = {k: claimed[k] for k in wanted if k > 0}
        if 0 in wanted:
            inputs[0] = self.engine.initial_state(full)  # drawn here, never the miner's
        recomputed = self.engine.recompute_steps(full, image, inputs)
        errors = {k: step_error(inputs[k], claimed[k + 1], recomputed[k]) for k in wanted}
        failed = [k for k in wanted if not errors[k] <= thresholds[k]]
        if failed:
            k = failed[0]
            return StepVerdict(False, errors, thresholds,
                               f"step {k}: error {errors[k]:.3g} above {thresholds[k]:.3g}")
        if answer is not None:
            decoded = self.engine.decode_state(full, claimed[n])
            similarity = compare(decoded, answer).similarity
            limit = self.verifier.threshold(full.model, pipeline)
            if not similarity >= limit:
                return StepVerdict(False, errors, thresholds,
                                   f"decoded x_{n} is not the answer (similarity "
                                   f"{similarity:.3f} below {limit:.3f})")
        return StepVerdict(True, errors, thresholds, "ok")
