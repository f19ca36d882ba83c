"""Half-precision engines keep the sampler state in float32 (niche.models.precision)."""
from __future__ import annotations

import pytest
import torch

from niche.models.precision import _cast
from niche.protocol import GenerationParams


def test_cast_reaches_nested_outputs_and_leaves_integers():
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    out = UNet2DConditionOutput(sample=torch.ones(2, dtype=torch.bfloat16))
    nested = (out, [torch.ones(1, dtype=torch.bfloat16)], {"ids": torch.arange(3)})
    cast = _cast(nested, torch.float32)
    assert cast[0].sample.dtype == torch.float32 and cast[0]["sample"].dtype == torch.float32
    assert cast[1][0].dtype == torch.float32
    assert cast[2]["ids"].dtype == torch.int64


def test_inputs_are_cast_but_timesteps_keep_their_dtype():
    from niche.models.precision import cast_inputs_to_own_dtype, return_float32

    seen = {}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x, timestep):
            seen.update(x=x.dtype, timestep=timestep.dtype)
            return self.linear(x)

    net = Net().to(torch.bfloat16)
    cast_inputs_to_own_dtype(net)
    return_float32(net)
    out = net(torch.ones(2, 4), timestep=torch.tensor([823.0]))
    assert seen == {"x": torch.bfloat16, "timestep": torch.float32}  # bfloat16 823 is 824
    assert out.dtype == torch.float32


@pytest.fixture(scope="module")
def bf16_kolors(tiny_root):
    from niche.models.engine import Engine

    return Engine(models=["kolors"], model_root=tiny_root, dtype="bfloat16")


@pytest.mark.parametrize("pipeline", ["txt2img", "controlnet-canny"])
def test_bfloat16_networks_see_float32_latents_from_the_sampler(bf16_kolors, pipeline):
    family = bf16_kolors.family("kolors")
    unet = family.base.unet
    assert unet.dtype == torch.bfloat16
    seen: list[torch.dtype] = []

    def record(module, args, kwargs):  # runs before the engine's own cast
        sample = args[0] if args else kwargs["sample"]
        seen.append(sample.dtype)

    handle = unet.register_forward_pre_hook(record, with_kwargs=True, prepend=True)
    try:
        image = None
        if pipeline != "txt2img":
            from niche.devnet.training.fidelity import scene_image

            image = scene_image("circle", "white", "black")
        params = GenerationParams(model="kolors", pipeline=pipeline, prompt="a red circle", seed=3)
        out = bf16_kolors.generate(params, image)
    finally:
        handle.remove()
    assert out.size == (64, 64)
    assert seen and set(seen) == {torch.float32}, seen
