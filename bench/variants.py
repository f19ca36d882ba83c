"""Which weight-storage variants verify: every FLUX variant (single-file bf16, fp8 storage,
GGUF Q8_0 and Q4_0 transformers, T5 in fp8) through the validator's own checks against the
model's reference precision (its YAML `reference_dtype`), on the project's tiny checkpoints:
the reference loads the diffusers folder, each variant the same weights written as single
files (niche/devnet/flux_files.py) in its format.

    PYTHONPATH=. .venv/bin/python bench/variants.py [--requests 3] [--models flux-dev ...]
        [--write niche/models/variants.json]

Per request: the variant generates its image and states x_1..x_N; the reference engine runs
the step check (steps.StepChecker.check, every step, declared dtype = the variant's compute
dtype) and the image check (verify.Verifier.judge against its own image). A variant passes
when every request passes both. Printed: a markdown table (docs/scoring.md "Variants") with
the worst figures and margins; `--write` stores the rows the miner's start-up check reads
(niche/models/variants.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from niche.models.engine import Engine  # noqa: E402
from niche.models.spec import load_spec, with_quant  # noqa: E402
from niche.models.variants import VariantResult, reference_name  # noqa: E402
from niche.protocol import GenerationParams  # noqa: E402
from niche.validator.steps import StepChecker  # noqa: E402

VARIANTS = ("none", "fp8", "gguf-q8", "gguf-q4", "none+t5-fp8")
PROMPTS = ("a small red circle in the left on a blue background",
           "a large blue triangle in the top on a white split background",
           "a medium green square in the right on a yellow gradient background",
           "a photo of a cat sitting on a red chair in the sun")


def measure(model: str, root: Path, variant: str, reference: Engine,
            requests: int) -> VariantResult:
    spec = load_spec(model, model_dir=root / model)
    engine = Engine([model], model_paths={model: root / f"{model}-files"},
                    dtype=spec.reference_dtype, quant={model: variant})
    checker = StepChecker(reference)
    worst_ratio, step_err, step_thr = -1.0, 0.0, 0.0
    sim, thr, psnr, floor = 1.0, 0.0, 1e9, 0.0
    passed = True
    for i in range(requests):
        params = GenerationParams(model=model, prompt=PROMPTS[i % len(PROMPTS)], seed=100 + i)
        image, states = engine.generate_with_states(params)
        full = reference.resolve(params)
        n = int(full.steps or 0)
        claimed = {k + 1: s for k, s in enumerate(states)}
        verdict = checker.check(params, None, claimed, list(range(n)),
                                dtype=engine.compute_dtype(model), answer=image)
        passed &= verdict.passed
        for k, err in verdict.errors.items():
            ratio = err / verdict.thresholds[k]
            if ratio > worst_ratio:
                worst_ratio, step_err, step_thr = ratio, err, verdict.thresholds[k]
        judged = checker.verifier.judge(model, reference.generate(params), image, "txt2img")
        passed &= judged.passed
        if judged.similarity < sim:
            sim, thr = judged.similarity, judged.threshold
        if judged.psnr is not None and judged.psnr < psnr:
            psnr, floor = judged.psnr, judged.psnr_floor
    return VariantResult(model=model, variant=variant,
                         reference=reference_name(with_quant(spec, variant)),
                         requests=requests, passed=bool(passed), step_error=step_err,
                         step_threshold=step_thr, similarity=sim, threshold=thr,
                         psnr=psnr, psnr_floor=floor)


def table(rows: list[VariantResult]) -> str:
    lines = ["| model | variant | reference | verifies | worst step error / threshold "
             "(margin) | lowest similarity / threshold (margin) | lowest PSNR / floor |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        step_margin = r.step_threshold / r.step_error if r.step_error else float("inf")
        lines.append(
            f"| {r.model} | {r.variant} | {r.reference} | {'yes' if r.passed else 'no'} | "
            f"{r.step_error:.3g} / {r.step_threshold:.3g} ({step_margin:.2g}x) | "
            f"{r.similarity:.3f} / {r.threshold:.3f} ({r.similarity - r.threshold:+.3f}) | "
            f"{r.psnr:.1f} / {r.psnr_floor:.1f} dB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["flux-schnell", "flux-dev", "flux-mini"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--write", type=Path, help="store the rows (niche/models/variants.json)")
    args = ap.parse_args(argv)
    from niche.devnet.tiny import ensure_tiny_models

    root = ensure_tiny_models()
    rows = []
    start = time.perf_counter()
    for model in args.models:
        spec = load_spec(model, model_dir=root / model)
        reference = Engine([model], model_paths={model: root / model},
                           dtype=spec.reference_dtype)
        for variant in args.variants:
            rows.append(measure(model, root, variant, reference, args.requests))
            print(f"# {model} {variant}: {'pass' if rows[-1].passed else 'FAIL'}",
                  file=sys.stderr, flush=True)
    print(table(rows))
    print(f"\n{len(rows)} variants x {args.requests} requests, tiny checkpoints, CPU, "
          f"{time.perf_counter() - start:.0f} s")
    if args.write:
        args.write.write_text(json.dumps([r.model_dump() for r in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
