"""FLUX.1 text-to-image through diffusers' FluxPipeline: schnell, dev and Flux-mini (dev
and mini are guidance-distilled: the transformer embeds the guidance scale, no negative
branch). Components may come from single files (niche/models/single_file.py) and the
transformer may be stored in fp8 or GGUF (the spec's `quant`)."""
from __future__ import annotations

import logging
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from niche.models.families.base import (
    BatchItem,
    Family,
    StepHook,
    recording_callback,
    scheduler_at,
)
from niche.protocol import GenerationParams

log = logging.getLogger(__name__)


@dataclass
class FluxStepContext:
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    text_ids: torch.Tensor
    latent_image_ids: torch.Tensor
    guidance: torch.Tensor | None
    scheduler: object  # a copy set to the request's schedule


class FluxFamily(Family):
    uses_negative_prompt = False  # guidance-distilled (schnell, dev, mini): no negative branch

    def load(self) -> None:
        from diffusers import FluxPipeline

        path, kwargs = self.source("base")
        parts = self.single_file_parts()
        if self.spec.quant.startswith("gguf") and "transformer" not in parts:
            from niche.errors import ConfigError

            raise ConfigError(f"model {self.spec.name}: quant {self.spec.quant} needs a .gguf "
                              "transformer file (components.transformer.file or one in the "
                              "model folder)")
        self.pipe = FluxPipeline.from_pretrained(path, dtype=self.dtype, **kwargs, **parts)
        self.apply_quant()
        self.prepare()

    def single_file_parts(self) -> dict[str, torch.nn.Module]:
        """The components that come from single files, loaded (the rest from the folder)."""
        from niche.models import single_file as sf

        files = sf.component_files(self.spec, self.folder)
        if not files:
            return {}
        base = self.folder or Path(".")
        parts: dict[str, torch.nn.Module] = {}
        for key, path in files.items():
            if key == sf.TRANSFORMER:
                parts[key] = sf.load_transformer(path, base, self.dtype, self.spec.quant)
            elif key == sf.VAE:
                parts[key] = sf.load_vae(path, base, self.dtype)
            else:
                parts[key] = sf.load_text_encoder(key, path, base, self.dtype)
            log.info("%s: %s from %s", self.spec.name, key, path)
        return parts

    def apply_quant(self) -> None:
        """fp8 storage for the transformer (`quant: fp8`) and T5 (`text_encoder_quant`)."""
        from niche.models.quant import store_in_fp8

        if self.spec.quant == "fp8":
            store_in_fp8(self.pipe.transformer, self.dtype)
        if self.spec.text_encoder_quant == "fp8":
            store_in_fp8(self.pipe.text_encoder_2, self.dtype)

    def prepare(self) -> None:
        """Everything after the weights are in `self.pipe` (bench/gpu.py builds them itself)."""
        self.keep_sampling_in_float32(self.pipe.transformer, self.pipe.vae)
        self.place(self.pipe)
        self.apply_fast(self.pipe.transformer, self.pipe.vae)

    def bounding_tokenizer(self) -> Any:
        # T5 bounds the prompt (CLIP's 77 tokens are truncated by the pipeline, as upstream).
        return self.pipe.tokenizer_2

    def initial_noise(self, params: GenerationParams, generator: torch.Generator) -> torch.Tensor:
        """Packed latents drawn on CPU in float32, so a seed means the same on every device."""
        channels = self.pipe.transformer.config.in_channels // 4
        latents, _ = self.pipe.prepare_latents(1, channels, params.height, params.width,
                                               torch.float32, torch.device("cpu"), generator)
        return latents

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled, text_ids), the embeddings as float32: FluxPipeline casts
        the latents it is given to the embeddings' dtype (prepare_latents), which would round
        x_0 (and the first timestep) in a half-precision engine. The transformer casts its
        inputs back to its own dtype (precision.py), exactly, so only the loop state differs."""
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.pipe._execution_device,
            num_images_per_prompt=1, max_sequence_length=self.spec.defaults.max_sequence_length)
        return embeds.to(torch.float32), pooled.to(torch.float32), text_ids

    def run(self, params: GenerationParams, items: list[BatchItem],
            image: PIL.Image.Image | None,
            on_step: StepHook | None = None) -> list[PIL.Image.Image]:
        noise = torch.cat([self.initial_noise(params, it.generator) for it in items])
        embeds, pooled, _ = self.encode([it.prompt for it in items])
        out = self.pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance,
            width=params.width,
            height=params.height,
            latents=self.initial_latents(noise),
            generator=[it.generator for it in items],
            max_sequence_length=self.spec.defaults.max_sequence_length,
            output_type="pil",
            **recording_callback(on_step),
        )
        return list(out.images)

    # ------------------------------------------------------------------ single steps
    def initial_state(self, params: GenerationParams,
                      generator: torch.Generator) -> torch.Tensor:
        return self.initial_noise(params, generator)  # float32, used as given (see encode)

    def state_shape(self, params: GenerationParams) -> tuple[int, ...]:
        width, height = params.size
        side = self.pipe.vae_scale_factor * 2  # 2x2 latent patches per token
        return (1, (height // side) * (width // side), self.pipe.transformer.config.in_channels)

    def step_context(self, params: GenerationParams, prompt: str, negative_prompt: str,
                     image: PIL.Image.Image | None) -> FluxStepContext:
        """FluxPipeline.__call__ steps 3-5 for one prompt: embeddings, image ids, the
        shifted sigmas for this resolution, guidance (None for schnell)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        pipe = self.pipe
        device = pipe._execution_device
        embeds, pooled, text_ids = self.encode([prompt])
        vsf = pipe.vae_scale_factor
        width, height = params.size
        h, w = 2 * (height // (vsf * 2)), 2 * (width // (vsf * 2))
        image_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, embeds.dtype)
        n = int(params.steps or 0)
        sigmas: np.ndarray | None = np.linspace(1.0, 1 / n, n)
        if getattr(pipe.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        cfg = pipe.scheduler.config
        mu = calculate_shift((h // 2) * (w // 2), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                             cfg.get("max_shift", 1.15))
        scheduler = deepcopy(pipe.scheduler)
        retrieve_timesteps(scheduler, n, device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full([1], params.guidance, device=device, dtype=torch.float32)
        return FluxStepContext(embeds, pooled, text_ids, image_ids, guidance, scheduler)

    def step(self, params: GenerationParams, context: FluxStepContext, state: torch.Tensor,
             step: int) -> torch.Tensor:
        """One iteration of FluxPipeline's denoising loop (step 6), no true CFG."""
        scheduler = scheduler_at(context.scheduler, step)
        latents = state.to(self.pipe._execution_device, torch.float32)
        t = scheduler.timesteps[step]
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        with self.pipe.transformer.cache_context("cond"):
            noise_pred = self.pipe.transformer(
                hidden_states=latents, timestep=timestep / 1000, guidance=context.guidance,
                pooled_projections=context.pooled_prompt_embeds,
                encoder_hidden_states=context.prompt_embeds, txt_ids=context.text_ids,
                img_ids=context.latent_image_ids, joint_attention_kwargs={},
                return_dict=False)[0]
        out = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        return out.to("cpu", torch.float32)

    def decode(self, params: GenerationParams, state: torch.Tensor) -> PIL.Image.Image:
        """FluxPipeline.__call__'s decoding: unpack, unscale and shift, VAE, postprocess."""
        from diffusers.utils.torch_utils import get_module_execution_device

        pipe = self.pipe
        latents = state.to(pipe._execution_device, torch.float32)
        latents = pipe._unpack_latents(latents, params.height, params.width, pipe.vae_scale_factor)
        latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        latents = latents.to(get_module_execution_device(pipe.vae))
        image = pipe.vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0]

    def shared_modules(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.pipe.transformer, "vae": self.pipe.vae}
