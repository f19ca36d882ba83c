"""The hardened image check (issue 15): the verdict needs similarity >= threshold AND
psnr >= the model's PSNR floor. Honest variants pass; skip-and-post-process cheats, which
restore the statistics the similarity looks at, fail on the pixel error with a PSNR reason.
And compare's float32 version gives the verdicts of the float64 original it replaced.

Bounds used (niche/validator/verify.py, calibrated by bench/calibrate_verify.py):
DEFAULT_THRESHOLDS and DEFAULT_PSNR_FLOORS; the float32 compare agrees with the float64 one
to 1e-5 on every term and 1e-9 dB on PSNR.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from niche.protocol import GenerationParams
from niche.validator.verify import (
    DEFAULT_PSNR_FLOORS,
    DEFAULT_THRESHOLDS,
    Comparison,
    Verdict,
    Verifier,
    VerifyConfig,
    compare,
)

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


# ------------------------------------------------------------------ float64 reference
def compare_float64(reference: Image.Image, candidate: Image.Image) -> Comparison:
    """The float64 compare as it was before the float32 rewrite (one filter per moment)."""
    import cv2

    if reference.size != candidate.size:
        return Comparison(0.0, 0.0, 0.0, 0.0, 0.0)
    ref = np.asarray(reference.convert("RGB"), dtype=np.float64) / 255.0
    cand = np.asarray(candidate.convert("RGB"), dtype=np.float64) / 255.0
    mse = float(np.mean((ref - cand) ** 2))
    psnr = 100.0 if mse <= 1e-12 else float(10.0 * np.log10(1.0 / mse))
    weights = np.array([0.299, 0.587, 0.114])
    a, b = ref @ weights, cand @ weights

    def blur(x):
        return cv2.GaussianBlur(x, (7, 7), 1.0, borderType=cv2.BORDER_REFLECT)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = float(np.mean((2 * mu_a * mu_b + c1) * (2 * cov + c2)
                      / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))))
    la = cv2.Laplacian(a, cv2.CV_64F, ksize=3, borderType=cv2.BORDER_REFLECT)
    lb = cv2.Laplacian(b, cv2.CV_64F, ksize=3, borderType=cv2.BORDER_REFLECT)
    ea, eb = float(np.mean(la ** 2)), float(np.mean(lb ** 2))
    if ea <= 1e-12 or eb <= 1e-12:
        value = 1.0 if np.allclose(ref, cand, atol=2 / 255) else 0.0
        return Comparison(min(s, value), s, value, value, psnr)
    ratio = eb / ea
    energy = float(np.sqrt(min(ratio, 1.0 / ratio)))
    corr = float(np.sum((la - la.mean()) * (lb - lb.mean()))
                 / np.sqrt(np.sum((la - la.mean()) ** 2) * np.sum((lb - lb.mean()) ** 2)))
    return Comparison(max(0.0, min(s, corr, energy)), s, corr, ratio, psnr)


def sharpen(image: Image.Image, amount: float, sigma: float = 1.0) -> Image.Image:
    x = np.asarray(image, dtype=np.float64)
    blur = np.asarray(image.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(x + amount * (x - blur)), 0, 255).astype(np.uint8))


def noise(image: Image.Image, sigma: float, seed: int = 0) -> Image.Image:
    x = np.asarray(image, dtype=np.float64)
    x = x + np.random.default_rng(seed).normal(0, sigma, x.shape)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def _pairs() -> list[tuple[str, Image.Image, Image.Image]]:
    rng = np.random.default_rng(3)
    smooth = Image.fromarray(rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)).filter(
        ImageFilter.GaussianBlur(2))
    flat = Image.new("RGB", (32, 32), (120, 40, 200))
    return [("identical", smooth, smooth.copy()),
            ("noised 2", smooth, noise(smooth, 2.0)),
            ("noised 8", smooth, noise(smooth, 8.0, 1)),
            ("blurred", smooth, smooth.filter(ImageFilter.GaussianBlur(0.7))),
            ("sharpened", smooth, sharpen(smooth, 0.6)),
            ("grey mode", smooth, smooth.convert("L")),
            ("flat same", flat, flat.copy()),
            ("flat off by 1", flat, Image.new("RGB", (32, 32), (121, 40, 200))),
            ("flat other", flat, Image.new("RGB", (32, 32), (10, 40, 200)))]


@pytest.mark.parametrize("name,ref,cand", _pairs(), ids=[p[0] for p in _pairs()])
def test_float32_compare_agrees_with_float64(name, ref, cand):
    new, old = compare(ref, cand), compare_float64(ref, cand)
    for field in ("similarity", "ssim", "detail_correlation", "energy_ratio"):
        assert getattr(new, field) == pytest.approx(getattr(old, field), abs=1e-5), field
    assert new.psnr == pytest.approx(old.psnr, abs=1e-9)
    for threshold in (*DEFAULT_THRESHOLDS.values(), 0.5, 0.99):
        assert (new.similarity >= threshold) == (old.similarity >= threshold)


# ------------------------------------------------------------------ on the tiny checkpoints
@pytest.fixture(scope="module")
def half_engines(tiny_root):
    from niche.models.engine import Engine

    return {dtype: Engine(models=["flux-schnell"], model_root=tiny_root, dtype=dtype,
                          device="cpu") for dtype in ("bfloat16", "float16")}


@pytest.fixture(scope="module")
def verifier(tiny_engine):
    return Verifier(tiny_engine)


def _params(engine, model: str, seed: int, **kw) -> GenerationParams:
    kw.setdefault("prompt", PROMPT)
    return engine.resolve(GenerationParams(model=model, seed=seed, **kw))


def test_honest_variants_pass_the_hardened_check(tiny_engine, half_engines, verifier):
    params = _params(tiny_engine, "flux-schnell", 21)
    other = _params(tiny_engine, "flux-schnell", 22, prompt="a sailboat on a calm sea")
    ref = tiny_engine.generate(params)
    before = torch.get_num_threads()
    torch.set_num_threads(1 if before != 1 else 2)
    try:
        threads = tiny_engine.generate(params)
    finally:
        torch.set_num_threads(before)
    variants = {
        "bfloat16": half_engines["bfloat16"].generate(params),
        "float16": half_engines["float16"].generate(params),
        "other thread count": threads,
        "batched": tiny_engine.generate_batch([(params, None), (other, None)], fuse=True)[0],
    }
    for name, image in variants.items():
        verdict = verifier.judge("flux-schnell", ref, image, "txt2img")
        assert verdict.passed, (name, verdict.reason)
        assert verdict.reason == "" and verdict.psnr is not None
        assert verdict.psnr >= verdict.psnr_floor == DEFAULT_PSNR_FLOORS["flux-schnell"]


def test_sharpened_fewer_steps_fails_on_psnr(tiny_engine, verifier):
    """Kolors 4 of 8 steps, sharpened to put back the detail it lacks: the PSNR floor
    (29 dB; this cheat ~26 dB) rejects it at every strength, at least 1 dB under the floor.
    (N-1 steps is NOT always rejected: docs/adversary.md.)"""
    params = _params(tiny_engine, "kolors", 5)
    ref = tiny_engine.generate(params)
    fewer = tiny_engine.generate(params.model_copy(update={"steps": params.steps // 2}))
    verdicts = [verifier.judge("kolors", ref, sharpen(fewer, a), "txt2img")
                for a in (0.0, 0.3, 0.6)]
    for v in verdicts:
        assert not v.passed
        assert f"psnr {v.psnr:.1f} dB < {v.psnr_floor:.1f} dB" in v.reason
        assert v.psnr is not None and v.psnr < v.psnr_floor - 1.0


def test_noised_upscaled_cheat_fails_on_psnr(tiny_engine, verifier):
    params = _params(tiny_engine, "flux-schnell", 9)
    ref = tiny_engine.generate(params)
    w, h = params.size
    small = tiny_engine.generate(params.model_copy(update={"width": w // 2, "height": h // 2}))
    cheat = noise(sharpen(small.resize((w, h), Image.Resampling.BICUBIC), 1.0), 2.0)
    v = verifier.judge("flux-schnell", ref, cheat, "txt2img")
    assert not v.passed and "psnr" in v.reason and v.psnr is not None
    assert v.psnr < v.psnr_floor


def test_verdict_and_config_api(tiny_engine):
    config = VerifyConfig.with_overrides({"kolors": 0.9}, {"kolors": 20.0})
    v = Verifier(tiny_engine, config)
    assert v.psnr_floor("kolors", "controlnet-canny") == 20.0  # model-wide replaces pipelines
    assert v.psnr_floor("flux-schnell") == DEFAULT_PSNR_FLOORS["flux-schnell"]
    assert v.psnr_floor("unknown-model") == config.default_psnr_floor
    img = Image.new("RGB", (16, 16), (1, 2, 3))
    ok = v.judge("flux-schnell", img, img)
    assert isinstance(ok, Verdict) and ok.passed and ok.reason == "" and ok.psnr == 100.0
    bad = v.judge("flux-schnell", img, "not an image")  # type: ignore[arg-type]
    assert not bad.passed and bad.reason.startswith("compare failed") and bad.psnr is None
