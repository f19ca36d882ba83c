"""The CUDA fast path is harmless on CPU: `fast=True` there is a logged no-op, so the tiny
engine's bytes and sampler states are exactly the plain engine's, run after run."""
from __future__ import annotations

import argparse
import logging

import pytest
import torch

from niche.imaging import encode_image
from niche.protocol import GenerationParams

MODELS = ["flux-schnell", "kolors"]


@pytest.fixture(scope="module")
def fast_engine(tiny_root):
    from niche.models.engine import Engine

    return Engine(models=MODELS, model_root=tiny_root, device="cpu", fast=True,
                  pipelines={"kolors": ["txt2img"]})


@pytest.mark.parametrize("model", MODELS)
def test_fast_on_cpu_is_bit_identical_and_deterministic(tiny_engine, fast_engine, model):
    params = GenerationParams(model=model, prompt="a red circle on blue", seed=11)
    plain_image, plain_states = tiny_engine.generate_with_states(params)
    runs = [fast_engine.generate_with_states(params) for _ in range(2)]
    for image, states in runs:
        assert encode_image(image) == encode_image(plain_image)
        assert len(states) == len(plain_states)
        assert all(torch.equal(a, b) for a, b in zip(states, plain_states, strict=True))
    assert fast_engine.family(model).fast is True
    assert fast_engine.family(model).fast_applied == []  # nothing was transformed on CPU


def test_fast_on_cpu_says_so(tiny_root, caplog):
    from niche.models.engine import Engine

    with caplog.at_level(logging.INFO, logger="niche.models.families.base"):
        Engine(models=["flux-schnell"], model_root=tiny_root, device="cpu", fast=True)
    assert any("fast path is a no-op on cpu" in r.getMessage() for r in caplog.records)


def test_yaml_fast_is_the_default_and_the_flag_overrides_it(tiny_root, tmp_path):
    from niche.commands.engine_args import add_engine_args, engine_from_args
    from niche.models.spec import load_spec

    assert load_spec("flux-schnell").fast is False
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--tiny", "--device", "cpu", "--engine.fast"])
    assert args.engine_fast is True
    assert engine_from_args(args, ["flux-schnell"]).family("flux-schnell").fast is True
    assert parser.parse_args(["--no-engine.fast"]).engine_fast is False
    assert parser.parse_args([]).engine_fast is None  # the YAML decides
