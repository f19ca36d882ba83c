"""Conditioning images: canny edges, depth maps, IP-Adapter references.

Every conditioning image is first fitted to the request's width x height the same way on
every machine (center crop to the aspect ratio, then a Lanczos resize in PIL), so the control
signal, like the seed, means the same thing everywhere.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import PIL.Image
import torch

log = logging.getLogger(__name__)


def fit(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """RGB, center-cropped to width:height, resized to exactly width x height."""
    image = image.convert("RGB")
    w, h = image.size
    target = width / height
    if w / h > target:  # too wide: crop the sides
        new_w = max(1, round(h * target))
        left = (w - new_w) // 2
        image = image.crop((left, 0, left + new_w, h))
    elif w / h < target:
        new_h = max(1, round(w / target))
        top = (h - new_h) // 2
        image = image.crop((0, top, w, top + new_h))
    if image.size != (width, height):
        image = image.resize((width, height), PIL.Image.Resampling.LANCZOS)
    return image


def canny(image: PIL.Image.Image, width: int, height: int, low: int = 100,
          high: int = 200) -> PIL.Image.Image:
    """OpenCV Canny edges of the fitted image, as a 3-channel white-on-black image."""
    import cv2

    gray = cv2.cvtColor(np.asarray(fit(image, width, height)), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, low, high)
    return PIL.Image.fromarray(np.stack([edges] * 3, axis=-1))


class DepthEstimator:
    """A transformers depth model (DPT / Depth Anything); relative depth, near = bright."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 **kwargs):
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        kwargs.pop("variant", None)
        self.processor = AutoImageProcessor.from_pretrained(str(path), **kwargs)
        self.model = AutoModelForDepthEstimation.from_pretrained(str(path), **kwargs).eval()
        self.device = torch.device(device)
        self.model.to(self.device)

    @torch.no_grad()
    def __call__(self, image: PIL.Image.Image) -> np.ndarray:
        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.model.dtype)
        depth = self.model(pixel_values=pixel_values).predicted_depth
        return depth[0].float().cpu().numpy()


def depth(image: PIL.Image.Image, width: int, height: int,
          estimator: DepthEstimator | None = None) -> PIL.Image.Image:
    """A depth map for ControlNet-depth. With an estimator the image is a photo and its depth
    is predicted; without one the image is taken as a depth map already (grayscale)."""
    fitted = fit(image, width, height)
    if estimator is None:
        gray = np.asarray(fitted.convert("L"))
    else:
        pred = estimator(fitted).astype(np.float64)
        lo, hi = float(pred.min()), float(pred.max())
        norm = (pred - lo) / (hi - lo) if hi > lo else np.zeros_like(pred)
        small = PIL.Image.fromarray(np.round(norm * 255.0).astype(np.uint8))
        gray = np.asarray(small.resize((width, height), PIL.Image.Resampling.BICUBIC))
    return PIL.Image.fromarray(np.stack([gray] * 3, axis=-1))


def reference(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """IP-Adapter reference: fitted like the rest; the CLIP processor takes it from there."""
    return fit(image, width, height)
