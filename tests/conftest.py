"""Shared fixtures. Heavy ones are session-scoped: the tiny checkpoints are built once per
machine (cached in ~/.cache/niche/tiny-v1 or $NICHE_TINY_DIR) and loaded once per session."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_root() -> Path:
    """Root of the tiny real-architecture checkpoints: tiny_root/<model>/ per model."""
    from niche.devnet.tiny import ensure_tiny_models

    return ensure_tiny_models()


@pytest.fixture(scope="session")
def tiny_engine(tiny_root):
    """An Engine serving every model and pipeline from the tiny checkpoints, on CPU."""
    from niche.models.engine import Engine

    return Engine(models=["flux-schnell", "kolors"], model_root=tiny_root, device="cpu")


@pytest.fixture(scope="session")
def tiny_engine_bf16(tiny_root):
    """FLUX and Kolors text-to-image in bfloat16 on CPU (same thread count as tiny_engine):
    an honest half-precision miner for the step check."""
    from niche.models.engine import Engine

    return Engine(models=["flux-schnell", "kolors"], model_root=tiny_root, device="cpu",
                  dtype="bfloat16", pipelines={"kolors": ["txt2img"]})
