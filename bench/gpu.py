"""Production-size speed on a CUDA device: plain diffusers bfloat16, niche's engine path and
niche's fast path (`--engine.fast`), side by side, with random weights in the real
architectures (no checkpoint download: this measures compute, not image quality).

FLUX.1-schnell: FluxTransformer2DModel with schnell's config (19 double + 38 single blocks,
3072 wide, 24 heads of 128), its 16-channel VAE; 1024x1024, 4 steps. Kolors: the SDXL-shaped
UNet2DConditionModel with Kolors' config (4096-wide text projection, 2048 cross-attention), the
SDXL VAE; 1024x1024, 30 steps. Text encoders are the real classes made small (1-2 layers) at
the widths the denoisers expect; tokenizers and schedulers come from the tiny checkpoints.

Per memory mode: seconds per image (median) and peak device memory of each path, the fast
path's warm-up (torch.compile) apart, and the validator's step error of every fast step
recomputed by the plain bfloat16 engine path, against its threshold (docs/step-check.md).

`--noise` (FLUX.1-dev at 28 steps and Kolors at 30 by default, 1024x1024): the same-dtype
noise of the kernels that change bits, each chain recomputed by the plain bfloat16 path
(default attention, TF32 off, eager) at every step, next to the step thresholds: SDPA flash,
memory-efficient, cuDNN and math, declared (the validator switches to the declared backend)
and undeclared (recomputed on the default one), TF32 matmuls on, and torch.compile. The
thresholds only need to cover the declared rows (docs/step-check.md, "What is assumed").

    python bench/gpu.py [--models flux-schnell kolors] [--runs 3]
                        [--memory-modes gpu model-offload sequential-offload]
    python bench/gpu.py --noise [--models flux-dev kolors]

Without CUDA it prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NO_CUDA = "no CUDA device: bench/gpu.py measures nothing on this machine"
PROMPT = "a lighthouse on a rocky coast at dusk, detailed, photograph"
SEED = 1234

# FLUX.1-schnell transformer/config.json and vae/config.json (the values that size them).
FLUX_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": False, "axes_dims_rope": [16, 56, 56],
}
FLUX_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.3611,
    "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
}
# Kwai-Kolors/Kolors-diffusers unet/config.json and vae/config.json.
KOLORS_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_num_groups": 32,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 5632, "encoder_hid_dim": 4096,
    "encoder_hid_dim_type": "text_proj", "use_linear_projection": True, "act_fn": "silu",
}
KOLORS_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025,
    "force_upcast": False,
}
# Small text encoders at the widths the denoisers read (pooled 768 + T5 4096; ChatGLM 4096).
CLIP_SMALL = {"hidden_size": 768, "intermediate_size": 1024, "num_attention_heads": 12,
              "num_hidden_layers": 1}
T5_SMALL = {"d_model": 4096, "d_kv": 64, "num_heads": 8, "d_ff": 1024, "num_layers": 1}
CHATGLM_SMALL = {"hidden_size": 4096, "kv_channels": 128, "num_attention_heads": 32,
                 "multi_query_group_num": 2, "ffn_hidden_size": 1024, "num_layers": 2}


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _resized(module: Any, overrides: dict[str, Any]) -> Any:
    """A transformers model of `module`'s class and config with `overrides`, random init."""
    config = copy.deepcopy(module.config)
    for key, value in overrides.items():
        setattr(config, key, value)
    return type(module)(config)


class Weights:
    """Random full-size weights made once per model (seeded, on the GPU), kept on the CPU;
    every path gets its own modules loaded from them, so all paths compute the same net."""

    def __init__(self, model: str, tiny_root: Path):
        import torch
        from diffusers import (
            AutoencoderKL,
            FluxPipeline,
            FluxTransformer2DModel,
            KolorsPipeline,
            UNet2DConditionModel,
        )

        self.model = model
        torch.manual_seed(SEED)
        if model.startswith("flux"):
            tiny = FluxPipeline.from_pretrained(tiny_root / model, dtype=torch.float32)
            self.pipeline_class: Any = FluxPipeline
            self.denoiser_key, self.denoiser_class = "transformer", FluxTransformer2DModel
            self.denoiser_config = {**FLUX_TRANSFORMER,
                                    "guidance_embeds": model != "flux-schnell"}
            self.vae_config = FLUX_VAE
            self.small = {"text_encoder": _resized(tiny.text_encoder, CLIP_SMALL),
                          "text_encoder_2": _resized(tiny.text_encoder_2, T5_SMALL),
                          "tokenizer": tiny.tokenizer, "tokenizer_2": tiny.tokenizer_2}
        else:
            tiny = KolorsPipeline.from_pretrained(tiny_root / model, dtype=torch.float32)
            self.pipeline_class = KolorsPipeline
            self.denoiser_key, self.denoiser_class = "unet", UNet2DConditionModel
            self.denoiser_config, self.vae_config = KOLORS_UNET, KOLORS_VAE
            self.small = {"text_encoder": _resized(tiny.text_encoder, CHATGLM_SMALL),
                          "tokenizer": tiny.tokenizer}
        self.scheduler = tiny.scheduler
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # made in bfloat16: FLUX is 24 GB, not 48
        try:
            with torch.device("cuda"):
                denoiser = self.denoiser_class.from_config(self.denoiser_config)
                vae = AutoencoderKL.from_config(self.vae_config)
        finally:
            torch.set_default_dtype(default)
        self.denoiser = {k: v.to("cpu", torch.bfloat16) for k, v in denoiser.state_dict().items()}
        self.vae = {k: v.to("cpu", torch.bfloat16) for k, v in vae.state_dict().items()}
        self.small = {k: v.to(torch.bfloat16) if isinstance(v, torch.nn.Module) else v
                      for k, v in self.small.items()}
        del denoiser, vae
        torch.cuda.empty_cache()

    def pipeline(self) -> Any:
        """A fresh bfloat16 pipeline on the CPU (new modules, the same weights)."""
        from accelerate import init_empty_weights
        from diffusers import AutoencoderKL

        with init_empty_weights():
            denoiser = self.denoiser_class.from_config(self.denoiser_config)
            vae = AutoencoderKL.from_config(self.vae_config)
        denoiser.load_state_dict(self.denoiser, assign=True)
        vae.load_state_dict(self.vae, assign=True)
        parts = {k: copy.deepcopy(v) for k, v in self.small.items()}
        return self.pipeline_class(vae=vae, scheduler=copy.deepcopy(self.scheduler),
                                   **{self.denoiser_key: denoiser}, **parts)


def _place_plain(pipe: Any, mode: str) -> None:
    pipe.set_progress_bar_config(disable=True)
    if mode == "gpu":
        pipe.to("cuda")
    elif mode == "model-offload":
        pipe.enable_model_cpu_offload()
    else:
        pipe.enable_sequential_cpu_offload()


def _timed(fn, runs: int) -> tuple[float, list[float], float, Any]:
    """(warm-up seconds, per-run seconds, peak GiB over the runs, last result)."""
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    warmup = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return warmup, seconds, torch.cuda.max_memory_allocated() / 2**30, result


def _family(weights: Weights, mode: str, fast: bool, compile_mode: str) -> Any:
    """niche's family (the engine's path from loaded weights on) with the bench's weights."""
    from niche.models.families import family_class
    from niche.models.spec import load_spec
    from niche.protocol import PipelineKind

    spec = load_spec(weights.model).model_copy(update={
        "pipelines": [PipelineKind.TXT2IMG], "fast_compile": compile_mode})
    family: Any = family_class(spec.family)(spec, None, "cuda", "bfloat16", mode,  # type: ignore[arg-type]
                                            fast=fast)
    pipe = weights.pipeline()
    if weights.model.startswith("flux"):
        family.pipe = pipe
    else:
        family.base = pipe
    family.prepare()
    return family


def _params(model: str) -> Any:
    from niche.models.spec import load_spec
    from niche.protocol import GenerationParams

    d = load_spec(model).defaults
    return GenerationParams(model=model, prompt=PROMPT, seed=SEED, steps=d.steps,
                            guidance=d.guidance, width=d.width, height=d.height)


def _family_call(family: Any, params: Any) -> tuple[Any, list[Any]]:
    import torch

    from niche.models.families import BatchItem

    states: list[torch.Tensor] = []
    item = BatchItem(prompt=params.prompt, negative_prompt=params.negative_prompt or "",
                     generator=torch.Generator("cpu").manual_seed(params.seed))
    images = family.run(params, [item], None,
                        lambda i, x: states.append(x.detach().to("cpu", torch.float32).clone()))
    return images[0], states


def step_errors(reference: Any, params: Any, states: list[Any],
                attention: str = "default") -> list[tuple[float, float]]:
    """(error, threshold) of every step of `states` recomputed by `reference` (bfloat16) on
    the `attention` backend (what a validator does with a declared backend)."""
    import torch

    from niche.models.kernels import attention_backend
    from niche.validator.steps import StepThresholds, step_error

    n = len(states)
    bands = StepThresholds()
    with attention_backend(attention), torch.no_grad():
        context = reference.step_context(params, params.prompt, params.negative_prompt or "",
                                         None)
        x0 = reference.initial_state(params, torch.Generator("cpu").manual_seed(params.seed))
        chain = [x0, *states]
        out = []
        for k in range(n):
            recomputed = reference.step(params, context, chain[k], k)
            out.append((step_error(chain[k], chain[k + 1], recomputed),
                        bands.threshold(params.model, "txt2img", "bfloat16", k, n)))
    return out


def kernel_noise(weights: Weights, params: Any, compile_mode: str) -> None:
    """The same-dtype noise table of `--noise` (module docstring)."""
    import torch

    from niche.models.kernels import attention_backend, attention_problem

    plain = _family(weights, "gpu", fast=False, compile_mode=compile_mode)
    rows: list[tuple[str, list[tuple[float, float]]]] = []

    def chain(**switches: Any) -> list[Any]:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = switches.get("tf32", False)
        try:
            with attention_backend(switches.get("attention", "default")), torch.no_grad():
                return _family_call(switches.get("family", plain), params)[1]
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32

    rows.append(("default again (determinism)", step_errors(plain, params, chain())))
    for backend in ("flash", "efficient", "cudnn", "math"):
        problem = attention_problem(backend, "cuda")
        if problem:
            print(f"    {backend}: {problem}")
            continue
        states = chain(attention=backend)
        rows.append((f"{backend} attention, declared", step_errors(plain, params, states,
                                                                   attention=backend)))
        rows.append((f"{backend} attention, NOT declared", step_errors(plain, params, states)))
    rows.append(("TF32 matmuls on", step_errors(plain, params, chain(tf32=True))))
    if compile_mode != "none":
        compiled = _family(weights, "gpu", fast=False, compile_mode=compile_mode)
        compiled_denoiser = (compiled.pipe.transformer if weights.model.startswith("flux")
                             else compiled.base.unet)
        compiled_denoiser.compile(mode=compile_mode)
        chain(family=compiled)  # warm-up
        rows.append((f"torch.compile {compile_mode}",
                     step_errors(plain, params, chain(family=compiled))))
    print(f"  same-dtype kernel noise ({params.width}x{params.height}, {params.steps} steps; "
          "worst step error, its threshold, ratio):")
    for name, errors in rows:
        worst = max(errors, key=lambda e: e[0] / e[1] if e[1] else float("inf"))
        print(f"    {name:<36} max {max(e for e, _ in errors):9.3g}   threshold "
              f"{worst[1]:9.3g}   worst ratio {worst[0] / worst[1]:7.3f}")
    _release()


def bench(model: str, modes: list[str], runs: int, compile_mode: str, tiny_root: Path) -> None:
    print(f"{model}: building full-size random weights ...", flush=True)
    weights = Weights(model, tiny_root)
    params = _params(model)
    n = params.steps
    print(f"{model} {params.width}x{params.height}, {n} steps, bfloat16, {runs} runs")
    for mode in modes:
        bench_mode(weights, params, mode, runs, compile_mode)


def _plain_call(pipe: Any, params: Any) -> Any:
    import torch

    return pipe(prompt=PROMPT, num_inference_steps=params.steps,
                guidance_scale=params.guidance, width=params.width, height=params.height,
                output_type="pil", generator=torch.Generator("cpu").manual_seed(SEED))


def _release() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def bench_mode(weights: Weights, params: Any, mode: str, runs: int, compile_mode: str) -> None:
    """One memory mode: plain diffusers, niche's path, niche's fast path; fast vs plain."""
    rows = []
    pipe = weights.pipeline()
    _place_plain(pipe, mode)
    warm, secs, peak, _ = _timed(partial(_plain_call, pipe, params), runs)
    rows.append(("plain diffusers", warm, secs, peak))
    del pipe
    _release()
    plain = _family(weights, mode, fast=False, compile_mode=compile_mode)
    warm, secs, peak, _ = _timed(partial(_family_call, plain, params), runs)
    rows.append(("niche engine", warm, secs, peak))
    fast = _family(weights, mode, fast=True, compile_mode=compile_mode)
    warm, secs, peak, (_, fast_states) = _timed(partial(_family_call, fast, params), runs)
    rows.append((f"niche fast ({', '.join(fast.fast_applied) or 'nothing applied'})",
                 warm, secs, peak))
    errors = step_errors(plain, params, fast_states)
    del fast, plain
    _release()
    print(f"  [{mode}]")
    for name, warm, secs, peak in rows:
        print(f"    {name:<40} {statistics.median(secs):7.3f} s/image (median)  "
              f"warm-up {warm:7.2f} s  peak {peak:6.2f} GiB")
    worst = max(errors, key=lambda e: e[0] / e[1] if e[1] else float("inf"))
    ok = all(e <= t for e, t in errors)
    print(f"    fast vs plain step check: {'passes' if ok else 'FAILS'}; max error "
          f"{max(e for e, _ in errors):.3g}, worst step error/threshold "
          f"{worst[0]:.3g}/{worst[1]:.3g}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["flux-schnell", "kolors"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory-modes", nargs="+", default=["gpu"],
                        choices=["gpu", "model-offload", "sequential-offload"])
    parser.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                        choices=["none", "default", "max-autotune-no-cudagraphs"])
    parser.add_argument("--noise", action="store_true",
                        help="the same-dtype kernel noise table instead of the speed table "
                             "(default models: flux-dev kolors)")
    args = parser.parse_args(argv)
    if not cuda_available():
        print(NO_CUDA)
        return 0
    from niche.devnet.tiny import ensure_tiny_models
    from niche.models.quiet import quiet_libraries

    quiet_libraries()
    root = ensure_tiny_models()  # tokenizers, schedulers, the text encoders' classes
    if args.noise:
        models = args.models if "--models" in (argv or sys.argv) else ["flux-dev", "kolors"]
        for model in models:
            print(f"{model}: building full-size random weights ...", flush=True)
            kernel_noise(Weights(model, root), _params(model), args.compile_mode)
        return 0
    for model in args.models:
        bench(model, args.memory_modes, args.runs, args.compile_mode, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
