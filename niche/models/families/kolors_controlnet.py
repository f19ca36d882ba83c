"""Kolors + ControlNet: diffusers ships no such pipeline, so this one extends KolorsPipeline.

Adapted from diffusers 0.42: `KolorsPipeline.__call__` (prompt encoding, latents, time ids,
the denoising loop and decoding) with the ControlNet residuals added the way
`StableDiffusionXLControlNetPipeline.__call__` adds them (one ControlNet, no guess mode,
control_guidance_start/end as a per-step keep mask), and `callback_on_step_end` as
KolorsPipeline calls it. Left out: IP-Adapter inputs, denoising_end, cross_attention_kwargs,
num_images_per_prompt > 1.
Kolors ControlNets carry their own `encoder_hid_proj` (ChatGLM 4096 -> cross-attention width),
which ControlNetModel.forward does not apply, so the pipeline projects the prompt embeddings
for the ControlNet itself. The pipeline holds references to the base pipeline's modules: no
weights are copied.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import PIL.Image
import torch
from diffusers import ControlNetModel, KolorsPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.kolors.pipeline_kolors import retrieve_timesteps
from diffusers.pipelines.kolors.pipeline_output import KolorsPipelineOutput


def control_keep(n: int, start: float, end: float) -> list[float]:
    """1 for the steps of an n-step schedule the ControlNet applies to, 0 for the others."""
    return [1.0 - float(i / n < start or (i + 1) / n > end) for i in range(n)]


def added_conditioning(pipe: KolorsPipeline, height: int, width: int,
                       prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None,
                       pooled: torch.Tensor, negative_pooled: torch.Tensor | None, cfg: bool,
                       batch_size: int, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The UNet's text states and SDXL-style added conditioning (pooled text, time ids),
    batched [uncond, cond] under guidance, as KolorsPipeline builds them. The ControlNet
    pipeline and the step check's recomputation both use it, so they condition alike."""
    add_time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width),
                                          dtype=prompt_embeds.dtype,
                                          text_encoder_projection_dim=int(pooled.shape[-1]))
    add_text_embeds = pooled
    if cfg:
        prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
        add_text_embeds = torch.cat([negative_pooled, add_text_embeds], dim=0)
        add_time_ids = torch.cat([add_time_ids, add_time_ids], dim=0)
    return prompt_embeds.to(device), {"text_embeds": add_text_embeds.to(device),
                                      "time_ids": add_time_ids.to(device).repeat(batch_size, 1)}


def controlnet_states(controlnet: ControlNetModel, prompt_embeds: torch.Tensor) -> torch.Tensor:
    """The ControlNet sees ChatGLM states through its own projection (Kolors' text_proj),
    which ControlNetModel.forward does not apply."""
    if getattr(controlnet, "encoder_hid_proj", None) is not None:
        return controlnet.encoder_hid_proj(prompt_embeds.to(controlnet.dtype))
    return prompt_embeds


class KolorsControlNetPipeline(KolorsPipeline):
    """Kolors text-to-image guided by one ControlNet (canny edges or a depth map).

    Args:
        vae, text_encoder, tokenizer, unet, scheduler, image_encoder, feature_extractor,
            force_zeros_for_empty_prompt: as for `KolorsPipeline` (shared, not copied).
        controlnet (`ControlNetModel`): built for the Kolors UNet (`ControlNetModel.from_unet`
            keeps its `encoder_hid_proj`, which this pipeline applies to the prompt states).
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->unet->controlnet->vae"
    _optional_components: ClassVar[list[str]] = ["image_encoder", "feature_extractor"]
    _callback_tensor_inputs: ClassVar[list[str]] = [
        "latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]

    def __init__(self, vae, text_encoder, tokenizer, unet, controlnet: ControlNetModel, scheduler,
                 image_encoder=None, feature_extractor=None,
                 force_zeros_for_empty_prompt: bool = False):
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                         scheduler=scheduler, image_encoder=image_encoder,
                         feature_extractor=feature_extractor,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.register_modules(controlnet=controlnet)
        self.control_image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False)

    def prepare_control_image(self, image, width: int, height: int, batch_size: int,
                              device, dtype, do_classifier_free_guidance: bool) -> torch.Tensor:
        image = self.control_image_processor.preprocess(image, height=height, width=width)
        image = image.to(dtype=torch.float32)
        if image.shape[0] == 1:
            image = image.repeat_interleave(batch_size, dim=0)
        image = image.to(device=device, dtype=dtype)
        if do_classifier_free_guidance:
            image = torch.cat([image] * 2)
        return image

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image: PIL.Image.Image | list[PIL.Image.Image] | torch.Tensor,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        controlnet_conditioning_scale: float = 0.8,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        max_sequence_length: int = 256,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        r"""Generate images from prompts and a control image.

        Args:
            prompt (`str` or `list[str]`): what to draw; a list makes a batch.
            image (`PIL.Image.Image`, a list of them, or `torch.Tensor`): the control signal
                (an edge map or a depth map) at any size; resized to `width` x `height`.
            height, width (`int`, *optional*): output size in pixels (default: the UNet's
                sample size x the VAE scale factor).
            num_inference_steps (`int`, defaults to 50): denoising steps.
            guidance_scale (`float`, defaults to 5.0): classifier-free guidance weight; <= 1
                runs the conditional branch alone.
            negative_prompt (`str` or `list[str]`, *optional*): the unconditional branch.
            controlnet_conditioning_scale (`float`, defaults to 0.8): weight of the
                ControlNet residuals; 0 skips the ControlNet.
            control_guidance_start, control_guidance_end (`float`, defaults to 0.0 and 1.0):
                the fraction of the steps during which the ControlNet is applied.
            generator (`torch.Generator` or a list, one per prompt, *optional*): seeds the
                initial noise when `latents` is not given, and the scheduler's noise.
            latents (`torch.Tensor`, *optional*): initial noise, unscaled: `prepare_latents`
                multiplies it by the scheduler's `init_noise_sigma`, as when it draws it.
            eta (`float`, defaults to 0.0): DDIM's eta, for schedulers that take it.
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" or "latent".
            return_dict (`bool`, defaults to True): a `KolorsPipelineOutput` or a tuple.
            max_sequence_length (`int`, defaults to 256): ChatGLM tokens per prompt.
            callback_on_step_end (`Callable`, *optional*): called after each denoising step
                as `callback_on_step_end(self, step, timestep, callback_kwargs)`;
                `callback_kwargs` holds the tensors named in
                `callback_on_step_end_tensor_inputs`, and the returned dict may replace them.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to
                `["latents"]`): among `_callback_tensor_inputs` (the CFG-batched
                `prompt_embeds`, `add_text_embeds`, `add_time_ids`, and `latents`).

        Returns:
            `KolorsPipelineOutput` (or `(images,)`): the generated images.
        """
        # 1. Check inputs and set the call's state.
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        if not 0.0 <= control_guidance_start < control_guidance_end <= 1.0:
            raise ValueError("need 0 <= control_guidance_start < control_guidance_end <= 1")
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        self.check_inputs(prompt, num_inference_steps, height, width, negative_prompt,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        self._guidance_scale = guidance_scale
        self._cross_attention_kwargs = None
        self._denoising_end = None
        self._interrupt = False
        batch_size = 1 if isinstance(prompt, str) else len(prompt)
        device = self._execution_device
        cfg = self.do_classifier_free_guidance

        # 2. Encode the prompts (ChatGLM hidden states and pooled output).
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=cfg, negative_prompt=negative_prompt,
            max_sequence_length=max_sequence_length,
        )
        # 3. Prepare the control image (CFG doubles it).
        control = self.prepare_control_image(image, width, height, batch_size, device,
                                             self.controlnet.dtype, cfg)
        # 4. Timesteps, initial latents and the scheduler's extra arguments.
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps,
                                                            device)
        latents = self.prepare_latents(batch_size, self.unet.config.in_channels, height, width,
                                       prompt_embeds.dtype, device, generator, latents)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 5. Which steps the ControlNet applies to.
        n = len(timesteps)
        keep = control_keep(n, control_guidance_start, control_guidance_end)

        # 6. SDXL-style added conditioning (pooled text, time ids), batched [uncond, cond].
        prompt_embeds, added_cond_kwargs = added_conditioning(
            self, height, width, prompt_embeds, negative_prompt_embeds, pooled, negative_pooled,
            cfg, batch_size, device)
        control_states = controlnet_states(self.controlnet, prompt_embeds)

        # 7. Denoising loop: ControlNet residuals, UNet, guidance, scheduler step, callback.
        self._num_timesteps = n
        with self.progress_bar(total=n) as progress_bar:
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents] * 2) if cfg else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                down_res, mid_res = None, None
                cond_scale = controlnet_conditioning_scale * keep[i]
                if cond_scale != 0.0:
                    down_res, mid_res = self.controlnet(
                        model_input, t, encoder_hidden_states=control_states,
                        controlnet_cond=control, conditioning_scale=cond_scale,
                        added_cond_kwargs=added_cond_kwargs, return_dict=False,
                    )
                noise_pred = self.unet(
                    model_input, t, encoder_hidden_states=prompt_embeds,
                    added_cond_kwargs=added_cond_kwargs,
                    down_block_additional_residuals=down_res,
                    mid_block_additional_residual=mid_res, return_dict=False,
                )[0]
                if cfg:
                    uncond, text = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (text - uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs,
                                              return_dict=False)[0]
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds,
                               "add_text_embeds": added_cond_kwargs["text_embeds"],
                               "add_time_ids": added_cond_kwargs["time_ids"]}
                    outputs = callback_on_step_end(
                        self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                    latents = outputs.pop("latents", latents)
                    if "prompt_embeds" in outputs:  # the ControlNet's projection follows it
                        prompt_embeds = outputs.pop("prompt_embeds")
                        control_states = controlnet_states(self.controlnet, prompt_embeds)
                    added_cond_kwargs = {
                        "text_embeds": outputs.pop("add_text_embeds",
                                                   added_cond_kwargs["text_embeds"]),
                        "time_ids": outputs.pop("add_time_ids", added_cond_kwargs["time_ids"])}
                progress_bar.update()

        # 8. Decode the latents (upcasting a float16 VAE that asks for it).
        if output_type == "latent":
            images = latents
        else:
            needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
            if needs_upcasting:
                self.upcast_vae()
                latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
            scaled = latents / self.vae.config.scaling_factor
            decoded = self.vae.decode(scaled, return_dict=False)[0]
            if needs_upcasting:
                self.vae.to(dtype=torch.float16)
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return KolorsPipelineOutput(images=images)
