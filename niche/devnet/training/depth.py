"""Train the tiny depth estimator to predict the procedural scenes' depth maps.

ControlNet-depth sees what the engine's depth model makes of a photo; with random weights that
is noise unrelated to the scene, so the ControlNet would learn nothing useful. A short
regression onto the rendered depth (near = bright, the relative-depth convention) fixes that.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

from niche.devnet.training import data
from niche.devnet.training.common import LoopResult, run_loop


def train_depth(estimator, *, seed: int, steps: int, batch_size: int = 32, size: int = 64,
                lr: float = 2e-3, seconds: float | None = None) -> LoopResult:
    """``estimator`` is niche.models.conditioning.DepthEstimator (processor + model)."""
    rng = np.random.default_rng(seed)
    model = estimator.model
    model.train()

    def step(_: int) -> torch.Tensor:
        scenes, _prompts, images = data.batch(rng, batch_size, size)
        pixels = estimator.processor(images=[PIL.Image.fromarray(im) for im in images],
                                     return_tensors="pt")["pixel_values"]
        pred = model(pixel_values=pixels).predicted_depth
        h, w = pred.shape[-2:]
        target = np.stack([
            np.asarray(PIL.Image.fromarray(data.render_depth(s, size)[..., 0]).resize(
                (w, h), PIL.Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
            for s in scenes])
        return torch.nn.functional.mse_loss(pred, torch.from_numpy(target))

    result = run_loop("depth", model.parameters(), step, steps, lr, seconds)
    model.eval()
    return result
