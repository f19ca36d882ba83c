"""Weight storage in float8 (e4m3) with compute in the engine dtype, for the FLUX transformer
(`quant: fp8`) and T5 (`text_encoder_quant: fp8`).

diffusers' layerwise casting keeps each Linear/Conv weight in float8_e4m3fn and casts it to
the compute dtype just before its forward (and back after), so the weights take one byte per
parameter and the arithmetic is the engine's. Norms, embeddings and the in/out projections
stay in the compute dtype (diffusers' default skip patterns). It runs on CPU as on CUDA.
GGUF files (gguf-q8, gguf-q4) are quantized by their file and dequantized by diffusers'
GGUF layers (niche/models/single_file.py), not here.
"""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn


# diffusers' defaults, plus T5's feed-forward output `wo`: transformers' T5 casts the
# activations to `wo.weight.dtype` before calling it, which would be float8.
SKIP = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$", r"\.wo$")


def store_in_fp8(module: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Weights of `module` stored as float8_e4m3fn, computed in `compute_dtype`."""
    from diffusers.hooks import apply_layerwise_casting

    apply_layerwise_casting(module, storage_dtype=FP8, compute_dtype=compute_dtype,
                            skip_modules_pattern=SKIP)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes its parameters take as stored (float8: 1, GGUF: its packed bytes)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())
