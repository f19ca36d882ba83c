"""FLUX.1-schnell text-to-image through diffusers' FluxPipeline."""
from __future__ import annotations

import PIL.Image
import torch

from niche.models.families.base import BatchItem, Family
from niche.protocol import GenerationParams


class FluxFamily(Family):
    uses_negative_prompt = False  # schnell is guidance-distilled: no negative branch
    def load(self) -> None:
        from diffusers import FluxPipeline

        path, kwargs = self.source("base")
        self.pipe = FluxPipeline.from_pretrained(path, dtype=self.dtype, **kwargs)
        self.keep_sampling_in_float32(self.pipe.transformer, self.pipe.vae)
        self.place(self.pipe)

    def token_count(self, text: str) -> int:
        # T5 bounds the prompt (CLIP's 77 tokens are truncated by the pipeline, as upstream).
        return len(self.pipe.tokenizer_2(text, truncation=False).input_ids)

    def initial_noise(self, params: GenerationParams, generator: torch.Generator) -> torch.Tensor:
        """Packed latents drawn on CPU in float32, so a seed means the same on every device."""
        channels = self.pipe.transformer.config.in_channels // 4
        latents, _ = self.pipe.prepare_latents(1, channels, params.height, params.width,
                                               torch.float32, torch.device("cpu"), generator)
        return latents

    def run(self, params: GenerationParams, items: list[BatchItem],
            image: PIL.Image.Image | None) -> list[PIL.Image.Image]:
        noise = torch.cat([self.initial_noise(params, it.generator) for it in items])
        out = self.pipe(
            prompt=[it.prompt for it in items],
            num_inference_steps=params.steps,
            guidance_scale=params.guidance,
            width=params.width,
            height=params.height,
            latents=self.initial_latents(noise),
            generator=[it.generator for it in items],
            max_sequence_length=self.spec.defaults.max_sequence_length,
            output_type="pil",
        )
        return list(out.images)

    def shared_modules(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.pipe.transformer, "vae": self.pipe.vae}
