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
from copy import deepcopy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import PIL.Image
import torch

from niche.models.families.base import (
    BatchItem,
    Family,
    StepHook,
    recording_callback,
    scheduler_at,
)
from niche.models.families.kolors_controlnet import (
    added_conditioning,
    control_keep,
    controlnet_states,
)
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


@dataclass
class KolorsStepContext:
    """What every step of one request shares (the pipelines' steps 3-7 for one prompt)."""

    kind: PipelineKind  # the pipeline that actually runs (scale 0 -> txt2img)
    cfg: bool
    prompt_embeds: torch.Tensor  # [uncond, cond] under CFG
    added_cond_kwargs: dict[str, Any]
    scheduler: Any  # a copy set to the request's schedule
    controlnet_states: torch.Tensor | None = None
    control: torch.Tensor | None = None
    keep: list[float] = field(default_factory=list)


class KolorsFamily(Family):
    def load(self) -> None:
        from diffusers import KolorsPipeline

        path, kwargs = self.source("base")
        self.base = KolorsPipeline.from_pretrained(path, dtype=self.dtype, **kwargs)
        self.prepare()

    def prepare(self) -> None:
        """Everything after the base weights are in `self.base` (bench/gpu.py builds them)."""
        from diffusers import ControlNetModel

        from niche.models.families.kolors_controlnet import KolorsControlNetPipeline

        shared = {k: getattr(self.base, k)
                  for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
        self.controlnet_pipes: dict[PipelineKind, KolorsControlNetPipeline] = {}
        for kind, key in CONTROLNETS.items():
            if kind not in self.spec.pipelines:
                continue
            cpath, ckw = self.source(key)
            controlnet = ControlNetModel.from_pretrained(cpath, dtype=self.dtype, **ckw)
            self.controlnet_pipes[kind] = KolorsControlNetPipeline(controlnet=controlnet, **shared)
        self.ip_pipe: DiffusionPipeline | None = None
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
        # Fused QKV would be undone by the IP-Adapter's processor switch: only without it.
        self.apply_fast(self.base.unet, self.base.vae, fuse_qkv=not self._wiring)

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

    def bounding_tokenizer(self) -> Any:
        return self.base.tokenizer

    def initial_noise(self, params: GenerationParams, generator: torch.Generator) -> torch.Tensor:
        """Unscaled latents drawn on CPU in float32 (the pipeline applies init_noise_sigma)."""
        factor = self.base.vae_scale_factor
        shape = (1, self.base.unet.config.in_channels, params.height // factor,
                 params.width // factor)
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    def running_kind(self, params: GenerationParams) -> PipelineKind:
        """Scale 0 means "no adapter": the base pipeline runs, which makes it exactly txt2img."""
        kind = params.pipeline
        if kind in CONTROLNETS and params.controlnet_scale == 0.0:
            return PipelineKind.TXT2IMG
        if kind is PipelineKind.IP_ADAPTER and params.ip_adapter_scale == 0.0:
            return PipelineKind.TXT2IMG
        return kind

    def run(self, params: GenerationParams, items: list[BatchItem],
            image: PIL.Image.Image | None,
            on_step: StepHook | None = None) -> list[PIL.Image.Image]:
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
            **recording_callback(on_step),
        }
        kind = self.running_kind(params)
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

    # ------------------------------------------------------------------ single steps
    def _schedule(self, params: GenerationParams):
        """A copy of the shared scheduler set to the request's N steps, as retrieve_timesteps
        sets the pipeline's own (the three pipelines share one scheduler)."""
        from diffusers.pipelines.kolors.pipeline_kolors import retrieve_timesteps

        scheduler = deepcopy(self.base.scheduler)
        retrieve_timesteps(scheduler, params.steps, self.base._execution_device)
        return scheduler

    def initial_state(self, params: GenerationParams,
                      generator: torch.Generator) -> torch.Tensor:
        """KolorsPipeline.prepare_latents on the given noise: x init_noise_sigma, which
        depends on the N-step schedule ("leading" spacing)."""
        latents = self.initial_latents(self.initial_noise(params, generator))
        latents = latents * self._schedule(params).init_noise_sigma
        return latents.to("cpu", torch.float32)

    def state_shape(self, params: GenerationParams) -> tuple[int, ...]:
        width, height = params.size
        factor = self.base.vae_scale_factor
        return (1, self.base.unet.config.in_channels, height // factor, width // factor)

    def step_context(self, params: GenerationParams, prompt: str, negative_prompt: str,
                     image: PIL.Image.Image | None) -> KolorsStepContext:
        kind = self.running_kind(params)
        pipe: Any = self.pipelines()[kind]
        device = pipe._execution_device
        guidance = float(params.guidance or 0.0)
        cfg = guidance > 1 and self.base.unet.config.time_cond_proj_dim is None
        encode_kw: dict[str, Any] = {}
        if kind in CONTROLNETS:  # our pipeline passes its max_sequence_length, Kolors' not
            encode_kw["max_sequence_length"] = self.spec.defaults.max_sequence_length
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=[prompt], device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=cfg, negative_prompt=[negative_prompt], **encode_kw)
        width, height = params.size
        embeds, conditioning = added_conditioning(pipe, height, width, embeds, negative, pooled,
                                                  negative_pooled, cfg, 1, device)
        added: dict[str, Any] = dict(conditioning)
        ctx = KolorsStepContext(kind, cfg, embeds, added, self._schedule(params))
        if kind in CONTROLNETS:
            controlnet = pipe.controlnet
            ctx.control = pipe.prepare_control_image(image, params.width, params.height, 1,
                                                     device, controlnet.dtype, cfg)
            ctx.controlnet_states = controlnet_states(controlnet, ctx.prompt_embeds)
            ctx.keep = control_keep(len(ctx.scheduler.timesteps), 0.0,
                                    self.spec.defaults.control_guidance_end)
        elif kind is PipelineKind.IP_ADAPTER:
            self._set_mode("ip")
            try:
                added["image_embeds"] = pipe.prepare_ip_adapter_image_embeds(
                    image, None, device, 1, cfg)
            finally:
                self._set_mode("base")
        return ctx

    def step(self, params: GenerationParams, context: KolorsStepContext, state: torch.Tensor,
             step: int) -> torch.Tensor:
        """One iteration of the denoising loop of the pipeline `context.kind` runs."""
        ctx = context
        scheduler = scheduler_at(ctx.scheduler, step)
        unet = self.base.unet
        latents = state.to(self.base._execution_device, torch.float32)
        t = scheduler.timesteps[step]
        model_input = torch.cat([latents] * 2) if ctx.cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        if ctx.kind in CONTROLNETS:
            pipe = self.controlnet_pipes[ctx.kind]
            down_res, mid_res = None, None
            cond_scale = float(params.controlnet_scale or 0.0) * ctx.keep[step]
            if cond_scale != 0.0:
                down_res, mid_res = pipe.controlnet(
                    model_input, t, encoder_hidden_states=ctx.controlnet_states,
                    controlnet_cond=ctx.control, conditioning_scale=cond_scale,
                    added_cond_kwargs=ctx.added_cond_kwargs, return_dict=False)
            noise_pred = unet(model_input, t, encoder_hidden_states=ctx.prompt_embeds,
                              added_cond_kwargs=ctx.added_cond_kwargs,
                              down_block_additional_residuals=down_res,
                              mid_block_additional_residual=mid_res, return_dict=False)[0]
        else:
            ip = ctx.kind is PipelineKind.IP_ADAPTER
            if ip:
                assert self.ip_pipe is not None
                self._set_mode("ip")
                self.ip_pipe.set_ip_adapter_scale(params.ip_adapter_scale)
            try:
                noise_pred = unet(model_input, t, encoder_hidden_states=ctx.prompt_embeds,
                                  timestep_cond=None, cross_attention_kwargs=None,
                                  added_cond_kwargs=ctx.added_cond_kwargs, return_dict=False)[0]
            finally:
                if ip:
                    self._set_mode("base")
        if ctx.cfg:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + params.guidance * (text - uncond)
        out = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        return out.to("cpu", torch.float32)

    def decode(self, params: GenerationParams, state: torch.Tensor) -> PIL.Image.Image:
        """The pipelines' decoding: upcast a float16 VAE that asks for it, unscale, decode,
        postprocess."""
        pipe = self.base
        latents = state.to(pipe._execution_device, torch.float32)
        needs_upcasting = pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
        if needs_upcasting:
            pipe.vae.to(dtype=torch.float32)
            latents = latents.to(next(iter(pipe.vae.post_quant_conv.parameters())).dtype)
        latents = latents / pipe.vae.config.scaling_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        if needs_upcasting:
            pipe.vae.to(dtype=torch.float16)
        return pipe.image_processor.postprocess(image, output_type="pil")[0]

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
