"""Encode a fixed set of procedural samples once (latent posteriors, prompt states, control
maps, image features), so each diffusion training step runs only the model being trained.

On two busy cores the frozen VAE and text encoders cost more per step than the tiny denoisers
themselves; caching them makes training several times faster and changes nothing about the
objective (latents are still sampled from the posterior with the run's generator each step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch

from niche.devnet.training import data
from niche.devnet.training.common import to_tensor

EMPTY_PROMPT_RATE = 0.1


@dataclass
class Encoded:
    scenes: list[data.Scene]
    images: np.ndarray  # (N, H, W, 3) uint8
    mean: torch.Tensor  # latent posterior mean, unscaled (N, C, h, w)
    std: torch.Tensor
    embeds: torch.Tensor  # prompt states (N, L, D)
    pooled: torch.Tensor  # (N, D)
    empty_embeds: torch.Tensor  # states of "" (1, L, D)
    empty_pooled: torch.Tensor  # (1, D)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.scenes)

    def latents(self, idx: np.ndarray, gen: torch.Generator, shift: float,
                scale: float) -> torch.Tensor:
        i = torch.from_numpy(idx)
        eps = torch.randn(self.mean[i].shape, generator=gen)
        return (self.mean[i] + self.std[i] * eps - shift) * scale

    def text(self, idx: np.ndarray, rng: np.random.Generator | None = None,
             empty_rate: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.from_numpy(idx)
        embeds, pooled = self.embeds[i].clone(), self.pooled[i].clone()
        if rng is not None and empty_rate > 0:
            drop = torch.from_numpy(rng.random(len(idx)) < empty_rate)
            embeds[drop] = self.empty_embeds
            pooled[drop] = self.empty_pooled
        return embeds, pooled


@torch.no_grad()
def encode(pipe, family: str, *, n: int, seed: int, size: int, max_sequence_length: int,
           chunk: int = 64) -> Encoded:
    """``family`` is "flux" or "kolors" (which encode_prompt to call)."""
    rng = np.random.default_rng(seed)
    scenes, prompts, images = data.batch(rng, n, size)
    means, stds, embeds, pooled = [], [], [], []
    for start in range(0, n, chunk):
        post = pipe.vae.encode(to_tensor(images[start:start + chunk])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
        e, p = _prompt(pipe, family, prompts[start:start + chunk], max_sequence_length)
        embeds.append(e)
        pooled.append(p)
    ee, ep = _prompt(pipe, family, [""], max_sequence_length)
    return Encoded(scenes, images, torch.cat(means), torch.cat(stds), torch.cat(embeds),
                   torch.cat(pooled), ee, ep)


def _prompt(pipe, family: str, prompts: list[str], msl: int):
    if family == "flux":
        e, p, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device="cpu",
                                     max_sequence_length=msl)
        return e, p
    e, _, p, _ = pipe.encode_prompt(prompt=prompts, device="cpu",
                                    do_classifier_free_guidance=False, max_sequence_length=msl)
    return e, p


@torch.no_grad()
def add_control(ds: Encoded, key: str, control: Callable[[PIL.Image.Image, int, int],
                PIL.Image.Image]) -> None:
    """Control maps exactly as the engine makes them, stored as uint8 (N, 3, H, W)."""
    h, w = ds.images.shape[1:3]
    maps = [np.asarray(control(PIL.Image.fromarray(im), w, h).convert("RGB")) for im in ds.images]
    ds.extra[key] = torch.from_numpy(np.stack(maps)).permute(0, 3, 1, 2).contiguous()
