"""`niche generate`: one image from the engine, saved as a lossless PNG, summary as JSON."""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from niche.errors import InvalidRequest

PIPELINES = ("txt2img", "controlnet-canny", "controlnet-depth", "ip-adapter")


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate one image with the engine",
                              description="Generate one image deterministically and print a "
                              "one-line JSON summary (model, pipeline, seed, seconds, sha256).")
    add_request_args(p)
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.set_defaults(func=_generate)


def add_request_args(p: argparse.ArgumentParser) -> None:
    """The flags that describe one generation request; `niche verify` takes the same."""
    p.add_argument("--model", required=True, help="model name: flux-schnell or kolors")
    p.add_argument("--pipeline", default="txt2img", choices=PIPELINES,
                   help="how to draw (default txt2img); the others need --image")
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--negative-prompt", default="", help="what not to draw (Kolors only)")
    p.add_argument("--seed", type=int, required=True, help="0..2**32-1; same seed, same image")
    p.add_argument("--image", type=Path, default=None, help="conditioning image file")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: model's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: model's)")
    p.add_argument("--width", type=int, default=None, help="multiple of 16 (default: model's)")
    p.add_argument("--height", type=int, default=None, help="multiple of 16 (default: model's)")
    p.add_argument("--controlnet-scale", type=float, default=None,
                   help="ControlNet conditioning scale (default 0.8; 0 = txt2img)")
    p.add_argument("--ip-adapter-scale", type=float, default=None,
                   help="IP-Adapter scale (default: model's; 0 = txt2img)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="compute dtype (default float32)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda when available, else cpu), cpu or cuda[:N]")
    p.add_argument("--memory-mode", choices=("gpu", "model-offload", "sequential-offload"),
                   default=None, help="default: the model config's")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default min(4, cores))")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-path", type=Path, default=None,
                     help="folder holding the model's checkpoint in the hub layout")
    src.add_argument("--tiny", action="store_true", help="use the tiny checkpoints (built once)")


def _params(args: argparse.Namespace):
    from pydantic import ValidationError

    from niche.protocol import GenerationParams

    fields = {"model": args.model, "pipeline": args.pipeline, "prompt": args.prompt,
                  "negative_prompt": args.negative_prompt, "seed": args.seed, "steps": args.steps,
                  "guidance": args.guidance, "width": args.width, "height": args.height,
                  "controlnet_scale": args.controlnet_scale, "ip_adapter_scale": args.ip_adapter_scale}
    try:
        return GenerationParams(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err.get("loc") else None
        raise InvalidRequest(err["msg"], field=field) from None


def _generate(args: argparse.Namespace) -> int:
    from niche.models.quiet import quiet_libraries

    quiet_libraries()
    from niche.models.images import open_image_file

    params = _params(args)
    image = open_image_file(args.image) if args.image else None
    return _run(engine_from_request_args(args), args, params, image)


def engine_from_request_args(args: argparse.Namespace):
    """The one-model engine that `niche generate` and `niche verify` run the request on."""
    from niche.models.engine import Engine

    root, paths = None, None
    if args.tiny:
        from niche.models.tiny import ensure_tiny_models

        root = ensure_tiny_models()
    elif args.model_path:
        paths = {args.model: args.model_path}
    return Engine(models=[args.model], model_root=root, model_paths=paths, device=args.device,
                  dtype=args.dtype, memory_mode=args.memory_mode, num_threads=args.threads)


def _run(engine, args, params, image) -> int:
    from niche.models.engine import png_bytes

    full = engine.resolve(params)
    start = time.perf_counter()
    result = engine.generate(full, image)
    seconds = time.perf_counter() - start
    data = png_bytes(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(json.dumps({"model": full.model, "pipeline": full.pipeline.value, "seed": full.seed,
                      "steps": full.steps, "width": full.width, "height": full.height,
                      "seconds": round(seconds, 4), "sha256": hashlib.sha256(data).hexdigest(),
                      "out": str(args.out)}))
    return 0
