"""The Family contract: how a model's weights are loaded and how one pipeline call is made.

A family is built from a ModelSpec and a location (a local folder holding the hub layout, or
None for hub ids). The engine owns validation, seeds and locking; a family only turns resolved
params plus per-item generators into images.
"""
from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from niche.errors import ConfigError
from niche.models.spec import ComponentSource, MemoryMode, ModelSpec
from niche.models.token_counter import TokenCounter
from niche.protocol import GenerationParams

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BatchItem:
    """One image of a pipeline call: its prompt pair and its own seeded CPU generator."""

    prompt: str
    negative_prompt: str
    generator: torch.Generator


StepHook = Callable[[int, torch.Tensor], None]
"""Called after every denoising step i (0-based) with the batch's sampler state x_{i+1}."""


class Family(ABC):
    uses_negative_prompt = True  # False: the engine blanks it in resolve (no effect on pixels)

    def __init__(self, spec: ModelSpec, folder: Path | None, device: str, dtype: str,
                 memory_mode: MemoryMode, local_files_only: bool = False, fast: bool = False):
        self.spec = spec
        self.folder = Path(folder) if folder is not None else None
        self.device = torch.device(device)
        self.dtype_name = dtype
        self.dtype = TORCH_DTYPES[dtype]
        self.memory_mode = memory_mode
        self.local_files_only = local_files_only or self.folder is not None
        self.fast = fast
        self.fast_applied: list[str] = []  # what apply_fast did (bench reports it)
        self._counting_lock = threading.Lock()
        self._token_counter: TokenCounter | None = None

    # ------------------------------------------------------------------ loading helpers
    def source(self, key: str) -> tuple[str, dict[str, Any]]:
        """(path or hub id, from_pretrained kwargs) for one component of the spec."""
        comp: ComponentSource = self.spec.component(key)
        if self.folder is not None:
            path = (self.folder / comp.local).resolve()
            if not path.exists():
                raise ConfigError(f"model {self.spec.name}: {path} missing (component {key})")
            return str(path), {"local_files_only": True}
        if comp.hub is None:
            raise ConfigError(f"model {self.spec.name}: component {key} has no hub id; give "
                              "a model folder (--model-path or --model-dir)")
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

    def apply_fast(self, denoiser: torch.nn.Module, vae: torch.nn.Module,
                   fuse_qkv: bool = True) -> list[str]:
        """The CUDA fast path, after `place` (docs/models.md "Fast path"): each piece is kept
        only where its outputs still pass the validator's step check against plain bfloat16.
        On CPU (or when `fast` is off) nothing changes: the bits are the plain path's."""
        if not self.fast:
            return []
        if self.device.type != "cuda":
            log.info("%s: the fast path is a no-op on %s (CUDA only): bits unchanged",
                     self.spec.name, self.device.type)
            return []
        done: list[str] = []
        vae.to(memory_format=torch.channels_last)
        done.append("channels_last vae")
        if fuse_qkv and hasattr(denoiser, "fuse_qkv_projections"):
            denoiser.fuse_qkv_projections()
            done.append("fused qkv")
        # SDPA: diffusers' default processors on torch 2 are the scaled_dot_product_attention
        # ones (AttnProcessor2_0, FluxAttnProcessor...), so nothing is swapped in; this only
        # records that no slower processor (xformers, sliced, vanilla) replaced them.
        processors = getattr(denoiser, "attn_processors", {})
        slow = sorted({type(p).__name__ for p in processors.values()
                       if type(p).__name__ in ("AttnProcessor", "SlicedAttnProcessor",
                                               "XFormersAttnProcessor")})
        if slow:
            log.warning("%s: fast path: non-SDPA attention processors in use: %s",
                        self.spec.name, ", ".join(slow))
        else:
            done.append("sdpa attention")
        mode = self.spec.fast_compile
        if mode != "none":
            if self.memory_mode == "sequential-offload":
                log.info("%s: fast path: no torch.compile under sequential offload "
                         "(its per-layer hooks move weights)", self.spec.name)
            else:
                denoiser.compile(mode=mode)  # in place: the module keeps its type and config
                done.append(f"torch.compile {mode}")
        log.info("%s: fast path on: %s", self.spec.name, ", ".join(done))
        self.fast_applied = done
        return done

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

            # the engine dtype, not the first parameter's: fp8 / GGUF storage computes in it
            float32_sampling(denoiser, vae, list(side_networks), denoiser_dtype=self.dtype)

    # ------------------------------------------------------------------ the interface
    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def bounding_tokenizer(self) -> Any:
        """The pipeline's tokenizer whose length limit bounds the prompt."""

    def token_count(self, text: str) -> int:
        """Tokens the text encoder that bounds the prompt would see (max_sequence_length),
        counted on a private copy of its tokenizer (niche/models/token_counter.py says why):
        requests are resolved outside the engine lock, so they must never touch the
        pipeline's own tokenizer."""
        if self._token_counter is None:
            with self._counting_lock:
                if self._token_counter is None:
                    self._token_counter = TokenCounter(self.bounding_tokenizer())
        return self._token_counter.count(text)

    @abstractmethod
    def run(self, params: GenerationParams, items: list[BatchItem],
            image: PIL.Image.Image | None,
            on_step: StepHook | None = None) -> list[PIL.Image.Image]:
        """One pipeline call for items sharing `params` (prompt/seed aside). `on_step`, if
        given, sees the batch's sampler state after every step (the pipeline's
        `callback_on_step_end`); it must not change it."""

    # ------------------------------------------------------------------ single steps
    # One denoising step outside the pipeline's loop, for the step check: the same
    # components, scheduler schedule, conditioning and batching as `run`, batch size 1, so
    # that recomputing a step on the same machine and dtype is bit-exact.
    @abstractmethod
    def initial_state(self, params: GenerationParams,
                      generator: torch.Generator) -> torch.Tensor:
        """x_0, float32 on CPU, exactly as the pipeline starts its loop from it."""

    def state_shape(self, params: GenerationParams) -> tuple[int, ...]:
        """The shape of every state x_0..x_N of a request (batch 1)."""
        return tuple(self.initial_state(params, torch.Generator("cpu").manual_seed(0)).shape)

    @abstractmethod
    def step_context(self, params: GenerationParams, prompt: str, negative_prompt: str,
                     image: PIL.Image.Image | None) -> Any:
        """Everything a step needs that does not depend on the state (text embeddings, the
        control image, image embeddings), computed once for any number of steps."""

    @abstractmethod
    def step(self, params: GenerationParams, context: Any, state: torch.Tensor,
             step: int) -> torch.Tensor:
        """x_{step+1} (float32, CPU) from x_step = `state` (float32, batch 1)."""

    @abstractmethod
    def decode(self, params: GenerationParams, state: torch.Tensor) -> PIL.Image.Image:
        """The image the pipeline outputs when its loop ends at `state` (x_N)."""

    def shared_modules(self) -> dict[str, torch.nn.Module]:
        return {}


def recording_callback(on_step: StepHook | None) -> dict[str, Any]:
    """Pipeline kwargs that pass the latents after each step to `on_step` (none if None)."""
    if on_step is None:
        return {}

    def callback(pipe, i: int, t, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        on_step(i, tensors["latents"])
        return {}  # nothing replaced: the loop goes on with its own latents

    return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]}


def scheduler_at(scheduler, step: int):
    """A copy of the pipeline's scheduler (already set to the call's schedule) positioned
    at `step`: the pipeline's own one is left at the end of its last call, where
    `scale_model_input` silently uses sigma 0."""
    copy = deepcopy(scheduler)
    copy._step_index = step
    return copy
