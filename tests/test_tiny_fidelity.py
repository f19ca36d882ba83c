"""The tiny checkpoints (with the committed trained weights) react to their inputs like real
models: another prompt, seed or conditioning image changes the image a lot (< 25 dB), half the
steps changes it at least 10 dB more than bfloat16 rounding, bfloat16 stays close (> 35 dB).
One request per model x pipeline; the full table is bench/tiny_fidelity.py."""
from __future__ import annotations

import pytest

from niche.models.training.fidelity import default_cases, measure

# Measured with the committed weights (bench/tiny_fidelity.py): these miss a threshold today.
# strict: the test fails as soon as one of them passes, so the list cannot go stale.
KNOWN_MISSES = {
    ("kolors", "txt2img"): "bfloat16 29.2 dB (< 35): guidance 5 amplifies rounding",
    ("kolors", "controlnet-canny"): "other control image 31.2 dB (> 25): canny control weak",
    ("kolors", "ip-adapter"): "bfloat16 32.5 dB (< 35)",
}
CASES = [
    pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=KNOWN_MISSES[(c.model, c.pipeline)]))
    if (c.model, c.pipeline) in KNOWN_MISSES else c
    for c in default_cases(quick=True)
]


@pytest.fixture(scope="session")
def bf16_engine(tiny_root):
    from niche.models.engine import Engine

    return Engine(models=["flux-schnell", "kolors"], model_root=tiny_root, dtype="bfloat16")


def test_trained_weights_are_committed():
    from niche.models.tiny import TRAINED_WEIGHTS_DIR

    files = {p.relative_to(TRAINED_WEIGHTS_DIR).as_posix()
             for p in TRAINED_WEIGHTS_DIR.rglob("*.safetensors")}
    for needed in ("flux-schnell/transformer.safetensors", "flux-schnell/vae.safetensors",
                   "kolors/unet.safetensors", "kolors/vae.safetensors"):
        assert needed in files, f"{needed} missing: run `niche models train-tiny`"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.model}-{c.pipeline}")
def test_variants_move_the_image_like_a_real_model(case, tiny_engine, bf16_engine):
    row, _ = measure(tiny_engine, bf16_engine, case)
    assert not row.failures(), f"{case.model} {case.pipeline}: {row.db}"
