"""verify.py pinned: compare() against an independent numpy rendering of the formulas in the
module docstring, the threshold lookup order, judge on a real bad candidate, and the
batching of references (chunk sizes on a recording engine; chunked == single regenerations on
the tiny real checkpoints)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from niche.errors import InvalidRequest
from niche.protocol import GenerationParams, PipelineKind
from niche.validator import verify as vf
from niche.validator.verify import (
    Verdict,
    Verifier,
    VerifyConfig,
    compare,
)

NO_FLOOR = {"psnr_floors": {}, "default_psnr_floor": 0.0}
"""These tests pin the similarity threshold; the PSNR floor has its own tests
(tests/test_verify_hardened.py)."""
FLOAT32_TOL = 1e-5
"""compare works in float32 (sums in float64): it agrees with the float64 formulas written
out here to 1e-5 on every term (and exactly on PSNR, computed on the integer pixels)."""


# ----------------------------------------------------------------------------- reference maths
def _reflect(x: np.ndarray, r: int) -> np.ndarray:
    return np.pad(x, r, mode="symmetric")  # OpenCV BORDER_REFLECT: fedcba|abcdef


def _blur(x: np.ndarray) -> np.ndarray:
    """7x7 Gaussian, sigma 1, separable, normalised to sum 1."""
    t = np.arange(-3, 4, dtype=np.float64)
    k = np.exp(-t * t / 2.0)
    k /= k.sum()
    p = _reflect(x, 3)
    h, w = x.shape
    rows = sum(k[i] * p[:, i:i + w] for i in range(7))
    return sum(k[i] * rows[i:i + h, :] for i in range(7))


def _lap(x: np.ndarray) -> np.ndarray:
    """3x3-aperture Laplacian: d2/dx2 + d2/dy2 with Sobel smoothing = [[2,0,2],[0,-8,0],[2,0,2]]."""
    p = _reflect(x, 1)
    h, w = x.shape
    return (2 * (p[0:h, 0:w] + p[0:h, 2:w + 2] + p[2:h + 2, 0:w] + p[2:h + 2, 2:w + 2])
            - 8 * p[1:h + 1, 1:w + 1])


def _luma(rgb: np.ndarray) -> np.ndarray:
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def _ssim(ya: np.ndarray, yb: np.ndarray) -> float:
    c1, c2 = 0.0001, 0.0009  # (0.01 L)^2, (0.03 L)^2 with L = 1
    ma, mb = _blur(ya), _blur(yb)
    va, vb = _blur(ya * ya) - ma * ma, _blur(yb * yb) - mb * mb
    cov = _blur(ya * yb) - ma * mb
    return float(np.mean((2 * ma * mb + c1) * (2 * cov + c2)
                         / ((ma * ma + mb * mb + c1) * (va + vb + c2))))


def reference_ssim(a: Image.Image, b: Image.Image) -> float:
    def grey(im):
        return _luma(np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0)

    return _ssim(grey(a), grey(b))


def reference_compare(a: Image.Image, b: Image.Image) -> tuple[float, float, float, float,
                                                                float]:
    ra = np.asarray(a.convert("RGB"), dtype=np.float64) / 255.0
    rb = np.asarray(b.convert("RGB"), dtype=np.float64) / 255.0
    mse = np.mean((ra - rb) ** 2)
    psnr = 100.0 if mse <= 1e-12 else 10 * np.log10(1 / mse)
    ya, yb = _luma(ra), _luma(rb)
    s = _ssim(ya, yb)
    la, lb = _lap(ya), _lap(yb)
    ea, eb = np.mean(la * la), np.mean(lb * lb)
    da, db = la - la.mean(), lb - lb.mean()
    corr = np.sum(da * db) / np.sqrt(np.sum(da * da) * np.sum(db * db))
    r = eb / ea
    energy = np.sqrt(min(r, 1 / r))
    return max(0.0, min(s, corr, energy)), s, corr, r, psnr


def _noise(seed, shape=(24, 20, 3)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def _smooth(seed) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:24, 0:20]
    base = 120 + 60 * np.sin(x / 3.0 + seed) + 40 * np.cos(y / 4.0)
    rgb = np.stack([base, base * 0.8, 255 - base], -1) + rng.normal(0, 6, (24, 20, 3))
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


def _noisy_copy(image: Image.Image, spread: int) -> Image.Image:
    rng = np.random.default_rng(spread)
    noise = rng.integers(-spread, spread + 1, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=int) + noise, 0, 255).astype(np.uint8))


PAIRS = [
    ("noise vs other noise", _noise(1), _noise(2)),
    ("smooth vs noisier copy", _smooth(3), Image.fromarray(np.clip(
        np.asarray(_smooth(3), dtype=np.int16) + np.random.default_rng(4).integers(
            -20, 21, (24, 20, 3)), 0, 255).astype(np.uint8))),
    ("smooth vs another", _smooth(5), _smooth(6)),
    ("colour vs its grey", _smooth(7), _smooth(7).convert("L").convert("RGB")),
]


@pytest.mark.parametrize("name, a, b", PAIRS, ids=[p[0] for p in PAIRS])
def test_compare_matches_the_documented_formulas(name, a, b):
    c = compare(a, b)
    sim, s, corr, r, psnr = reference_compare(a, b)
    assert c.ssim == pytest.approx(s, abs=FLOAT32_TOL)
    assert c.detail_correlation == pytest.approx(corr, abs=FLOAT32_TOL)
    assert c.energy_ratio == pytest.approx(r, rel=FLOAT32_TOL)
    assert c.psnr == pytest.approx(psnr, abs=1e-9)
    assert c.similarity == pytest.approx(sim, abs=FLOAT32_TOL)
    assert c.as_dict() == {"similarity": c.similarity, "ssim": c.ssim,
                           "detail_correlation": c.detail_correlation,
                           "energy_ratio": c.energy_ratio, "psnr": c.psnr}


def test_compare_identical_images():
    img = _smooth(9)
    c = compare(img, img)
    assert (c.similarity, c.ssim, c.detail_correlation, c.energy_ratio, c.psnr) == (
        pytest.approx(1.0, abs=FLOAT32_TOL), pytest.approx(1.0, abs=FLOAT32_TOL),
        pytest.approx(1.0, abs=FLOAT32_TOL), 1.0, 100.0)


def test_compare_energy_score_is_the_square_root_of_the_smaller_ratio():
    ref = _smooth(11)
    arr = np.asarray(ref, dtype=np.float64)
    mean = arr.mean(axis=(0, 1))
    flat = Image.fromarray(np.clip(np.rint(mean + (arr - mean) * 0.5), 0, 255).astype(np.uint8))
    c, back = compare(ref, flat), compare(flat, ref)
    # scaling contrast keeps structure (correlation ~1) and lowers the energy ~4x
    assert c.energy_ratio == pytest.approx(1 / back.energy_ratio, rel=1e-12)
    assert c.energy_ratio < 0.3
    assert c.similarity == pytest.approx(min(c.ssim, c.detail_correlation,
                                             np.sqrt(c.energy_ratio)), abs=FLOAT32_TOL)
    assert back.similarity == pytest.approx(min(back.ssim, back.detail_correlation,
                                                np.sqrt(1 / back.energy_ratio)), abs=FLOAT32_TOL)
    assert c.similarity == pytest.approx(np.sqrt(c.energy_ratio), abs=FLOAT32_TOL)


def test_compare_brightness_shift_is_limited_by_ssim():
    arr = np.asarray(_smooth(15), dtype=np.int16) // 2 + 20
    ref = Image.fromarray(arr.astype(np.uint8))
    brighter = Image.fromarray(np.clip(arr + 25, 0, 255).astype(np.uint8))
    assert arr.max() + 25 <= 255  # no clipping: the detail is untouched
    c = compare(ref, brighter)
    s = reference_ssim(ref, brighter)
    assert c.detail_correlation == pytest.approx(1.0, abs=FLOAT32_TOL)
    assert c.energy_ratio == pytest.approx(1.0, abs=FLOAT32_TOL)
    assert c.ssim == pytest.approx(s, abs=FLOAT32_TOL) and s < 0.999
    assert c.similarity == pytest.approx(s, abs=FLOAT32_TOL)


def test_compare_converts_other_modes_to_rgb():
    ref = _smooth(16)
    rgba = ref.convert("RGBA")
    grey = ref.convert("L")
    c = compare(ref, rgba)
    assert (c.similarity, c.psnr) == (pytest.approx(1.0, abs=1e-12), 100.0)
    c = compare(grey.convert("RGB"), grey)
    assert (c.similarity, c.psnr) == (pytest.approx(1.0, abs=1e-12), 100.0)


def test_compare_anti_correlated_detail_scores_zero_not_negative():
    ref = _smooth(13)
    inverted = Image.fromarray(255 - np.asarray(ref))
    c = compare(ref, inverted)
    assert c.detail_correlation == pytest.approx(-1.0, abs=FLOAT32_TOL)
    assert c.similarity == 0.0


def test_compare_size_mismatch_is_all_zero():
    c = compare(_smooth(1), _smooth(1).resize((20, 23)))
    assert (c.similarity, c.ssim, c.detail_correlation, c.energy_ratio, c.psnr) == (
        0.0, 0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("level, same", [(9, True), (10, True), (11, True), (12, False),
                                         (7, True), (6, False)])
def test_compare_flat_images_match_within_two_levels(level, same):
    ref = Image.new("RGB", (16, 16), (9, 9, 9))
    cand = Image.new("RGB", (16, 16), (level, level, level))
    c = compare(ref, cand)
    s = reference_ssim(ref, cand)
    assert c.ssim == pytest.approx(s, abs=FLOAT32_TOL)
    assert c.detail_correlation == c.energy_ratio == (1.0 if same else 0.0)
    assert c.similarity == pytest.approx(min(s, 1.0) if same else 0.0, abs=FLOAT32_TOL)
    mse = ((level - 9) / 255) ** 2
    assert c.psnr == pytest.approx(100.0 if level == 9 else 10 * np.log10(1 / mse), abs=1e-9)


def test_compare_flat_against_textured_either_way_is_zero():
    flat, textured = Image.new("RGB", (20, 24), (128, 128, 128)), _noise(3)
    for a, b in ((flat, textured), (textured, flat)):
        c = compare(a, b)
        assert (c.similarity, c.detail_correlation, c.energy_ratio) == (0.0, 0.0, 0.0)
        assert c.ssim == pytest.approx(reference_ssim(a, b), abs=FLOAT32_TOL)


def test_ssim_of_a_constant_shift():
    a = np.full((10, 10), 0.5)
    # flat windows: ssim = (2 mu_a mu_b + c1) / (mu_a^2 + mu_b^2 + c1), exactly
    # float32 variances of flat windows cancel to ~1e-7, which c2 = 9e-4 turns into ~1e-4
    assert vf.ssim(a, a + 0.1) == pytest.approx((2 * 0.5 * 0.6 + 0.0001)
                                                / (0.25 + 0.36 + 0.0001), abs=1e-4)


# ----------------------------------------------------------------------------- thresholds
def test_calibrated_thresholds_are_pinned():
    assert vf.DEFAULT_THRESHOLD == 0.99
    assert vf.DEFAULT_THRESHOLDS == {"flux-schnell": 0.956, "kolors": 0.971,
                                     "flux-dev": 0.956, "flux-mini": 0.956,
                                     "kolors/controlnet-canny": 0.975,
                                     "kolors/controlnet-depth": 0.980,
                                     "kolors/ip-adapter": 0.972}
    cfg = VerifyConfig()
    assert (cfg.default_threshold, cfg.max_batch) == (0.99, 8)
    assert cfg.thresholds == vf.DEFAULT_THRESHOLDS and cfg.thresholds is not vf.DEFAULT_THRESHOLDS
    merged = VerifyConfig.with_overrides({"kolors/ip-adapter": 0.5}, max_batch=3,
                                         default_threshold=0.9)
    assert (merged.max_batch, merged.default_threshold) == (3, 0.9)
    assert merged.thresholds["kolors/ip-adapter"] == 0.5
    assert merged.thresholds["kolors/controlnet-depth"] == 0.980


class SpecEngine:
    """spec(model) for the model "other" only (an unknown model raises InvalidRequest, as
    the engine does); "missing" is a spec that declares no threshold."""

    def __init__(self, value="missing"):
        self.value = value

    def spec(self, model):
        if self.value == "raise" or model != "other":
            raise InvalidRequest(f"model '{model}' is not served here", field="model")
        if self.value == "missing":
            return type("Spec", (), {"verify_threshold": None})()
        return type("Spec", (), {"verify_threshold": self.value})()


def test_threshold_lookup_order():
    cfg = VerifyConfig(default_threshold=0.9, thresholds={"m": 0.8, "m/ip-adapter": 0.7})
    v = Verifier(SpecEngine(0.6), cfg)
    assert v.threshold("m", "ip-adapter") == 0.7
    assert v.threshold("m", PipelineKind.IP_ADAPTER) == 0.7
    assert v.threshold("m", PipelineKind.TXT2IMG) == 0.8
    assert v.threshold("m") == 0.8
    assert v.threshold("other", "ip-adapter") == 0.6  # the spec's own
    assert Verifier(SpecEngine("0.65"), cfg).threshold("other") == 0.65  # as a float
    assert Verifier(SpecEngine(None), cfg).threshold("other") == 0.9
    assert Verifier(SpecEngine("missing"), cfg).threshold("other") == 0.9
    assert Verifier(SpecEngine("raise"), cfg).threshold("other") == 0.9
    assert isinstance(Verifier(SpecEngine(1), cfg).threshold("other"), float)
    assert Verifier(SpecEngine(), None).config == VerifyConfig()
    assert Verifier(SpecEngine(0.6), cfg).threshold("third") == 0.9  # spec("third") raises


# ----------------------------------------------------------------------------- judge
def _truncated_png(image: Image.Image) -> Image.Image:
    """What a miner could send: a PNG whose header is intact but whose data is cut short."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return Image.open(io.BytesIO(buf.getvalue()[:60]))


def test_judge_passes_at_the_threshold_and_fails_below():
    ref = _smooth(2)
    exact = Verifier(SpecEngine(), VerifyConfig(thresholds={"m": 1.0}, **NO_FLOOR))
    v = exact.judge("m", ref, ref.copy())
    assert v.passed and v.similarity == pytest.approx(1.0) and v.threshold == 1.0
    assert v.details == compare(ref, ref) and v.error == ""
    other = _smooth(3)
    sim = compare(ref, other).similarity
    at = Verifier(SpecEngine(), VerifyConfig(thresholds={"m": sim}, **NO_FLOOR))
    assert at.judge("m", ref, other).passed
    above = Verifier(SpecEngine(), VerifyConfig(thresholds={"m": sim + 1e-9}, **NO_FLOOR))
    verdict = above.judge("m", ref, other)
    assert not verdict.passed and verdict.similarity == sim


def test_judge_uses_the_pipeline_threshold():
    ref, other = _smooth(2), _smooth(3)
    sim = compare(ref, other).similarity
    thresholds = {"m": 0.0, "m/controlnet-canny": 1.0}
    v = Verifier(SpecEngine(), VerifyConfig(thresholds=thresholds, **NO_FLOOR))
    assert v.judge("m", ref, other).passed
    verdict = v.judge("m", ref, other, PipelineKind.CONTROLNET_CANNY)
    assert not verdict.passed and verdict.threshold == 1.0 and verdict.similarity == sim


def test_judge_turns_an_unreadable_candidate_into_a_failed_verdict():
    ref = _smooth(4)
    bad = _truncated_png(ref)
    assert bad.size == ref.size  # the header promises the right size ...
    with pytest.raises(OSError):
        compare(ref, bad)  # ... the pixels are not there
    v = Verifier(SpecEngine(), VerifyConfig(thresholds={"m": 0.5}, **NO_FLOOR))
    verdict = v.judge("m", ref, _truncated_png(ref))
    assert (verdict.passed, verdict.similarity, verdict.threshold, verdict.details) == (
        False, 0.0, 0.5, None)
    assert verdict.error.startswith("compare failed: ") and len(verdict.error) > 16
    assert Verdict(True, 1.0, 0.9).details is None and Verdict(True, 1.0, 0.9).error == ""


# ----------------------------------------------------------------------------- references
class Recorder:
    """An engine that records each generate_batch call and draws an image per request."""

    def __init__(self, fail=False):
        self.calls: list[list[int]] = []
        self.fail = fail

    def resolve(self, params):
        return params.model_copy(update={"negative_prompt": "r"})

    def spec(self, model):
        raise KeyError(model)

    def generate_batch(self, items):
        if self.fail:
            raise RuntimeError("out of memory")
        assert all(p.negative_prompt == "r" for p, _ in items)  # resolved before batching
        self.calls.append([p.seed for p, _ in items])
        return [Image.new("RGB", (p.width, p.height), (p.seed % 256, 0, 0)) for p, _ in items]


def _p(seed, **kw):
    base = {"model": "kolors", "prompt": f"p{seed}", "seed": seed, "steps": 4, "guidance": 5.0,
                "width": 16, "height": 16}
    base.update(kw)
    return GenerationParams(**base)


@pytest.mark.parametrize("max_batch, sizes", [(8, [8, 2]), (3, [3, 3, 3, 1]), (1, [1] * 10),
                                              (0, [1] * 10), (-4, [1] * 10), (10, [10]),
                                              (9, [9, 1])])
def test_chunks_honour_max_batch(max_batch, sizes):
    engine = Recorder()
    v = Verifier(engine, VerifyConfig(max_batch=max_batch))
    refs = v.references([(_p(s), None) for s in range(10)])
    assert [len(c) for c in engine.calls] == sizes
    assert [seed for call in engine.calls for seed in call] == list(range(10))
    assert [r.getpixel((0, 0))[0] for r in refs] == list(range(10))


def test_default_chunk_is_eight():
    engine = Recorder()
    Verifier(engine).references([(_p(s), None) for s in range(17)])
    assert [len(c) for c in engine.calls] == [8, 8, 1]


@pytest.mark.parametrize("change", [{"model": "flux-schnell"},
                                    {"pipeline": PipelineKind.IP_ADAPTER},
                                    {"steps": 5}, {"guidance": 4.0}, {"width": 24},
                                    {"height": 24}, {"controlnet_scale": 0.5},
                                    {"ip_adapter_scale": 0.5}])
def test_requests_differing_in_anything_but_prompt_and_seed_are_not_batched(change):
    engine = Recorder()
    refs = Verifier(engine).references([(_p(1), None), (_p(2, **change), None), (_p(3), None)])
    assert engine.calls == [[1, 3], [2]]
    assert [r.getpixel((0, 0))[0] for r in refs] == [1, 2, 3]


def test_prompt_negative_prompt_and_seed_share_a_batch_but_images_do_not():
    engine = Recorder()
    Verifier(engine).references([(_p(1), None), (_p(2, prompt="other", negative_prompt="n"),
                                                 None)])
    assert engine.calls == [[1, 2]]
    a, b = Image.new("RGB", (16, 16)), Image.new("RGB", (16, 16))
    engine = Recorder()
    Verifier(engine).references([(_p(1), a), (_p(2), b), (_p(3), a)])
    assert engine.calls == [[1, 3], [2]]


def test_verify_judges_each_item_and_lets_regeneration_failures_propagate():
    engine = Recorder()
    v = Verifier(engine, VerifyConfig(thresholds={"kolors": 0.5, "kolors/ip-adapter": 1.1}))
    good = Image.new("RGB", (16, 16), (1, 0, 0))
    verdicts = v.verify([(_p(1), None, good),
                         (_p(2), None, Image.new("RGB", (16, 16), (90, 0, 0))),
                         (_p(1, pipeline=PipelineKind.IP_ADAPTER), good, good)])
    assert [x.passed for x in verdicts] == [True, False, False]
    assert [x.threshold for x in verdicts] == [0.5, 0.5, 1.1]
    assert v.verify([]) == []
    with pytest.raises(RuntimeError, match="out of memory"):
        Verifier(Recorder(fail=True)).verify([(_p(1), None, good)])


# ----------------------------------------------------------------------------- real engine
@pytest.mark.slow
def test_chunked_references_equal_single_regenerations(tiny_engine):
    class Counting:
        def __init__(self, engine):
            self.engine, self.sizes = engine, []

        def resolve(self, params):
            return self.engine.resolve(params)

        def generate_batch(self, items):
            self.sizes.append(len(items))
            return self.engine.generate_batch(items)

    requests = [(GenerationParams(model="flux-schnell", prompt=f"a lighthouse, study {i}",
                                  seed=100 + i), None) for i in range(5)]
    counting = Counting(tiny_engine)
    refs = Verifier(counting, VerifyConfig(max_batch=2)).references(requests)
    assert counting.sizes == [2, 2, 1]
    for (params, _), ref in zip(requests, refs, strict=False):
        single = tiny_engine.generate(tiny_engine.resolve(params))
        c = compare(single, ref)
        assert c.similarity >= vf.DEFAULT_THRESHOLDS["flux-schnell"], (params.seed, c)
    # and each reference belongs to its own request, not a neighbour in the batch
    assert compare(tiny_engine.generate(tiny_engine.resolve(requests[1][0])),
                   refs[0]).similarity < vf.DEFAULT_THRESHOLDS["flux-schnell"]


# ----------------------------------------------------------------------------- PSNR floor
def test_psnr_floor_defaults_and_lookup_order():
    from niche.validator.verify import DEFAULT_PSNR_FLOOR, DEFAULT_PSNR_FLOORS

    assert DEFAULT_PSNR_FLOOR == 28.0
    assert DEFAULT_PSNR_FLOORS == {"flux-schnell": 28.0, "kolors": 29.0,
                                   "flux-dev": 28.0, "flux-mini": 28.0,
                                   "kolors/controlnet-canny": 29.0,
                                   "kolors/controlnet-depth": 29.0, "kolors/ip-adapter": 29.0}
    assert VerifyConfig().psnr_floors == DEFAULT_PSNR_FLOORS
    assert VerifyConfig().default_psnr_floor == 28.0
    cfg = VerifyConfig(psnr_floors={"m": 30.0, "m/ip-adapter": 33.0}, default_psnr_floor=25.0)
    v = Verifier(SpecEngine(), cfg)
    assert v.psnr_floor("m", "ip-adapter") == 33.0
    assert v.psnr_floor("m", PipelineKind.IP_ADAPTER) == 33.0
    assert v.psnr_floor("m", "txt2img") == 30.0 and v.psnr_floor("m") == 30.0
    assert v.psnr_floor("other") == 25.0 and isinstance(v.psnr_floor("other"), float)
    merged = VerifyConfig.with_overrides({}, {"kolors": 20.0, "flux-schnell/txt2img": 31.0})
    assert merged.psnr_floors["kolors"] == 20.0 and "kolors/ip-adapter" not in merged.psnr_floors
    assert merged.psnr_floors["flux-schnell"] == 28.0
    assert merged.psnr_floors["flux-schnell/txt2img"] == 31.0
    assert VerifyConfig.with_overrides({}).psnr_floors == DEFAULT_PSNR_FLOORS


def test_judge_applies_the_floor_exactly_and_says_why():
    ref = _smooth(2)
    other = _noisy_copy(ref, 6)
    c = compare(ref, other)
    at = Verifier(SpecEngine(), VerifyConfig(thresholds={"m": 0.0}, psnr_floors={"m": c.psnr}))
    verdict = at.judge("m", ref, other)
    assert verdict.passed and verdict.reason == "" and verdict.psnr == c.psnr
    assert verdict.psnr_floor == c.psnr
    above = Verifier(SpecEngine(), VerifyConfig(thresholds={"m": 0.0},
                                                psnr_floors={"m": c.psnr + 1e-6}))
    failed = above.judge("m", ref, other)
    assert not failed.passed
    assert failed.reason == f"psnr {c.psnr:.1f} dB < {c.psnr + 1e-6:.1f} dB"
    both = Verifier(SpecEngine(), VerifyConfig(thresholds={"m": 1.0},
                                               psnr_floors={"m": 99.0})).judge("m", ref, other)
    assert both.reason == (f"similarity {c.similarity:.3f} < 1.000; "
                           f"psnr {c.psnr:.1f} dB < 99.0 dB")
    broken = at.judge("m", ref, _truncated_png(ref))
    assert broken.reason == broken.error and broken.reason.startswith("compare failed: ")
    assert broken.psnr is None and broken.psnr_floor == c.psnr


def test_judge_uses_the_pipeline_psnr_floor():
    ref = _smooth(2)
    other = _noisy_copy(ref, 6)
    psnr = compare(ref, other).psnr
    cfg = VerifyConfig(thresholds={"m": 0.0},
                       psnr_floors={"m": psnr - 1.0, "m/controlnet-canny": psnr + 1.0})
    v = Verifier(SpecEngine(), cfg)
    assert v.judge("m", ref, other).passed
    strict = v.judge("m", ref, other, PipelineKind.CONTROLNET_CANNY)
    assert not strict.passed and strict.psnr_floor == psnr + 1.0
