"""The Kolors training losses (niche.devnet.training.kolors): the loss weighting (v-prediction's
1/abar_t, capped, mean 1, so high-noise steps, where the prompt decides the picture, count), its
same objective in either parametrisation, and the targets the pipeline's scheduler expects."""
from __future__ import annotations

import pytest
import torch

from niche.devnet.training.kolors import loss_weights, weighted_mse


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


def test_v_weights_give_the_same_objective_as_epsilon_weights():
    """The same prediction costs the same (up to one constant) in either parametrisation, so
    switching the tiny Kolors to v-prediction changes how rounding reaches the image, not
    what the UNet is asked to learn."""
    from diffusers import EulerDiscreteScheduler

    abar = EulerDiscreteScheduler(num_train_timesteps=1100, beta_start=0.00085, beta_end=0.014,
                                  beta_schedule="scaled_linear").alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 200, 700, 1099])
    x0, eps, eps_hat = (torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
                        for _ in range(3))
    a, s = abar[t].sqrt()[:, None, None, None], (1 - abar[t]).sqrt()[:, None, None, None]
    xt = a * x0 + s * eps
    x0_hat = (xt - s * eps_hat) / a  # what the epsilon prediction implies
    v, v_hat = a * eps - s * x0, a * eps_hat - s * x0_hat
    for cap in (None, 100.0):
        w_eps, w_v = loss_weights(abar, cap).double(), loss_weights(abar, cap, True).double()
        per_eps = w_eps[t] * ((eps_hat - eps) ** 2).mean(dim=(1, 2, 3))
        per_v = w_v[t] * ((v_hat - v) ** 2).mean(dim=(1, 2, 3))
        ratio = per_v / per_eps
        assert torch.allclose(ratio, ratio[0].expand(4), rtol=1e-4), (cap, ratio)
    plain = loss_weights(abar, None)
    assert torch.equal(plain, torch.ones_like(plain))  # no cap: the plain epsilon loss


class _Latents:
    """Only what ``noisy`` reads of an encoded data set: fixed clean latents."""

    def __init__(self, x0: torch.Tensor):
        self.x0 = x0

    def latents(self, idx, gen, shift, scale):
        return self.x0[torch.as_tensor(idx)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noisy_targets_what_the_scheduler_turns_back_into_the_clean_latent(prediction_type):
    """The training target is what the pipeline's EulerDiscrete step expects of the UNet: fed
    the target as the model output at x_t, the scheduler's own x0 estimate is the clean latent."""
    from types import SimpleNamespace

    import numpy as np
    from diffusers import EulerDiscreteScheduler

    from niche.devnet.training.kolors import noisy

    scheduler = EulerDiscreteScheduler(num_train_timesteps=1100, beta_start=0.00085,
                                       beta_end=0.014, beta_schedule="scaled_linear",
                                       prediction_type=prediction_type)
    pipe = SimpleNamespace(scheduler=scheduler,
                           vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=1.0)))
    x0 = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    xt, t, target = noisy(pipe, _Latents(x0), np.arange(8), torch.Generator().manual_seed(2))
    abar = scheduler.alphas_cumprod[t][:, None, None, None]
    sigma = ((1 - abar) / abar).sqrt()
    sample = xt * (sigma**2 + 1).sqrt()  # EulerDiscrete's unscaled sample at this sigma
    if prediction_type == "epsilon":
        estimate = sample - sigma * target
    else:
        estimate = target * (-sigma / (sigma**2 + 1).sqrt()) + sample / (sigma**2 + 1)
    assert torch.allclose(estimate, x0, atol=1e-4)


def test_training_refuses_a_parametrisation_it_does_not_implement():
    from diffusers import EulerDiscreteScheduler

    from niche.devnet.training.kolors import predicts_v

    with pytest.raises(ValueError, match="sample"):
        predicts_v(EulerDiscreteScheduler(prediction_type="sample"))
