"""What each model accepts, from its spec (the same YAML and checkpoint overrides the
miners load), and how an OpenAI request becomes one `GenerationParams` per image.

The gateway fills every default (size, steps, guidance) itself, so the params sent, the
params reported to the user and the params audited are the same explicit values."""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from niche.errors import InvalidRequest, one_line
from niche.gateway.errors import bad_request
from niche.gateway.schemas import ImagesRequest
from niche.imaging import DEFAULT_LIMITS, ImageLimits, decode_image
from niche.models.spec import ModelSpec, load_spec
from niche.protocol import MAX_SEED, GenerationParams

_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
"""Matched whole (`fullmatch`: `$` would let a final newline through)."""


@dataclass(frozen=True)
class ModelCatalog:
    specs: dict[str, ModelSpec]

    @classmethod
    def load(cls, models: Iterable[str], model_root: Path | None = None) -> ModelCatalog:
        """Specs of `models`; with `model_root`, each model folder's overrides (the tiny
        checkpoints' 64x64 limits) apply, as they do on miners loading that folder."""
        specs = {}
        for name in models:
            folder = Path(model_root) / name if model_root else None
            specs[name] = load_spec(name, model_dir=folder if folder and folder.is_dir()
                                    else None)
        return cls(specs)

    def spec(self, model: str | None) -> ModelSpec:
        if not model:
            raise bad_request(f"model is required; one of: {', '.join(sorted(self.specs))}",
                              "model", code="model_not_found")
        spec = self.specs.get(model)
        if spec is None:
            raise bad_request(f"unknown model '{one_line(model)}'; this gateway serves: "
                              f"{', '.join(sorted(self.specs))} (GET /v1/models)", "model",
                              code="model_not_found")
        return spec

    @staticmethod
    def sizes_text(spec: ModelSpec) -> str:
        lim = spec.limits
        if lim.allowed_sizes:
            return ", ".join(f"{w}x{h}" for w, h in lim.allowed_sizes)
        return f"WxH, each {lim.min_size}..{lim.max_size} in steps of {lim.size_multiple}"

    def size(self, spec: ModelSpec, size: str | None) -> tuple[int, int]:
        """`size` "WxH" checked against the model's limits; None: the model's default."""
        if size is None or size == "auto":
            return spec.defaults.width, spec.defaults.height
        match = _SIZE.fullmatch(size)
        advice = f"{spec.name} accepts {self.sizes_text(spec)}"
        if match is None:
            raise bad_request(f"size '{one_line(size)}' is not WIDTHxHEIGHT; {advice}", "size")
        width, height = int(match.group(1)), int(match.group(2))
        lim = spec.limits
        rule = (f"each side must be a multiple of {lim.size_multiple} within "
                f"[{lim.min_size}, {lim.max_size}]")
        for value in (width, height):
            if not lim.min_size <= value <= lim.max_size:
                raise bad_request(f"size {size} is out of range: {rule} ({advice})", "size")
            if value % lim.size_multiple:
                raise bad_request(f"size {size}: {value} is not a multiple of "
                                  f"{lim.size_multiple}; {rule} ({advice})", "size")
        if lim.allowed_sizes and [width, height] not in [list(s) for s in lim.allowed_sizes]:
            raise bad_request(f"size {size} is not allowed; {advice}", "size")
        return width, height

    def params(self, request: ImagesRequest, seeds: list[int]) -> list[GenerationParams]:
        """One explicit GenerationParams per image (the i-th with seeds[i])."""
        spec = self.spec(request.model)
        lim, d = spec.limits, spec.defaults
        if request.pipeline not in spec.pipelines:
            raise bad_request(f"{spec.name} does not serve pipeline '{request.pipeline.value}' "
                              f"(serves: {', '.join(p.value for p in spec.pipelines)})",
                              "pipeline")
        if request.pipeline.needs_image and not request.image:
            raise bad_request(f"pipeline {request.pipeline.value} needs a conditioning image "
                              "(base64 PNG/WebP/JPEG in 'image')", "image")
        if not request.pipeline.needs_image and request.image:
            raise bad_request("'image' is only for the controlnet-* and ip-adapter pipelines",
                              "image")
        width, height = self.size(spec, request.size)
        steps = d.steps if request.steps is None else request.steps
        if not lim.min_steps <= steps <= lim.max_steps or (
                lim.allowed_steps and steps not in lim.allowed_steps):
            raise bad_request(f"steps {steps}: {spec.name} takes "
                              f"{lim.allowed_steps or f'{lim.min_steps}..{lim.max_steps}'}",
                              "steps")
        guidance = d.guidance if request.guidance is None else request.guidance
        if guidance > lim.max_guidance:
            raise bad_request(f"guidance {guidance}: {spec.name} takes at most "
                              f"{lim.max_guidance}", "guidance")
        if request.controlnet_scale is not None and not request.pipeline.value.startswith(
                "controlnet"):
            raise bad_request("controlnet_scale is only for the controlnet-* pipelines",
                              "controlnet_scale")
        if request.ip_adapter_scale is not None and request.pipeline.value != "ip-adapter":
            raise bad_request("ip_adapter_scale is only for the ip-adapter pipeline",
                              "ip_adapter_scale")
        return [GenerationParams(
            model=spec.name, pipeline=request.pipeline, prompt=request.prompt,
            negative_prompt=request.negative_prompt, seed=seed % (MAX_SEED + 1), steps=steps,
            guidance=guidance, width=width, height=height,
            controlnet_scale=request.controlnet_scale,
            ip_adapter_scale=request.ip_adapter_scale) for seed in seeds]

    def check_image(self, spec: ModelSpec, image_b64: str) -> None:
        """Decode the conditioning image under the caps the miners apply (the model's pixel
        cap, imaging's side cap): a bomb, a lie about the format, bad base64 or an image a
        miner would refuse is a 400 before any miner is asked."""
        limits = ImageLimits(max_pixels=min(DEFAULT_LIMITS.max_pixels,
                                            spec.limits.max_image_pixels),
                             max_side=DEFAULT_LIMITS.max_side)
        try:
            decode_image(image_b64, field="image", limits=limits)
        except InvalidRequest as exc:
            raise bad_request(str(exc), "image", code="invalid_image") from None
