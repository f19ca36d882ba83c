"""Shared training plumbing: seeded data streams, the loop with its progress bar, timing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) -> float (n, 3, h, w) in [-1, 1], as the VAE sees pixels."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass
class LoopResult:
    steps: int
    seconds: float
    final_loss: float


def run_loop(
    name: str,
    params: Iterable[torch.nn.Parameter],
    step_fn: Callable[[int], torch.Tensor],
    steps: int,
    lr: float,
    seconds: float | None = None,
    warmup: int = 50,
) -> LoopResult:
    """AdamW + linear warm-up + cosine decay; stops at ``steps`` or after ``seconds``.

    A time cap keeps ``train-tiny --minutes`` honest on busy machines; the step count
    (not the time) is what makes runs repeatable, so the cap is only a guard.
    """
    from tqdm import tqdm

    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))

    def schedule(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + np.cos(np.pi * (i - warmup) / max(1, steps - warmup))) * 0.95 + 0.05

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    start = time.monotonic()
    ema = None
    bar = tqdm(range(steps), desc=name, dynamic_ncols=True, mininterval=1.0)
    i = 0
    for i in bar:
        loss = step_fn(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        bar.set_postfix(loss=f"{ema:.4f}")
        if seconds is not None and time.monotonic() - start > seconds:
            break
    bar.close()
    return LoopResult(steps=i + 1, seconds=time.monotonic() - start, final_loss=float(ema or 0.0))
