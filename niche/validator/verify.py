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

similarity = min(ssim, detail_correlation, energy_score); an image passes when
similarity >= threshold (per model, configurable; calibrated by bench/calibrate_verify.py,
figures in docs/scoring.md). PSNR is reported alongside for people, not used to decide.
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


def _as_float(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _gaussian(x: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(x, (7, 7), sigma, borderType=cv2.BORDER_REFLECT)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two grey images in [0, 1] (Wang et al. 2004)."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = _gaussian(a), _gaussian(b)
    var_a = _gaussian(a * a) - mu_a ** 2
    var_b = _gaussian(b * b) - mu_b ** 2
    cov = _gaussian(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def _laplacian(grey: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.Laplacian(grey, cv2.CV_64F, ksize=3, borderType=cv2.BORDER_REFLECT)


def compare(reference: Image.Image, candidate: Image.Image) -> Comparison:
    """Similarity of a candidate to the reference; 0 when the sizes differ."""
    if reference.size != candidate.size:
        return Comparison(0.0, 0.0, 0.0, 0.0, 0.0)
    ref, cand = _as_float(reference), _as_float(candidate)
    mse = float(np.mean((ref - cand) ** 2))
    psnr = 100.0 if mse <= 1e-12 else float(10.0 * np.log10(1.0 / mse))
    ref_y, cand_y = _luma(ref), _luma(cand)
    s = ssim(ref_y, cand_y)
    lap_ref, lap_cand = _laplacian(ref_y), _laplacian(cand_y)
    e_ref, e_cand = float(np.mean(lap_ref ** 2)), float(np.mean(lap_cand ** 2))
    if e_ref <= 1e-12 or e_cand <= 1e-12:  # flat images: only identical ones match
        same = bool(np.allclose(ref, cand, atol=2 / 255))
        value = 1.0 if same else 0.0
        return Comparison(min(s, value), s, value, value, psnr)
    ratio = e_cand / e_ref
    energy = float(np.sqrt(min(ratio, 1.0 / ratio)))
    corr = float(np.sum((lap_ref - lap_ref.mean()) * (lap_cand - lap_cand.mean()))
                 / np.sqrt(np.sum((lap_ref - lap_ref.mean()) ** 2)
                           * np.sum((lap_cand - lap_cand.mean()) ** 2)))
    similarity = max(0.0, min(s, corr, energy))
    return Comparison(similarity, s, corr, ratio, psnr)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    similarity: float
    threshold: float
    details: Comparison | None = None
    error: str = ""


@dataclass
class VerifyConfig:
    """Thresholds per `model` or per `model/pipeline`; see Verifier.threshold."""

    default_threshold: float = DEFAULT_THRESHOLD
    thresholds: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    max_batch: int = 8

    @classmethod
    def with_overrides(cls, overrides: Mapping[str, float], **kwargs) -> VerifyConfig:
        """The calibrated defaults with an operator's `--verify.threshold` on top: a
        model-wide override (`kolors=0.97`) replaces that model's per-pipeline defaults too."""
        whole_models = {key for key in overrides if "/" not in key}
        merged = {key: value for key, value in DEFAULT_THRESHOLDS.items()
                  if key.split("/")[0] not in whole_models}
        merged.update(overrides)
        return cls(thresholds=merged, **kwargs)


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
        if pipeline and f"{model}/{pipeline}" in self.config.thresholds:
            return float(self.config.thresholds[f"{model}/{pipeline}"])
        if model in self.config.thresholds:
            return float(self.config.thresholds[model])
        try:
            value = self.engine.spec(model).verify_threshold
        except InvalidRequest:  # a model the engine does not serve: the default applies
            value = None
        return float(value) if value is not None else self.config.default_threshold

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
        """Compare one candidate to its reference; never raises for a bad candidate."""
        t = self.threshold(model, pipeline)
        try:
            c = compare(reference, candidate)
        except Exception as exc:  # an unreadable candidate fails, with the reason
            return Verdict(False, 0.0, t, None, f"compare failed: {exc}")
        return Verdict(c.similarity >= t, c.similarity, t, c)

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
