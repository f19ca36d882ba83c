"""Which quantized variants of a model verify against the model's reference precision.

A miner whose weights are stored in fp8 or GGUF computes something else than the validator,
which recomputes steps at the model's `reference_dtype` / `reference_quant` (a subnet
parameter, in the model's YAML). Whether a variant still passes the validator's checks (the
step check and the image check) was measured by bench/variants.py, which runs each variant
through the validator's own StepChecker and Verifier against the reference on the project's
tiny checkpoints (the same weights written in each format); the results ship with the code in
variants.json and docs/scoring.md.

The miner refuses, at start-up, a variant measured as failing (or never measured): a quick
self-check at start-up would need the reference weights in memory beside the variant's, i.e.
exactly the memory the variant exists to save (an 8 GB card cannot hold the bf16 reference),
and its verdict on a handful of requests would be noisier than the bench's. The table is
keyed by model, reference and variant; production weights may behave otherwise, so rerun the
bench with `--model-path` before trusting a variant on a real network.
"""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from niche.errors import ConfigError
from niche.models.spec import ModelSpec, variant_name

MEASURED_FILE = Path(__file__).parent / "variants.json"


class VariantResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    variant: str
    reference: str
    requests: int
    passed: bool
    step_error: float        # largest step_error over every recomputed step
    step_threshold: float    # the step check's threshold at that step
    similarity: float        # lowest image similarity against the reference
    threshold: float         # the image check's similarity threshold
    psnr: float              # lowest PSNR (dB) against the reference
    psnr_floor: float


def reference_name(spec: ModelSpec) -> str:
    quant = "" if spec.reference_quant == "none" else f"+{spec.reference_quant}"
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[spec.reference_dtype]
    return short + quant


def measured(path: Path = MEASURED_FILE) -> dict[tuple[str, str, str], VariantResult]:
    if not path.is_file():
        return {}
    rows = [VariantResult.model_validate(r) for r in json.loads(path.read_text())]
    return {(r.model, r.reference, r.variant): r for r in rows}


def check_variant(spec: ModelSpec, table: dict | None = None) -> VariantResult | None:
    """Raise ConfigError unless `spec`'s variant was measured to verify at its reference.
    The plain variant at the reference needs no measurement (it is the reference)."""
    variant = variant_name(spec)
    reference = reference_name(spec)
    if variant == "none" and spec.reference_quant == "none":
        return None
    table = measured() if table is None else table
    result = table.get((spec.name, reference, variant))
    if result is None:
        raise ConfigError(f"{spec.name} with {variant} was never measured against the "
                          f"{reference} reference (python bench/variants.py; "
                          "docs/scoring.md): refusing to serve an unverified variant")
    if not result.passed:
        why = (f"similarity {result.similarity:.3f}, threshold {result.threshold:.3f}; "
               f"step error {result.step_error:.3g}, threshold {result.step_threshold:.3g}")
        raise ConfigError(f"{spec.name} with {variant} does not verify against the "
                          f"{reference} reference: {why} (docs/scoring.md \"Variants\"); "
                          "serve another --quant")
    return result


def check_models(models: list[str], model_root: Path | None = None,
                 model_paths: dict[str, Path] | None = None,
                 quants: dict[str, str] | None = None) -> None:
    """`check_variant` for each model as the engine would load it (its YAML, the folder's
    overrides, `--quant`), before any weights are read: what the miner runs at start-up."""
    from niche.models.spec import load_spec, with_quant

    for name in models:
        folder = (model_paths or {}).get(name) or (model_root / name if model_root else None)
        spec = load_spec(name, model_dir=folder)
        if quants and name in quants:
            spec = with_quant(spec, quants[name])
        check_variant(spec)
