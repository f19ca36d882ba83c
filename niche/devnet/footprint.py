"""Weight memory accounting: unique tensor storage across modules, so shared weights count once.

Used by the tests (the Kolors pipelines must share one UNet/ChatGLM/VAE) and bench/engine.py.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


def tensors(modules: Iterable[torch.nn.Module]) -> Iterable[torch.Tensor]:
    for module in modules:
        yield from module.parameters()
        yield from module.buffers()


def unique_bytes(modules: Iterable[torch.nn.Module]) -> int:
    """Bytes of distinct storages behind the modules' parameters and buffers."""
    seen: dict[int, int] = {}
    for t in tensors(modules):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def pipeline_modules(pipe) -> list[torch.nn.Module]:
    return [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
