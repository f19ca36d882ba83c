"""The Kolors UNet's loss weighting (niche.models.training.kolors.loss_weights): v-prediction's
1/abar_t, capped, mean 1, so high-noise steps, where the prompt decides the picture, count."""
from __future__ import annotations

import torch

from niche.models.training.kolors import loss_weights, weighted_mse


def test_weights_grow_with_noise_up_to_the_cap_and_average_one():
    from diffusers import EulerDiscreteScheduler

    abar = EulerDiscreteScheduler(num_train_timesteps=1100, beta_start=0.00085, beta_end=0.014,
                                  beta_schedule="scaled_linear").alphas_cumprod
    w = loss_weights(abar, cap=100.0)
    assert torch.isclose(w.mean(), torch.tensor(1.0))
    assert torch.all(w[1:] >= w[:-1])  # more noise, more weight
    raw = (1 / abar).clamp(max=100.0)
    assert torch.allclose(w / w[0], raw / raw[0])  # 1/abar_t, only rescaled
    assert float(w[-1] / w[0]) < 100.0 and float(raw[-1]) == 100.0  # capped at high noise


def test_weighted_mse_weights_each_sample():
    eps, noise = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    assert float(weighted_mse(eps, noise, torch.tensor([1.0, 1.0]))) == 1.0
    assert float(weighted_mse(eps, noise, torch.tensor([3.0, 0.0]))) == 1.5
