"""Train the tiny IP-Adapter Plus (resampler + to_k_ip/to_v_ip) on the frozen Kolors UNet.

The usual IP-Adapter objective: reconstruct an image from its own CLIP image features (plus a
prompt that is often empty), so the adapter learns to carry what the reference shows. The
adapter is loaded exactly as the engine loads it (``load_ip_adapter`` from the checkpoint
folder), trained at the engine's default adapter scale, and written back in the original
file layout (``image_proj.*`` / ``ip_adapter.*``) through an index probe of diffusers' own
key conversion, so no hand-written inverse mapping can drift from it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch

from niche.devnet.training.cache import Encoded
from niche.devnet.training.common import LoopResult, run_loop
from niche.devnet.training.kolors import noisy, scheduler_loss_weights, time_ids, weighted_mse

WEIGHT_NAME = "ip_adapter_plus_general.safetensors"
EMPTY_PROMPT_RATE = 0.2


def _ip_pipe(pipe, ip_dir: Path):
    from diffusers import KolorsPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(str(ip_dir / "image_encoder")).eval()
    size = encoder.config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size},
                                   crop_size={"height": size, "width": size})
    ip = KolorsPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                        unet=pipe.unet, scheduler=pipe.scheduler, image_encoder=encoder,
                        feature_extractor=processor, force_zeros_for_empty_prompt=False)
    ip.load_ip_adapter(str(ip_dir), subfolder="", weight_name=WEIGHT_NAME,
                       image_encoder_folder=None)
    return ip, encoder


def _export(unet, original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trained diffusers modules -> the original ``image_proj.*`` / ``ip_adapter.*`` layout."""
    image_keys = sorted(k for k in original if k.startswith("image_proj."))
    flat_sizes = [original[k].numel() for k in image_keys]
    offsets = np.cumsum([0] + flat_sizes)
    probe = {k[len("image_proj."):]: torch.arange(offsets[i], offsets[i + 1], dtype=torch.float64)
             .reshape(original[k].shape).to(torch.float32) for i, k in enumerate(image_keys)}
    assert offsets[-1] < 2**24, "probe indices must be exact in float32"
    converted = unet._convert_ip_adapter_image_proj_to_diffusers(probe, low_cpu_mem_usage=False)
    flat = torch.cat([original[k].flatten().to(torch.float32) for k in image_keys])
    trained = unet.encoder_hid_proj.image_projection_layers[0].state_dict()
    for name, index in converted.state_dict().items():
        flat[index.flatten().long()] = trained[name].detach().flatten().to(torch.float32)
    out = {k: flat[offsets[i]:offsets[i + 1]].reshape(original[k].shape).clone()
           for i, k in enumerate(image_keys)}
    key_id = 1
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn1.processor") or name.startswith("encoder_hid_proj."):
            continue  # self-attention, and the resampler's own attention
        if not hasattr(proc, "to_k_ip"):
            raise RuntimeError(f"{name}: {type(proc).__name__} is not an IP-Adapter processor")
        out[f"ip_adapter.{key_id}.to_k_ip.weight"] = proc.to_k_ip[0].weight.detach().clone()
        out[f"ip_adapter.{key_id}.to_v_ip.weight"] = proc.to_v_ip[0].weight.detach().clone()
        key_id += 2
    assert set(out) == set(original), set(out) ^ set(original)
    return out


def train_ip_adapter(
    pipe, ds: Encoded, ip_dir: Path, *, seed: int, steps: int, batch_size: int = 16,
    scale: float = 0.5, lr: float = 1e-3, seconds: float | None = None,
) -> tuple[LoopResult, dict[str, torch.Tensor], torch.nn.Module]:
    """Returns the loop result, the trained state (original layout) and the image encoder."""
    from safetensors.torch import load_file

    original = load_file(str(Path(ip_dir) / WEIGHT_NAME))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    ip, encoder = _ip_pipe(pipe, Path(ip_dir))
    ip.set_ip_adapter_scale(scale)
    unet = ip.unet
    for module in (pipe.vae, pipe.text_encoder, unet, encoder):
        module.eval().requires_grad_(False)
    with torch.no_grad():  # the reference image of each sample is the sample itself
        feats = torch.cat([
            ip.encode_image([PIL.Image.fromarray(im) for im in ds.images[i:i + 64]], "cpu", 1,
                            output_hidden_states=True)[0]
            for i in range(0, len(ds), 64)])
    params = list(unet.encoder_hid_proj.image_projection_layers.parameters())
    for proc in unet.attn_processors.values():
        if hasattr(proc, "to_k_ip"):
            params += list(proc.to_k_ip.parameters()) + list(proc.to_v_ip.parameters())
    for p in params:
        p.requires_grad_(True)
    unet.encoder_hid_proj.train()
    ids = time_ids(batch_size, ds.images.shape[1])
    weights = scheduler_loss_weights(pipe.scheduler, None)

    def step(_: int) -> torch.Tensor:
        idx = rng.integers(0, len(ds), batch_size)
        embeds, pooled = ds.text(idx, rng, EMPTY_PROMPT_RATE)
        xt, t, target = noisy(ip, ds, idx, gen)
        added = {"text_embeds": pooled, "time_ids": ids,
                 "image_embeds": [feats[torch.from_numpy(idx)][:, None]]}
        out = unet(xt, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
        return weighted_mse(out, target, weights[t])  # the plain epsilon loss

    result = run_loop("ip-adapter", params, step, steps, lr, seconds)
    unet.encoder_hid_proj.eval()
    state = _export(unet, original)
    ip.unload_ip_adapter()
    return result, state, encoder
