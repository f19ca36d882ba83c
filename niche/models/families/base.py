"""The Family contract: how a model's weights are loaded and how one pipeline call is made.

A family is built from a ModelSpec and a location (a local folder holding the hub layout, or
None for hub ids). The engine owns validation, seeds and locking; a family only turns resolved
params plus per-item generators into images.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from niche.errors import ConfigError
from niche.models.spec import ComponentSource, MemoryMode, ModelSpec
from niche.protocol import GenerationParams

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BatchItem:
    """One image of a pipeline call: its prompt pair and its own seeded CPU generator."""

    prompt: str
    negative_prompt: str
    generator: torch.Generator


class Family(ABC):
    uses_negative_prompt = True  # False: the engine blanks it in resolve (no effect on pixels)

    def __init__(self, spec: ModelSpec, folder: Path | None, device: str, dtype: str,
                 memory_mode: MemoryMode, local_files_only: bool = False):
        self.spec = spec
        self.folder = Path(folder) if folder is not None else None
        self.device = torch.device(device)
        self.dtype_name = dtype
        self.dtype = TORCH_DTYPES[dtype]
        self.memory_mode = memory_mode
        self.local_files_only = local_files_only or self.folder is not None

    # ------------------------------------------------------------------ loading helpers
    def source(self, key: str) -> tuple[str, dict[str, Any]]:
        """(path or hub id, from_pretrained kwargs) for one component of the spec."""
        comp: ComponentSource = self.spec.component(key)
        if self.folder is not None:
            path = (self.folder / comp.local).resolve()
            if not path.exists():
                raise ConfigError(f"model {self.spec.name}: {path} missing (component {key})")
            return str(path), {"local_files_only": True}
        kwargs: dict[str, Any] = {"local_files_only": self.local_files_only}
        if comp.revision:
            kwargs["revision"] = comp.revision
        if comp.variant and self.dtype_name == "float16":
            kwargs["variant"] = comp.variant
        return comp.hub, kwargs

    def place(self, pipe) -> None:
        """Apply the memory mode once after loading (a pipeline's modules follow the device)."""
        pipe.set_progress_bar_config(disable=True)
        if self.device.type == "cpu":
            if self.memory_mode != "gpu":
                log.info("%s: memory mode %s is a no-op on CPU", self.spec.name, self.memory_mode)
            return
        if self.memory_mode == "gpu":
            pipe.to(self.device)
        elif self.memory_mode == "model-offload":
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.enable_sequential_cpu_offload(device=self.device)

    @property
    def noise_device(self) -> torch.device:
        """Where pipelines run; initial noise is always drawn on CPU then moved here."""
        return self.device

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """The float32 CPU noise as the pipeline's starting latents: float32 on the pipeline's
        device (the sampler state stays float32 whatever the networks' dtype: precision.py)."""
        return noise.to(self.noise_device, torch.float32)

    def keep_sampling_in_float32(self, denoiser: torch.nn.Module, vae: torch.nn.Module,
                                 side_networks: Sequence[torch.nn.Module] = ()) -> None:
        """Half-precision networks, float32 loop state (niche.models.precision)."""
        if self.dtype != torch.float32:
            from niche.models.precision import float32_sampling

            float32_sampling(denoiser, vae, list(side_networks))

    # ------------------------------------------------------------------ the interface
    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def token_count(self, text: str) -> int:
        """Tokens the text encoder that bounds the prompt would see (max_sequence_length)."""

    @abstractmethod
    def run(self, params: GenerationParams, items: list[BatchItem],
            image: PIL.Image.Image | None) -> list[PIL.Image.Image]:
        """One pipeline call for items sharing `params` (prompt/seed aside)."""

    def shared_modules(self) -> dict[str, torch.nn.Module]:
        return {}
