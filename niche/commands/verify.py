"""`niche verify`: check a candidate image as an audit does.

With `--states FILE` (what `niche generate --states-out` writes, what a miner commits to):
the step check (recompute step 0 from the seed and random steps from the file's states,
decode x_N against the candidate). Without: regenerate the request and compare.

Prints one JSON line: {"match": bool, ...}. Exit code 0 when the candidate matches, 1 when
it does not (a script can trust `niche verify ... && accept`), 2 for a usage or configuration
error (a bad flag, a missing file).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify", help="check a candidate image against a regenerated reference",
        description="Regenerate the request with the engine and compare the candidate image "
                    "with the validator's metric (SSIM, detail correlation, detail energy at "
                    "full resolution). Same request flags as `niche generate`. Prints one "
                    "JSON line {\"match\": ...}.",
        epilog="exit status: 0 the candidate matches, 1 it does not match, 2 a usage or "
               "configuration error (bad flag, missing or unreadable file).")
    from niche.commands.generate import add_request_args

    add_request_args(p)
    p.add_argument("--candidate", type=Path, required=True, help="the image to check")
    p.add_argument("--threshold", type=float, default=None,
                   help="similarity needed to match (default: the validator's for the model)")
    p.add_argument("--save-reference", type=Path, default=None,
                   help="also write the regenerated reference as PNG")
    p.add_argument("--states", type=Path, default=None,
                   help="sampler states x_1..x_N (safetensors): run the step check instead "
                        "of a regeneration")
    p.add_argument("--check-steps", default="1", metavar="K|all",
                   help="with --states: steps recomputed besides step 0, drawn at random "
                        "(default 1), or 'all'")
    p.add_argument("--check-seed", type=int, default=None,
                   help="with --states: seed of the random step choice (default: fresh)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from niche.commands.generate import _params, engine_from_request_args
    from niche.errors import InvalidRequest
    from niche.imaging import encode_image, load_image_file
    from niche.validator.verify import Verifier, VerifyConfig

    params = _params(args)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise InvalidRequest("must be in [0, 1]", field="threshold")
    if args.save_reference is not None:
        from niche.commands.generate import check_output_file

        check_output_file(args.save_reference, "--save-reference")  # before regenerating
    candidate = load_image_file(args.candidate)  # bounded decode: a bomb is refused
    image = load_image_file(args.image) if args.image else None
    from niche.models.quiet import quiet_libraries

    quiet_libraries()
    if args.states is not None:
        from niche.states import load_states_file

        states = load_states_file(args.states)  # before minutes of model loading
        return _step_check(args, engine_from_request_args(args), params, image, candidate,
                           states)
    engine = engine_from_request_args(args)
    overrides = {args.model: args.threshold} if args.threshold is not None else {}
    verifier = Verifier(engine, VerifyConfig.with_overrides(overrides))
    full = engine.resolve(params)
    reference = verifier.references([(full, image)])[0]
    if args.save_reference:
        args.save_reference.parent.mkdir(parents=True, exist_ok=True)
        args.save_reference.write_bytes(encode_image(reference))
    verdict = verifier.judge(full.model, reference, candidate, full.pipeline)
    print(json.dumps({
        "similarity": round(verdict.similarity, 6), "threshold": verdict.threshold,
        "match": verdict.passed, "psnr_floor": verdict.psnr_floor, "reason": verdict.reason,
        "details": {k: round(v, 6) for k, v in verdict.details.as_dict().items()}
        if verdict.details else {},
    }))
    return 0 if verdict.passed else 1


def _step_check(args: argparse.Namespace, engine, params, image, candidate,
                loaded: tuple[dict, str]) -> int:
    import random

    from niche.errors import InvalidRequest
    from niche.validator.steps import StepChecker, choose_steps

    states, dtype = loaded
    full = engine.resolve(params)
    n = int(full.steps or 0)
    if sorted(states) != list(range(1, n + 1)):
        raise InvalidRequest(f"{args.states} holds states {sorted(states)[:8]}..., the "
                             f"request has {n} steps (want x_1..x_{n})", field="states")
    if args.check_steps == "all":
        steps = list(range(n))
    else:
        try:
            k = int(args.check_steps)
        except ValueError:
            raise InvalidRequest("a number or 'all'", field="check_steps") from None
        steps = choose_steps(random.Random(args.check_seed), n, k=max(0, k))
    checker = StepChecker(engine)
    problem = checker.unreproducible(full.model, dtype)
    if problem:  # the check recomputes in the states' own dtype: say which flag gives it
        raise InvalidRequest(f"{problem}; rerun with --dtype {dtype}", field="states")
    verdict = checker.check(full, image, states, steps, dtype=dtype, answer=candidate)
    print(json.dumps({
        "match": verdict.passed, "reason": verdict.reason, "compute_dtype": dtype,
        "steps": {str(k): {"error": round(verdict.errors[k], 6),
                           "threshold": round(verdict.thresholds[k], 6)}
                  for k in sorted(verdict.errors)},
    }))
    return 0 if verdict.passed else 1
