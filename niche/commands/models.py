"""`niche models ...`: build the tiny checkpoints, list the configured models."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("models",
                                   help="model checkpoints: download, list, build tiny ones",
                                   description="Model checkpoints and their configs.")
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    p = sub.add_parser("build-tiny", help="write tiny random-weight checkpoints of the real "
                       "architectures (default: the shared cache, built once)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder to (re)build into; default ~/.cache/niche/tiny-v1 or "
                   "$NICHE_TINY_DIR, reused when complete")
    p.set_defaults(func=_build_tiny)
    p = sub.add_parser("train-tiny", help="train the tiny checkpoints briefly on CPU "
                       "(procedural shapes) and write the committed fixtures")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for <model>/<component>.safetensors; default "
                   "niche/devnet/tiny_weights (what build-tiny loads)")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-time cap for the whole run (split over the stages)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (fixed: repeatable; one is fastest on busy cores)")
    p.add_argument("--only", nargs="*", default=None, metavar="STAGE",
                   help="train only these stages (e.g. kolors/controlnet); others are loaded "
                   "from --out")
    p.set_defaults(func=_train_tiny)
    p = sub.add_parser("download", help="fetch models' hub checkpoints (disk space first, "
                       "progress bars; HF_TOKEN for gated repositories, HF_ENDPOINT for a "
                       "mirror)")
    p.add_argument("--model", dest="models", nargs="+", default=None, metavar="MODEL",
                   help="models to fetch (default: every configured model)")
    p.add_argument("--dest", type=Path, default=None,
                   help="write DEST/<model>/ folders to pass as --model-path DEST (default: "
                        "the hub cache, where the miner looks without --model-path)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="the dtype you will run (picks fp16 variant files; default: the "
                        "model's)")
    p.add_argument("--dry-run", action="store_true",
                   help="state the files and the disk space needed, download nothing")
    p.set_defaults(func=_download)
    p = sub.add_parser("list", help="configured models, pipelines, defaults and hub ids")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list)


def _build_tiny(args: argparse.Namespace) -> int:
    from niche.commands.generate import check_output_folder
    from niche.errors import NicheError

    if args.out is not None:
        args.out = args.out.expanduser()
        check_output_folder(args.out, "--out")  # an existing file, /proc/...: one line
    from niche.models.quiet import quiet_libraries

    quiet_libraries()
    from niche.devnet.tiny import build_tiny_models, ensure_tiny_models

    try:
        root = build_tiny_models(args.out) if args.out else ensure_tiny_models()
    except OSError as exc:
        where = exc.filename or args.out or "the tiny cache"
        raise NicheError(f"cannot write the tiny checkpoints to {where}: "
                         f"{exc.strerror or exc}") from None
    print(root)
    return 0


def _train_tiny(args: argparse.Namespace) -> int:
    from niche.models.quiet import quiet_libraries

    quiet_libraries()
    from niche.devnet.training.run import DEFAULT_OUT, train_tiny

    record = train_tiny(args.out or DEFAULT_OUT, minutes=args.minutes, seed=args.seed,
                        threads=args.threads, only=args.only)
    print(f"trained {len(record['stages'])} stages in {record['seconds']} s -> "
          f"{args.out or DEFAULT_OUT}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from niche.models.spec import available_models, load_spec

    specs = [load_spec(name) for name in available_models()]
    if args.json:
        print(json.dumps([s.model_dump(mode="json") for s in specs], indent=2))
        return 0
    for s in specs:
        d = s.defaults
        print(f"{s.name}: {', '.join(p.value for p in s.pipelines)}")
        print(f"  defaults: {d.width}x{d.height}, {d.steps} steps, guidance {d.guidance}, "
              f"timeout {d.timeout} s; dtype {s.dtype}, memory {s.memory_mode}")
        for key, c in s.components.items():
            print(f"  {key}: {c.hub}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from niche.logging_setup import setup_logging

    setup_logging(progress=True)
    from huggingface_hub import HfApi

    from niche.models.download import check_space, download, endpoint, plan_model, target_dir
    from niche.models.spec import available_models, load_spec

    names = args.models or available_models()
    specs = [load_spec(name) for name in names]  # an unknown model fails before the network
    api = HfApi(endpoint=endpoint())
    plans = [plan for spec in specs for plan in plan_model(spec, args.dest, api, args.dtype)]
    folder = target_dir(args.dest)
    print(f"{', '.join(names)}: {check_space(plans, folder)}", flush=True)
    if args.dry_run:
        for plan in plans:
            print(f"  {plan.model} {plan.component}: {plan.repo} {len(plan.files)} files, "
                  f"{plan.missing_bytes / 1e9:.1f} GB missing")
        return 0
    download(plans)
    hint = f"--model-path {args.dest}" if args.dest else "no --model-path needed"
    print(f"done: {', '.join(names)} on disk ({hint})")
    return 0
