"""Model specs: what a model family serves, its defaults and limits, where its weights live.

Defaults ship as package data (niche/models/configs/*.yaml; configs/models/ in the repository
links to them), so an installed wheel finds them. An operator can point `NICHE_MODELS_CONFIG_DIR`
(or `config_dir=`) at another folder. A checkpoint folder may carry `niche_model.yaml` whose
`defaults`/`limits` override the spec's (the tiny checkpoints use it for 64x64, few steps).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from niche.errors import ConfigError
from niche.protocol import PipelineKind

PACKAGE_CONFIG_DIR = Path(__file__).parent / "configs"
OVERRIDE_FILE = "niche_model.yaml"
MemoryMode = Literal["gpu", "model-offload", "sequential-offload"]
DTYPES = ("float32", "bfloat16", "float16")
MEMORY_MODES = ("gpu", "model-offload", "sequential-offload")
COMPILE_MODES = ("none", "default", "max-autotune-no-cudagraphs")
CompileMode = Literal["none", "default", "max-autotune-no-cudagraphs"]
Quant = Literal["none", "fp8", "gguf-q8", "gguf-q4"]
QUANTS = ("none", "fp8", "gguf-q8", "gguf-q4")
"""How the denoiser's weights are stored (docs/models.md "Quantized variants"): none (the
engine dtype), fp8 (float8_e4m3fn storage, compute in the engine dtype), GGUF Q8_0 / Q4
transformer files (diffusers' GGUF support). Compute is always the engine dtype."""


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ComponentSource(_Cfg):
    """One loadable piece: a hub repository, or `local` relative to the model's folder, or
    (FLUX transformer, vae, text_encoder, text_encoder_2) one single `file` (relative to the
    model's folder or absolute; niche/models/single_file.py)."""

    hub: str | None = None
    file: str | None = None
    local: str = "."
    variant: str | None = None
    revision: str | None = None
    weight_name: str | None = None
    image_encoder: str | None = None


class Defaults(_Cfg):
    steps: int = Field(ge=1)
    guidance: float = Field(ge=0.0)
    width: int = Field(ge=16)
    height: int = Field(ge=16)
    timeout: float = Field(default=30.0, gt=0.0)
    max_sequence_length: int = Field(default=256, ge=1)
    controlnet_scale: float = 0.8
    control_guidance_end: float = Field(default=0.9, gt=0.0, le=1.0)
    ip_adapter_scale: float = 0.5
    canny_low: int = 100
    canny_high: int = 200


class Limits(_Cfg):
    min_size: int = Field(default=256, ge=16)
    max_size: int = Field(default=2048, ge=16)
    size_multiple: int = Field(default=16, ge=1)
    min_steps: int = Field(default=1, ge=1)
    max_steps: int = Field(default=50, ge=1)
    max_guidance: float = Field(default=30.0, ge=0.0)
    allowed_sizes: list[tuple[int, int]] | None = None  # (width, height); None = any in range
    allowed_steps: list[int] | None = None
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)


class ModelSpec(_Cfg):
    name: str
    family: Literal["flux", "kolors"]
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    memory_mode: MemoryMode = "gpu"
    cpu_threads: int | None = Field(default=None, ge=1)  # torch threads hint on CPU
    # The CUDA fast path (families/base.py `apply_fast`): channels_last VAE, fused QKV,
    # SDPA processors, torch.compile of the denoiser. A no-op on CPU. docs/models.md.
    fast: bool = False
    fast_compile: CompileMode = "max-autotune-no-cudagraphs"  # "none": no torch.compile
    pipelines: list[PipelineKind]
    components: dict[str, ComponentSource]
    defaults: Defaults
    limits: Limits = Limits()
    verify_threshold: float | None = None  # validator's similarity bar; None: its default
    quant: Quant = "none"  # the denoiser's weight storage (QUANTS)
    text_encoder_quant: Literal["none", "fp8"] = "none"  # T5 weights in float8_e4m3fn
    # The precision the validator recomputes with, a subnet parameter: a miner's variant
    # must verify against it (niche/models/variants.py, docs/scoring.md).
    reference_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    reference_quant: Quant = "none"

    def component(self, key: str) -> ComponentSource:
        try:
            return self.components[key]
        except KeyError:
            raise ConfigError(f"model {self.name}: no component '{key}' in its config") from None


def config_dir(explicit: Path | None = None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("NICHE_MODELS_CONFIG_DIR")
    return Path(env) if env else PACKAGE_CONFIG_DIR


def available_models(directory: Path | None = None) -> list[str]:
    return sorted(p.stem for p in config_dir(directory).glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping")
    return data


def load_spec(name: str, directory: Path | None = None,
              model_dir: Path | None = None) -> ModelSpec:
    """The spec for `name`, with `model_dir/niche_model.yaml` overrides merged in when present."""
    path = config_dir(directory) / f"{name}.yaml"
    if not path.is_file():
        known = available_models(directory)
        if not known:
            raise ConfigError(f"unknown model '{name}': no model configs in "
                              f"{config_dir(directory)} (check NICHE_MODELS_CONFIG_DIR)")
        raise ConfigError(f"unknown model '{name}': choose from {', '.join(known)}")
    data = _read_yaml(path)
    if model_dir is not None and (Path(model_dir) / OVERRIDE_FILE).is_file():
        override = _read_yaml(Path(model_dir) / OVERRIDE_FILE)
        for key, value in override.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


T5_FP8 = "+t5-fp8"


def with_quant(spec: ModelSpec, variant: str) -> ModelSpec:
    """`spec` with the weight storage of `variant`: QUANT or QUANT+t5-fp8 (e.g. gguf-q8,
    none+t5-fp8), as `--quant MODEL=VARIANT` and the variants table name them."""
    quant, t5 = (variant[: -len(T5_FP8)], "fp8") if variant.endswith(T5_FP8) else (variant, None)
    if quant not in QUANTS:
        raise ConfigError(f"quant {variant!r} for {spec.name}: expected one of "
                          f"{', '.join(QUANTS)}, optionally followed by {T5_FP8}")
    if spec.family != "flux" and variant != "none":
        raise ConfigError(f"quant {variant!r}: {spec.name} serves no quantized variants "
                          "(FLUX models only)")
    update: dict = {"quant": quant}
    if t5:
        update["text_encoder_quant"] = t5
    return spec.model_copy(update=update)


def variant_name(spec: ModelSpec) -> str:
    """The name `with_quant` reads back (what the miner's refusal and the table say)."""
    return spec.quant + (T5_FP8 if spec.text_encoder_quant == "fp8" else "")

