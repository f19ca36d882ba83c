"""Engine flags shared by the long-running processes (miner, validator): both load the same
models the same way, and on CPU the thread count must match for bit-identical images."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_engine_args(group: argparse._ArgumentGroup) -> None:
    """--model-path | --tiny, --device, --dtype, --memory-mode, --num-threads."""
    src = group.add_mutually_exclusive_group()
    src.add_argument("--model-path", dest="model_path", type=Path, default=None,
                     help="folder holding <model>/ checkpoints (default: hub ids)")
    src.add_argument("--tiny", action="store_true",
                     help="use the tiny random-weight checkpoints (tests, localnet)")
    group.add_argument("--device", default="auto",
                       help="torch device (default auto: cuda when available, else cpu)")
    group.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="weights dtype (default: the model's)")
    group.add_argument("--memory-mode", dest="memory_mode", default=None,
                       choices=["gpu", "model-offload", "sequential-offload"],
                       help="GPU memory strategy (default: the model's)")
    group.add_argument("--num-threads", dest="num_threads", type=int, default=None,
                       help="torch CPU threads (default: the checkpoint's hint, else "
                            "min(4, cores)); miners and validators must agree on CPU")


def model_root_from_args(args: argparse.Namespace) -> Path | None:
    if args.tiny:
        from niche.models.tiny import ensure_tiny_models

        return ensure_tiny_models()
    return args.model_path
