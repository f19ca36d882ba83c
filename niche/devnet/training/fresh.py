"""Untrained tiny checkpoints, built by niche.devnet.tiny with its trained-weights hook off,
and the writer of trained components into the hook's layout."""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def fresh_checkpoints(models: list[str], weights_dir: Path | None = None):
    """Yield a folder with tiny checkpoints built by tiny.py: freshly initialised (no trained
    weights loaded) so a full training run always starts from the same deterministic init,
    or with the trained weights of ``weights_dir`` (continuing with some stages only)."""
    from niche.devnet import tiny

    saved = tiny.TRAINED_WEIGHTS_DIR
    with tempfile.TemporaryDirectory(prefix="niche-train-") as tmp:
        tiny.TRAINED_WEIGHTS_DIR = Path(weights_dir) if weights_dir else Path(tmp) / "none"
        try:
            tiny.build_tiny_models(Path(tmp) / "root", models)
        finally:
            tiny.TRAINED_WEIGHTS_DIR = saved
        yield Path(tmp) / "root"


def save_component(state: dict[str, torch.Tensor] | torch.nn.Module, out: Path, model: str,
                   component: str) -> Path:
    """Write <out>/<model>/<component>.safetensors (float32; tied tensors stored twice)."""
    from safetensors.torch import save_file

    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    tensors = {k: v.detach().to(torch.float32).clone().contiguous() for k, v in state.items()}
    path = Path(out) / model / f"{component}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def write_manifest(out: Path, record: dict) -> None:
    (Path(out) / "manifest.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
