"""Step-verifiable generation: the sampler states an answer commits to, and the engine
recomputing any one step from them bit for bit (same machine, dtype and thread count)."""
from __future__ import annotations

import pytest
import torch
from test_models_engine import ALL, cond

from niche.errors import InvalidRequest
from niche.imaging import encode_image as png_bytes
from niche.protocol import GenerationParams


def req(model, pipeline="txt2img", **kw) -> GenerationParams:
    kw.setdefault("prompt", "a photo of a cat sitting on a red chair")
    kw.setdefault("seed", 7)
    return GenerationParams(model=model, pipeline=pipeline, **kw)


def assert_chain_recomputes_exactly(engine, params, image):
    """generate_with_states = generate, every step recomputes bit-exactly, x_N decodes to
    the image."""
    picture, states = engine.generate_with_states(params, image)
    assert png_bytes(picture) == png_bytes(engine.generate(params, image))
    n = engine.resolve(params).steps
    assert len(states) == n
    x0 = engine.initial_state(params)
    chain = [x0, *states]
    assert tuple(x0.shape) == engine.state_shape(params)
    for s in chain:
        assert s.dtype == torch.float32 and s.device.type == "cpu"
        assert s.shape == x0.shape and s.shape[0] == 1
    recomputed = engine.recompute_steps(params, image, {k: chain[k] for k in range(n)})
    for k in range(n):
        assert torch.equal(recomputed[k], chain[k + 1]), f"step {k} not bit-exact"
    assert png_bytes(engine.decode_state(params, states[-1])) == png_bytes(picture)
    return chain


@pytest.mark.parametrize("model,pipeline", ALL)
def test_every_step_recomputes_bit_exactly(tiny_engine, model, pipeline):
    chain = assert_chain_recomputes_exactly(tiny_engine, req(model, pipeline), cond(pipeline))
    expected = (1, 16, 16) if model == "flux-schnell" else (1, 4, 8, 8)  # packed / (1,4,h,w)
    assert tuple(chain[0].shape) == expected
    # one step on its own (the scheduler copy is positioned, whatever ran before)
    one = tiny_engine.recompute_step(req(model, pipeline), cond(pipeline), 2, chain[2])
    assert torch.equal(one, chain[3])


@pytest.mark.parametrize("model", ["flux-schnell", "kolors"])
def test_half_precision_engine_recomputes_bit_exactly_and_keeps_x0(
        tiny_engine, tiny_engine_bf16, model):
    params = req(model, seed=3)
    chain = assert_chain_recomputes_exactly(tiny_engine_bf16, params, None)
    # x_0 is the float32 noise (x init_noise_sigma), not rounded to bfloat16 on the way in
    assert torch.equal(chain[0], tiny_engine.initial_state(params))


def test_kolors_x0_is_noise_times_init_noise_sigma(tiny_engine):
    params = tiny_engine.resolve(req("kolors", steps=5))
    family = tiny_engine.family("kolors")
    noise = family.initial_noise(params, torch.Generator("cpu").manual_seed(params.seed))
    sigma = float(family._schedule(params).init_noise_sigma)
    assert sigma > 1.0
    torch.testing.assert_close(tiny_engine.initial_state(params), noise * sigma,
                               rtol=0, atol=1e-6)


def test_batch_with_states_unfused_is_each_request_alone(tiny_engine):
    a, b = req("flux-schnell", seed=1), req("flux-schnell", seed=2, prompt="a red boat")
    out = tiny_engine.generate_batch_with_states([(a, None), (b, None)], fuse=False)
    for params, (image, states) in zip((a, b), out, strict=True):
        alone_image, alone_states = tiny_engine.generate_with_states(params)
        assert png_bytes(image) == png_bytes(alone_image)
        assert all(torch.equal(x, y) for x, y in zip(states, alone_states, strict=True))
    fused = tiny_engine.generate_batch_with_states([(a, None), (b, None)], fuse=True)
    assert [len(s) for _, s in fused] == [4, 4] and fused[0][1][0].shape == (1, 16, 16)


def test_recompute_refuses_steps_and_shapes_outside_the_request(tiny_engine):
    params = req("flux-schnell")
    x0 = tiny_engine.initial_state(params)
    with pytest.raises(InvalidRequest):
        tiny_engine.recompute_step(params, None, 4, x0)  # 4 steps: 0..3
    with pytest.raises(InvalidRequest):
        tiny_engine.recompute_step(params, None, 0, x0[:, :8])


def test_controlnet_pipeline_checks_its_callback_inputs(tiny_engine):
    from test_models_engine import photo

    pipe = next(iter(tiny_engine.family("kolors").controlnet_pipes.values()))
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(prompt="x", image=photo(1), num_inference_steps=2, height=64, width=64,
             callback_on_step_end=lambda *a: {},
             callback_on_step_end_tensor_inputs=["not_a_tensor"])
