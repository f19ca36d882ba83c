"""Engine flags, one definition for every command that loads models (generate, verify, miner,
validator): on CPU miners and validators must agree on threads for bit-identical images, so
the flags must mean the same thing everywhere.

`--model-path DIR` is always a folder holding one `<model>/` checkpoint folder per model;
`--model-dir MODEL=PATH` points one model at its own folder (a hub snapshot, say).
"""
from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from niche.errors import ConfigError
from niche.models.spec import DTYPES, MEMORY_MODES
from niche.protocol import ATTENTION_BACKENDS

if TYPE_CHECKING:
    from niche.models.engine import Engine, ImageEngine



def check_threads(args: argparse.Namespace) -> None:
    """--num-threads, or NICHE_NUM_THREADS without it, checked before the models load:
    ConfigError (one line) unless a whole number >= 1."""
    threads = getattr(args, "num_threads", None)
    if threads is None:
        from niche.models.engine import default_threads

        default_threads()
    elif threads < 1:
        raise ConfigError(f"--num-threads must be at least 1, not {threads}")
    elif threads > max_threads():
        raise ConfigError(f"--num-threads {threads} is more than {max_threads()} (4 per core of "
                          f"this machine's {os.cpu_count() or 1}): torch runs best on one "
                          "thread per core; leave it out for the default")


def max_threads() -> int:
    """The most CPU threads an engine may be given: a few per core (a typo of 10000 would
    start 10000 threads and wedge the box)."""
    return max(8, 4 * (os.cpu_count() or 1))


DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d{1,3})?)")


def device_name(value: str) -> str:
    """--device's type: auto, cpu, mps, cuda or cuda:N (argparse: usage and one line, exit
    2), checked before any model loads."""
    if not DEVICE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device niche runs on: auto, cpu, "
                                         "cuda or cuda:N (mps on a Mac)")
    return value


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
    group.add_argument("--device", default="auto", type=device_name,
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
    group.add_argument("--engine.attention", dest="engine_attention", default="default",
                       choices=ATTENTION_BACKENDS,
                       help="scaled-dot-product attention backend (default: torch's choice "
                            "per device). Answers declare it and validators recompute with "
                            "the same one (docs/step-check.md)")


BACKENDS = ("local", "ray")


def add_backend_args(parser: argparse.ArgumentParser) -> None:
    """--engine.backend local|ray and the Ray flags (the miner's; see docs/miner.md)."""
    g = parser.add_argument_group("engine backend")
    g.add_argument("--engine.backend", dest="engine_backend", default="local", choices=BACKENDS,
                   help="local: the engine in this process (default); ray: a Ray Serve "
                        "deployment of it with --engine.replicas replicas (pip install "
                        "'niche[ray]')")
    g.add_argument("--engine.replicas", dest="engine_replicas", type=int, default=1,
                   help="engine replicas on Ray, one per GPU (default 1)")
    g.add_argument("--engine.gpus_per_replica", dest="engine_gpus_per_replica", type=float,
                   default=None, help="GPUs each replica holds (default: 1 on a CUDA "
                                      "device, 0 on CPU)")
    g.add_argument("--engine.cpus_per_replica", dest="engine_cpus_per_replica", type=float,
                   default=1.0, help="CPUs Ray reserves for each replica (default 1)")
    g.add_argument("--ray.address", dest="ray_address", default=None,
                   help="an existing Ray cluster (`ray start --head`): auto or HOST:PORT "
                        "(default: start a local Ray instance for the replicas)")
    g.add_argument("--ray.object_store_mb", dest="ray_object_store_mb", type=int, default=None,
                   help="MiB of object store for a local Ray instance (answers pass through "
                        "it; default 160 per replica, at least 256)")


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

    return Engine(**engine_kwargs_from_args(args, models, memory_mode=memory_mode,
                                            dtype=dtype))


def engine_kwargs_from_args(args: argparse.Namespace, models: Sequence[str], *,
                            memory_mode: str | None = None, dtype: str | None = None
                            ) -> dict[str, Any]:
    """`Engine`'s keyword arguments from the flags (what every Ray replica is built with)."""
    check_threads(args)
    dirs = model_dirs_from_args(args)
    unknown = sorted(set(dirs) - set(models))
    if unknown:
        raise ConfigError(f"--model-dir names models that are not loaded: {unknown}")
    quants = quants_from_args(args)
    unknown = sorted(set(quants) - set(models))
    if unknown:
        raise ConfigError(f"--quant names models that are not loaded: {unknown}")
    return {"models": list(models), "model_root": model_root_from_args(args),
            "model_paths": dirs or None, "device": args.device, "dtype": dtype or args.dtype,
            "memory_mode": memory_mode or args.memory_mode, "num_threads": args.num_threads,
            "fast": getattr(args, "engine_fast", None), "quant": quants or None,
            "attention": getattr(args, "engine_attention", "default")}


def backend_engine_from_args(args: argparse.Namespace, models: Sequence[str]) -> ImageEngine:
    """The engine `--engine.backend` names: in this process, or replicas on Ray."""
    backend = getattr(args, "engine_backend", "local")
    if backend == "local":
        if getattr(args, "engine_replicas", 1) != 1:
            raise ConfigError("--engine.replicas needs --engine.backend ray")
        return engine_from_args(args, models)
    import os

    from niche.models.engine import resolve_device
    from niche.models.ray_backend import RayConfig, RayEngine

    kwargs = engine_kwargs_from_args(args, models)
    device = resolve_device(args.device) if args.ray_address is None else args.device
    gpus = args.engine_gpus_per_replica
    if gpus is None:
        gpus = 1.0 if str(device).startswith("cuda") else 0.0
    if str(device) == "auto" and gpus:
        kwargs["device"] = "cuda"
    env = {k: v for k, v in os.environ.items()
           if k in ("NICHE_NUM_THREADS", "NICHE_TINY_DIR", "HF_HOME", "HF_HUB_OFFLINE")}
    return RayEngine(kwargs, RayConfig(replicas=args.engine_replicas, gpus_per_replica=gpus,
                                       cpus_per_replica=args.engine_cpus_per_replica,
                                       address=args.ray_address, env=env,
                                       object_store_mb=args.ray_object_store_mb))
