"""The project's own single-file FLUX checkpoints, in the formats operators download.

From a tiny diffusers FLUX folder, write a sibling folder holding only the diffusers config
files (what single-file loading needs beside the weights) and the weights as single files:
the transformer in BFL keys (bf16 `.safetensors`, float8_e4m3fn `-fp8.safetensors`, GGUF
`-Q8_0.gguf` / `-Q4_0.gguf` written with the `gguf` package's writer and quantizer),
`ae.safetensors` in the original LDM autoencoder keys, `clip_l.safetensors` and
`t5xxl_fp16.safetensors` / `t5xxl_fp8_e4m3fn.safetensors` in transformers' keys. The key maps
here invert the ones the loaders apply (niche/models/single_file.py for the transformer,
diffusers' convert_ldm_vae_checkpoint for the VAE).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from niche.models.single_file import (
    DOUBLE_QKV,
    FINAL_MODULATION,
    SINGLE_LINEAR1,
    bfl_renames,
    block_indices,
    swap_halves,
)

TRANSFORMER_FILES = {"flux-schnell": "flux1-schnell", "flux-dev": "flux1-dev",
                     "flux-mini": "flux-mini"}
GGUF_QUANTS = {"Q8_0": "gguf-q8", "Q4_0": "gguf-q4"}


def diffusers_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FluxTransformer2DModel keys -> BFL keys: single_file's rename table read backwards, the
    fused tensors joined (the inverse of single_file.bfl_to_diffusers)."""
    sd = dict(sd)
    doubles = block_indices(sd, "transformer_blocks.")
    singles = block_indices(sd, "single_transformer_blocks.")
    out = {bfl: sd.pop(ours) for bfl, ours in bfl_renames(doubles, singles) if ours in sd}
    for p in ("weight", "bias"):
        bfl, ours = (name.format(p=p) for name in FINAL_MODULATION)
        out[bfl] = swap_halves(sd.pop(ours))
        for i in doubles:
            for side, names in DOUBLE_QKV.items():
                out[f"double_blocks.{i}.{side}_attn.qkv.{p}"] = torch.cat(
                    [sd.pop(f"transformer_blocks.{i}.{n}.{p}") for n in names], dim=0)
        for i in singles:
            out[f"single_blocks.{i}.linear1.{p}"] = torch.cat(
                [sd.pop(f"single_transformer_blocks.{i}.{n}.{p}") for n in SINGLE_LINEAR1], dim=0)
    if sd:
        raise ValueError(f"unmapped transformer keys: {sorted(sd)[:5]}")
    return out


def diffusers_vae_to_ldm(sd: dict[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    """AutoencoderKL keys -> the original LDM keys of BFL's ae.safetensors (attention as 1x1
    convolutions), the inverse of diffusers' convert_ldm_vae_checkpoint."""
    out: dict[str, torch.Tensor] = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in sd.items():
        parts = key.split(".")
        side = parts[0]
        rest = ".".join(parts[1:])
        new = None
        if rest.startswith(("conv_in", "conv_out")):
            new = key
        elif rest.startswith("conv_norm_out"):
            new = f"{side}.norm_out." + rest.split(".", 1)[1]
        elif rest.startswith("down_blocks.") or rest.startswith("up_blocks."):
            i = int(parts[2])
            level = i if side == "encoder" else n_blocks - 1 - i
            tag = "down" if side == "encoder" else "up"
            tail = parts[3:]
            if tail[0] == "resnets":
                name = ".".join(tail[2:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.{tag}.{level}.block.{tail[1]}.{name}"
            elif tail[0] in ("downsamplers", "upsamplers"):
                what = "downsample" if tail[0] == "downsamplers" else "upsample"
                new = f"{side}.{tag}.{level}.{what}." + ".".join(tail[2:])
        elif rest.startswith("mid_block.resnets."):
            j = int(parts[3])
            new = f"{side}.mid.block_{j + 1}." + ".".join(parts[4:])
        elif rest.startswith("mid_block.attentions.0."):
            sub = rest.removeprefix("mid_block.attentions.0.")
            for src, dst in attn.items():
                if sub.startswith(src + "."):
                    new = f"{side}.mid.attn_1.{dst}." + sub.removeprefix(src + ".")
                    if dst != "norm" and new.endswith(".weight") and value.ndim == 2:
                        value = value[:, :, None, None]
                    break
        elif key.startswith(("quant_conv", "post_quant_conv")):
            new = key
        if new is None:
            raise ValueError(f"unmapped VAE key {key}")
        out[new] = value.contiguous()
    return out


def write_gguf(path: Path, sd: dict[str, torch.Tensor], qtype: str) -> None:
    """A GGUF file of `sd` (BFL keys): 2-D weights whose rows split into whole blocks are
    quantized to `qtype` by the gguf package's quantizer, the rest kept as F32 (as the
    published FLUX GGUF converters keep norms, biases and small tensors)."""
    import gguf

    kind = getattr(gguf.GGMLQuantizationType, qtype)
    block, _ = gguf.GGML_QUANT_SIZES[kind]
    writer = gguf.GGUFWriter(str(path), arch="flux")
    for name, tensor in sd.items():
        data = tensor.detach().to(torch.float32).numpy()
        if data.ndim == 2 and data.shape[-1] % block == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _fp8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """2-D+ weights as float8_e4m3fn, norms and biases bfloat16 (the fp8 files' convention)."""
    return {k: (v.to(torch.float8_e4m3fn) if v.ndim >= 2 else v.to(torch.bfloat16))
            for k, v in sd.items()}


def write_single_files(src: Path, out: Path, model: str) -> None:
    """From the diffusers folder `src`, the single-file folder `out` (module docstring)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from safetensors.torch import load_file, save_file

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    meta = {"format": "pt"}
    transformer = FluxTransformer2DModel.from_pretrained(str(src / "transformer"))
    bfl = {k: v.contiguous() for k, v in diffusers_to_bfl(transformer.state_dict()).items()}
    stem = TRANSFORMER_FILES[model]
    save_file({k: v.to(torch.bfloat16) for k, v in bfl.items()},
              str(out / f"{stem}.safetensors"), metadata=meta)
    save_file(_fp8(bfl), str(out / f"{stem}-fp8.safetensors"), metadata=meta)
    for qtype in GGUF_QUANTS:
        write_gguf(out / f"{stem}-{qtype}.gguf", bfl, qtype)
    vae = AutoencoderKL.from_pretrained(str(src / "vae"))
    save_file(diffusers_vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)),
              str(out / "ae.safetensors"), metadata=meta)
    clip = load_file(str(next((src / "text_encoder").glob("*.safetensors"))))
    save_file({k: v.to(torch.bfloat16) for k, v in clip.items()},
              str(out / "clip_l.safetensors"), metadata=meta)
    t5 = load_file(str(next((src / "text_encoder_2").glob("*.safetensors"))))
    # the published T5 files are bfloat16 weights re-saved in float16 (lossless): round to
    # bfloat16 first, so a bfloat16 engine loads the folder's bits from either format
    save_file({k: v.to(torch.bfloat16).to(torch.float16) for k, v in t5.items()},
              str(out / "t5xxl_fp16.safetensors"), metadata=meta)
    save_file(_fp8(t5), str(out / "t5xxl_fp8_e4m3fn.safetensors"), metadata=meta)
