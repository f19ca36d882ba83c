"""Bad requests fail with InvalidRequest naming the field, before any model runs."""
from __future__ import annotations

import PIL.Image
import pytest

from niche.errors import ConfigError, InvalidRequest
from niche.protocol import GenerationParams


@pytest.fixture
def no_model_runs(tiny_engine, monkeypatch):
    """Any pipeline call fails the test: validation must come first."""
    def forbidden(*a, **k):
        raise AssertionError("a model ran before validation finished")

    for name in ("flux-schnell", "kolors"):
        monkeypatch.setattr(tiny_engine.family(name), "run", forbidden)
    return tiny_engine


def params(model="kolors", pipeline="txt2img", **kw):
    kw.setdefault("prompt", "a cat")
    kw.setdefault("seed", 1)
    return GenerationParams(model=model, pipeline=pipeline, **kw)


IMG = PIL.Image.new("RGB", (64, 64), (10, 200, 30))
LONG = " ".join(["mountain lake at dawn"] * 80)

CASES = [
    ("model", params(model="sdxl-turbo"), None),
    ("pipeline", params(model="flux-schnell", pipeline="controlnet-canny"), IMG),
    ("image", params(pipeline="controlnet-canny"), None),
    ("image", params(pipeline="controlnet-depth"), None),
    ("image", params(pipeline="ip-adapter"), None),
    ("image", params(), IMG),
    ("image", params(pipeline="ip-adapter"), PIL.Image.new("RGB", (5000, 4000))),
    ("steps", params(steps=51), None),
    ("steps", params(model="flux-schnell", steps=9), None),
    ("width", params(width=72), None),
    ("height", params(height=40), None),
    ("width", params(width=16), None),
    ("height", params(model="flux-schnell", height=4096), None),
    ("guidance", params(model="flux-schnell", guidance=3.5), None),
    ("guidance", params(guidance=25.0), None),
    ("prompt", params(model="flux-schnell", prompt=LONG), None),
    ("prompt", params(prompt=LONG), None),
    ("negative_prompt", params(negative_prompt=LONG), None),
    ("controlnet_scale", params(controlnet_scale=0.5), None),
    ("ip_adapter_scale", params(pipeline="controlnet-canny", ip_adapter_scale=0.5), IMG),
]


@pytest.mark.parametrize("field,request_params,image", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_request_names_the_field(no_model_runs, field, request_params, image):
    with pytest.raises(InvalidRequest) as err:
        no_model_runs.generate(request_params, image)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


def test_a_bad_item_stops_the_whole_batch_before_any_run(no_model_runs):
    good = (params(), None)
    with pytest.raises(InvalidRequest) as err:
        no_model_runs.generate_batch([good, good, (params(steps=99), None)])
    assert err.value.field == "steps"


def test_resolve_alone_validates(tiny_engine):
    with pytest.raises(InvalidRequest, match="not a multiple of 16"):
        tiny_engine.resolve(params(width=88))


def test_engine_config_errors(tiny_root):
    from niche.models.engine import Engine

    with pytest.raises(ConfigError, match="unknown model"):
        Engine(models=["nope"], model_root=tiny_root)
    with pytest.raises(ConfigError, match="dtype"):
        Engine(models=["kolors"], model_root=tiny_root, dtype="int8")
    with pytest.raises(ConfigError, match="memory mode"):
        Engine(models=["kolors"], model_root=tiny_root, memory_mode="swap")
    with pytest.raises(ConfigError, match="no pipeline"):
        Engine(models=["flux-schnell"], model_root=tiny_root,
               pipelines={"flux-schnell": ["ip-adapter"]})


def test_protocol_rejects_unknown_pipeline_names():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        GenerationParams(model="kolors", pipeline="inpaint", prompt="x", seed=1)


def test_an_unknown_model_names_the_known_ones(tmp_path, monkeypatch):
    from niche.models.spec import load_spec

    with pytest.raises(ConfigError) as caught:
        load_spec("flux-schnel")
    assert "unknown model 'flux-schnel': choose from " in str(caught.value)
    assert "flux-schnell" in str(caught.value) and "kolors" in str(caught.value)
    monkeypatch.setenv("NICHE_MODELS_CONFIG_DIR", str(tmp_path / "nope"))
    with pytest.raises(ConfigError) as caught:
        load_spec("flux-schnell")
    assert "no model configs in" in str(caught.value) and "NICHE_MODELS_CONFIG_DIR" in \
        str(caught.value)


@pytest.mark.parametrize("damage", ["cut", "zeros"])
def test_a_damaged_weights_file_says_so_and_how_to_fetch_it_again(tiny_root, tmp_path,
                                                                   damage):
    """A half-downloaded or garbled safetensors file got the loader's bare words."""
    import shutil

    from niche.models.engine import Engine

    root = tmp_path / "models"
    shutil.copytree(tiny_root / "flux-schnell", root / "flux-schnell")
    weights = next((root / "flux-schnell" / "transformer").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == "cut" else b"\0" * len(data))
    with pytest.raises(ConfigError) as caught:
        Engine(models=["flux-schnell"], model_root=root, device="cpu")
    message = str(caught.value)
    assert "truncated or corrupt" in message and "fetch it with `niche models download" in \
        message and "\n" not in message, message
