"""Is this image what the challenge's parameters produce? Regenerate and compare.

Semantic embeddings are not enough (a CLIP cosine of 0.9 lets through fewer steps, other
seeds of the same prompt, low-res upscales), so the comparison works on pixels at full
resolution and looks at three things, each of which a different cheat breaks:

- SSIM (luminance, 7x7 Gaussian window): structure at every location. Another seed, prompt,
  model or conditioning image changes the layout; noise and blocking lower it too.
- detail correlation: Pearson correlation of the Laplacians (the high-frequency part) of
  both images. Honest numeric noise (bfloat16, thread counts, attention kernels, batching)
  keeps the same fine detail; blur, upscaling, fewer steps and JPEG do not.
- detail energy ratio r: Laplacian energy of the candidate over the reference's, scored
  sqrt(min(r, 1/r)). Blurred / upscaled images have far too little (r = 0.1-0.5), noised
  ones too much; the square root keeps bfloat16's own extra high-frequency noise
  (r ~ 1.01) from dominating the score while those cheats stay far below the threshold.

similarity = min(ssim, detail_correlation, energy_score). Those three are statistics, and a
cheater can restore statistics: skip a denoising step, then sharpen / add noise / match
colours until SSIM, detail correlation and energy look honest (issue 15; bench/adversary.py
searches such post-processing with this module's own score). What post-processing cannot
restore is the pixel error itself, so the verdict also bounds it:

- PSNR floor: psnr >= floor[model/pipeline] is required as well. The floor sits under the
  worst honest numeric noise measured (bfloat16 / float16 against a float32 reference,
  other thread counts, batching; bfloat16 has a tail down to ~29 dB on the tiny weights),
  so it rejects the cheats whose pixel error exceeds any honest one (half steps, no CFG,
  upscales, other seeds / prompts, most skipped steps) even after post-processing. Cheats
  whose error falls inside honest noise (one step fewer or skipped on some requests) are
  out of any image check's reach: that is the step check's job (docs/adversary.md).

An image passes when similarity >= threshold AND psnr >= psnr_floor (both per model and
model/pipeline, configurable; calibrated by bench/calibrate_verify.py, figures in
docs/scoring.md and docs/adversary.md). Verdict.reason names the bound that failed.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from niche.errors import InvalidRequest
from niche.protocol import GenerationParams

if TYPE_CHECKING:
    from niche.models.engine import ImageEngine

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.99
DEFAULT_THRESHOLDS = {
    "flux-schnell": 0.956,
    "flux-dev": 0.956,   # schnell's (same VAE and family), not recalibrated
    "flux-mini": 0.956,
    "kolors": 0.971,
    "kolors/controlnet-canny": 0.975,
    "kolors/controlnet-depth": 0.980,
    "kolors/ip-adapter": 0.972,
}
"""Calibrated on the trained tiny checkpoints (bench/calibrate_verify.py, docs/scoring.md):
each sits midway between the lowest honest variant (bfloat16 against a float32 reference,
0.979 to 0.993) and the highest cheat (fewer steps 0.902 to 0.967; another conditioning
image 0.903 to 0.963), margins +0.025 to +0.046. Recalibrate with production weights and
hardware (`--model-path`) before trusting them on a real network."""

DEFAULT_PSNR_FLOOR = 28.0
"""For a model without a calibrated floor: under the lowest honest figure measured so far."""
DEFAULT_PSNR_FLOORS = {
    "flux-schnell": 28.0,
    "flux-dev": 28.0,
    "flux-mini": 28.0,
    "kolors": 29.0,
    "kolors/controlnet-canny": 29.0,
    "kolors/controlnet-depth": 29.0,
    "kolors/ip-adapter": 29.0,
}
"""PSNR (dB) an answer must reach against the float32 reference. Set from
bench/calibrate_verify.py plus 10 more requests per model (docs/adversary.md): honest
bfloat16 is 39-48 dB on most requests but has a tail (FLUX 28.8, Kolors 29.8 dB, 1 to 2 in
13 requests), so each floor sits under the lowest honest figure (margins +0.8 dB), not
midway to the cheats: fewer steps (N-1) reaches 38.1 / 39.2 dB on some requests and a fixed
floor cannot reject it there without failing honest miners. What the floor does reject is
the bulk of the skip-and-post-process cheats (detection per audited answer in
docs/adversary.md); the conditioned Kolors pipelines take the txt2img floor (not measured
separately this session). Recalibrate with production weights (`--model-path`)."""


@dataclass(frozen=True)
class Comparison:
    similarity: float
    ssim: float
    detail_correlation: float
    energy_ratio: float
    psnr: float

    def as_dict(self) -> dict:
        return {"similarity": self.similarity, "ssim": self.ssim,
                "detail_correlation": self.detail_correlation,
                "energy_ratio": self.energy_ratio, "psnr": self.psnr}


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_C1, _C2 = 0.01 ** 2, 0.03 ** 2


def _rgb8(image: Image.Image) -> np.ndarray:
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def _grey(rgb8: np.ndarray) -> np.ndarray:
    """Luminance in [0, 1] as float32, straight from the 8-bit pixels (one pass)."""
    import cv2

    return cv2.transform(rgb8.astype(np.float32), (_LUMA / 255.0).reshape(1, 3))


def _gaussian(x: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """7x7 Gaussian, reflected border; x may stack several channels (one call blurs all)."""
    import cv2

    return cv2.GaussianBlur(x, (7, 7), sigma, borderType=cv2.BORDER_REFLECT)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two grey images in [0, 1] (Wang et al. 2004), float32
    with contiguous planes and in-place arithmetic (few temporaries, one pass each)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    mu_a, mu_b = _gaussian(a), _gaussian(b)
    s_ab = _gaussian(a * b)
    s_sq = _gaussian(np.add(np.square(a), np.square(b)))  # var_a + var_b needs only the sum
    mu_ab = mu_a * mu_b
    np.square(mu_a, out=mu_a)
    np.square(mu_b, out=mu_b)
    mu_sq = np.add(mu_a, mu_b, out=mu_a)  # mu_a^2 + mu_b^2
    # num = (2 mu_a mu_b + c1) (2 cov + c2), den = (mu_a^2 + mu_b^2 + c1) (var_a + var_b + c2)
    s_ab -= mu_ab
    s_ab *= 2
    s_ab += _C2
    mu_ab *= 2
    mu_ab += _C1
    mu_ab *= s_ab
    s_sq -= mu_sq
    s_sq += _C2
    mu_sq += _C1
    mu_sq *= s_sq
    mu_ab /= mu_sq
    return float(mu_ab.mean(dtype=np.float64))


def _laplacian(grey: np.ndarray) -> np.ndarray:
    """3x3 Laplacian, reflected border, float32; grey may stack channels."""
    import cv2

    return cv2.Laplacian(grey.astype(np.float32, copy=False), cv2.CV_32F, ksize=3,
                         borderType=cv2.BORDER_REFLECT)


def _psnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    """PSNR in dB over the RGB bytes; the squared error is summed exactly in integers."""
    import cv2

    sse = float(cv2.norm(reference, candidate, cv2.NORM_L2SQR))  # exact for 8-bit input
    mse = sse / (reference.size * 255.0 ** 2)
    return 100.0 if mse <= 1e-12 else float(10.0 * np.log10(1.0 / mse))


def psnr(reference: Image.Image, candidate: Image.Image) -> float:
    """PSNR in dB of two images of one size, as `compare` measures it."""
    return _psnr(_rgb8(reference), _rgb8(candidate))


def compare(reference: Image.Image, candidate: Image.Image) -> Comparison:
    """Similarity of a candidate to the reference; 0 when the sizes differ.

    float32 throughout (sums and means accumulate in float64), few temporaries: ~4x
    faster than the float64 original at 1024x1024. tests/test_verify_hardened.py keeps
    that original and checks that both agree to 1e-5 and give the same verdicts."""
    if reference.size != candidate.size:
        return Comparison(0.0, 0.0, 0.0, 0.0, 0.0)
    ref8, cand8 = _rgb8(reference), _rgb8(candidate)
    psnr = _psnr(ref8, cand8)
    ref_y, cand_y = _grey(ref8), _grey(cand8)
    s = ssim(ref_y, cand_y)
    lap_ref, lap_cand = _laplacian(ref_y), _laplacian(cand_y)
    n = lap_ref.size
    sum_ref, sum_cand = float(lap_ref.sum(dtype=np.float64)), float(
        lap_cand.sum(dtype=np.float64))
    sq_ref = float(np.einsum("ij,ij->", lap_ref, lap_ref, dtype=np.float64))
    sq_cand = float(np.einsum("ij,ij->", lap_cand, lap_cand, dtype=np.float64))
    e_ref, e_cand = sq_ref / n, sq_cand / n
    if e_ref <= 1e-12 or e_cand <= 1e-12:  # flat images: only identical ones match
        same = bool(np.max(np.abs(ref8.astype(np.int16) - cand8.astype(np.int16))) <= 2)
        value = 1.0 if same else 0.0
        return Comparison(min(s, value), s, value, value, psnr)
    ratio = e_cand / e_ref
    energy = float(np.sqrt(min(ratio, 1.0 / ratio)))
    cross = float(np.einsum("ij,ij->", lap_ref, lap_cand, dtype=np.float64))
    cov = cross - sum_ref * sum_cand / n
    var_ref, var_cand = sq_ref - sum_ref ** 2 / n, sq_cand - sum_cand ** 2 / n
    corr = cov / float(np.sqrt(var_ref * var_cand)) if var_ref > 0 and var_cand > 0 else 0.0
    similarity = max(0.0, min(s, corr, energy))
    return Comparison(similarity, s, corr, ratio, psnr)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    similarity: float
    threshold: float
    details: Comparison | None = None
    error: str = ""
    psnr: float | None = None
    """the candidate's PSNR against the reference (dB); None when compare failed"""
    psnr_floor: float = 0.0
    reason: str = ""
    """empty when passed; otherwise which bound failed, e.g. 'similarity 0.912 < 0.956' or
    'psnr 33.1 dB < 36.0 dB' (both, joined by '; ', when both fail), or the compare error"""


@dataclass
class VerifyConfig:
    """Thresholds and PSNR floors per `model` or per `model/pipeline`; see
    Verifier.threshold and Verifier.psnr_floor."""

    default_threshold: float = DEFAULT_THRESHOLD
    thresholds: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    max_batch: int = 8
    default_psnr_floor: float = DEFAULT_PSNR_FLOOR
    psnr_floors: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_PSNR_FLOORS))

    @classmethod
    def with_overrides(cls, overrides: Mapping[str, float],
                       psnr_overrides: Mapping[str, float] | None = None,
                       **kwargs) -> VerifyConfig:
        """The calibrated defaults with an operator's `--verify.threshold` (and PSNR floors)
        on top: a model-wide override (`kolors=0.97`) replaces that model's per-pipeline
        defaults too."""
        return cls(thresholds=_merge(DEFAULT_THRESHOLDS, overrides),
                   psnr_floors=_merge(DEFAULT_PSNR_FLOORS, psnr_overrides or {}), **kwargs)


def _merge(defaults: Mapping[str, float], overrides: Mapping[str, float]) -> dict[str, float]:
    whole_models = {key for key in overrides if "/" not in key}
    merged = {key: value for key, value in defaults.items()
              if key.split("/")[0] not in whole_models}
    merged.update(overrides)
    return merged


def _lookup(table: Mapping[str, float], model: str, pipeline: str | None) -> float | None:
    if pipeline and f"{model}/{pipeline}" in table:
        return float(table[f"{model}/{pipeline}"])
    if model in table:
        return float(table[model])
    return None


class Verifier:
    """Regenerates references with the shared engine (batched where parameters allow) and
    compares each candidate to its reference."""

    def __init__(self, engine: ImageEngine, config: VerifyConfig | None = None):
        self.engine = engine
        self.config = config or VerifyConfig()

    def threshold(self, model: str, pipeline: str | None = None) -> float:
        """`model/pipeline` (e.g. kolors/controlnet-canny) first, then `model`, then the
        ModelSpec's `verify_threshold` if the engine declares one, then the default."""
        pipeline = getattr(pipeline, "value", pipeline)
        value = _lookup(self.config.thresholds, model, pipeline)
        if value is not None:
            return value
        try:
            declared = self.engine.spec(model).verify_threshold
        except InvalidRequest:  # a model the engine does not serve: the default applies
            declared = None
        return float(declared) if declared is not None else self.config.default_threshold

    def psnr_floor(self, model: str, pipeline: str | None = None) -> float:
        """Lowest PSNR (dB) an honest answer has against the reference: `model/pipeline`
        first, then `model`, then the default."""
        pipeline = getattr(pipeline, "value", pipeline)
        value = _lookup(self.config.psnr_floors, model, pipeline)
        return value if value is not None else float(self.config.default_psnr_floor)

    def references(self, requests: Sequence[tuple[GenerationParams, Image.Image | None]]
                   ) -> list[Image.Image]:
        """Regenerate every request. Requests that can share a pipeline call (same model,
        pipeline, size, steps, guidance, scales, conditioning image) are batched by the
        engine; `max_batch` bounds each call's memory."""
        resolved = [(self.engine.resolve(p), img) for p, img in requests]
        groups: dict[tuple, list[int]] = {}
        for index, (params, img) in enumerate(resolved):
            groups.setdefault(_batch_key(params, img), []).append(index)
        out: list[Image.Image | None] = [None] * len(resolved)
        step = max(1, self.config.max_batch)
        for indices in groups.values():
            for start in range(0, len(indices), step):
                chunk = indices[start:start + step]
                images = self.engine.generate_batch([resolved[i] for i in chunk])
                for i, image in zip(chunk, images, strict=False):
                    out[i] = image
        return out  # type: ignore[return-value]

    def judge(self, model: str, reference: Image.Image, candidate: Image.Image,
              pipeline: str | None = None) -> Verdict:
        """Compare one candidate to its reference; never raises for a bad candidate. Passes
        when similarity >= threshold and psnr >= psnr_floor."""
        t = self.threshold(model, pipeline)
        floor = self.psnr_floor(model, pipeline)
        try:
            c = compare(reference, candidate)
        except Exception as exc:  # an unreadable candidate fails, with the reason
            reason = f"compare failed: {exc}"
            return Verdict(False, 0.0, t, None, reason, None, floor, reason)
        failed = []
        if not c.similarity >= t:
            failed.append(f"similarity {c.similarity:.3f} < {t:.3f}")
        if not c.psnr >= floor:
            failed.append(f"psnr {c.psnr:.1f} dB < {floor:.1f} dB")
        return Verdict(not failed, c.similarity, t, c, "", c.psnr, floor, "; ".join(failed))

    def verify(self, items: Sequence[tuple[GenerationParams, Image.Image | None, Image.Image]]
               ) -> list[Verdict]:
        """items: (params, conditioning image, candidate). A regeneration failure is the
        validator's problem and propagates; a bad candidate is a failed verdict."""
        refs = self.references([(p, img) for p, img, _ in items])
        return [self.judge(params.model, ref, candidate, params.pipeline)
                for (params, _, candidate), ref in zip(items, refs, strict=False)]


def _batch_key(params: GenerationParams, image: Image.Image | None) -> tuple:
    """Everything but prompt, negative prompt and seed: those vary inside one batch."""
    return (params.model, params.pipeline, params.steps, params.guidance, params.width,
            params.height, params.controlnet_scale, params.ip_adapter_scale, id(image))
