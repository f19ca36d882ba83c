"""A cheater who has read niche/validator/steps.py and audit.py, at production settings.

For each model and pipeline at the production step count (FLUX.1-schnell 4, FLUX.1-dev and
Flux-mini 28, Kolors 30 on all four pipelines) and at the calibrated one (4 / 6 / 8), on the
tiny checkpoints in the production dtype (FLUX bfloat16, Kolors float16), it measures:

- honest variants in the same dtype (another thread count, a fused batch of 2, another
  attention backend declared in the answer and so reproduced): their worst step error over
  the threshold, which must stay <= 0.5; and, for reference, another attention backend NOT
  declared (what the declaration is for: the thresholds are not meant to cover it), and
  the same computation with its linear layers summed in another order (split-K in two
  halves), which no declaration can cover: another GPU model's noise;
- cheats, each with a search over its knobs:
  * caches: the denoiser's output of the previous step reused, or extrapolated linearly
    from the two before, on the steps where it shows least (the greedy choice dominates any
    adaptive rule in the style of TeaCache / First-Block-Cache at the same saving, since those
    also only pick a subset of steps);
  * CFG (Kolors): the unconditional branch reused from the previous step, or dropped (one
    batch-1 call) from some step on;
  * quantized compute: int8 weights and activations (W8A8, per channel / per token) and
    float8 e4m3 weights and activations, declared as the reference dtype;
  * fewer steps: half the schedule, its states resampled onto the N-step grid;
  * low resolution (Kolors txt2img and IP-Adapter): the first steps' UNet run at half
    resolution, upsampled (a ControlNet's residuals are full size: not tried there).
  For each: the compute saved (denoiser evaluations; W8A8 / fp8 count 25 % per the public
  figures for int8 / fp8 tensor cores), the worst step error over its threshold, and the
  probability that one audit catches it under the validator's real plan (`Auditor.plan`:
  step 0 + `random_steps_needed(N)` random steps). The cache and CFG searches find, per
  step, the error of cheating there alone; the cheater then takes the least visible steps,
  and the chosen set is re-run as a real chain and judged by the real `StepChecker` at every
  step. `--live` also audits each best cheat through a real miner's HTTP /v1/states (the
  real fetch in the loop) with the real `Auditor`.

It ends with the done-when lines: cheats saving >= 5 % caught on < 1/3 of audits, and
honest variants above half their threshold (both must be 0).

    PYTHONPATH=. .venv/bin/python bench/adversary.py [--quick] [--requests 2]
        [--models flux-dev kolors] [--steps production|calibrated|both] [--json out.json]
        [--dtype bfloat16] [--step-counts 8 30] [--compile] [--profile [--profile-json F]]

`--dtype` measures every model in that dtype (declared as such) instead of its production
one; `--step-counts` replaces the production / calibrated step counts. `--compile` adds an
undeclared torch.compile (inductor) engine next to the undeclared math attention: both stand
in for the noise of other hardware in the same dtype, and for Kolors both must stay <= half
the threshold like the honest rows (`NOISE_BOUND`). `--profile` skips the chosen-set chains
and prints, per step of each schedule, the honest worst, the noise worst, the smallest error of
any single-step cache / CFG trick, and the threshold in force: what the bands are fitted to.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from niche.devnet import step_cheats
from niche.devnet.pictures import shapes_picture
from niche.devnet.tiny import ensure_tiny_models
from niche.models.engine import Engine
from niche.models.quiet import quiet_libraries
from niche.protocol import GenerationParams, PipelineKind
from niche.validator.audit import MIN_DETECTION, MIN_SAVING, random_steps_needed
from niche.validator.steps import StepChecker, StepThresholds, step_error

PRODUCTION = {"flux-schnell": 4, "flux-dev": 28, "flux-mini": 28, "kolors": 30}
CALIBRATED = {"flux-schnell": 4, "flux-dev": 6, "flux-mini": 6, "kolors": 8}
DTYPE = {"flux-schnell": "bfloat16", "flux-dev": "bfloat16", "flux-mini": "bfloat16",
         "kolors": "float16"}
PROMPTS = ("a lighthouse on a cliff at sunset", "a red fox in a snowy forest, watercolor",
           "a bowl of ramen on a wooden table, studio photograph")
CALIBRATION: dict[tuple[str, str, int], dict[str, list[float]]] = {}
"""(model, pipeline, N) -> {"honest": per-step worst honest error (declared kernels),
"cheat": per-step smallest error of cheating there alone (caches, CFG tricks)}."""
CONTROLNETS = (PipelineKind.CONTROLNET_CANNY, PipelineKind.CONTROLNET_DEPTH)
QUANT_SAVING = 0.25
"""int8 / fp8 tensor cores against bfloat16 (public W8A8 / fp8 figures, about 25 %)."""
LAST_RUN: list[Row] = []
NOISE_BOUND = {("kolors", "float16")}
"""(model, dtype) whose undeclared other attention backend and torch.compile (the "info:"
rows, the stand-ins for other hardware) must stay <= half the threshold too. Not FLUX, not
Kolors in bfloat16: there another attention backend or inductor moves a step by 0.3x-0.7x of
the smallest cache, so no threshold passes it and still catches caches: it must be declared."""
PER_STEP_CHEATS = ("cache: reuse output", "cache: extrapolate output",
                   "cfg: reuse uncond branch", "cfg: drop guidance")


@dataclass
class Row:
    model: str
    pipeline: str
    steps: int
    name: str
    honest: bool
    saved: float
    worst_ratio: float
    """worst step error / threshold over the requests (inf: a non-finite error)"""
    catch: float
    """probability that one audit catches it (worst request)"""
    live: float | None = None
    errors: list[list[float]] = field(default_factory=list)
    dtype: str = ""


@contextmanager
def other_gemm_order() -> Iterator[None]:
    """Every half-precision linear layer summed as two halves of its inner dimension (fp32
    accumulation, one rounding): the same math in another order, what another GPU model,
    cuBLAS version or split-K choice does. It cannot be declared (the kernels are the same),
    so it stands for the noise of honest hardware the thresholds must live with."""
    plain = torch.nn.functional.linear

    def split_k(x, weight, bias=None):
        if x.dtype not in (torch.bfloat16, torch.float16) or x.shape[-1] < 32:
            return plain(x, weight, bias)
        half = x.shape[-1] // 2
        out = (x[..., :half].float() @ weight[:, :half].float().t()
               + x[..., half:].float() @ weight[:, half:].float().t())
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)

    torch.nn.functional.linear = split_k
    try:
        yield
    finally:
        torch.nn.functional.linear = plain


# ------------------------------------------------------------------ engines and requests
def engines(root: Path, model: str, device: str = "cpu", dtype: str | None = None,
            pipelines: Sequence[str] | None = None, compile_: bool = False
            ) -> dict[str, Engine]:
    kw = {"models": [model], "model_root": root, "dtype": dtype or DTYPE[model],
          "num_threads": 1, "device": device}
    if pipelines:
        kw["pipelines"] = {model: list(pipelines)}
    out = {"validator": Engine(**kw), "threads2": Engine(**{**kw, "num_threads": 2}),
           "math": Engine(**kw, attention="math")}
    if compile_:  # inductor on the denoiser only, not declared: a noise stand-in
        out["compiled"] = Engine(**kw)
        step_cheats.denoiser(out["compiled"], model).compile()
    return out


def request(model: str, pipeline: PipelineKind, steps: int, i: int) -> GenerationParams:
    return GenerationParams(model=model, pipeline=pipeline, prompt=PROMPTS[i % len(PROMPTS)],
                            seed=1000 + i, steps=steps)


def cond_image(pipeline: PipelineKind, i: int):
    return shapes_picture(50 + i, (64, 64)) if pipeline.needs_image else None


# ------------------------------------------------------------------ the step check of a chain
def all_errors(engine: Engine, params: GenerationParams, image, chain: dict[int, torch.Tensor],
               kernels: dict[str, str] | None = None) -> list[float]:
    """step_error of every step of a claimed chain x_1..x_N, recomputed by `engine`."""
    full = engine.resolve(params)
    n = int(full.steps or 0)
    xs = {0: engine.initial_state(full), **chain}
    recomputed = engine.recompute_steps(full, image, {k: xs[k] for k in range(n)},
                                        kernels=kernels)
    return [step_error(xs[k], xs[k + 1], recomputed[k]) for k in range(n)]


def thresholds_for(checker: StepChecker, params: GenerationParams, n: int,
                   dtype: str | None = None) -> list[float]:
    t = checker.thresholds
    dtype = dtype or DTYPE[params.model]
    return [t.threshold(params.model, params.pipeline.value, dtype, k, n) for k in range(n)]


def catch_probability(visible: Sequence[bool], n: int, k: int | None = None) -> float:
    """P(one audit recomputes a visible step): step 0 always, k others drawn without
    replacement from 1..N-1 (`choose_steps`)."""
    if visible[0]:
        return 1.0
    k = random_steps_needed(n) if k is None else k
    others = n - 1
    if others <= 0:
        return 0.0
    k = min(k, others)
    hidden = sum(1 for v in visible[1:] if not v)
    return 1.0 - math.comb(hidden, k) / math.comb(others, k)


# ------------------------------------------------------------------ denoiser-output cheats
Transform = Callable[[int, list, object], object]
"""(step j, honest outputs so far of steps < j, this step's output) -> the output used."""


def _map(out, fn):
    if isinstance(out, tuple):
        return tuple(_map(o, fn) for o in out)
    if isinstance(out, torch.Tensor):
        return fn(out)
    return out


def _zip(a, b, fn):
    if isinstance(a, tuple):
        return tuple(_zip(x, y, fn) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return fn(a, b)
    return a


def reuse(j, history, out):
    return _map(history[j - 1], torch.clone) if j >= 1 else out


def extrapolate(j, history, out):
    if j < 2:
        return reuse(j, history, out)
    return _zip(history[j - 1], history[j - 2], lambda a, b: 2 * a - b)


def _cfg_pair(t: torch.Tensor) -> bool:
    """A CFG batch [uncond, cond] (Kolors' one batch-2 UNet call per step)."""
    return t.ndim > 0 and t.shape[0] == 2


def uncond_reuse(j, history, out):
    """The unconditional half from the previous step, the conditional one computed."""
    if j < 1:
        return out
    return _zip(out, history[j - 1],
                lambda t, prev: torch.cat([prev[:1], t[1:]]) if _cfg_pair(t) else t)


def drop_cfg(j, history, out):
    """The unconditional half replaced by the conditional one: guidance has no effect."""
    return _map(out, lambda t: torch.cat([t[1:], t[1:]]) if _cfg_pair(t) else t)


@contextmanager
def hooked(module: torch.nn.Module, transform: Transform | None, steps: Sequence[int],
           record: list | None = None, order: Sequence[int] | None = None) -> Iterator[None]:
    """The module's output on the calls of `steps` replaced by `transform`; call i is step
    order[i] (default: i). `record` collects the outputs actually used."""
    calls = {"n": 0}
    wanted = set(steps)

    def hook(mod, args, output):
        i = calls["n"]
        calls["n"] += 1
        j = order[i] if order is not None else i
        used = output
        if transform is not None and j in wanted and record is not None:
            used = transform(j, record, output)
        if record is not None and order is None:
            record.append(_map(used, lambda t: t.detach().clone()))
        return used if used is not output else None

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def single_step_errors(engine: Engine, params: GenerationParams, image,
                       honest_chain: dict[int, torch.Tensor], history: list,
                       transform: Transform) -> list[float]:
    """Error at each step j of cheating there alone, from the honest x_j and the honest
    outputs before it: one recomputation per step (what the cheater's search needs)."""
    full = engine.resolve(params)
    n = int(full.steps or 0)
    xs = {0: engine.initial_state(full), **honest_chain}
    order = list(range(n))
    module = step_cheats.denoiser(engine, params.model)
    used: list = list(history)

    def per_call(j, _record, out):
        return transform(j, used, out)

    with hooked(module, per_call, order, record=[], order=order):
        cheated = engine.recompute_steps(full, image, {k: xs[k] for k in order})
    return [step_error(xs[k], cheated[k], xs[k + 1]) for k in order]


def cheat_chain(engine: Engine, params: GenerationParams, image, transform: Transform,
                steps: Sequence[int]) -> dict[int, torch.Tensor]:
    module = step_cheats.denoiser(engine, params.model)
    record: list = []
    with hooked(module, transform, steps, record=record):
        return step_cheats.honest(engine, params, image)


def honest_history(engine: Engine, params: GenerationParams, image):
    module = step_cheats.denoiser(engine, params.model)
    record: list = []
    with hooked(module, None, (), record=record):
        chain = step_cheats.honest(engine, params, image)
    return chain, record


# ------------------------------------------------------------------ quantized compute
def _fake_quant_int8(x: torch.Tensor, dim: int) -> torch.Tensor:
    scale = x.abs().amax(dim=dim, keepdim=True).clamp(min=1e-8) / 127.0
    return (x / scale).round().clamp(-127, 127) * scale


def _fake_fp8(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax().clamp(min=1e-8) / 448.0
    return (x / scale).to(torch.float8_e4m3fn).to(x.dtype) * scale


@contextmanager
def quantized(module: torch.nn.Module, kind: str) -> Iterator[None]:
    """Every Linear of the denoiser computes on int8 (W8A8: per output channel / per token)
    or float8 e4m3 (per tensor) weights and activations, dequantized: what the cheap
    kernels compute, declared as the reference dtype."""
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    saved = [m.weight.data.clone() for m in linears]
    handles = []
    for m in linears:
        w = m.weight.data.float()
        m.weight.data = (_fake_quant_int8(w, 1) if kind == "int8" else _fake_fp8(w)
                         ).to(m.weight.dtype)

        def pre(mod, args):
            x = args[0]
            q = _fake_quant_int8(x.float(), -1) if kind == "int8" else _fake_fp8(x.float())
            return (q.to(x.dtype), *args[1:])
        handles.append(m.register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m, w in zip(linears, saved, strict=True):
            m.weight.data = w


# ------------------------------------------------------------------ low resolution (Kolors)
@contextmanager
def low_resolution(module: torch.nn.Module, steps: Sequence[int]) -> Iterator[None]:
    """The UNet's calls of `steps` run on the latent at half size, the output upsampled."""
    calls = {"n": 0}
    wanted = set(steps)

    def pre(mod, args, kwargs):
        j = calls["n"]
        if j not in wanted:
            return None
        sample = args[0] if args else kwargs["sample"]
        small = torch.nn.functional.interpolate(sample, scale_factor=0.5, mode="bilinear")
        if args:
            return (small, *args[1:]), kwargs
        return args, {**kwargs, "sample": small}

    def post(mod, args, output):
        j = calls["n"]
        calls["n"] += 1
        if j not in wanted:
            return None
        return _map(output, lambda t: torch.nn.functional.interpolate(
            t, scale_factor=2.0, mode="bilinear") if t.ndim == 4 else t)

    h1 = module.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = module.register_forward_hook(post)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


# ------------------------------------------------------------------ one model / pipeline / N
@dataclass
class Case:
    model: str
    pipeline: PipelineKind
    steps: int
    requests: int
    dtype: str = ""

    def __post_init__(self) -> None:
        self.dtype = self.dtype or DTYPE[self.model]


def visible_of(errors: Sequence[float], thresholds: Sequence[float]) -> list[bool]:
    return [not e <= t for e, t in zip(errors, thresholds, strict=True)]


def worst_ratio(errors: Sequence[float], thresholds: Sequence[float]) -> float:
    return max((e / t if t > 0 else math.inf) for e, t in zip(errors, thresholds, strict=True))


def greedy_sets(ratios: Sequence[float], allowed: Sequence[int], sizes: Sequence[int]
                ) -> dict[int, list[int]]:
    """The `size` allowed steps where cheating alone shows least (the cheater's choice)."""
    ranked = sorted(allowed, key=lambda j: ratios[j])
    return {s: sorted(ranked[:s]) for s in sizes if s <= len(ranked)}


def run_case(case: Case, eng: dict[str, Engine], checker: StepChecker, quick: bool,
             live: Callable | None) -> list[Row]:
    v = eng["validator"]
    n = case.steps
    rows: dict[str, Row] = {}
    calibration = _calibration(case)

    def add(name, honest, saved, errors, thr):
        if honest:
            calibration["honest"] = _worse(calibration["honest"], errors)
        elif name.startswith("info:"):
            _record_noise(calibration, name, errors)
        row = rows.setdefault(name, Row(case.model, case.pipeline.value, n, name, honest,
                                        saved, 0.0, 1.0, dtype=case.dtype))
        row.errors.append([round(e, 6) for e in errors])
        row.worst_ratio = max(row.worst_ratio, worst_ratio(errors, thr))
        row.catch = min(row.catch, catch_probability(visible_of(errors, thr), n))
        return row

    kolors = case.model == "kolors"
    cfg = kolors
    sizes = sorted({max(1, math.ceil(MIN_SAVING * n)), max(1, n // 10), max(1, n // 4),
                    max(1, n // 2)})
    for i, params, image, thr, chain, history in _requests(case, v, checker, eng, add):
        for name, transform, per_step, allowed in cache_transforms(params, n, cfg):
            single = single_step_errors(v, params, image, chain, history, transform)
            _record_cheat(calibration, name, single, allowed)
            ratios = [e / t for e, t in zip(single, thr, strict=True)]
            for size, chosen in greedy_sets(ratios, allowed, sizes).items():
                if name == "cfg: drop guidance":  # late steps only: a suffix, as people do
                    chosen = list(range(n - size, n))
                cheated = cheat_chain(v, params, image, transform, chosen)
                errors = all_errors(v, params, image, cheated)
                row = add(f"{name} x{size}", False, per_step * size / n, errors, thr)
                if live is not None and i == 0 and image is None:
                    row.live = live(params, image, cheated)
        # quantized compute, declared as the reference dtype
        for kind in ("int8", "fp8"):
            with quantized(step_cheats.denoiser(v, case.model), kind):
                cheated = step_cheats.honest(v, params, image)
            add(f"quantized compute {kind} (W8A8)" if kind == "int8" else
                "quantized compute fp8 (e4m3)", False, QUANT_SAVING,
                all_errors(v, params, image, cheated), thr)
        # fewer steps smoothed onto the grid
        if n > 1:
            add("fewer steps (N/2) resampled", False, 0.5,
                all_errors(v, params, image,
                           step_cheats.fewer_steps(v, params, image, resample=True)), thr)
        if kolors and case.pipeline not in CONTROLNETS:  # ControlNet residuals are full size
            for size in sizes:
                with low_resolution(step_cheats.denoiser(v, case.model), range(size)):
                    cheated = step_cheats.honest(v, params, image)
                add(f"low resolution, first {size} steps", False, 0.75 * size / n,
                    all_errors(v, params, image, cheated), thr)
    return list(rows.values())


def _worse(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [max(x, y) for x, y in zip(a, b, strict=True)]


def _calibration(case: Case) -> dict:
    n = case.steps
    return CALIBRATION.setdefault((case.model, case.pipeline.value, n, case.dtype), {
        "honest": [0.0] * n, "noise": [0.0] * n, "cheat": [math.inf] * n,
        "cheat_by": {}, "noise_by": {}})


def _record_noise(calibration: dict, name: str, errors: Sequence[float]) -> None:
    calibration["noise"] = _worse(calibration["noise"], errors)
    by = calibration["noise_by"]
    by[name] = _worse(by.get(name, [0.0] * len(errors)), errors)


def _record_cheat(calibration: dict, name: str, single: Sequence[float],
                  allowed: Sequence[int]) -> None:
    """The smallest error of cheating at each step alone (steps where the trick is the
    honest computation, e.g. reusing at step 0, are left out)."""
    n = len(single)
    ok = set(allowed)
    by = calibration["cheat_by"].setdefault(name, [math.inf] * n)
    for k, e in enumerate(single):
        if k in ok and e > 0:
            by[k] = min(by[k], e)
            calibration["cheat"][k] = min(calibration["cheat"][k], e)


def cache_transforms(params: GenerationParams, n: int, cfg: bool
                     ) -> list[tuple[str, Transform, float, list[int]]]:
    """(name, transform, evaluations saved per step, steps it can be applied to)."""
    out: list[tuple[str, Transform, float, list[int]]] = [
        ("cache: reuse output", reuse, 1.0, list(range(1, n))),
        ("cache: extrapolate output", extrapolate, 1.0, list(range(2, n))),
    ]
    if cfg and (params.guidance or 0) > 1:
        out += [("cfg: reuse uncond branch", uncond_reuse, 0.5, list(range(1, n))),
                ("cfg: drop guidance", drop_cfg, 0.5, list(range(n)))]
    return out


def honest_rows(eng: dict[str, Engine], params: GenerationParams, image, chain: dict,
                thr: Sequence[float], add: Callable) -> None:
    """The honest variants (declared kernels) and the noise stand-ins ("info:", undeclared)."""
    v = eng["validator"]
    add("honest (validator's own kernels)", True, 0.0, all_errors(v, params, image, chain), thr)
    add("honest, 2 threads", True, 0.0,
        all_errors(v, params, image, step_cheats.honest(eng["threads2"], params, image)), thr)
    other = params.model_copy(update={"prompt": "a dragon over a castle", "seed": 7})
    fused = v.generate_batch_with_states([(params, image), (other, image)], fuse=True)[0][1]
    add("honest, fused batch of 2", True, 0.0,
        all_errors(v, params, image, step_cheats.as_chain(fused)), thr)
    math_chain = step_cheats.honest(eng["math"], params, image)
    add("honest, math attention (declared)", True, 0.0,
        all_errors(v, params, image, math_chain, kernels={"attention": "math"}), thr)
    add("info: math attention NOT declared", False, 0.0,
        all_errors(v, params, image, math_chain), thr)
    with other_gemm_order():
        gemm_chain = step_cheats.honest(eng["validator"], params, image)
    add("info: another GEMM order (undeclarable)", False, 0.0,
        all_errors(v, params, image, gemm_chain), thr)
    if "compiled" in eng:
        add("info: torch.compile NOT declared", False, 0.0,
            all_errors(v, params, image, step_cheats.honest(eng["compiled"], params, image)),
            thr)


def _requests(case: Case, v, checker: StepChecker, eng: dict[str, Engine], add):
    """Per request of `case`: (index, params, conditioning image, thresholds, honest chain
    and history), its honest variants' rows already added."""
    n = case.steps
    for i in range(case.requests):
        params = v.resolve(request(case.model, case.pipeline, n, i))
        image = cond_image(case.pipeline, i)
        thr = thresholds_for(checker, params, n, case.dtype)
        chain, history = honest_history(v, params, image)
        honest_rows(eng, params, image, chain, thr, add)
        yield i, params, image, thr, chain, history


def profile_case(case: Case, eng: dict[str, Engine], checker: StepChecker) -> dict:
    """Per step: the honest worst, the noise stand-ins' worst, the smallest error of each
    single-step cache / CFG trick, and the threshold (no chosen-set chains)."""
    v = eng["validator"]
    n = case.steps
    calibration = _calibration(case)
    thr: list[float] = []

    def add(name, honest, saved, errors, thr_):
        if honest:
            calibration["honest"] = _worse(calibration["honest"], errors)
        else:
            _record_noise(calibration, name, errors)

    for _, params, image, request_thr, chain, history in _requests(case, v, checker, eng,
                                                                   add):
        thr = request_thr  # one schedule: the same thresholds for every request
        for name, transform, _per_step, allowed in cache_transforms(
                params, n, case.model == "kolors"):
            single = single_step_errors(v, params, image, chain, history, transform)
            _record_cheat(calibration, name, single, allowed)
    return {"model": case.model, "pipeline": case.pipeline.value, "steps": n,
            "dtype": case.dtype, "threshold": thr, **calibration}


def print_profile(p: dict) -> None:
    n = p["steps"]
    print(f"\n== profile {p['model']} / {p['pipeline']}, {n} steps, {p['dtype']} "
          "(errors; ratios to the threshold in force)")
    print(f"{'k':>3}{'(k+1)/N':>8}{'thr':>10}{'honest':>10}{'noise':>10}{'cheat min':>11}"
          f"{'noise/thr':>10}{'cheat/thr':>10}  least visible trick")
    for k in range(n):
        t, h, z, c = p["threshold"][k], p["honest"][k], p["noise"][k], p["cheat"][k]
        who = min(p["cheat_by"], key=lambda name: p["cheat_by"][name][k], default="")
        cs = "-" if math.isinf(c) else f"{c:.3g}"
        cr = "-" if math.isinf(c) else f"{c / t:.2f}"
        print(f"{k:>3}{(k + 1) / n:>8.3f}{t:>10.3g}{h:>10.3g}{z:>10.3g}{cs:>11}"
              f"{max(h, z) / t:>10.2f}{cr:>10}  {who if cs != '-' else ''}")
    for name, errs in p["noise_by"].items():
        worst = max(e / t for e, t in zip(errs, p["threshold"], strict=True))
        print(f"{name}: worst/thr {worst:.2f}")
    noisiest = max(max(h, z) / t for h, z, t in zip(p["honest"], p["noise"], p["threshold"],
                                                    strict=True))
    finite = [p["cheat"][k] / p["threshold"][k] for k in range(n)
              if math.isfinite(p["cheat"][k])]
    print(f"worst honest-or-noise/thr {noisiest:.2f}; smallest single-step cheat/thr "
          f"{min(finite) if finite else math.inf:.2f}")


# ------------------------------------------------------------------ the real fetch in the loop
def live_auditor(root: Path, model: str, audits: int) -> Callable:
    """Serve a cheat chain from a real miner on 127.0.0.1 and audit it `audits` times with
    the real Auditor: the fetch (chunked, signed, hashed) in the loop."""
    from niche.devnet.step_audit import LiveAudit

    harness = LiveAudit(root, model, DTYPE[model])

    def run(params, image, chain) -> float:
        return harness.catch_rate(params, image, chain, audits)

    return run


LIVE_NOTE = ("live: share of real audits (miner on 127.0.0.1, signed chunked fetch, "
             "Auditor) that failed the cache/CFG cheat chosen on the first request")


# ------------------------------------------------------------------ report
def print_rows(rows: Sequence[Row]) -> None:
    if not rows:
        return
    r0 = rows[0]
    print(f"\n== {r0.model} / {r0.pipeline}, {r0.steps} steps ({r0.dtype}; plan: step 0 "
          f"+ {random_steps_needed(r0.steps)} random)")
    print(f"{'variant':<40}{'saved':>7}{'worst err/thr':>15}{'caught/audit':>14}{'live':>7}")
    for r in rows:
        live = "" if r.live is None else f"{r.live:.2f}"
        ratio = "inf" if math.isinf(r.worst_ratio) else f"{r.worst_ratio:.3f}"
        caught = "-" if r.honest else f"{r.catch:.2f}"
        print(f"{r.name:<40}{r.saved:>7.0%}{ratio:>15}{caught:>14}{live:>7}")


def holes(rows: Sequence[Row]) -> tuple[list[Row], list[Row]]:
    cheats = [r for r in rows if not r.honest and not r.name.startswith("info:")
              and r.saved >= MIN_SAVING - 1e-9 and r.catch < MIN_DETECTION]
    honest = [r for r in rows if (r.honest or (r.name.startswith("info:")
                                               and noise_bound(r.model, r.dtype)))
              and r.worst_ratio > 0.5]
    return cheats, honest


def _samples(calibration: dict) -> dict[tuple[str, str], list[tuple[float, float, float, float]]]:
    """{(model, dtype): [(where, honest, noise, cheat), ...]} over every measured step."""
    out: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    for key, data in calibration.items():
        model, _pipeline, n = key[:3]
        dtype = key[3] if len(key) > 3 else DTYPE[model]
        noise = data.get("noise", [0.0] * n)
        for k in range(n):
            out.setdefault((model, dtype), []).append(
                ((k + 1) / n, data["honest"][k], noise[k], data["cheat"][k]))
    return out


def noise_bound(model: str, dtype: str) -> bool:
    return (model, dtype) in NOISE_BOUND


def suggest_bands(calibration: dict, margin: float = 2.0) -> tuple[dict, list[str]]:
    """Bands for `StepThresholds.from_file` ("geometric": each band's value holds at its
    `upto`, geometric in between), from the measured per-step data. Per model and measured
    dtype, at each of the defaults' band points, the value is the geometric mean of `margin` x
    the largest honest error near it (and of the noise stand-ins where they are bound,
    `NOISE_BOUND`; floored at 1/8 of the cheat minimum, for hardware not measured) and the
    smallest single-step cheat error near it ("near": between the neighbouring points), over
    every step count measured. Dtypes not measured keep the defaults' ratios to a measured
    one. Notes name every measured step where the interpolated threshold does not separate
    them (margin x honest above it, or a cheat at or below it)."""
    from niche.validator.steps import DEFAULT_STEP_BANDS, STATE_DTYPES, Band, StepThresholds

    out: dict[str, list[dict]] = {}
    notes: list[str] = []
    samples = _samples(calibration)
    for model in sorted({m for m, _ in samples}):
        defaults = sorted(DEFAULT_STEP_BANDS[model], key=lambda b: b.upto)
        edges = [b.upto for b in defaults]
        measured: dict[str, list[float]] = {}
        for (m, dtype), rows in samples.items():
            if m != model:
                continue
            values = []
            for i, band in enumerate(defaults):
                lo = edges[i - 1] if i > 0 else 0.0
                hi = edges[i + 1] if i + 1 < len(edges) else 1.0
                near = [r for r in rows if lo < r[0] <= hi + 1e-12]
                cheat = min((r[3] for r in near), default=math.inf)
                if not math.isfinite(cheat):
                    values.append(band.for_dtype(dtype))
                    continue
                bound = noise_bound(model, dtype)
                low = max(max(margin * r[1], margin * r[2] if bound else 0.0) for r in near)
                values.append(math.sqrt(max(low, cheat / 8) * cheat))
            measured[dtype] = values
        ref = sorted(measured)[0]
        table = {d: measured.get(d) or [v * b.for_dtype(d) / b.for_dtype(ref)
                                        for v, b in zip(measured[ref], defaults, strict=True)]
                 for d in STATE_DTYPES}
        bands = [dict(upto=b.upto, **{d: float(f"{table[d][i]:.3g}") for d in STATE_DTYPES})
                 for i, b in enumerate(defaults)]
        out[model] = bands
        check = StepThresholds({model: tuple(Band(**b) for b in bands)})
        for (m, dtype), rows in samples.items():
            if m != model:
                continue
            for where, honest, noise, cheat in rows:
                thr = _threshold_at(check, model, dtype, where)
                worst = max(honest, noise if noise_bound(model, dtype) else 0.0)
                if margin * worst > thr or cheat <= thr:
                    notes.append(f"{model} {dtype} at {where:.3f} of the schedule: threshold "
                                 f"{thr:.3g}, honest x{margin} {margin * worst:.3g}, smallest "
                                 f"cheat {cheat:.3g}: no threshold separates them")
    return {"interpolation": "geometric", "bands": out}, notes


def _threshold_at(t, model: str, dtype: str, where: float) -> float:
    """The threshold at `where` = (k + 1) / N along the schedule."""
    n = 1000000
    return t.threshold(model, None, dtype, max(0, round(where * n) - 1), n)


def summary(rows: Sequence[Row]) -> dict[str, tuple[float, float]]:
    """{cheat: (saved, worst catch probability)} for bench/incentives.py."""
    out: dict[str, tuple[float, float]] = {}
    for r in rows:
        if r.honest or r.name.startswith("info:"):
            continue
        key = f"{r.model}/{r.pipeline}@{r.steps}: {r.name}"
        out[key] = (r.saved, min(r.catch, out.get(key, (0, 1.0))[1]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(PRODUCTION))
    ap.add_argument("--pipelines", nargs="+", default=None,
                    help="Kolors pipelines (default: all four; --quick: txt2img)")
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--steps", choices=("production", "calibrated", "both"), default="both")
    ap.add_argument("--quick", action="store_true", help="1 request, Kolors txt2img only")
    ap.add_argument("--live", type=int, default=0, metavar="AUDITS",
                    help="also audit each cache / CFG cheat (txt2img) AUDITS times through a "
                         "real miner and the real Auditor")
    ap.add_argument("--model-path", type=Path, default=None,
                    help="folder of <model>/ checkpoints (default: the tiny ones)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (production weights)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--write-bands", type=Path, default=None, metavar="FILE",
                    help="write step-check bands suggested by these measurements (for "
                         "`niche validator --verify.step_bands FILE`)")
    ap.add_argument("--bands", type=Path, default=None, metavar="FILE",
                    help="judge with these bands instead of the defaults")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="run and declare every model in this dtype (default: each "
                         "model's production dtype: FLUX bfloat16, Kolors float16)")
    ap.add_argument("--step-counts", type=int, nargs="+", default=None, metavar="N",
                    help="these step counts instead of --steps' production / calibrated ones")
    ap.add_argument("--compile", action="store_true",
                    help="also an undeclared torch.compile (inductor) engine, a noise "
                         "stand-in like the undeclared math attention")
    ap.add_argument("--profile", action="store_true",
                    help="per-step table only (honest, noise, smallest single-step cheat, "
                         "threshold): no chosen-set chains, no quantized / resampled / "
                         "low-resolution cheats")
    ap.add_argument("--profile-json", type=Path, default=None, metavar="FILE",
                    help="with --profile: write the per-step data here")
    args = ap.parse_args(argv)
    quiet_libraries()
    root = args.model_path or ensure_tiny_models()
    requests = 1 if args.quick else args.requests
    started = time.perf_counter()
    all_rows: list[Row] = []
    profiles: list[dict] = []
    for model in args.models:
        dtype = args.dtype or DTYPE[model]
        only = None
        if model == "kolors" and (args.pipelines or args.quick):
            only = [PipelineKind(p).value for p in args.pipelines or ["txt2img"]]
        eng = engines(root, model, args.device, dtype, only, args.compile)
        checker = StepChecker(eng["validator"], StepThresholds.from_file(args.bands)
                              if args.bands else StepThresholds())
        live = live_auditor(root, model, args.live) if args.live else None
        kinds = [PipelineKind.TXT2IMG]
        if model == "kolors":
            kinds = ([PipelineKind(p) for p in args.pipelines] if args.pipelines else
                     [PipelineKind.TXT2IMG] if args.quick else list(PipelineKind))
        counts = {"production": [PRODUCTION[model]], "calibrated": [CALIBRATED[model]],
                  "both": sorted({PRODUCTION[model], CALIBRATED[model]}, reverse=True)}
        for n in args.step_counts or counts[args.steps]:
            for pipeline in kinds:
                case = Case(model, pipeline, n, requests, dtype)
                if args.profile:
                    profiles.append(profile_case(case, eng, checker))
                    print_profile(profiles[-1])
                    sys.stdout.flush()
                    continue
                rows = run_case(case, eng, checker, args.quick, live)
                print_rows(rows)
                sys.stdout.flush()
                all_rows += rows
    LAST_RUN[:] = all_rows
    if args.profile_json:
        args.profile_json.write_text(json.dumps(profiles, indent=1))
    if args.live:
        print("\n" + LIVE_NOTE)
    cheats, honest = holes(all_rows)
    print(f"\n{time.perf_counter() - started:.0f}s on {torch.get_num_threads()} threads, "
          f"tiny checkpoints at {root}")
    print(f"done-when: {len(cheats)} cheat(s) saving >= {MIN_SAVING:.0%} caught on < "
          f"{MIN_DETECTION:.2f} of audits; {len(honest)} honest variant(s) above half their "
          "threshold")
    for r in cheats + honest:
        print(f"  {r.model}/{r.pipeline}@{r.steps}: {r.name}: saved {r.saved:.0%}, "
              f"worst {r.worst_ratio:.3f}, caught {r.catch:.2f}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in all_rows], indent=1))
    if args.write_bands:
        bands, notes = suggest_bands(CALIBRATION)
        args.write_bands.write_text(json.dumps(bands, indent=1) + "\n")
        print(f"suggested bands written to {args.write_bands} (niche validator "
              f"--verify.step_bands {args.write_bands}); rerun this bench with "
              f"--bands {args.write_bands} to check them")
        for note in notes:
            print(f"  warning: {note}")
    return 1 if cheats or honest else 0


if __name__ == "__main__":
    sys.exit(main())
