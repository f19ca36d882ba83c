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
from pathlib import Path
from typing import Literal

import numpy as np
import PIL.Image
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from niche.errors import ConfigError
from niche.models.engine import ImageEngine
from niche.models.kernels import DEFAULT_ATTENTION, attention_problem
from niche.protocol import GenerationParams, first_validation_error
from niche.validator.verify import Verifier, VerifyConfig, psnr

STATE_DTYPES = ("float32", "bfloat16", "float16")
INTERPOLATIONS = ("geometric", "step")
DECODE_PSNR_FLOOR = 35.0
"""dB the answer must reach against the decode of its own x_N, in the declared dtype and
kernels, over the whole image. That decode is bit-exact on the miner's hardware and moved
to 52.6 dB by another attention backend; the image check's floor (28-29 dB, calibrated for
a float32 regeneration against a bfloat16 miner) let colour grading (R+12 / B-12: 28.3 dB)
and a pasted region (10 % of a 1024x1024 image: 33.1 dB) through."""
DECODE_BLOCK = 16
DECODE_BLOCK_PSNR_FLOOR = 25.0
"""dB every 16x16 block must reach against the decode: a watermark or a small pasted ad
moves the whole image's PSNR little and its own blocks a lot (honest noise spreads)."""
"""How a model's bands give the threshold between their points (`StepThresholds.threshold`):
"geometric" (the defaults, and bands files that say so): each band's values hold exactly at
its `upto`, and in between the threshold moves geometrically from one band's value to the
next, so it has no jump anywhere; "step" (bands files without "interpolation", the meaning
before): each band's values hold for its whole range, jumping at every boundary."""


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


def decode_gap(decoded: PIL.Image.Image, answer: PIL.Image.Image,
               whole_psnr: float | None = None) -> str | None:
    """Why `answer` is not `decoded` (the same-dtype decode of its x_N), or None: the whole
    image under DECODE_PSNR_FLOOR (`whole_psnr` when the image check measured it already),
    or any 16x16 block (edge blocks flush with the border) under DECODE_BLOCK_PSNR_FLOOR."""
    if decoded.size != answer.size:
        return f"size {answer.size}, decoded {decoded.size}"
    whole = psnr(decoded, answer) if whole_psnr is None else whole_psnr
    if whole < DECODE_PSNR_FLOOR:
        return f"psnr {whole:.1f} dB against its own decode < {DECODE_PSNR_FLOOR:.0f} dB"
    a = np.asarray(decoded.convert("RGB"), dtype=np.float64)
    b = np.asarray(answer.convert("RGB"), dtype=np.float64)
    squared = ((a - b) ** 2).sum(axis=2)
    side = min(DECODE_BLOCK, *squared.shape)
    sums = np.pad(squared.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    height, width = squared.shape
    ys = np.unique(np.r_[np.arange(0, height - side + 1, side), height - side])
    xs = np.unique(np.r_[np.arange(0, width - side + 1, side), width - side])
    y0, x0 = np.meshgrid(ys, xs, indexing="ij")
    block = (sums[y0 + side, x0 + side] - sums[y0, x0 + side] - sums[y0 + side, x0]
             + sums[y0, x0])
    mse = float(block.max()) / (side * side * 3)
    worst = math.inf if mse <= 0 else 10 * math.log10(255.0 ** 2 / mse)
    if worst < DECODE_BLOCK_PSNR_FLOOR:
        k = np.unravel_index(int(block.argmax()), block.shape)
        return (f"block at ({int(x0[k])}, {int(y0[k])}) {worst:.1f} dB against its own "
                f"decode < {DECODE_BLOCK_PSNR_FLOOR:.0f} dB")
    return None


@dataclass(frozen=True)
class Band:
    """Thresholds, one per declared network dtype, at the point `upto` of the schedule: for
    the step that ends there ((k + 1) / N == upto), and, interpolated geometrically, for the
    steps between this point and its neighbours (before the first point: the first band's
    values). Under "step" interpolation (an old bands file): for every step that ends at
    most `upto` along and after the previous band's `upto`."""

    upto: float
    float32: float
    bfloat16: float
    float16: float

    def for_dtype(self, dtype: str) -> float:
        if dtype not in STATE_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(STATE_DTYPES)})")
        return float(getattr(self, dtype))


# Same dtype, same declared kernels: the validator recomputes in the miner's dtype on its
# attention backend, where another thread count, a fused batch of 2 and a declared math
# backend are all bit-exact on this platform (bench/adversary.py). What the thresholds cover
# is therefore other hardware and other kernels of the same declared class, not measured
# here (docs/step-check.md: an assumption until bench/gpu.py runs on GPUs): each threshold
# leaves a measured honest worst of at most half of it, and sits below the smallest step
# error of every cheat tried at production step counts (caches, CFG tricks, int8 / fp8
# compute, resampled schedules, low-resolution steps).
# Kolors, geometric between the points (`INTERPOLATIONS`: no loose step right after a
# boundary), measured per step at 8, 20, 25, 30, 40 and 50 steps (bench/adversary.py
# --profile --compile, docs/step-check.md). float16 (production): an undeclared other
# attention backend and torch.compile (the stand-ins for other hardware) stay <= 0.39x, and
# the least visible single-step cache / CFG trick is >= 2.6x (a reused output on step 1 of 25,
# 2.1e-3 of its update, is the tightest). bfloat16: 1.25x float16; every cheat >= 2.6x, but
# an undeclared other kernel moves a bfloat16 step by 0.7x-0.9x of the smallest cheat (1.4x-2.5x
# these), so, as for FLUX, other kernels must be declared. float32: 1/4 of float16 (not
# re-measured).
_KOLORS = (
    Band(0.1, float32=2e-4, bfloat16=1e-3, float16=8e-4),
    Band(0.25, float32=5.5e-4, bfloat16=2.75e-3, float16=2.2e-3),
    Band(0.5, float32=1.75e-3, bfloat16=8.75e-3, float16=7e-3),
    Band(0.75, float32=3.75e-3, bfloat16=1.875e-2, float16=1.5e-2),
    Band(0.875, float32=5.5e-3, bfloat16=2.75e-2, float16=2.2e-2),
    Band(1.0, float32=1e-2, bfloat16=5e-2, float16=4e-2),
)
# FLUX (bfloat16 in production): the smallest cheat step error at N = 28 (a reused output
# early in the schedule, int8 W8A8) is 1.3e-2 to 1.5e-2, an undeclared other attention
# backend moves a step by 0.6e-2 to 2.3e-2 (so it must be declared), the declared kernels
# by 0: 5e-3 for the whole schedule.
_FLUX = (Band(1.0, float32=3e-4, bfloat16=5e-3, float16=1.25e-3),)
DEFAULT_STEP_BANDS: dict[str, tuple[Band, ...]] = {
    "flux-schnell": _FLUX,
    "flux-dev": _FLUX,
    "flux-mini": _FLUX,
    "kolors": _KOLORS,
}
"""Per model (or model/pipeline) bands, same-dtype recomputation (docs/step-check.md:
`python bench/adversary.py` prints every honest variant's and every cheat's error over
these). Recalibrate with production weights and hardware (`--model-path`, bench/gpu.py)
before a real network trusts them."""


class _BandModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    upto: float = Field(gt=0.0, le=1.0)
    float32: float = Field(gt=0.0, lt=10.0)
    bfloat16: float = Field(gt=0.0, lt=10.0)
    float16: float = Field(gt=0.0, lt=10.0)


class _BandsFile(BaseModel):
    """A bands file: {"interpolation": "geometric" | "step", "bands": {"model" or
    "model/pipeline": [band, ...]}} (bench/adversary.py --write-bands writes one from
    measurements on the validator's own weights, "geometric"). Without "interpolation" a
    file keeps the meaning it had before: "step" (`INTERPOLATIONS`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interpolation: Literal["geometric", "step"] = "step"
    bands: dict[str, list[_BandModel]] = Field(min_length=1)


@dataclass
class StepThresholds:
    """Per `model/pipeline` (then `model`) bands along the schedule; the largest allowed
    step_error for step k of N under the miner's declared dtype. `interpolation` says, per
    bands key, how the threshold goes between the bands' points (`INTERPOLATIONS`; a key
    not in it: "geometric")."""

    bands: Mapping[str, Sequence[Band]] = field(
        default_factory=lambda: dict(DEFAULT_STEP_BANDS))
    interpolation: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, how in self.interpolation.items():
            if how not in INTERPOLATIONS:
                raise ValueError(f"{key}: unknown interpolation {how!r} (known: "
                                 f"{', '.join(INTERPOLATIONS)})")

    @classmethod
    def from_file(cls, path: Path) -> StepThresholds:
        """The defaults with the file's models replaced; a ConfigError in one line when the
        file is missing or malformed (a validator must not start on broken thresholds)."""
        try:
            parsed = _BandsFile.model_validate_json(Path(path).read_bytes())
        except OSError as exc:
            raise ConfigError(f"step bands file {path}: {exc.strerror or exc}") from None
        except ValidationError as exc:
            where, message = first_validation_error(exc)
            raise ConfigError(f"step bands file {path}: {where}: {message}") from None
        bands = dict(DEFAULT_STEP_BANDS)
        for key, rows in parsed.bands.items():
            uptos = sorted(r.upto for r in rows)
            if not rows or uptos[-1] != 1.0:
                raise ConfigError(f"step bands file {path}: {key}: the last band must end at "
                                  "upto 1.0")
            if parsed.interpolation == "geometric" and len(set(uptos)) != len(uptos):
                raise ConfigError(f"step bands file {path}: {key}: two bands at the same "
                                  "upto")
            bands[key] = tuple(Band(**r.model_dump()) for r in sorted(rows,
                                                                       key=lambda r: r.upto))
        return cls(bands, {key: parsed.interpolation for key in parsed.bands})

    def _key(self, model: str, pipeline: str | None) -> str:
        pipeline = getattr(pipeline, "value", pipeline)
        for key in (f"{model}/{pipeline}" if pipeline else None, model):
            if key and key in self.bands:
                return key
        raise KeyError(f"no step thresholds for {model}" + (f"/{pipeline}" if pipeline else ""))

    def bands_for(self, model: str, pipeline: str | None = None) -> Sequence[Band]:
        return self.bands[self._key(model, pipeline)]

    def threshold(self, model: str, pipeline: str | None, dtype: str, step: int,
                  n_steps: int) -> float:
        """The threshold for step k of N, at `where` = (k + 1) / N along the schedule:
        geometric interpolation between the two bands whose points surround it (no jump at
        a boundary: under a step function the steps right after each boundary are the
        loosest of the schedule, and a cheater caches exactly there), or, for "step" bands,
        the value of the first band with `where` <= upto."""
        if not 0 <= step < n_steps:
            raise ValueError(f"step {step} not in [0, {n_steps})")
        where = (step + 1) / n_steps
        key = self._key(model, pipeline)
        bands = sorted(self.bands[key], key=lambda b: b.upto)
        geometric = self.interpolation.get(key, "geometric") == "geometric"
        before: Band | None = None
        for band in bands:
            if where <= band.upto + 1e-12:
                if not geometric or before is None or band.upto - before.upto <= 1e-12:
                    return band.for_dtype(dtype)
                low, high = before.for_dtype(dtype), band.for_dtype(dtype)
                frac = (where - before.upto) / (band.upto - before.upto)
                return low * (high / low) ** frac
            before = band
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


def _dtype_of(engine: ImageEngine, model: str) -> str | None:
    """The dtype `engine` runs `model` in (None: it does not serve it)."""
    try:
        return engine.compute_dtype(model)
    except Exception:  # noqa: BLE001 - an engine that does not serve the model
        return None


def _kernel_text(kernels: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(kernels.items())) or "the plain kernels"


class StepChecker:
    """Recompute chosen steps of a miner's chain with the validator's engine and judge them.

    The recomputation runs in the dtype the miner declares, on the attention backend it
    declares, so the thresholds only cover what other kernels and hardware add in that
    dtype (docs/step-check.md). `engine` and each of `extra_engines` serve the dtypes they
    were loaded in (`compute_dtype(model)`); a declared dtype none of them runs cannot be
    reproduced, and the audit says so instead of judging it against another dtype."""

    def __init__(self, engine: ImageEngine, thresholds: StepThresholds | None = None,
                 verify_config: VerifyConfig | None = None,
                 extra_engines: Sequence[ImageEngine] = ()):
        self.engine = engine
        self.engines = [engine, *extra_engines]
        self.thresholds = thresholds or StepThresholds()
        self.verifier = Verifier(engine, verify_config)  # image thresholds for `answer`

    def engine_for(self, model: str, dtype: str | None) -> ImageEngine | None:
        """The engine that recomputes `model` in `dtype` (None: the main one)."""
        if dtype is None:
            return self.engine
        return next((e for e in self.engines if _dtype_of(e, model) == dtype), None)

    def dtypes(self, model: str) -> list[str]:
        """The dtypes this validator recomputes `model` in."""
        return sorted({d for e in self.engines if (d := _dtype_of(e, model)) is not None})

    def unreproducible(self, model: str, dtype: str,
                       kernels: Mapping[str, str] | None = None) -> str | None:
        """Why this validator cannot recompute an answer declared in `dtype` with `kernels`
        (None: it can), in one line an operator can act on."""
        engine = self.engine_for(model, dtype)
        if engine is None:
            held = ", ".join(self.dtypes(model)) or "none"
            return (f"cannot reproduce {model} in declared dtype {dtype}: this validator "
                    f"recomputes it in {held} (the miner: run {model}'s configured dtype "
                    f"without --dtype; the validator: add --verify.dtypes {dtype} to hold "
                    f"it too)")
        declared = dict(kernels or {})
        attention = declared.pop("attention", DEFAULT_ATTENTION)
        problem = attention_problem(attention, getattr(engine, "device", "cpu"), dtype)
        if problem:
            return f"cannot reproduce the declared kernels: {problem}"
        own_kernels = getattr(engine, "kernels", None)
        own = dict(own_kernels(model)) if callable(own_kernels) else {}
        own.pop("attention", None)
        if declared != own:
            return (f"cannot reproduce the declared kernels {_kernel_text(declared)}: this "
                    f"validator recomputes {model} with {_kernel_text(own)} (weights and "
                    "the fast path's compile / fused QKV must match the subnet's reference)")
        return None

    def check(self, params: GenerationParams, image: PIL.Image.Image | None,
              claimed: Mapping[int, torch.Tensor], steps: Sequence[int],
              dtype: str | None = None, answer: PIL.Image.Image | None = None,
              kernels: Mapping[str, str] | None = None) -> StepVerdict:
        """`claimed` maps state index i (1..N) to the miner's x_i (index 0 is never taken
        from the miner); `steps` are the steps k to recompute, from claimed x_k (the
        validator's own x_0 for k = 0) to claimed x_{k+1}. `image` is the request's
        conditioning image; `dtype` the miner's declared network dtype, recomputed in that
        dtype (None: the main engine's, judged at the most lenient dtype's thresholds);
        `kernels` its declared kernel choices (the attention backend is reproduced). With
        `answer` (the miner's image), claimed x_N is decoded too and must look like it
        (`Verifier.judge`: the image similarity threshold and the PSNR floor). Malformed or
        missing states give a failed verdict, never an exception; a dtype no engine here
        runs is a ValueError (check `unreproducible` first)."""
        engine = self.engine_for(params.model, dtype)
        if engine is None:
            raise ValueError(self.unreproducible(params.model, str(dtype), kernels))
        full = engine.resolve(params)
        n = int(full.steps or 0)
        pipeline = full.pipeline.value
        wanted = sorted(set(steps))
        for k in wanted:
            if not 0 <= k < n:
                raise ValueError(f"step {k} not in [0, {n})")
        dtypes = [dtype] if dtype is not None else list(STATE_DTYPES)
        thresholds = {k: max(self.thresholds.threshold(full.model, pipeline, d, k, n)
                             for d in dtypes) for k in wanted}
        shape = engine.state_shape(full)
        for i in states_needed(wanted, n, decode=answer is not None):
            if i not in claimed:
                return StepVerdict(False, {}, thresholds, f"state {i} missing")
            bad = _bad_state(claimed[i], shape)
            if bad:
                return StepVerdict(False, {}, thresholds, f"state {i}: {bad}")
        inputs = {k: claimed[k] for k in wanted if k > 0}
        if 0 in wanted:
            inputs[0] = engine.initial_state(full)  # drawn here, never the miner's
        recomputed = engine.recompute_steps(full, image, inputs, kernels=kernels)
        errors = {k: step_error(inputs[k], claimed[k + 1], recomputed[k]) for k in wanted}
        failed = [k for k in wanted if not errors[k] <= thresholds[k]]
        if failed:
            k = failed[0]
            return StepVerdict(False, errors, thresholds,
                               f"step {k}: error {errors[k]:.3g} above {thresholds[k]:.3g}")
        if answer is not None:
            decoded = engine.decode_state(full, claimed[n], kernels=kernels)
            judged = self.verifier.judge(full.model, decoded, answer, pipeline)
            if not judged.passed:  # similarity AND PSNR: a cheaper decoder is no answer
                return StepVerdict(False, errors, thresholds,
                                   f"decoded x_{n} is not the answer ({judged.reason})")
            gap = decode_gap(decoded, answer, judged.psnr) if dtype is not None else None
            if gap:  # the same decode, in the same dtype: post-processing shows here
                return StepVerdict(False, errors, thresholds,
                                   f"decoded x_{n} is not the answer ({gap})")
        return StepVerdict(True, errors, thresholds, "ok")
