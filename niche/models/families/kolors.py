"""Kolors: text-to-image, ControlNet (canny, depth) and IP-Adapter Plus on ONE set of weights.

The base KolorsPipeline owns the UNet, ChatGLM, tokenizer, VAE and scheduler. The ControlNet
pipelines are KolorsControlNetPipeline objects built on those same module objects plus their
own ControlNetModel; the IP-Adapter pipeline is a KolorsPipeline on the same modules plus the
CLIP image encoder. Loading the IP-Adapter rewires the shared UNet (attention processors and
`encoder_hid_proj`), so the family keeps both wirings and switches between them, under the
engine's lock, before each call: no weights are copied, and txt2img is untouched by the adapter.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import PIL.Image
import torch

from niche.models.families.base import BatchItem, Family
from niche.protocol import GenerationParams, PipelineKind

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

log = logging.getLogger(__name__)

CONTROLNETS = {PipelineKind.CONTROLNET_CANNY: "controlnet-canny",
               PipelineKind.CONTROLNET_DEPTH: "controlnet-depth"}


class _UNetWiring:
    """The UNet's attention processors and text/image projection for one mode."""

    def __init__(self, unet):
        self.processors = dict(unet.attn_processors)
        self.encoder_hid_proj = unet.encoder_hid_proj
        self.encoder_hid_dim_type = unet.config.encoder_hid_dim_type

    def to(self, device, dtype) -> None:
        for module in [self.encoder_hid_proj, *self.processors.values()]:
            if isinstance(module, torch.nn.Module):
                module.to(device=device, dtype=dtype)

    def apply(self, unet) -> None:
        # The projection first: its attention layers count among the UNet's processors.
        unet.encoder_hid_proj = self.encoder_hid_proj
        unet.config.encoder_hid_dim_type = self.encoder_hid_dim_type
        unet.set_attn_processor(dict(self.processors))  # set_attn_processor pops from its dict


class KolorsFamily(Family):
    def load(self) -> None:
        from diffusers import ControlNetModel, KolorsPipeline

        from niche.models.families.kolors_controlnet import KolorsControlNetPipeline

        path, kwargs = self.source("base")
        self.base = KolorsPipeline.from_pretrained(path, dtype=self.dtype, **kwargs)
        shared = {k: getattr(self.base, k)
                  for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
        self.controlnet_pipes: dict[PipelineKind, KolorsControlNetPipeline] = {}
        for kind, key in CONTROLNETS.items():
            if kind not in self.spec.pipelines:
                continue
            cpath, ckw = self.source(key)
            controlnet = ControlNetModel.from_pretrained(cpath, dtype=self.dtype, **ckw)
            self.controlnet_pipes[kind] = KolorsControlNetPipeline(controlnet=controlnet, **shared)
        self.ip_pipe: KolorsPipeline | None = None
        self._wiring: dict[str, _UNetWiring] = {}
        if PipelineKind.IP_ADAPTER in self.spec.pipelines:
            self._load_ip_adapter(shared)
        self.keep_sampling_in_float32(
            self.base.unet, self.base.vae, [p.controlnet for p in self.controlnet_pipes.values()])
        self.depth_estimator = None
        if PipelineKind.CONTROLNET_DEPTH in self.spec.pipelines and \
                "depth-estimator" in self.spec.components:
            from niche.models.conditioning import DepthEstimator

            dpath, dkw = self.source("depth-estimator")
            self.depth_estimator = DepthEstimator(dpath, device=self.device, **dkw)
        pipes = list(self.pipelines().values())
        if self.device.type == "cpu" or self.memory_mode == "gpu":
            for pipe in pipes:
                self.place(pipe)
            if "ip" in self._wiring:  # detached from the UNet while in base wiring
                self._wiring["ip"].to(self.device, self.dtype)
        else:  # offload hooks belong to one pipeline: re-installed when another one runs
            for pipe in pipes:
                pipe.set_progress_bar_config(disable=True)
            self.place(self.base)
        self._placed = self.base

    def _load_ip_adapter(self, shared: dict) -> None:
        from diffusers import KolorsPipeline
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        comp = self.spec.component("ip-adapter")
        ipath, ikw = self.source("ip-adapter")
        enc_kw = {k: v for k, v in ikw.items() if k != "variant"}
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            ipath, subfolder=comp.image_encoder or "image_encoder", dtype=self.dtype, **enc_kw)
        size = encoder.config.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": size},
                                       crop_size={"height": size, "width": size})
        self._wiring["base"] = _UNetWiring(shared["unet"])
        self.ip_pipe = KolorsPipeline(image_encoder=encoder, feature_extractor=processor, **shared)
        self.ip_pipe.load_ip_adapter(ipath, subfolder="", weight_name=comp.weight_name,
                                     image_encoder_folder=None, **enc_kw)
        self._wiring["ip"] = _UNetWiring(shared["unet"])
        self._wiring["base"].apply(shared["unet"])
        self._mode = "base"

    def _set_mode(self, mode: str) -> None:
        if self._wiring and self._mode != mode:
            self._wiring[mode].apply(self.base.unet)
            self._mode = mode

    def _prepare_offload(self, pipe) -> None:
        """Offload hooks belong to one pipeline; re-hook when another pipeline runs."""
        if self.device.type != "cpu" and self.memory_mode != "gpu" and pipe is not self._placed:
            self.place(pipe)
            self._placed = pipe

    def token_count(self, text: str) -> int:
        return len(self.base.tokenizer(text, truncation=False).input_ids)

    def initial_noise(self, params: GenerationParams, generator: torch.Generator) -> torch.Tensor:
        """Unscaled latents drawn on CPU in float32 (the pipeline applies init_noise_sigma)."""
        factor = self.base.vae_scale_factor
        shape = (1, self.base.unet.config.in_channels, params.height // factor,
                 params.width // factor)
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    def run(self, params: GenerationParams, items: list[BatchItem],
            image: PIL.Image.Image | None) -> list[PIL.Image.Image]:
        noise = torch.cat([self.initial_noise(params, it.generator) for it in items])
        common = {
            "prompt": [it.prompt for it in items],
            "negative_prompt": [it.negative_prompt for it in items],
            "num_inference_steps": params.steps,
            "guidance_scale": params.guidance,
            "width": params.width,
            "height": params.height,
            "latents": self.initial_latents(noise),
            "generator": [it.generator for it in items],
            "max_sequence_length": self.spec.defaults.max_sequence_length,
            "output_type": "pil",
        }
        kind = params.pipeline
        # Scale 0 means "no adapter": run the base pipeline, which makes it exactly txt2img.
        if kind in CONTROLNETS and params.controlnet_scale == 0.0:
            kind = PipelineKind.TXT2IMG
        if kind is PipelineKind.IP_ADAPTER and params.ip_adapter_scale == 0.0:
            kind = PipelineKind.TXT2IMG
        if kind is PipelineKind.TXT2IMG:
            self._set_mode("base")
            self._prepare_offload(self.base)
            return list(self.base(**common).images)
        if kind in CONTROLNETS:
            pipe = self.controlnet_pipes[kind]
            self._set_mode("base")
            self._prepare_offload(pipe)
            return list(pipe(image=image, controlnet_conditioning_scale=params.controlnet_scale,
                             control_guidance_end=self.spec.defaults.control_guidance_end,
                             **common).images)
        assert self.ip_pipe is not None
        self._set_mode("ip")
        try:
            self._prepare_offload(self.ip_pipe)
            self.ip_pipe.set_ip_adapter_scale(params.ip_adapter_scale)
            return list(self.ip_pipe(ip_adapter_image=image, **common).images)
        finally:
            self._set_mode("base")

    def shared_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.base.unet, "text_encoder": self.base.text_encoder,
                "vae": self.base.vae}

    def pipelines(self) -> dict[PipelineKind, DiffusionPipeline]:
        out: dict[PipelineKind, DiffusionPipeline] = {PipelineKind.TXT2IMG: self.base}
        out.update(self.controlnet_pipes)
        if self.ip_pipe is not None:
            out[PipelineKind.IP_ADAPTER] = self.ip_pipe
        return out

    def own_modules(self) -> dict[str, torch.nn.Module]:
        """Weights that belong to one adapter pipeline, not to the shared base."""
        own: dict[str, torch.nn.Module] = {
            CONTROLNETS[k]: p.controlnet for k, p in self.controlnet_pipes.items()}
        if self.ip_pipe is not None:
            own["image_encoder"] = self.ip_pipe.image_encoder
            ip = self._wiring["ip"]
            own["ip_image_proj"] = ip.encoder_hid_proj
            layers = torch.nn.ModuleList(p for p in ip.processors.values()
                                         if isinstance(p, torch.nn.Module))
            own["ip_attn"] = layers
        if self.depth_estimator is not None:
            own["depth_estimator"] = self.depth_estimator.model
        return own
