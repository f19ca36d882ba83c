"""Out of GPU memory: one log line naming the memory mode to try, never a traceback loop.

The spec's memory modes trade speed for memory in this order: `gpu` (every network on the
GPU), `model-offload` (one network at a time), `sequential-offload` (one layer at a time).
"""
from __future__ import annotations

import torch

from niche.models.spec import MEMORY_MODES


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


def next_memory_mode(current: str) -> str | None:
    """The mode after `current` that needs less memory (None: already the smallest)."""
    try:
        index = MEMORY_MODES.index(current)
    except ValueError:
        return None
    return MEMORY_MODES[index + 1] if index + 1 < len(MEMORY_MODES) else None


def memory_advice(model: str, current: str) -> str:
    """`out of GPU memory running kolors in memory mode gpu: try --memory-mode ...`."""
    smaller = next_memory_mode(current)
    tip = (f"try --memory-mode {smaller}" if smaller else
           "it is already the smallest mode: serve fewer models or use a bigger GPU")
    return f"out of GPU memory running {model} in memory mode {current}: {tip}"


def release_cached_memory() -> None:
    """Give the allocator's cache back after an OOM so the next request can fit."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
