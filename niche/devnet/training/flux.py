"""Rectified-flow training of a tiny FLUX transformer on procedural scenes.

Same objective as FLUX itself: x_t = (1 - t) x0 + t eps, the transformer predicts
v = eps - x0 at timestep t (the pipeline feeds sigma = t), and FlowMatchEuler steps
along v. Text encoders and VAE stay frozen; only the transformer learns, so the prompt
embeddings it learns to read are the ones inference will produce.
"""

from __future__ import annotations

import numpy as np
import torch

from niche.devnet.training.cache import Encoded
from niche.devnet.training.common import LoopResult, run_loop


def train_flux(
    pipe, ds: Encoded, *, seed: int, steps: int, batch_size: int = 16,
    lr: float = 1e-3, seconds: float | None = None,
) -> LoopResult:
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    tr = pipe.transformer
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval().requires_grad_(False)
    tr.train()
    shift = float(pipe.vae.config.shift_factor or 0.0)
    scale = float(pipe.vae.config.scaling_factor)
    _, c, h, w = ds.mean.shape
    img_ids = pipe._prepare_latent_image_ids(batch_size, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(ds.embeds.shape[1], 3)

    def step(_: int) -> torch.Tensor:
        idx = rng.integers(0, len(ds), batch_size)
        embeds, pooled = ds.text(idx)
        z = ds.latents(idx, gen, shift, scale)
        x0 = pipe._pack_latents(z, batch_size, c, h, w)
        noise = torch.randn(x0.shape, generator=gen)
        # uniform t with extra mass near t=1: the first step decides the layout
        t = torch.rand(batch_size, generator=gen)
        t = torch.where(torch.rand(batch_size, generator=gen) < 0.2, 1.0 - 0.1 * t, t)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        v = tr(
            hidden_states=xt, timestep=t, guidance=None, pooled_projections=pooled,
            encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]
        return torch.nn.functional.mse_loss(v, noise - x0)

    result = run_loop("flux", tr.parameters(), step, steps, lr, seconds)
    tr.eval()
    return result
