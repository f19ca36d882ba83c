"""`niche generate`: one image from the engine, saved as a lossless PNG, summary as JSON."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from niche.errors import ConfigError, InvalidRequest, NicheError

if TYPE_CHECKING:
    from niche.models.engine import Engine

PIPELINES = ("txt2img", "controlnet-canny", "controlnet-depth", "ip-adapter")


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate one image with the engine",
                              description="Generate one image deterministically and print a "
                              "one-line JSON summary (model, pipeline, seed, seconds, sha256).")
    add_request_args(p)
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--states-out", type=Path, default=None,
                   help="also write the sampler states x_1..x_N (safetensors), what a miner "
                        "commits to; `niche verify --states` checks them")
    p.set_defaults(func=_generate)


def add_request_args(p: argparse.ArgumentParser) -> None:
    """The flags that describe one generation request; `niche verify` takes the same."""
    p.add_argument("--model", required=True,
                   help="model name: flux-schnell, flux-dev, flux-mini or kolors")
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
    from niche.commands.engine_args import add_engine_args

    add_engine_args(p.add_argument_group("engine"))  # dtype: the model's, as a miner


def _writable_folder(folder: Path, what: str) -> None:
    """ConfigError unless `folder` is an existing folder a file can be created in (probed
    with a temporary file, removed at once: a read-only or virtual file system such as /proc
    says no only when asked)."""
    if not folder.exists():
        raise ConfigError(f"{what}: folder {folder} does not exist: create it first "
                          f"(mkdir -p {folder}) or pick a path in an existing folder")
    if not folder.is_dir():
        raise ConfigError(f"{what}: {folder} is not a folder: pick a path in a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".niche-probe-")
    except OSError as exc:
        raise ConfigError(f"{what}: cannot write in {folder} ({exc.strerror or exc}): pick a "
                          "writable folder") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: Path, flag: str, example: str = "image.png") -> None:
    """Refuse, before any work, an output file that cannot be written: a folder, a missing
    or unwritable parent folder. Creates nothing (missing parent folders are not made: a
    typo would otherwise create folders anywhere, at / included)."""
    what = f"{flag} {path}"
    if path.is_dir():
        raise ConfigError(f"{what} is a folder: name a file, e.g. {path / example}")
    if path.exists():  # overwritten (a device such as /dev/null included) if writable
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{what} exists and is not writable: pick another path")
    else:
        _writable_folder(path.parent, what)


def check_output_folder(path: Path, flag: str) -> None:
    """Refuse, before any work, an output folder that cannot be made or written: an existing
    file, a missing or unwritable parent. Creates nothing."""
    what = f"{flag} {path}"
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{what} exists and is not a folder: pick a folder path")
        _writable_folder(path, what)
    else:
        _writable_folder(path.parent, what)


def _write_output(path: Path, flag: str, write) -> None:
    try:
        write()
    except OSError as exc:
        raise NicheError(f"{flag} {path}: cannot write ({exc.strerror or exc})") from None


def _params(args: argparse.Namespace):
    from pydantic import ValidationError

    from niche.protocol import GenerationParams, first_validation_error

    fields = {"model": args.model, "pipeline": args.pipeline, "prompt": args.prompt,
              "negative_prompt": args.negative_prompt, "seed": args.seed, "steps": args.steps,
              "guidance": args.guidance, "width": args.width, "height": args.height,
              "controlnet_scale": args.controlnet_scale,
              "ip_adapter_scale": args.ip_adapter_scale}
    try:
        return GenerationParams(**fields)
    except ValidationError as exc:
        where, message = first_validation_error(exc)
        raise InvalidRequest(message, field=where or None) from None


def _generate(args: argparse.Namespace) -> int:
    from niche.models.quiet import quiet_libraries

    quiet_libraries()
    from niche.imaging import load_image_file

    params = _params(args)
    check_output_file(args.out, "--out")  # before minutes of loading and generating
    if args.states_out is not None:
        check_output_file(args.states_out, "--states-out", "image.states")
        if args.states_out.resolve() == args.out.resolve():
            raise ConfigError("--states-out names the same file as --out: pick another")
    image = load_image_file(args.image) if args.image else None
    return _run(engine_from_request_args(args), args, params, image)


def engine_from_request_args(args: argparse.Namespace) -> Engine:
    """The one-model engine that `niche generate` and `niche verify` run the request on."""
    from niche.commands.engine_args import engine_from_args

    return engine_from_args(args, [args.model])


def _run(engine, args, params, image) -> int:
    from niche.imaging import encode_image

    full = engine.resolve(params)
    start = time.perf_counter()
    result, states = engine.generate_with_states(full, image)
    seconds = time.perf_counter() - start
    if args.states_out:
        from niche.states import save_states_file

        _write_output(args.states_out, "--states-out", lambda: save_states_file(
            args.states_out, states, engine.compute_dtype(full.model)))
    data = encode_image(result)
    _write_output(args.out, "--out", lambda: args.out.write_bytes(data))
    print(json.dumps({"model": full.model, "pipeline": full.pipeline.value, "seed": full.seed,
                      "steps": full.steps, "width": full.width, "height": full.height,
                      "seconds": round(seconds, 4), "sha256": hashlib.sha256(data).hexdigest(),
                      "out": str(args.out)}))
    return 0
