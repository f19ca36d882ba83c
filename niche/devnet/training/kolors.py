"""Diffusion training of the tiny Kolors UNet and its ControlNets, epsilon or v prediction.

Kolors is an SDXL-style latent diffusion model: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
on the scheduler's own beta schedule (1100 steps, scaled_linear), the UNet predicts eps (real
Kolors) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (the tiny one: tiny.kolors_scheduler says
why), whichever the scheduler's ``prediction_type`` names, from x_t, the ChatGLM states
(penultimate layer) and the SDXL micro-conditioning (pooled text + size/crop time ids).
EulerDiscrete's scaled input is exactly this x_t, so a UNet trained here is what the pipeline
expects. One prompt in ten is empty so classifier-free guidance (the pipeline's negative prompt
is "") has a meaningful unconditional branch. The loss is weighted towards high noise
(``loss_weights``), where the prompt decides the picture; the weights are stated in epsilon
terms and converted, so both parametrisations learn the same objective.

ControlNets are trained with the UNet frozen, on the exact control maps the engine computes at
inference (niche.models.conditioning: canny, or the tiny depth model), half of them with an
empty prompt, on a lightly high-noise-weighted loss (``CONTROL_WEIGHT_CAP``).
"""

from __future__ import annotations

import numpy as np
import torch

from niche.devnet.training.cache import Encoded
from niche.devnet.training.common import LoopResult, run_loop

EMPTY_PROMPT_RATE = 0.1
#: as in the ControlNet paper: half the prompts empty, so the control image has to carry the
#: layout (measured on canny, 2000 steps: other control image 20-26 dB at 0.5)
CONTROL_EMPTY_PROMPT_RATE = 0.5
#: the UNet's loss weighting, see loss_weights
UNET_WEIGHT_CAP = 100.0
#: the ControlNets' (epsilon terms): mostly the plain loss, where edges pay off at low noise,
#: up to 10x at high noise where the layout is decided. Measured with the v UNet (canny, other
#: control image on "a white triangle in the left", the prompt naming the old layout): plain
#: loss 28.7 dB, 4000 steps; cap 10: 17.1 dB there, 21.5 dB the worst of the three requests
CONTROL_WEIGHT_CAP = 10.0


def noisy(pipe, ds: Encoded, idx: np.ndarray, gen: torch.Generator):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at uniformly drawn training timesteps;
    returns x_t, t and the target of the scheduler's parametrisation (eps, or
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0)."""
    x0 = ds.latents(idx, gen, 0.0, float(pipe.vae.config.scaling_factor))
    abar = pipe.scheduler.alphas_cumprod.to(torch.float32)
    t = torch.randint(0, len(abar), (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    a = abar[t].sqrt()[:, None, None, None]
    s = (1 - abar[t]).sqrt()[:, None, None, None]
    target = a * noise - s * x0 if predicts_v(pipe.scheduler) else noise
    return a * x0 + s * noise, t, target


def predicts_v(scheduler) -> bool:
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"training supports epsilon and v_prediction, not {kind!r}")
    return kind == "v_prediction"


def loss_weights(alphas_cumprod: torch.Tensor, cap: float | None,
                 v_prediction: bool = False) -> torch.Tensor:
    """Per-timestep weights of the MSE of the network's own output (eps or v), normalised to
    mean 1, such that in epsilon terms the weight is 1/abar_t capped at ``cap`` (``None``: the
    plain epsilon loss). Since v - v_hat = (eps - eps_hat) / sqrt(abar_t), the same objective
    in v terms is that weight times abar_t: the parametrisation changes how the network's
    rounding reaches the image, not what it learns.

    Why 1/abar_t: at high noise the prompt-dependent part of the epsilon target is scaled by
    the SNR, so the plain loss gives it almost no share, and 4000 steps learned a UNet that
    ignored its prompt (x0 error at t=900 with the right vs a shuffled prompt: 0.857 vs 0.916;
    with ``cap=100``: 0.465 vs 0.541, and the contact sheet draws the prompt's colours).
    """
    abar = alphas_cumprod.to(torch.float32)
    w = (1 / abar).clamp(max=cap) if cap is not None else torch.ones_like(abar)
    if v_prediction:
        w = w * abar
    return w / w.mean()


def scheduler_loss_weights(scheduler, cap: float | None) -> torch.Tensor:
    """``loss_weights`` for the parametrisation this scheduler (and so ``noisy``) uses."""
    return loss_weights(scheduler.alphas_cumprod, cap, predicts_v(scheduler))


def weighted_mse(eps: torch.Tensor, noise: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``w``: one weight per sample (``loss_weights(...)[t]``)."""
    return (w[:, None, None, None] * (eps - noise) ** 2).mean()


def time_ids(n: int, size: int) -> torch.Tensor:
    """SDXL micro-conditioning as the pipeline builds it: original size, crop, target size."""
    return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(n, 1)


def _freeze(pipe) -> None:
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.eval().requires_grad_(False)


def train_unet(
    pipe, ds: Encoded, *, seed: int, steps: int, batch_size: int = 16, lr: float = 1e-3,
    seconds: float | None = None,
) -> LoopResult:
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    _freeze(pipe)
    unet = pipe.unet
    unet.requires_grad_(True).train()
    ids = time_ids(batch_size, ds.images.shape[1])
    weights = scheduler_loss_weights(pipe.scheduler, UNET_WEIGHT_CAP)

    def step(_: int) -> torch.Tensor:
        idx = rng.integers(0, len(ds), batch_size)
        embeds, pooled = ds.text(idx, rng, EMPTY_PROMPT_RATE)
        xt, t, target = noisy(pipe, ds, idx, gen)
        out = unet(xt, t, encoder_hidden_states=embeds,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        return weighted_mse(out, target, weights[t])

    result = run_loop("kolors-unet", unet.parameters(), step, steps, lr, seconds)
    unet.eval().requires_grad_(False)
    return result


@torch.no_grad()
def _balance_control(pipe, controlnet, ds: Encoded, key: str, gen: torch.Generator) -> None:
    """Scale the control embedding's last conv so the image-dependent part of the control
    enters as strongly as the noisy latent does, and remove its constant part. At tiny.py's
    random init the embedding is mostly bias, and a brief training run then learns residuals
    that ignore the control image (measured: other control image 45-58 dB)."""
    idx = np.arange(min(64, len(ds)))
    cond = ds.extra[key][torch.from_numpy(idx)].float() / 255.0
    xt, _, _ = noisy(pipe, ds, idx, gen)
    emb = controlnet.controlnet_cond_embedding
    blank = emb(torch.zeros_like(cond))
    ratio = float(controlnet.conv_in(xt).std()) / max(float((emb(cond) - blank).std()), 1e-6)
    emb.conv_out.weight.mul_(ratio)
    emb.conv_out.bias.mul_(ratio)
    emb.conv_out.bias.sub_(emb(torch.zeros_like(cond)).mean(dim=(0, 2, 3)))
    # ControlNet training starts from zero output convolutions (the UNet unchanged): tiny.py's
    # random ones add large residuals that do not depend on the control image
    for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        conv.weight.zero_()
        conv.bias.zero_()


def train_controlnet(
    pipe, controlnet, ds: Encoded, key: str, *, seed: int, steps: int,
    batch_size: int = 16, lr: float = 2e-3, seconds: float | None = None,
) -> LoopResult:
    """``ds.extra[key]``: the engine's own control maps (uint8) for each sample."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    _freeze(pipe)
    unet = pipe.unet
    controlnet.requires_grad_(True).train()
    ids = time_ids(batch_size, ds.images.shape[1])
    _balance_control(pipe, controlnet, ds, key, gen)
    weights = scheduler_loss_weights(pipe.scheduler, CONTROL_WEIGHT_CAP)

    def step(_: int) -> torch.Tensor:
        idx = rng.integers(0, len(ds), batch_size)
        cond = ds.extra[key][torch.from_numpy(idx)].float() / 255.0
        embeds, pooled = ds.text(idx, rng, CONTROL_EMPTY_PROMPT_RATE)
        xt, t, target = noisy(pipe, ds, idx, gen)
        added = {"text_embeds": pooled, "time_ids": ids}
        states = embeds
        if getattr(controlnet, "encoder_hid_proj", None) is not None:
            states = controlnet.encoder_hid_proj(embeds)
        down, mid = controlnet(xt, t, encoder_hidden_states=states, controlnet_cond=cond,
                               conditioning_scale=1.0, added_cond_kwargs=added,
                               return_dict=False)
        out = unet(xt, t, encoder_hidden_states=embeds, added_cond_kwargs=added,
                   down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        # not the UNet's cap of 100: with it, on the epsilon UNet, the ControlNet learned a
        # constant residual (canny, other control image 34-50 dB; plain loss 20-26 dB)
        return weighted_mse(out, target, weights[t])

    result = run_loop(key, controlnet.parameters(), step, steps, lr, seconds)
    controlnet.eval()
    return result
