"""Calibrate the verification metric: which similarity threshold and which PSNR floor let
honest hardware through and stop cheats? Prints, per model / pipeline, the similarity and
PSNR of each variant to the float32 reference and the chosen threshold and floor with their
margins, then the suggested DEFAULT_THRESHOLDS / DEFAULT_PSNR_FLOORS.

honest: float16, bfloat16, another thread count, batched instead of single, the math SDPA
        kernel instead of the default one, lossless re-encoding (PNG / WebP lossless)
cheats: another seed, fewer steps (N-1 and N/2), the last step skipped (and sharpened),
        no classifier-free guidance (Kolors), half size upscaled, another model, another
        prompt, another conditioning image, blurred, noised, JPEG, an earlier challenge's image

The PSNR floor separates honest variants from the cheats that SAVE COMPUTE (marked *): those
are the ones post-processing can dress up to pass the similarity threshold (bench/adversary.py);
degradations of the honest image (blur, noise, JPEG) save nothing and similarity stops them.

    .venv/bin/python bench/calibrate_verify.py [--tiny | --model-path DIR] [--requests 3]
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/adversary.py: skipping()

from niche.protocol import GenerationParams, PipelineKind
from niche.validator.verify import compare


def reencode(image: Image.Image, fmt: str, **kw) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def noised(image: Image.Image, sigma: float, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.asarray(image, dtype=np.float64) + rng.normal(
        0.0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def with_threads(n: int, fn: Callable[[], Image.Image]) -> Image.Image:
    """torch's thread count is process-wide: set it around one call, then restore it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def with_math_attention(fn: Callable[[], Image.Image]) -> Image.Image:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        return fn()


PROMPTS = ("a red fox in a snowy forest, watercolor",
           "an old lighthouse at dusk, oil painting",
           "a bowl of ramen on a wooden table, studio photograph",
           "a sailboat on a calm sea, soft colors")


def sharpened(image: Image.Image, amount: float = 0.5, sigma: float = 1.0) -> Image.Image:
    """Unsharp mask: what a cheater adds to a fewer-steps image to restore its detail."""
    x = np.asarray(image, dtype=np.float64)
    blur = np.asarray(image.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(x + amount * (x - blur)), 0, 255).astype(np.uint8))


SAVES = "cheat*"  # a cheat that saves compute: the PSNR floor must stop it


def calibrate_model(model: str, engines: dict, requests: int, other_model: str | None,
                    pipeline: PipelineKind, conditioner) -> list[tuple[str, str, list]]:
    """Returns rows (kind, case, [Comparison per request])."""
    from adversary import skipping

    base, bf16, f16 = engines["float32"], engines["bfloat16"], engines["float16"]
    ref_threads, other_threads = engines["threads"]
    spec = base.spec(model)
    d = spec.defaults
    rows: dict[tuple[str, str], list] = {}

    def add(kind, case, ref, img):
        rows.setdefault((kind, case), []).append(compare(ref, img))

    for i in range(requests):
        prompt = PROMPTS[i % len(PROMPTS)]
        cond = alt_cond = None
        if pipeline.needs_image:
            cond = conditioner(model, pipeline, d.width, d.height, 1000 + i)
            alt_cond = conditioner(model, pipeline, d.width, d.height, 2000 + i)
        params = base.resolve(GenerationParams(model=model, pipeline=pipeline, prompt=prompt,
                                               seed=12345 + i))
        ref = base.generate(params, cond)

        def variant(params=params, **changes) -> GenerationParams:
            return base.resolve(params.model_copy(update=changes))

        add("honest", "float16", ref, f16.generate(params, cond))
        add("honest", "bfloat16", ref, bf16.generate(params, cond))
        add("honest", f"{other_threads} threads instead of {ref_threads}", ref,
            with_threads(other_threads, lambda p=params, c=cond: base.generate(p, c)))
        other = variant(seed=params.seed + 7, prompt=PROMPTS[(i + 1) % len(PROMPTS)])
        add("honest", "batched (2) vs single", ref,
            base.generate_batch([(params, cond), (other, cond)])[0])
        add("honest", "math SDPA kernel", ref,
            with_math_attention(lambda p=params, c=cond: base.generate(p, c)))
        add("honest", "PNG re-encode", ref, reencode(ref, "PNG"))
        add("honest", "WebP lossless re-encode", ref, reencode(ref, "WEBP", lossless=True))

        add(SAVES, "other seed", ref, base.generate(variant(seed=params.seed + 1), cond))
        if params.steps > 1:
            add(SAVES, "fewer steps (N/2)", ref,
                base.generate(variant(steps=max(1, params.steps // 2)), cond))
            fewer = base.generate(variant(steps=params.steps - 1), cond)
            add(SAVES, "fewer steps (N-1)", ref, fewer)
            add(SAVES, "fewer steps (N-1), sharpened", ref, sharpened(fewer))
            with skipping(base, model, [params.steps - 1]):
                skipped = base.generate(params, cond)
            add(SAVES, "last step skipped", ref, skipped)
            add(SAVES, "last step skipped, sharpened", ref, sharpened(skipped))
        if model.startswith("kolors") and params.guidance > 1:
            add(SAVES, "no CFG (guidance 1)", ref, base.generate(variant(guidance=1.0), cond))
        lim = spec.limits
        half_w, half_h = params.width // 2, params.height // 2
        if min(half_w, half_h) >= lim.min_size and half_w % lim.size_multiple == 0:
            small = base.generate(variant(width=half_w, height=half_h),
                                  cond.resize((half_w, half_h)) if cond else None)
            add(SAVES, "half size, upscaled", ref,
                small.resize((params.width, params.height), Image.Resampling.BICUBIC))
        if other_model:
            om = base.resolve(GenerationParams(model=other_model, prompt=prompt,
                                               seed=params.seed, width=params.width,
                                               height=params.height))
            add(SAVES, f"other model ({other_model})", ref, base.generate(om))
        add(SAVES, "other prompt", ref,
            base.generate(variant(prompt=PROMPTS[(i + 2) % len(PROMPTS)]), cond))
        if alt_cond is not None:
            add(SAVES, "other conditioning image", ref, base.generate(params, alt_cond))
        add("cheat", "blurred (r=1)", ref, ref.filter(ImageFilter.GaussianBlur(1.0)))
        add("cheat", "blurred (r=0.5)", ref, ref.filter(ImageFilter.GaussianBlur(0.5)))
        add("cheat", "noised (sigma=8)", ref, noised(ref, 8.0, i))
        add("cheat", "JPEG q=30", ref, reencode(ref, "JPEG", quality=30))
        add("cheat", "JPEG q=75", ref, reencode(ref, "JPEG", quality=75))
        add(SAVES, "earlier challenge's image", ref,
            base.generate(variant(seed=params.seed + 99,
                                  prompt=PROMPTS[(i + 3) % len(PROMPTS)]), cond))
    return [(k, c, v) for (k, c), v in rows.items()]


def choose_threshold(rows, floor: float | None = None) -> tuple[float, float, float]:
    """(threshold, lowest honest, highest cheat): midway when they separate; otherwise just
    under the lowest honest value (honest miners must never fail). With a PSNR floor the two
    bounds work together: only the cheat images the floor lets through (psnr >= floor) need
    the similarity threshold; without any such image, all cheats count."""
    honest = min(c.similarity for k, _, cs in rows if k == "honest" for c in cs)
    cheats = [c for k, _, cs in rows if k != "honest" for c in cs]
    through = [c for c in cheats if floor is not None and c.psnr >= floor]
    cheat = max(c.similarity for c in (through or cheats))
    if honest > cheat:
        return (honest + cheat) / 2, honest, cheat
    return max(0.0, honest - 0.005), honest, cheat


def choose_floor(rows) -> tuple[float, float, float]:
    """(PSNR floor, lowest honest, highest compute-saving cheat) in dB: midway when they
    separate, otherwise 0.5 dB under the lowest honest value. Lossless re-encodes (100 dB)
    are identical images and say nothing about honest noise: left out of the minimum only
    if they are the only honest rows (they never are)."""
    honest = min(c.psnr for k, _, cs in rows if k == "honest" for c in cs)
    cheat = max(c.psnr for k, _, cs in rows if k == SAVES for c in cs)
    if honest > cheat:
        return (honest + cheat) / 2, honest, cheat
    return honest - 0.5, honest, cheat


def print_matrix(model: str, pipeline: PipelineKind, rows) -> tuple[float, float]:
    floor, honest_db, cheat_db = choose_floor(rows)
    threshold, honest, cheat = choose_threshold(rows, floor)
    print(f"\n== {model} / {pipeline.value}: similarity and PSNR to the float32 reference "
          f"(worst case over requests: lowest honest, highest cheat; * saves compute)")
    print(f"{'kind':<8}{'case':<34}{'sim':>7}{'ssim':>7}{'detail':>8}{'energy':>8}"
          f"{'psnr':>7}  old    hardened")
    for kind, case, comps in rows:
        if kind == "honest":
            worst = min(comps, key=lambda c: c.similarity)
            worst_db = min(c.psnr for c in comps)
        else:
            worst = max(comps, key=lambda c: c.similarity)
            worst_db = max(c.psnr for c in comps)
        old = "pass" if worst.similarity >= threshold else "FAIL"
        new = "pass" if worst.similarity >= threshold and all(
            c.psnr >= floor for c in comps) else "FAIL"
        if kind != "honest":  # a cheat is stopped when no request passes both bounds
            new = "pass" if any(c.similarity >= threshold and c.psnr >= floor
                                for c in comps) else "FAIL"
        ok = (new == "pass") == (kind == "honest")
        print(f"{kind:<8}{case:<34}{worst.similarity:>7.3f}{worst.ssim:>7.3f}"
              f"{worst.detail_correlation:>8.3f}{worst.energy_ratio:>8.3f}{worst_db:>7.1f}  "
              f"{old:<7}{new}{'' if ok else '  <-- WRONG'}")
    margin = honest - cheat
    print(f"threshold {threshold:.3f}: lowest honest {honest:.3f}, highest cheat above the "
          f"floor {cheat:.3f}, "
          f"margin {margin:+.3f}{'' if margin > 0 else '  (NOT SEPARABLE on these weights)'}")
    if min(len(cs) for _, _, cs in rows) < 10:
        print("  (fewer than 10 requests: the honest bfloat16 PSNR has a tail - 1 to 2 requests "
              "in 13 near 29-30 dB on the tiny weights - that few requests miss; check it "
              "with --requests 10 before lowering the floor's margin)")
    print(f"PSNR floor {floor:.1f} dB: lowest honest {honest_db:.1f}, highest compute-saving "
          f"cheat {cheat_db:.1f}, margin {honest_db - cheat_db:+.1f} dB"
          f"{'' if honest_db > cheat_db else '  (NOT SEPARABLE on these weights)'}")
    return threshold, floor


def _key(model: str, pipeline: str) -> str:
    return model if pipeline == "txt2img" else f"{model}/{pipeline}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--tiny", action="store_true", default=True)
    src.add_argument("--model-path", type=Path, default=None)
    parser.add_argument("--models", nargs="+", default=["flux-schnell", "kolors"])
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="thread count of the reference")
    parser.add_argument("--pipelines", nargs="+", default=None,
                        help="kolors pipelines to calibrate (default: txt2img controlnet-canny)")
    args = parser.parse_args()
    import torch

    from niche.models.engine import Engine

    if args.model_path:
        root = args.model_path
    else:
        from niche.devnet.tiny import ensure_tiny_models

        root = ensure_tiny_models()
    started = time.time()
    engines = {
        "float32": Engine(models=args.models, model_root=root, dtype="float32",
                          num_threads=args.threads),
        "bfloat16": Engine(models=args.models, model_root=root, dtype="bfloat16",
                           num_threads=args.threads),
        "float16": Engine(models=args.models, model_root=root, dtype="float16",
                          num_threads=args.threads),
    }
    torch.set_num_threads(args.threads)  # each Engine pins the process-wide count on creation
    engines["threads"] = (args.threads, 1 if args.threads != 1 else 2)
    print(f"torch {torch.__version__}, reference threads={args.threads}, model root {root}")

    from niche.validator.challenges import engine_conditioner

    def conditioner(model, pipeline, w, h, seed):
        make = engine_conditioner(engines["float32"])
        return make(model, pipeline, w, h, np.random.default_rng(seed))

    chosen = {}
    for model in args.models:
        others = [m for m in args.models if m != model]
        pipelines = [PipelineKind.TXT2IMG]
        if model == "kolors":
            pipelines = [PipelineKind(p) for p in (args.pipelines or
                                                   ["txt2img", "controlnet-canny"])]
        for pipeline in pipelines:
            rows = calibrate_model(model, engines, args.requests, others[0] if others else None,
                                   pipeline, conditioner)
            chosen[(model, pipeline.value)] = print_matrix(model, pipeline, rows)
    print("\nsuggested (niche/validator/verify.py; txt2img is the model-wide key):")
    print("DEFAULT_THRESHOLDS = {" + ", ".join(
        f'"{_key(m, p)}": {t:.3f}' for (m, p), (t, _) in chosen.items()) + "}")
    print("DEFAULT_PSNR_FLOORS = {" + ", ".join(
        f'"{_key(m, p)}": {f:.1f}' for (m, p), (_, f) in chosen.items()) + "}")
    print(f"({time.time() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
