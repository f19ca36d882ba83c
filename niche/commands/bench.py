"""`niche bench`: what this box does with the configured models, before registering.

Per model and memory mode: load seconds, warm-up, seconds per image (median, p90), images per
minute and peak device memory at the model's production defaults; whether two runs of the
same request are bit-identical; and whether the output passes the validator's checks (the
step check of every step plus the image similarity) against the validator's reference path:
the plain engine in the same dtype (validators recompute in the dtype a miner declares).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from niche.errors import ConfigError

if TYPE_CHECKING:
    import PIL.Image
    import torch

    from niche.earnings import Subnet, Verdict
    from niche.protocol import GenerationParams

PROMPT = "a lighthouse on a rocky coast at dusk, detailed, photograph"


def seed_value(text: str) -> int:
    """--seed's type: a whole number in the protocol's range (usage and one line, exit 2,
    before any model loads)."""
    from niche.protocol import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is not in 0..{MAX_SEED}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="measure and verify this box's generation before registering",
        description="Load the models, time requests at the production defaults, check that "
        "runs are bit-identical and that the output passes the validator's step check "
        "against the plain engine in the same dtype, then give a verdict: the expected score "
        "at the measured latency on the validators' scoring curve and, with --netuid, the "
        "share against the miners earning on that subnet. docs/miner.md explains every line.")
    p.add_argument("--model", dest="models", nargs="+", default=["flux-schnell"],
                   metavar="MODEL", help="models to bench (default flux-schnell)")
    p.add_argument("--runs", type=int, default=5,
                   help="timed requests per memory mode after the warm-up (default 5)")
    p.add_argument("--memory-modes", nargs="+", default=None, metavar="MODE",
                   help="memory modes to compare on GPU: gpu model-offload sequential-offload "
                        "(default: --memory-mode, else the model's); one run on CPU")
    p.add_argument("--prompt", default=PROMPT, help="the request's prompt")
    p.add_argument("--seed", type=seed_value, default=1234,
                   help="the request's seed, 0..2**32-1 (default 1234)")
    p.add_argument("--reference-memory-mode", default="model-offload",
                   help="memory mode of the reference engine on GPU (default "
                        "model-offload: it sits beside the benched one)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the reference engine and the step check")
    p.add_argument("--json", action="store_true", help="print one JSON object, not a table")
    from niche.commands.chain_args import add_chain_args

    add_chain_args(p)  # --netuid: the verdict compares with the miners on that subnet
    from niche.commands.engine_args import add_engine_args

    add_engine_args(p.add_argument_group("engine"))
    p.set_defaults(func=_bench)


@dataclass
class ModeResult:
    memory_mode: str
    load_s: float
    warmup_s: float
    median_s: float
    p90_s: float
    images_per_minute: float
    peak_memory_gib: float | None  # None on CPU
    bit_identical: bool
    runs: int
    fast: list[str] = field(default_factory=list)


@dataclass
class Verification:
    verifies: bool
    reason: str
    max_step_error: float
    worst_step_ratio: float  # max over steps of error / that step's threshold (pass: <= 1)
    steps_checked: int
    similarity: float
    similarity_threshold: float
    step_check_ok: bool
    image_ok: bool


@dataclass
class ModelResult:
    model: str
    device: str
    dtype: str
    threads: int
    width: int
    height: int
    steps: int
    modes: list[ModeResult]
    timeout: float = 30.0
    """The validators' deadline for this model's challenges (its config's timeout)."""
    verification: dict[str, Verification] = field(default_factory=dict)  # by memory mode


def _check_args(args: argparse.Namespace) -> None:
    from niche.commands.engine_args import check_threads
    from niche.models.spec import MEMORY_MODES, available_models

    if args.runs < 1:
        raise ConfigError(f"--runs must be at least 1, not {args.runs}")
    known = available_models()
    for name in args.models:
        if name not in known:
            raise ConfigError(f"--model: unknown model {name!r} (known: {', '.join(known)})")
    for mode in [*(args.memory_modes or []), args.reference_memory_mode]:
        if mode not in MEMORY_MODES:
            raise ConfigError(f"memory mode must be one of {', '.join(MEMORY_MODES)}, "
                              f"not {mode!r}")
    check_threads(args)


def _check_device(args: argparse.Namespace) -> None:
    """A cuda device torch cannot use is refused in one line, before any torch.cuda call."""
    import torch

    from niche.models.engine import no_cuda_reason, resolve_device

    device = resolve_device(args.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(no_cuda_reason(device))


def p90(values: list[float]) -> float:
    """Nearest-rank 90th percentile (the slowest of few runs, as an operator reads it)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def _free(engine: Any) -> None:
    import torch

    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _same(a: tuple[bytes, list[torch.Tensor]], b: tuple[bytes, list[torch.Tensor]]) -> bool:
    import torch

    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(
        torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True))


def _bench_mode(args: argparse.Namespace, model: str, mode: str | None, on_cuda: bool
                ) -> tuple[ModeResult, Any, GenerationParams, PIL.Image.Image,
                           list[torch.Tensor]]:
    import torch
    from tqdm import tqdm

    from niche.commands.engine_args import engine_from_args
    from niche.imaging import encode_image
    from niche.protocol import GenerationParams

    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    engine = engine_from_args(args, [model], memory_mode=mode)
    load_s = time.perf_counter() - started
    params = engine.resolve(GenerationParams(model=model, prompt=args.prompt, seed=args.seed))

    def once() -> tuple[float, PIL.Image.Image, list[torch.Tensor]]:
        t0 = time.perf_counter()
        image, states = engine.generate_with_states(params)
        if on_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, image, states

    warmup_s, first_image, first_states = once()
    first = (encode_image(first_image), first_states)
    seconds: list[float] = []
    identical = True
    family = engine.family(model)
    label = f"{model} {family.memory_mode if on_cuda else engine.device}"
    for _ in tqdm(range(args.runs), desc=label, unit="image", file=sys.stderr,
                  disable=args.runs < 2 and not sys.stderr.isatty()):
        s, image, states = once()
        seconds.append(s)
        identical = identical and _same(first, (encode_image(image), states))
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None
    median = statistics.median(seconds)
    result = ModeResult(
        memory_mode=family.memory_mode if on_cuda else "cpu", load_s=load_s,
        warmup_s=warmup_s, median_s=median, p90_s=p90(seconds),
        images_per_minute=60.0 / median if median > 0 else math.inf,
        peak_memory_gib=peak, bit_identical=identical, runs=len(seconds) + 1,
        fast=list(family.fast_applied))
    return result, engine, params, first_image, first_states


def _verify(reference: Any, params: GenerationParams, dtype: str, image: PIL.Image.Image,
            states: list[torch.Tensor]) -> Verification:
    from niche.validator.steps import StepChecker
    from niche.validator.verify import Verifier

    n = len(states)
    checker = StepChecker(reference)
    verdict = checker.check(params, None, {i + 1: s for i, s in enumerate(states)},
                            list(range(n)), dtype=dtype, answer=image)
    judged = Verifier(reference).judge(params.model, reference.generate(params), image,
                                       params.pipeline.value)
    errors = list(verdict.errors.values())
    ok = bool(verdict.passed) and bool(judged.passed)
    reason = verdict.reason if not verdict.passed else (
        "ok" if judged.passed else f"image similarity {judged.similarity:.3f} below "
                                  f"{judged.threshold:.3f}")
    return Verification(
        verifies=ok, reason=reason, max_step_error=max(errors) if errors else math.nan,
        worst_step_ratio=max((e / verdict.thresholds[k] if verdict.thresholds[k] else math.inf)
                             for k, e in verdict.errors.items()) if errors else math.nan,
        steps_checked=len(errors), similarity=float(judged.similarity),
        similarity_threshold=float(judged.threshold), step_check_ok=bool(verdict.passed),
        image_ok=bool(judged.passed))


def bench_model(args: argparse.Namespace, model: str) -> ModelResult:
    from niche.commands.engine_args import engine_from_args
    from niche.models.engine import resolve_device

    device = resolve_device(args.device)
    on_cuda = device.startswith("cuda")
    modes: list[str | None] = list(args.memory_modes or [None]) if on_cuda else [None]
    results: list[ModeResult] = []
    outputs: dict[str, tuple[Any, PIL.Image.Image, list[torch.Tensor]]] = {}
    info: dict[str, Any] = {}
    for mode in modes:
        result, engine, params, image, states = _bench_mode(args, model, mode, on_cuda)
        results.append(result)
        outputs[result.memory_mode] = (params, image, states)
        info = {"dtype": engine.compute_dtype(model), "threads": engine.num_threads,
                "device": engine.device, "timeout": float(engine.spec(model).defaults.timeout)}
        _free(engine)
    out = ModelResult(model=model, device=info["device"], dtype=info["dtype"],
                      threads=info["threads"], width=int(params.width or 0),
                      height=int(params.height or 0), steps=int(params.steps or 0),
                      modes=results, timeout=info["timeout"])
    if args.verify:
        # the validator's path: plain (no fast path), the miner's dtype, default attention
        reference = engine_from_args(args, [model], dtype=out.dtype,
                                     memory_mode=args.reference_memory_mode if on_cuda else None)
        for mode_name, (params, image, states) in outputs.items():
            out.verification[mode_name] = _verify(reference, params, out.dtype, image, states)
        _free(reference)
    return out


def _subnet(args: argparse.Namespace) -> Subnet | None:
    """The miners of --netuid, read before minutes of measuring (a wrong netuid fails now)."""
    if args.netuid is None:
        return None
    from niche.chain.base import ChainError
    from niche.commands.chain_args import chain_from_args
    from niche.earnings import subnet_from_metagraph

    chain = chain_from_args(args)
    try:
        if not chain.subnet_exists(args.netuid):
            raise ChainError(f"subnet {args.netuid} does not exist on {chain.network}")
        return subnet_from_metagraph(chain.metagraph(args.netuid), chain.network)
    finally:
        chain.close()


def model_verdict(r: ModelResult, subnet: Subnet | None) -> Verdict:
    """The verdict at this model's fastest memory mode (the one an operator would run)."""
    from niche.earnings import verdict

    best = min(r.modes, key=lambda m: m.median_s)
    check = r.verification.get(best.memory_mode)
    return verdict(r.model, best.median_s, best.p90_s, r.timeout,
                   None if check is None else check.verifies, subnet)


def _bench(args: argparse.Namespace) -> int:
    _check_args(args)
    from niche.models.quiet import quiet_libraries

    subnet = _subnet(args)
    quiet_libraries()
    _check_device(args)
    results = [bench_model(args, model) for model in args.models]
    verified = all(v.verifies for r in results for v in r.verification.values())
    verdicts = [model_verdict(r, subnet) for r in results]
    if args.json:
        print(json.dumps({"models": [asdict(r) for r in results],
                          "bit_identical": all(m.bit_identical for r in results for m in r.modes),
                          "verifies": verified if args.verify else None,
                          "verdicts": [v.to_dict() for v in verdicts]}))
    else:
        from niche.earnings import format_verdict

        for r in results:
            print(format_table(r))
        for v in verdicts:
            print(format_verdict(v))
    return 0


def _yes(flag: bool) -> str:
    return "true" if flag else "false"


def format_table(r: ModelResult) -> str:
    lines = [f"{r.model}: {r.width}x{r.height}, {r.steps} steps, {r.dtype} on {r.device}, "
             f"{r.threads} thread(s)"]
    for m in r.modes:
        memory = (f"{m.peak_memory_gib:.2f} GiB" if m.peak_memory_gib is not None
                  else "cpu: n/a")
        lines += [
            f"  [{m.memory_mode}]" + (f"  fast: {', '.join(m.fast)}" if m.fast else ""),
            f"    load                {m.load_s:8.2f} s",
            f"    warm-up             {m.warmup_s:8.2f} s",
            f"    seconds per image   {m.median_s:8.3f} median   {m.p90_s:.3f} p90   "
            f"({m.runs - 1} runs)",
            f"    images per minute   {m.images_per_minute:8.1f}",
            f"    peak memory         {memory}",
            f"    bit-identical       {_yes(m.bit_identical)} ({m.runs} runs of one request)",
        ]
        v = r.verification.get(m.memory_mode)
        if v is not None:
            lines += [
                f"    verifies            {_yes(v.verifies)}: {v.reason}",
                f"      step check        {_yes(v.step_check_ok)}: {v.steps_checked} steps, "
                f"max error {v.max_step_error:.3g}, worst step at {v.worst_step_ratio:.2f} of its "
                f"threshold (same-dtype reference)",
                f"      image             {_yes(v.image_ok)}: similarity {v.similarity:.4f} "
                f"(threshold {v.similarity_threshold:.3f})",
            ]
    return "\n".join(lines)
