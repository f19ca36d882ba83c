"""Verification on the tiny checkpoints: honest variants pass, cheats fail, at the shipped
thresholds. (bench/calibrate_verify.py prints the full matrix; docs/scoring.md the figures.)"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from niche.protocol import GenerationParams, PipelineKind
from niche.validator.verify import DEFAULT_THRESHOLDS, Verifier, compare

PROMPT = "a red fox in a snowy forest, watercolor"


def reencode(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def verifier(tiny_engine):
    return Verifier(tiny_engine)


@pytest.fixture(scope="module")
def flux_case(tiny_engine):
    params = tiny_engine.resolve(GenerationParams(model="flux-schnell", prompt=PROMPT, seed=11))
    return params, tiny_engine.generate(params)


def test_compare_basics():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert compare(img, img).similarity == 1.0
    assert compare(img, img.resize((16, 16))).similarity == 0.0  # wrong size
    flat = Image.new("RGB", (32, 32), (9, 9, 9))
    assert compare(flat, flat).similarity == 1.0
    assert compare(flat, Image.new("RGB", (32, 32), (200, 9, 9))).similarity == 0.0


def test_honest_variants_pass(tiny_engine, tiny_root, verifier, flux_case):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params, ref = flux_case
    other = params.model_copy(update={"seed": 99, "prompt": "an old lighthouse at dusk"})
    before = torch.get_num_threads()
    torch.set_num_threads(1 if before != 1 else 2)
    try:
        threads = tiny_engine.generate(params)
    finally:
        torch.set_num_threads(before)
    with sdpa_kernel([SDPBackend.MATH]):
        math_kernel = tiny_engine.generate(params)
    honest = {
        "regenerated": tiny_engine.generate(params),
        "batched": tiny_engine.generate_batch([(other, None), (params, None)])[1],
        "other thread count": threads,
        "math attention kernel": math_kernel,
        "webp lossless": reencode(ref, "WEBP", lossless=True),
    }
    for name, image in honest.items():
        verdict = verifier.judge("flux-schnell", ref, image)
        assert verdict.passed, f"{name}: {verdict}"
    # the audit path (regenerate + compare) on the miner's answer
    assert all(v.passed for v in verifier.verify([(params, None, ref)]))


def test_bfloat16_passes(tiny_root, verifier, flux_case):
    from niche.models.engine import Engine

    params, ref = flux_case
    bf16 = Engine(models=["flux-schnell"], model_root=tiny_root, dtype="bfloat16",
                  num_threads=__import__("torch").get_num_threads())
    verdict = verifier.judge("flux-schnell", ref, bf16.generate(params))
    assert verdict.passed, verdict


def test_cheats_fail(tiny_engine, verifier, flux_case):
    params, ref = flux_case
    half = tiny_engine.generate(params.model_copy(update={"width": 32, "height": 32}))
    other_model = tiny_engine.generate(tiny_engine.resolve(GenerationParams(
        model="kolors", prompt=PROMPT, seed=params.seed)))
    noisy = np.asarray(ref, dtype=np.float64) + np.random.default_rng(1).normal(0, 8, (64, 64, 3))
    cheats = {
        "other seed": tiny_engine.generate(params.model_copy(update={"seed": 12})),
        "other prompt": tiny_engine.generate(params.model_copy(
            update={"prompt": "a bowl of ramen on a wooden table, studio photograph"})),
        "half size upscaled": half.resize((64, 64), Image.Resampling.BICUBIC),
        "other model": other_model,
        "blurred": ref.filter(ImageFilter.GaussianBlur(0.5)),
        "noised": Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8)),
        "jpeg q30": reencode(ref, "JPEG", quality=30),
        "earlier challenge": tiny_engine.generate(params.model_copy(
            update={"seed": 5, "prompt": "a sailboat on a calm sea"})),
    }
    for name, image in cheats.items():
        verdict = verifier.judge("flux-schnell", ref, image)
        assert not verdict.passed, f"{name} passed: {verdict}"
    # a non-image-like candidate is a failed verdict, not an exception
    assert not verifier.judge("flux-schnell", ref, ref.convert("L").resize((8, 8))).passed


def test_kolors_fewer_steps_and_batched_audit(tiny_engine, verifier):
    base = GenerationParams(model="kolors", prompt=PROMPT, seed=3)
    params = tiny_engine.resolve(base)
    ref = tiny_engine.generate(params)
    fewer = tiny_engine.generate(params.model_copy(update={"steps": params.steps // 2}))
    assert not verifier.judge("kolors", ref, fewer).passed
    # the audit batches requests that share parameters; verdicts stay per item
    other = params.model_copy(update={"seed": 4, "prompt": "an old lighthouse at dusk"})
    other_ref = tiny_engine.generate(other)
    verdicts = verifier.verify([(params, None, ref), (other, None, other_ref),
                                (other, None, ref)])
    assert [v.passed for v in verdicts] == [True, True, False]


def test_conditioned_pipeline_audit(tiny_engine, verifier):
    from niche.validator.challenges import engine_conditioner

    source = engine_conditioner(tiny_engine)("kolors", PipelineKind.CONTROLNET_CANNY, 64, 64,
                                             np.random.default_rng(5))
    params = tiny_engine.resolve(GenerationParams(
        model="kolors", pipeline=PipelineKind.CONTROLNET_CANNY, prompt=PROMPT, seed=8))
    answer = tiny_engine.generate(params, source)
    wrong_seed = tiny_engine.generate(params.model_copy(update={"seed": 9}), source)
    verdicts = verifier.verify([(params, source, answer), (params, source, wrong_seed)])
    assert [v.passed for v in verdicts] == [True, False]


def test_verify_command(tiny_root, tmp_path, capsys):
    from niche.cli import main
    from niche.imaging import encode_image as png_bytes
    from niche.models.engine import Engine

    engine = Engine(models=["flux-schnell"], model_root=tiny_root)
    params = engine.resolve(GenerationParams(model="flux-schnell", prompt="a red fox", seed=7))
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    good.write_bytes(png_bytes(engine.generate(params)))
    bad.write_bytes(png_bytes(engine.generate(params.model_copy(update={"seed": 8}))))
    # the reference engine above is float32, so the command is told so (its default is the
    # model's configured dtype, as a miner's)
    common = ["verify", "--tiny", "--model", "flux-schnell", "--dtype", "float32",
              "--prompt", "a red fox", "--seed", "7", "--candidate"]
    assert main(common + [str(good)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["match"] is True and out["similarity"] == 1.0
    assert out["threshold"] == DEFAULT_THRESHOLDS["flux-schnell"]
    assert main(common + [str(bad), "--threshold", "0.5"]) == 1  # a mismatch exits 1
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["match"] is False and out["similarity"] < 0.5 and out["threshold"] == 0.5
    assert main(common + [str(tmp_path / "missing.png")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_thresholds_per_model_and_pipeline(tiny_engine):
    from niche.validator.verify import DEFAULT_THRESHOLD, VerifyConfig

    v = Verifier(tiny_engine, VerifyConfig(thresholds={"kolors": 0.95,
                                                       "kolors/controlnet-canny": 0.97}))
    assert v.threshold("kolors") == 0.95
    assert v.threshold("kolors", PipelineKind.CONTROLNET_CANNY) == 0.97
    assert v.threshold("kolors", "ip-adapter") == 0.95
    assert v.threshold("flux-schnell") == DEFAULT_THRESHOLD


def test_operator_thresholds_layer_on_the_calibrated_defaults():
    from niche.validator.verify import VerifyConfig

    class NoSpec:
        def spec(self, model):
            raise KeyError(model)

    calibrated = Verifier(NoSpec(), VerifyConfig.with_overrides({}))
    assert calibrated.threshold("kolors", "controlnet-canny") == \
        DEFAULT_THRESHOLDS["kolors/controlnet-canny"]
    assert calibrated.threshold("flux-schnell", "txt2img") == DEFAULT_THRESHOLDS["flux-schnell"]
    whole = Verifier(NoSpec(), VerifyConfig.with_overrides({"kolors": 0.5}))
    assert whole.threshold("kolors", "controlnet-canny") == 0.5  # model-wide beats per-pipeline
    assert whole.threshold("flux-schnell") == DEFAULT_THRESHOLDS["flux-schnell"]
    one = Verifier(NoSpec(), VerifyConfig.with_overrides({"kolors/ip-adapter": 0.7}))
    assert one.threshold("kolors", "ip-adapter") == 0.7
    assert one.threshold("kolors", "txt2img") == DEFAULT_THRESHOLDS["kolors"]
