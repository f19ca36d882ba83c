"""Engine flags, one definition for every command that loads models (generate, verify, miner,
validator): on CPU miners and validators must agree on threads for bit-identical images, so
the flags must mean the same thing everywhere.

`--model-path DIR` is always a folder holding one `<model>/` checkpoint folder per model;
`--model-dir MODEL=PATH` points one model at its own folder (a hub snapshot, say).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from niche.errors import ConfigError
from niche.models.spec import DTYPES, MEMORY_MODES

if TYPE_CHECKING:
    from niche.models.engine import Engine



def add_engine_args(group: argparse._ActionsContainer) -> None:
    """--model-path | --tiny, --model-dir, --device, --dtype, --memory-mode, --num-threads,
    --engine.fast. One default dtype everywhere (the model config's): `niche generate`
    reproduces what a miner serves."""
    src = group.add_mutually_exclusive_group()
    src.add_argument("--model-path", dest="model_path", type=Path, default=None,
                     help="folder holding one <model>/ checkpoint folder per model "
                          "(default: hub ids)")
    src.add_argument("--tiny", action="store_true",
                     help="use the tiny real-architecture checkpoints (built once; tests, "
                          "localnet)")
    group.add_argument("--model-dir", dest="model_dirs", action="append", default=[],
                       metavar="MODEL=PATH",
                       help="one model's own checkpoint folder (repeatable); overrides "
                            "--model-path for that model")
    group.add_argument("--device", default="auto",
                       help="torch device: auto (cuda when available, else cpu), cpu, cuda[:N]")
    group.add_argument("--dtype", default=None, choices=DTYPES,
                       help="weights dtype (default: the model config's `dtype`, what miners "
                            "serve: bfloat16 for FLUX, float16 for Kolors)")
    group.add_argument("--memory-mode", dest="memory_mode", default=None, choices=MEMORY_MODES,
                       help="GPU memory strategy (default: the model's)")
    group.add_argument("--num-threads", dest="num_threads", type=int, default=None,
                       help="torch CPU threads (default: the checkpoint's hint, else "
                            "min(4, cores)); miners and validators must agree on CPU")
    group.add_argument("--threads", dest="num_threads", type=int, help=argparse.SUPPRESS)
    group.add_argument("--quant", dest="quants", action="append", default=[],
                       metavar="MODEL=QUANT",
                       help="a FLUX model's weight storage: none, fp8, gguf-q8, gguf-q4, "
                            "optionally +t5-fp8 (repeatable; default: the model's YAML "
                            "`quant`; docs/models.md)")
    group.add_argument("--engine.fast", dest="engine_fast", default=None,
                       action=argparse.BooleanOptionalAction,
                       help="CUDA fast path: channels_last VAE, fused QKV, SDPA, torch.compile "
                            "of the denoiser (default: the model's YAML `fast`; a no-op on CPU)")


def model_dirs_from_args(args: argparse.Namespace) -> dict[str, Path]:
    """`--model-dir MODEL=PATH` pairs as a mapping; a malformed pair is a one-line error."""
    dirs: dict[str, Path] = {}
    for item in args.model_dirs or ():
        model, sep, path = item.partition("=")
        if not sep or not model or not path:
            raise ConfigError(f"--model-dir: expected MODEL=PATH, got {item!r}")
        dirs[model] = Path(path).expanduser()
    return dirs


def quants_from_args(args: argparse.Namespace) -> dict[str, str]:
    """`--quant MODEL=QUANT` pairs as a mapping; a malformed pair is a one-line error."""
    quants: dict[str, str] = {}
    for item in getattr(args, "quants", None) or ():
        model, sep, quant = item.partition("=")
        if not sep or not model or not quant:
            raise ConfigError(f"--quant: expected MODEL=QUANT (e.g. flux-dev=gguf-q8), "
                              f"got {item!r}")
        quants[model] = quant
    return quants


def model_root_from_args(args: argparse.Namespace) -> Path | None:
    if args.tiny:
        from niche.devnet.tiny import ensure_tiny_models

        return ensure_tiny_models()
    return args.model_path


def engine_from_args(args: argparse.Namespace, models: Sequence[str], *,
                     memory_mode: str | None = None, dtype: str | None = None) -> Engine:
    """The engine the flags describe, serving `models` (`memory_mode`/`dtype` override the
    flags: `niche bench` loads one engine per memory mode and a float32 reference)."""
    from niche.models.engine import Engine

    dirs = model_dirs_from_args(args)
    unknown = sorted(set(dirs) - set(models))
    if unknown:
        raise ConfigError(f"--model-dir names models that are not loaded: {unknown}")
    quants = quants_from_args(args)
    unknown = sorted(set(quants) - set(models))
    if unknown:
        raise ConfigError(f"--quant names models that are not loaded: {unknown}")
    return Engine(models=list(models), model_root=model_root_from_args(args),
                  model_paths=dirs or None, device=args.device, dtype=dtype or args.dtype,
                  memory_mode=memory_mode or args.memory_mode,  # type: ignore[arg-type]
                  num_threads=args.num_threads, fast=getattr(args, "engine_fast", None),
                  quant=quants or None)
