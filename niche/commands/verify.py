"""`niche verify`: regenerate a request and compare a candidate image to it, as an audit does.

Prints one JSON line: {"similarity": x, "threshold": t, "match": bool, "details": {...}}.
Exit code 0 whether or not it matches (the JSON says); errors exit non-zero.
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
                    "full resolution). Same request flags as `niche generate`.")
    from niche.commands.generate import add_request_args

    add_request_args(p)
    p.add_argument("--candidate", type=Path, required=True, help="the image to check")
    p.add_argument("--threshold", type=float, default=None,
                   help="similarity needed to match (default: the validator's for the model)")
    p.add_argument("--save-reference", type=Path, default=None,
                   help="also write the regenerated reference as PNG")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from niche.commands.generate import _params, engine_from_request_args
    from niche.errors import InvalidRequest
    from niche.imaging import encode_image, load_image_file
    from niche.validator.verify import Verifier, VerifyConfig

    params = _params(args)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise InvalidRequest("must be in [0, 1]", field="threshold")
    candidate = load_image_file(args.candidate)  # bounded decode: a bomb is refused
    image = load_image_file(args.image) if args.image else None
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
    return 0
