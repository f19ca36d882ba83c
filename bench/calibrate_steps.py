"""Cross-dtype step noise and the cost of one audit (niche/validator/steps.py): per
model/pipeline and step, the error of chains in other dtypes and of cheats against a float32
validator. Since protocol 4 the validator recomputes in the miner's own dtype, so these tables
say why (bfloat16 against float32 is as large as a cache at production step counts); the
thresholds are calibrated by bench/adversary.py (same dtype, production step counts,
`--write-bands`). The cost part times the audit the validator really runs: step 0 plus
`random_steps_needed(N)` random steps, at `--steps N` (default: the model's).

honest: float32 at another thread count, bfloat16 engine, float16 engine
cheats: another prompt, another seed's chain, fewer steps (half the schedule, states
        duplicated or resampled onto the N-step grid), no classifier-free guidance (Kolors:
        guidance 1 computed, the request's claimed), the previous step's prediction reused on
        alternate steps

    PYTHONPATH=. .venv/bin/python bench/calibrate_steps.py [--model-path DIR] [--requests 3]
        [--json out.json]

Each step k of each chain is recomputed by the validator from the chain's own x_k (its own
x_0 for k = 0) and compared with the chain's x_{k+1} (steps.step_error). Printed per step:
the largest honest error per variant and the smallest cheat error per cheat, then the bands
in force (steps.DEFAULT_STEP_BANDS) with their margins.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from niche.devnet import step_cheats
from niche.devnet.pictures import shapes_picture as picture
from niche.models.engine import Engine
from niche.protocol import GenerationParams
from niche.validator.audit import random_steps_needed
from niche.validator.steps import StepChecker, StepThresholds, choose_steps, step_error

PIPELINES = [("flux-schnell", "txt2img"), ("flux-dev", "txt2img"), ("flux-mini", "txt2img"),
             ("kolors", "txt2img"), ("kolors", "controlnet-canny"),
             ("kolors", "controlnet-depth"), ("kolors", "ip-adapter")]
PROMPTS = ["a photo of a cat sitting on a red chair", "a lighthouse on a cliff at sunset",
           "a bowl of ramen, studio lighting", "an astronaut riding a horse on the moon"]
HONEST = ["float32-2threads", "bfloat16", "float16"]
CHEATS = ["other-prompt", "other-seed", "fewer-dup", "fewer-resample", "no-cfg", "reused-pred"]




def errors(validator: Engine, params: GenerationParams, image, chain: dict) -> list[float]:
    full = validator.resolve(params)
    n = int(full.steps or 0)
    x0 = validator.initial_state(full)
    inputs = {k: x0 if k == 0 else chain[k] for k in range(n)}
    rec = validator.recompute_steps(full, image, inputs)
    return [step_error(inputs[k], chain[k + 1], rec[k]) for k in range(n)]


def chains_for(kind: str, validator: Engine, engines: dict[str, Engine], threads: int,
               params: GenerationParams, image) -> dict | None:
    if kind == "float32-2threads":
        torch.set_num_threads(2 * threads)
        try:
            return step_cheats.honest(validator, params, image)
        finally:
            torch.set_num_threads(threads)
    if kind in engines:
        return step_cheats.honest(engines[kind], params, image)
    if kind == "other-prompt":
        return step_cheats.other_prompt(validator, params, image)
    if kind == "other-seed":
        return step_cheats.other_seed(validator, params, image)
    if kind == "fewer-dup":
        return step_cheats.fewer_steps(validator, params, image)
    if kind == "fewer-resample":
        return step_cheats.fewer_steps(validator, params, image, resample=True)
    if kind == "no-cfg":
        if params.model.startswith("flux"):
            return None  # FLUX has no CFG branch to drop (dev/mini embed guidance: no saving)
        return step_cheats.no_cfg(validator, params, image)
    if kind == "reused-pred":
        return step_cheats.reused_prediction(validator, params, image)
    raise ValueError(kind)


def timed(fn, repeat: int) -> float:
    """The fastest of `repeat` runs after a warm-up (the least disturbed by other load)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", type=Path, help="folder of <model>/ (default: tiny)")
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=9, help="timing repeats (fastest kept)")
    ap.add_argument("--cost-only", action="store_true", help="skip the error tables")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--models", nargs="+", default=["flux-schnell", "kolors"])
    ap.add_argument("--steps", type=int, default=None,
                    help="the requests' step count (default: each model's; production: 28 "
                         "for flux-dev, 30 for kolors)")
    args = ap.parse_args(argv)
    root = args.model_path
    if root is None:
        from niche.devnet.tiny import ensure_tiny_models

        root = ensure_tiny_models()
    models = list(args.models)
    validator = Engine(models=models, model_root=root, device="cpu", dtype="float32")
    threads = validator.num_threads
    engines = {} if args.cost_only else {
        d: Engine(models=models, model_root=root, device="cpu", dtype=d, num_threads=threads)
        for d in ("bfloat16", "float16")}
    torch.set_num_threads(threads)
    thresholds = StepThresholds()
    report: dict = {}
    for model, pipeline in [] if args.cost_only else [
            (m, p) for m, p in PIPELINES if m in models]:
        key = f"{model}/{pipeline}"
        per: dict[str, list[list[float]]] = {}
        n = 0
        for r in range(args.requests):
            params = validator.resolve(GenerationParams(
                model=model, pipeline=pipeline, prompt=PROMPTS[r % len(PROMPTS)], seed=11 + r,
                steps=args.steps))
            n = int(params.steps or 0)
            image = None if pipeline == "txt2img" else picture(r)
            for kind in HONEST + CHEATS:
                chain = chains_for(kind, validator, engines, threads, params, image)
                if chain is not None:
                    per.setdefault(kind, []).append(errors(validator, params, image, chain))
        table = {}
        for kind, rows in per.items():
            arr = np.array(rows)
            table[kind] = (arr.max(0) if kind in HONEST else arr.min(0)).tolist()
        bands = {d: [thresholds.threshold(model, pipeline, d, k, n) for k in range(n)]
                 for d in ("float32", "bfloat16", "float16")}
        report[key] = {"steps": n, "errors": table, "thresholds": bands}
        print(f"\n{key} ({args.requests} requests, {n} steps): honest = max, cheat = min")
        print(f"{'':18s}" + "".join(f"{'k=' + str(k):>9s}" for k in range(n)))
        for kind, row in table.items():
            print(f"{kind:18s}" + "".join(f"{v:9.2e}" for v in row))
        for d, row in bands.items():
            print(f"{'thr ' + d:18s}" + "".join(f"{v:9.2e}" for v in row))
        sys.stdout.flush()

    # the cost of one audit (initial state, encode, 2 steps, decode + compare) vs regenerating
    print("\ncost: one audit (x_0 + text encode + the plan's steps + decode + compare) vs "
          "regeneration")
    checker = StepChecker(validator)
    rng = random.Random(0)
    costs = {}
    for model in models:
        params = validator.resolve(GenerationParams(model=model, prompt=PROMPTS[0], seed=3,
                                                    steps=args.steps))
        answer, states = validator.generate_with_states(params)
        chain = step_cheats.as_chain(states)
        n = int(params.steps or 0)
        full_s = timed(lambda params=params: validator.generate(params), args.repeat)
        steps = choose_steps(rng, n, random_steps_needed(n))
        audit_s = timed(lambda params=params, chain=chain, steps=steps, answer=answer:
                        checker.check(params, None, chain, steps, answer=answer), args.repeat)
        steps_only_s = timed(lambda params=params, chain=chain, steps=steps:
                             checker.check(params, None, chain, steps), args.repeat)
        costs[model] = {"regenerate_s": full_s, "audit_s": audit_s,
                        "audit_without_decode_s": steps_only_s, "steps": n}
        print(f"{model:14s} {n} steps, {len(steps)} recomputed: regenerate "
              f"{full_s * 1e3:7.1f} ms, audit "
              f"{audit_s * 1e3:7.1f} ms ({audit_s / full_s:.2f}x), without decode "
              f"{steps_only_s * 1e3:7.1f} ms ({steps_only_s / full_s:.2f}x)")
        # where an audit's time goes (the engine's parts, without the checker's glue)
        family = validator.family(model)
        ctx = family.step_context(params, params.prompt, params.negative_prompt, None)
        x0 = validator.initial_state(params)
        parts = {
            "x0": timed(lambda params=params: validator.initial_state(params), args.repeat),
            "encode": timed(lambda f=family, p=params: f.step_context(
                p, p.prompt, p.negative_prompt, None), args.repeat),
            "step": timed(lambda f=family, p=params, c=ctx, x=x0: f.step(p, c, x, 0),
                          args.repeat),
            "decode": timed(lambda p=params, s=states[-1]: validator.decode_state(p, s),
                            args.repeat),
        }
        from niche.validator.verify import compare

        parts["compare"] = timed(lambda a=answer: compare(a, a), args.repeat)
        costs[model]["parts_s"] = parts
        print(f"{'':14s} parts: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in parts.items()))
    report["cost"] = costs
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
