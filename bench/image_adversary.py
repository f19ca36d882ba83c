"""A cheater who has read niche/validator/verify.py: how cheap can an answer be and still
pass the image check?

Each cheat is a cheaper computation (fewer steps, a shorter schedule, no classifier-free
guidance, lower precision, a smaller image upscaled, another seed's or another prompt's
image) followed by a search over post-processing (blend / extrapolate two cheap images,
unsharp mask, colour statistics matched back to the cheap image, gaussian noise) that uses
the verifier's OWN score as the objective. The search is given the honest reference, so it
is an upper bound on what a cheater can tune offline on requests it computes honestly.

For every cheat it prints the compute saved (denoiser evaluations, and measured wall time of
the cheap computation against the honest one), the best similarity and PSNR found against the
model's threshold and PSNR floor, whether the old check (similarity only) and the hardened one
(similarity AND PSNR) accept that best variant, and the detection probability per audited
answer: the fraction of requests on which the best variant found is rejected.

Cheats are importable: `CHEATS` maps a name to a `Cheat`, whose `make(ctx, params, image)`
returns the cheap image(s) and their cost, so a step-check column can be added next to the
image check without touching the search.

    .venv/bin/python bench/image_adversary.py [--quick] [--requests 3] [--model-path DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from niche.protocol import GenerationParams, PipelineKind
from niche.validator.verify import Verdict, Verifier, VerifyConfig, compare

PROMPTS = ("a red fox in a snowy forest, watercolor",
           "an old lighthouse at dusk, oil painting",
           "a bowl of ramen on a wooden table, studio photograph",
           "a sailboat on a calm sea, soft colors")


@dataclass
class Context:
    """What a cheat may use: engines per dtype (the float32 one is the validator's)."""

    engines: dict  # dtype name -> Engine
    conditioner: Callable[..., Image.Image] | None = None

    @property
    def base(self):
        return self.engines["float32"]


@dataclass
class Cheap:
    """What a cheat computed: one image, or two (cheap, cheaper) that the search may blend,
    and its cost relative to the honest computation."""

    images: list[Image.Image]
    seconds: float
    evals: float
    """denoiser evaluations (batch-1 equivalents x pixel-area fraction) over the honest ones"""


@dataclass(frozen=True)
class Cheat:
    name: str
    make: Callable[[Context, GenerationParams, Image.Image | None], Cheap]
    applies: Callable[[GenerationParams], bool] = lambda p: True
    tolerated: bool = False
    """an honest variant by policy (the validator accepts this precision): must PASS"""
    note: str = ""


# ------------------------------------------------------------------ cheap computations
def _timed(fn: Callable[[], Image.Image]) -> tuple[Image.Image, float]:
    started = time.perf_counter()
    image = fn()
    return image, time.perf_counter() - started


def _cfg(params: GenerationParams) -> int:
    """Batch-1 denoiser calls per step: 2 with classifier-free guidance (Kolors g > 1)."""
    return 2 if params.model.startswith("kolors") and (params.guidance or 0) > 1 else 1


def _schedulers(engine, model: str) -> list:
    family = engine.family(model)
    pipes = family.pipelines().values() if hasattr(family, "pipelines") else [family.pipe]
    seen: dict[int, object] = {}
    for pipe in pipes:
        seen.setdefault(id(pipe.scheduler), pipe.scheduler)
    return list(seen.values())


@contextlib.contextmanager
def skipping(engine, model: str, skip: Sequence[int]) -> Iterator[None]:
    """A shorter schedule: the requested N-step schedule with the evaluations at the given
    indices left out (the sampler jumps from sigma[j-1] straight to sigma[j+1]). Skipping the
    last index jumps from sigma[N-2] to 0."""
    import torch

    patched = []
    for scheduler in _schedulers(engine, model):
        original = scheduler.set_timesteps

        @functools.wraps(original)  # pipelines inspect its signature (custom sigmas)
        def shortened(*args, _original=original, _s=scheduler, **kwargs):
            _original(*args, **kwargs)
            n = len(_s.timesteps)
            keep = [i for i in range(n) if i not in set(skip)]
            _s.timesteps = _s.timesteps[keep]
            _s.sigmas = torch.cat([_s.sigmas[keep], _s.sigmas[-1:]])
            if hasattr(_s, "num_inference_steps"):
                _s.num_inference_steps = len(keep)

        scheduler.set_timesteps = shortened
        patched.append(scheduler)
    try:
        yield
    finally:
        for scheduler in patched:
            del scheduler.set_timesteps  # the instance attribute: the class method is back


def _variant(ctx: Context, params: GenerationParams, **changes) -> GenerationParams:
    return ctx.base.resolve(params.model_copy(update=changes))


def fewer_steps(k: Callable[[int], int]) -> Callable:
    def make(ctx: Context, params: GenerationParams, image: Image.Image | None) -> Cheap:
        steps = k(params.steps or 1)
        img, t = _timed(lambda: ctx.base.generate(_variant(ctx, params, steps=steps), image))
        return Cheap([img], t, steps / params.steps)
    return make


def skip_steps(which: Callable[[int], list[int]]) -> Callable:
    def make(ctx: Context, params: GenerationParams, image: Image.Image | None) -> Cheap:
        skip = which(params.steps or 1)
        with skipping(ctx.base, params.model, skip):
            img, t = _timed(lambda: ctx.base.generate(params, image))
        return Cheap([img], t, (params.steps - len(skip)) / params.steps)
    return make


def skip_extrapolated(ctx: Context, params: GenerationParams,
                      image: Image.Image | None) -> Cheap:
    """Skip the last step and the last two: the two share every evaluation but one, so a
    cheater gets both for N-1 evaluations and extrapolates (the search picks the factor)."""
    n = params.steps or 1
    with skipping(ctx.base, params.model, [n - 1]):
        one, t1 = _timed(lambda: ctx.base.generate(params, image))
    with skipping(ctx.base, params.model, [n - 2, n - 1]):
        two, t2 = _timed(lambda: ctx.base.generate(params, image))
    return Cheap([one, two], max(t1, t2), (n - 1) / n)


def no_guidance(ctx: Context, params: GenerationParams, image: Image.Image | None) -> Cheap:
    img, t = _timed(lambda: ctx.base.generate(_variant(ctx, params, guidance=1.0), image))
    return Cheap([img], t, 0.5)


def no_guidance_last(ctx: Context, params: GenerationParams,
                     image: Image.Image | None) -> Cheap:
    """Guidance on all but the last step, whose unguided image is blended with the guided
    N-1-step image (both from one shared prefix in a real cheat: cost (2N-1)/2N)."""
    n = params.steps or 1
    with skipping(ctx.base, params.model, [n - 1]):
        guided, t1 = _timed(lambda: ctx.base.generate(params, image))
    unguided, t2 = _timed(lambda: ctx.base.generate(_variant(ctx, params, guidance=1.0), image))
    return Cheap([guided, unguided], t1, (2 * n - 1) / (2 * n))


def precision(dtype: str) -> Callable:
    def make(ctx: Context, params: GenerationParams, image: Image.Image | None) -> Cheap:
        img, t = _timed(lambda: ctx.engines[dtype].generate(params, image))
        return Cheap([img], t, 1.0)
    return make


def half_size(ctx: Context, params: GenerationParams, image: Image.Image | None) -> Cheap:
    w, h = params.size
    small_params = _variant(ctx, params, width=w // 2, height=h // 2)
    small_image = image.resize((w // 2, h // 2)) if image is not None else None
    small, t = _timed(lambda: ctx.base.generate(small_params, small_image))
    up = [small.resize((w, h), Image.Resampling.BICUBIC),
          small.resize((w, h), Image.Resampling.LANCZOS)]
    return Cheap(up, t, 0.25)


def _half_size_ok(params: GenerationParams) -> bool:
    return params.size[0] // 2 >= 32 and (params.size[0] // 2) % 16 == 0


def other_seed(ctx: Context, params: GenerationParams, image: Image.Image | None) -> Cheap:
    """One computation answering for several hotkeys: another challenge's seed."""
    img = ctx.base.generate(_variant(ctx, params, seed=(params.seed + 1) % 2**32), image)
    return Cheap([img], 0.0, 0.0)


def cached_prompt(ctx: Context, params: GenerationParams, image: Image.Image | None) -> Cheap:
    """A cached answer to another prompt (same seed, same conditioning image)."""
    other = PROMPTS[(PROMPTS.index(params.prompt) + 2) % len(PROMPTS)] \
        if params.prompt in PROMPTS else params.prompt + ", at night"
    img = ctx.base.generate(_variant(ctx, params, prompt=other), image)
    return Cheap([img], 0.0, 0.0)


def _kolors(params: GenerationParams) -> bool:
    return params.model.startswith("kolors") and (params.guidance or 0) > 1


CHEATS: dict[str, Cheat] = {c.name: c for c in (
    Cheat("fewer steps (N-1)", fewer_steps(lambda n: max(1, n - 1)),
          lambda p: (p.steps or 1) > 1),
    Cheat("half steps (N/2)", fewer_steps(lambda n: max(1, n // 2)),
          lambda p: (p.steps or 1) > 1),
    Cheat("skip last step (jump to 0)", skip_steps(lambda n: [n - 1]),
          lambda p: (p.steps or 1) > 1),
    Cheat("skip a middle step", skip_steps(lambda n: [n // 2]),
          lambda p: (p.steps or 1) > 2),
    Cheat("skip last, extrapolated", skip_extrapolated, lambda p: (p.steps or 1) > 2),
    Cheat("no CFG (guidance 1)", no_guidance, _kolors),
    Cheat("no CFG on last step, blended", no_guidance_last, _kolors),
    Cheat("half size, upscaled", half_size, _half_size_ok),
    Cheat("other seed's image", other_seed),
    Cheat("cached answer, other prompt", cached_prompt),
    Cheat("float16 (ref float32)", precision("float16"), tolerated=True,
          note="honest precision: must pass"),
    Cheat("bfloat16 (ref float32)", precision("bfloat16"), tolerated=True,
          note="honest precision: must pass"),
)}


# ------------------------------------------------------------------ post-processing search
def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(x, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


def postprocess(images: Sequence[np.ndarray], blend: float, amount: float, sigma: float,
                match: bool, noise: float, seed: int = 0) -> Image.Image:
    """images: float32 HxWx3 in [0, 255]. blend a: a*first + (1-a)*second (a > 1
    extrapolates); unsharp mask x + amount*(x - blur_sigma(x)); per-channel mean/std matched
    back to the first cheap image; gaussian noise of std `noise` (of 255)."""
    x = images[0] if len(images) == 1 else blend * images[0] + (1 - blend) * images[1]
    if amount:
        x = x + amount * (x - _blur(x, sigma))
    if match:
        ref = images[0]
        mu, sd = x.mean(axis=(0, 1)), x.std(axis=(0, 1)) + 1e-6
        x = (x - mu) / sd * ref.std(axis=(0, 1)) + ref.mean(axis=(0, 1))
    if noise:
        x = x + np.random.default_rng(seed).normal(0.0, noise, x.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


GRID = {
    "amount": (0.0, 0.25, 0.5, 1.0, 1.5, 2.5),
    "sigma": (0.5, 1.0),
    "match": (False, True),
    "noise": (0.0, 1.0, 2.0, 4.0),
}
BLENDS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


@dataclass
class Found:
    verdict: Verdict
    params: dict
    old_pass: bool


def search(reference: Image.Image, cheap: Cheap, verifier: Verifier, model: str,
           pipeline: str, refine: int = 24, seed: int = 0) -> tuple[Found, Found]:
    """Grid, then random refinement around the best. Returns (best for the old check:
    highest similarity; best for the hardened check: highest normalised margin
    min(sim - threshold, (psnr - floor) / 20))."""
    threshold, floor = verifier.threshold(model, pipeline), verifier.psnr_floor(model, pipeline)
    arrays = [np.asarray(i, dtype=np.float32) for i in cheap.images]
    blends = BLENDS if len(arrays) > 1 else (1.0,)
    rng = np.random.default_rng(seed)

    def margin(v: Verdict) -> float:
        return min(v.similarity - threshold, ((v.psnr or 0.0) - floor) / 20.0)

    best_old: Found | None = None
    best_new: Found | None = None

    def consider(p: dict) -> None:
        nonlocal best_old, best_new
        img = postprocess(arrays, seed=seed, **p)
        v = verifier.judge(model, reference, img, pipeline)
        found = Found(v, p, v.similarity >= threshold)
        if best_old is None or v.similarity > best_old.verdict.similarity:
            best_old = found
        if best_new is None or margin(v) > margin(best_new.verdict):
            best_new = found

    for blend, amount, sigma, match, noise in itertools.product(
            blends, GRID["amount"], GRID["sigma"], GRID["match"], GRID["noise"]):
        if amount == 0.0 and sigma != GRID["sigma"][0]:
            continue
        consider({"blend": blend, "amount": amount, "sigma": sigma, "match": match,
                  "noise": noise})
    for _ in range(refine):
        assert best_new is not None
        p = dict(best_new.params)
        p["blend"] = float(p["blend"] + (rng.normal(0, 0.15) if len(arrays) > 1 else 0.0))
        p["amount"] = float(max(0.0, p["amount"] + rng.normal(0, 0.2)))
        p["sigma"] = float(np.clip(p["sigma"] + rng.normal(0, 0.2), 0.3, 2.0))
        p["noise"] = float(max(0.0, p["noise"] + rng.normal(0, 0.5)))
        consider(p)
    assert best_old is not None and best_new is not None
    return best_old, best_new


# ------------------------------------------------------------------ the run
@dataclass
class Row:
    model: str
    pipeline: str
    cheat: Cheat
    evals: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    honest_seconds: list[float] = field(default_factory=list)
    old: list[Found] = field(default_factory=list)
    new: list[Found] = field(default_factory=list)
    raw_psnr: list[float] = field(default_factory=list)
    """PSNR of the cheap image itself (no post-processing) against the reference"""
    step_detect: list[float] = field(default_factory=list)
    """per request: probability that the validator's step-check plan catches the claimed
    chain (see `step_detection`)"""

    @property
    def saved(self) -> float:
        return 1.0 - float(np.mean(self.evals))

    @property
    def wall_saved(self) -> float:
        if not self.seconds or not any(self.seconds):
            return 1.0
        return 1.0 - float(np.sum(self.seconds) / np.sum(self.honest_seconds))

    @property
    def detection(self) -> float:
        """Fraction of requests on which the best variant for the hardened check fails it."""
        return float(np.mean([not f.verdict.passed for f in self.new]))

    @property
    def step_min(self) -> float:
        """Worst request's step-check detection per audited answer."""
        return min(self.step_detect) if self.step_detect else float("nan")

    @property
    def old_detection(self) -> float:
        return float(np.mean([not f.old_pass for f in self.old]))


# ------------------------------------------------------------------ the step check's view
@contextlib.contextmanager
def recording_states(ctx: Context) -> Iterator[list]:
    """While open, every `generate` of the cheat's engines also records its sampler states
    (first call first): the chain the cheater has in hand to claim."""
    recorded: list = []
    patched = []
    for engine in ctx.engines.values():
        def generate(params, image=None, _engine=engine):
            picture, states = _engine.generate_with_states(params, image)
            recorded.append(states)
            return picture

        engine.generate = generate
        patched.append(engine)
    try:
        yield recorded
    finally:
        for engine in patched:
            del engine.generate  # the instance attribute: the class method is back


def claimed_chain(states: list, n: int, shape: tuple) -> dict | None:
    """The N states a cheater claims from the M it computed: as they are when M = N, else
    resampled linearly onto the N-step grid (the adaptive choice: it matches the honest grid
    where the two coincide). None when the cheap chain has another shape (a smaller image):
    no claim of the request's shape exists without computing at full size."""
    import torch

    if not states or tuple(states[0].shape) != shape:
        return None
    m = len(states)
    if m == n:
        return {i + 1: s for i, s in enumerate(states)}
    ys = states  # y_1..y_M; the cheater interpolates between its neighbours
    chain = {}
    for i in range(1, n + 1):
        where = i * m / n
        lo = max(1, min(m, int(where)))
        hi = min(m, lo + 1)
        frac = min(1.0, max(0.0, where - lo))
        chain[i] = ((1 - frac) * ys[lo - 1] + frac * ys[hi - 1]).to(torch.float32)
    return chain


def step_detection(ctx: Context, params: GenerationParams, image: Image.Image | None,
                   states: list, answer: Image.Image) -> float:
    """Probability that one audit catches the claimed chain: the validator's plan is step 0
    plus `random_steps_needed(N)` others drawn after the answer; the decoded x_N must match
    the answer."""
    from math import comb

    from niche.validator.audit import random_steps_needed
    from niche.validator.steps import StepChecker

    n = int(params.steps or 1)
    chain = claimed_chain(states, n, tuple(ctx.base.state_shape(params)))
    if chain is None:
        return 1.0  # refused for its shape: every audit
    # declared bfloat16: the loosest tolerance, the cheater's best declaration (and what
    # honest half-precision miners get)
    verdict = StepChecker(ctx.base).check(params, image, chain, list(range(n)),
                                          dtype="bfloat16", answer=answer)
    failing = {k for k, e in verdict.errors.items() if not e <= verdict.thresholds[k]}
    if (not verdict.passed and not failing) or 0 in failing:
        return 1.0  # the decoded image or step 0: every plan sees it
    k = random_steps_needed(n)
    bad = len(failing)
    return 1.0 - comb(n - 1 - bad, k) / comb(n - 1, k) if n > 1 else 0.0


def run(ctx: Context, verifier: Verifier, model: str, pipeline: PipelineKind, requests: int,
        cheats: Sequence[str], refine: int) -> list[Row]:
    rows = {name: Row(model, pipeline.value, CHEATS[name]) for name in cheats}
    d = ctx.base.spec(model).defaults
    warm = ctx.base.resolve(GenerationParams(model=model, pipeline=pipeline, prompt="warm up",
                                             seed=1))
    warm_cond = (ctx.conditioner(model, pipeline, d.width, d.height, 1)
                 if pipeline.needs_image and ctx.conditioner is not None else None)
    for engine in ctx.engines.values():  # first calls pay one-off costs: keep them off the clock
        engine.generate(warm, warm_cond)
    for i in range(requests):
        cond = None
        if pipeline.needs_image and ctx.conditioner is not None:
            cond = ctx.conditioner(model, pipeline, d.width, d.height, 1000 + i)
        params = ctx.base.resolve(GenerationParams(
            model=model, pipeline=pipeline, prompt=PROMPTS[i % len(PROMPTS)], seed=777 + i))
        reference, honest_t = _timed(lambda p=params, c=cond: ctx.base.generate(p, c))
        for row in rows.values():
            if not row.cheat.applies(params):
                continue
            with recording_states(ctx) as recorded:
                cheap = row.cheat.make(ctx, params, cond)
            old, new = search(reference, cheap, verifier, model, pipeline.value, refine, i)
            row.step_detect.append(step_detection(ctx, params, cond, recorded[0],
                                                  cheap.images[0]) if recorded else 1.0)
            row.evals.append(cheap.evals)
            row.seconds.append(cheap.seconds)
            row.honest_seconds.append(honest_t)
            row.old.append(old)
            row.new.append(new)
            row.raw_psnr.append(compare(reference, cheap.images[0]).psnr)
    return [r for r in rows.values() if r.new]


def honest_floor(rows: Sequence[Row]) -> float:
    """Lowest PSNR of an honest (tolerated) variant in this run: the honest noise level."""
    values = [p for r in rows if r.cheat.tolerated for p in r.raw_psnr]
    return min(values) if values else float("inf")


def visible(row: Row, honest_db: float) -> bool:
    """Can the image alone show this cheat? Not when its own image (before any
    post-processing) is at least as close to the reference as an honest variant is: no
    image check can reject it without rejecting honest miners. The step check can."""
    return max(row.raw_psnr) < honest_db


def print_rows(model: str, pipeline: str, rows: Sequence[Row], verifier: Verifier) -> None:
    t, f = verifier.threshold(model, pipeline), verifier.psnr_floor(model, pipeline)
    print(f"\n== {model} / {pipeline}: threshold {t:.3f}, PSNR floor {f:.1f} dB "
          f"({len(rows[0].new) if rows else 0} requests; best over the post-processing search, "
          f"worst request shown)")
    honest_db = honest_floor(rows)
    print(f"{'cheat':<32}{'evals':>7}{'wall':>7}{'raw psnr':>9}{'old: sim':>9}{'psnr':>6}"
          f"{'pass':>6}{'new: sim':>9}{'psnr':>6}{'detect':>8}{'step':>6}  verdict")
    for r in rows:
        old = max(r.old, key=lambda x: x.verdict.similarity)
        new = max(r.new, key=lambda x: min(x.verdict.similarity - t,
                                           ((x.verdict.psnr or 0) - f) / 20))
        if r.cheat.tolerated:
            ok = r.detection == 0.0
            verdict = "passes (honest)" if ok else "REJECTED  <-- WRONG (honest variant)"
        elif not visible(r, honest_db):
            verdict = ("rejected" if r.detection == 1.0 else
                       f"passes on {1 - r.detection:.0%}: within honest noise "
                       f"({max(r.raw_psnr):.1f} >= {honest_db:.1f} dB), step check needed")
        else:
            ok = r.detection == 1.0 or r.saved < 0.05
            verdict = ("rejected" if r.detection == 1.0 else
                       f"passes on {1 - r.detection:.0%}" + ("" if ok else "  <-- HOLE"))
        print(f"{r.cheat.name:<32}{r.saved:>7.0%}{r.wall_saved:>7.0%}{max(r.raw_psnr):>9.1f}"
              f"{old.verdict.similarity:>9.3f}{old.verdict.psnr or 0:>6.1f}"
              f"{'yes' if old.old_pass else 'no':>6}{new.verdict.similarity:>9.3f}"
              f"{new.verdict.psnr or 0:>6.1f}{r.detection:>8.2f}{r.step_min:>6.2f}  {verdict}")


def detection_table(all_rows: Sequence[Row]) -> dict[str, float]:
    """Worst (lowest) detection probability of each cheat over the models and pipelines."""
    out: dict[str, float] = {}
    for r in all_rows:
        if not r.cheat.tolerated:
            out[r.cheat.name] = min(out.get(r.cheat.name, 1.0), r.detection)
    return out


def build_context(root: Path, models: Sequence[str], threads: int) -> Context:
    import torch

    from niche.models.engine import Engine

    engines = {dtype: Engine(models=list(models), model_root=root, dtype=dtype,
                             num_threads=threads)
               for dtype in ("float32", "float16", "bfloat16")}
    torch.set_num_threads(threads)
    from niche.validator.challenges import engine_conditioner

    make = engine_conditioner(engines["float32"])

    def conditioner(model, pipeline, w, h, seed):
        return make(model, pipeline, w, h, np.random.default_rng(seed))

    return Context(engines, conditioner)


def summary(rows: Sequence[Row]) -> dict[str, tuple[float, float]]:
    """cheat -> (compute saved, detection probability), the worst case over models and
    pipelines (lowest detection; its smallest saving): what bench/incentives.py takes."""
    out: dict[str, tuple[float, float]] = {}
    for r in rows:
        if r.cheat.tolerated:
            continue
        saved, q = out.get(r.cheat.name, (1.0, 1.0))
        out[r.cheat.name] = (min(saved, r.saved), min(q, r.detection))
    return out


LAST_RUN: list[Row] = []
"""The rows of the latest main() call in this process (bench/incentives.py --from-adversary)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--tiny", action="store_true", default=True)
    src.add_argument("--model-path", type=Path, default=None)
    parser.add_argument("--quick", action="store_true",
                        help="2 requests, flux txt2img + kolors txt2img, short refinement")
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["flux-schnell", "kolors"])
    parser.add_argument("--pipelines", nargs="+", default=None,
                        help="kolors pipelines (default: txt2img controlnet-canny; quick: txt2img)")
    parser.add_argument("--cheats", nargs="+", default=None, choices=list(CHEATS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if args.model_path:
        root = args.model_path
    else:
        from niche.devnet.tiny import ensure_tiny_models

        root = ensure_tiny_models()
    requests = 2 if args.quick else args.requests
    refine = 8 if args.quick else 24
    kolors_pipes = args.pipelines or (["txt2img"] if args.quick
                                      else ["txt2img", "controlnet-canny"])
    started = time.time()
    ctx = build_context(root, args.models, args.threads)
    verifier = Verifier(ctx.base, VerifyConfig())
    print(f"adversary: reference float32, {args.threads} threads, model root {root}; "
          f"evals = denoiser evaluations saved, wall = wall time saved (cheap vs honest)")
    all_rows: list[Row] = []
    for model in args.models:
        pipes = [PipelineKind(p) for p in kolors_pipes] if model == "kolors" else [
            PipelineKind.TXT2IMG]
        for pipeline in pipes:
            rows = run(ctx, verifier, model, pipeline, requests, args.cheats or list(CHEATS),
                       refine)
            print_rows(model, pipeline.value, rows, verifier)
            all_rows.extend(rows)
    LAST_RUN[:] = all_rows
    honest_db = {(r.model, r.pipeline): honest_floor([x for x in all_rows if
                                                      (x.model, x.pipeline) == (r.model,
                                                                                r.pipeline)])
                 for r in all_rows}
    holes = [r for r in all_rows if not r.cheat.tolerated and r.saved >= 0.05
             and r.detection < 1.0 and visible(r, honest_db[(r.model, r.pipeline)])]
    invisible = sorted({f"{r.model}/{r.pipeline}: {r.cheat.name}" for r in all_rows
                        if not r.cheat.tolerated and r.detection < 1.0
                        and not visible(r, honest_db[(r.model, r.pipeline)])})
    wrong = [r for r in all_rows if r.cheat.tolerated and r.detection > 0.0]
    print("\ndetection probability per audited answer (worst over models/pipelines):")
    for name, p in detection_table(all_rows).items():
        print(f"  {name:<32}{p:.2f}")
    if invisible:
        print("within honest noise, so not rejectable from the image (the step check's job): "
              + "; ".join(invisible))
    step_holes = [r for r in all_rows if not r.cheat.tolerated and r.saved >= 0.05
                  and not r.step_min >= 1 / 3]
    step_wrong = [r for r in all_rows if r.cheat.tolerated and r.step_detect
                  and max(r.step_detect) > 0.0]
    print("\nstep-check detection per audited answer (worst request; plan: step 0 + "
          "random_steps_needed(N), the claim declared bfloat16):")
    for r in all_rows:
        print(f"  {r.model}/{r.pipeline}: {r.cheat.name:<32}{r.step_min:.2f}")
    print(f"\nimage-side done-when: {len(holes)} image-visible cheat(s) saving >= 5% not "
          f"always rejected, {len(wrong)} honest variant(s) rejected")
    print(f"step-side done-when: {len(step_holes)} cheat(s) saving >= 5% caught on < 1/3 of "
          f"audits, {len(step_wrong)} honest variant(s) failed  ({time.time() - started:.0f}s)")
    return 0 if not (holes or wrong or step_holes or step_wrong) else 1


if __name__ == "__main__":
    sys.exit(main())
