"""Train a tiny AutoencoderKL as an actual autoencoder.

A random VAE maps every latent to noise, so a diffusion model on top of it cannot
draw anything a person (or a PSNR) would recognise. A few hundred steps of
reconstruction + a small KL make the latent space meaningful; a penalty on the latent
statistics keeps ``(z - shift_factor) * scaling_factor`` (tiny.py's config values) near unit
variance, as real checkpoints' factors do, so the diffusion model sees standard latents.
"""

from __future__ import annotations

import numpy as np
import torch

from niche.devnet.training import data
from niche.devnet.training.common import LoopResult, run_loop, to_tensor


def train_vae(
    vae, *, seed: int, steps: int, batch_size: int = 16, size: int = 64,
    lr: float = 2e-3, seconds: float | None = None, low_res: float = 0.85,
) -> LoopResult:
    """Reconstruction (MSE + L1) + small KL, plus a penalty that keeps the scaled latents
    ``(z - shift_factor) * scaling_factor`` near zero mean and unit variance: the tiny
    checkpoint's config (and so the pipeline's scaling) stays as tiny.py wrote it."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    scale = float(vae.config.scaling_factor)
    vae.train()

    def step(i: int) -> torch.Tensor:
        # convolutions transfer across resolutions: most steps at half size cost a quarter
        res = size // 2 if i < low_res * steps else size
        _, _, images = data.batch(rng, batch_size, res)
        x = to_tensor(images)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=gen)
        recon = vae.decode(z).sample
        rec = torch.nn.functional.mse_loss(recon, x) + 0.5 * (recon - x).abs().mean()
        kl = posterior.kl().mean() / z[0].numel()
        u = (posterior.mean - shift) * scale
        norm = u.mean() ** 2 + (u.std() - 1.0) ** 2
        return rec + 1e-3 * kl + 0.05 * norm

    result = run_loop("vae", vae.parameters(), step, steps, lr, seconds)
    vae.eval()
    return result


@torch.no_grad()
def latent_stats(vae, *, seed: int, size: int = 64, n: int = 128) -> tuple[float, float]:
    """Mean and std of the scaled latents on fresh scenes (should be ~0 and ~1)."""
    rng = np.random.default_rng(seed)
    _, _, images = data.batch(rng, n, size)
    z = vae.encode(to_tensor(images)).latent_dist.mean
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    u = (z - shift) * float(vae.config.scaling_factor)
    return float(u.mean()), float(u.std())


@torch.no_grad()
def reconstruction_psnr(vae, *, seed: int, size: int = 64, n: int = 32) -> float:
    rng = np.random.default_rng(seed)
    _, _, images = data.batch(rng, n, size)
    x = to_tensor(images)
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = float(((recon - x) / 2).pow(2).mean())
    return 10 * float(np.log10(1.0 / max(mse, 1e-12)))


@torch.no_grad()
def transplant(src, dst) -> None:
    """Give ``dst`` (a VAE with 1x1 quant convs, e.g. Kolors') the trained ``src`` (e.g. FLUX's,
    same blocks, no quant convs), re-expressing its latents for ``dst``'s config factors.

    dst latents z' = a z + b are chosen so (z' - shift') * scale' == (z - shift) * scale; the
    affine map lives in quant_conv (moments: mean * a + b, logvar + 2 ln a) and its inverse in
    post_quant_conv. Both are 1x1 convolutions, so the reparametrisation is exact: training one
    tiny VAE serves both models (half the CPU time)."""
    import math

    state = {k: v for k, v in src.state_dict().items()
             if not k.startswith(("quant_conv.", "post_quant_conv."))}
    missing, unexpected = dst.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("quant_conv.", "post_quant_conv."))
                                  for k in missing), (missing, unexpected)
    s_shift = float(getattr(src.config, "shift_factor", None) or 0.0)
    d_shift = float(getattr(dst.config, "shift_factor", None) or 0.0)
    a = float(src.config.scaling_factor) / float(dst.config.scaling_factor)
    b = d_shift - s_shift * a
    c = dst.config.latent_channels
    eye = torch.eye(c)
    qw = torch.zeros(2 * c, 2 * c)
    qw[:c, :c] = a * eye
    qw[c:, c:] = eye
    dst.quant_conv.weight.copy_(qw[:, :, None, None])
    dst.quant_conv.bias.copy_(torch.cat([torch.full((c,), b), torch.full((c,), 2 * math.log(a))]))
    dst.post_quant_conv.weight.copy_((eye / a)[:, :, None, None])
    dst.post_quant_conv.bias.copy_(torch.full((c,), -b / a))
