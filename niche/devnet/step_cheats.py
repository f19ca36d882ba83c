"""Chains of sampler states a cheating miner could claim, for the step check's tests and its
calibration (bench/calibrate_steps.py). Each returns {i: x_i} for i = 1..N of the request's
N-step schedule, as an honest `Engine.generate_with_states` answer would.

- honest: the engine's own chain (run it on a bfloat16 / float16 engine, or at another
  thread count, for honest numeric noise);
- other_prompt / other_seed: the chain of another request;
- fewer_steps: a shorter schedule (half the steps) mapped onto the N-step grid, its states
  duplicated (x_i = y_round(i M / N)) or resampled (linear between neighbouring y);
- no_cfg (Kolors): guidance 1 (one unguided UNet call per step) while claiming the request's;
- reused_prediction: the denoiser's output of step k reused for step k + 1 on alternate steps.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import PIL.Image
import torch

from niche.models.engine import Engine
from niche.protocol import GenerationParams

Chain = dict[int, torch.Tensor]


def as_chain(states: list[torch.Tensor]) -> Chain:
    return {i + 1: s for i, s in enumerate(states)}


def honest(engine: Engine, params: GenerationParams, image: PIL.Image.Image | None) -> Chain:
    return as_chain(engine.generate_with_states(params, image)[1])


def other_prompt(engine: Engine, params: GenerationParams, image: PIL.Image.Image | None,
                 prompt: str = "a dragon flying over a castle at night") -> Chain:
    return honest(engine, params.model_copy(update={"prompt": prompt}), image)


def other_seed(engine: Engine, params: GenerationParams, image: PIL.Image.Image | None) -> Chain:
    return honest(engine, params.model_copy(update={"seed": params.seed + 1}), image)


def fewer_steps(engine: Engine, params: GenerationParams, image: PIL.Image.Image | None,
                resample: bool = False) -> Chain:
    full = engine.resolve(params)
    n = int(full.steps or 0)
    m = max(1, n // 2)
    short = full.model_copy(update={"steps": m})
    ys = [engine.initial_state(short), *engine.generate_with_states(short, image)[1]]
    chain: Chain = {}
    for i in range(1, n + 1):
        where = i * m / n
        if resample:
            lo, frac = math.floor(where), where - math.floor(where)
            hi = min(lo + 1, m)
            chain[i] = ((1 - frac) * ys[lo] + frac * ys[hi]).to(torch.float32)
        else:
            chain[i] = ys[max(1, round(where))].clone()
    return chain


def no_cfg(engine: Engine, params: GenerationParams, image: PIL.Image.Image | None) -> Chain:
    return honest(engine, params.model_copy(update={"guidance": 1.0}), image)


def denoiser(engine: Engine, model: str) -> torch.nn.Module:
    family = engine.family(model)
    pipe = getattr(family, "pipe", None)
    if pipe is not None:
        return pipe.transformer
    return family.base.unet  # type: ignore[attr-defined]


@contextmanager
def reusing_predictions(module: torch.nn.Module) -> Iterator[None]:
    """The module's output of every even call is returned again by the next (odd) call."""
    calls = {"n": 0}
    last: list = [None]

    def hook(mod, args, output):
        i = calls["n"]
        calls["n"] += 1
        if i % 2 == 1 and last[0] is not None:
            return last[0]
        last[0] = output
        return None

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def reused_prediction(engine: Engine, params: GenerationParams,
                      image: PIL.Image.Image | None) -> Chain:
    with reusing_predictions(denoiser(engine, params.model)):
        return honest(engine, params, image)
