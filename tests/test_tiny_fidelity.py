"""The tiny checkpoints (with the committed trained weights) react to their inputs like real
models: another prompt, seed or conditioning image changes the image a lot (< 25 dB), half the
steps changes it at least 10 dB more than bfloat16 rounding, bfloat16 stays close (> 35 dB).
Three requests per model x pipeline, as in bench/tiny_fidelity.py (which also writes a contact
sheet)."""
from __future__ import annotations

import pytest

from niche.devnet.training.fidelity import default_cases, measure

# The thresholds, stated here rather than taken from the code under test (dB of PSNR
# against the float32 reference of the same request):
MAX_OTHER_DB = 25.0  # another prompt, seed or conditioning image: a different picture
MIN_BF16_DB = 35.0  # bfloat16 rounding: the same picture
MIN_HALF_STEPS_GAP_DB = 10.0  # half the steps: at least this much further off than bfloat16


def _param(case):
    return pytest.param(case, id=f"{case.model}-{case.pipeline}-{case.prompt[:24]}")


# every request of the bench (15; about 10 s on two cores), not only one per pipeline
CASES = [_param(c) for c in default_cases()]


@pytest.fixture(scope="session")
def bf16_engine(tiny_root):
    from niche.models.engine import Engine

    return Engine(models=["flux-schnell", "kolors"], model_root=tiny_root, dtype="bfloat16")


def test_trained_weights_are_committed():
    from niche.devnet.tiny import TRAINED_WEIGHTS_DIR

    files = {p.relative_to(TRAINED_WEIGHTS_DIR).as_posix()
             for p in TRAINED_WEIGHTS_DIR.rglob("*.safetensors")}
    for needed in ("flux-schnell/transformer.safetensors", "flux-schnell/vae.safetensors",
                   "kolors/unet.safetensors", "kolors/vae.safetensors"):
        assert needed in files, f"{needed} missing: run `niche models train-tiny`"


@pytest.mark.parametrize("case", CASES)
def test_variants_move_the_image_like_a_real_model(case, tiny_engine, bf16_engine):
    row, _ = measure(tiny_engine, bf16_engine, case)
    db = row.db
    where = f"{case.model} {case.pipeline}: {db}"
    others = ["other prompt", "other seed"] + (["other image"] if case.image else [])
    missing = [k for k in (*others, "half steps", "bfloat16") if k not in db]
    assert not missing, f"{where}: not measured: {missing}"
    for key in others:
        assert db[key] < MAX_OTHER_DB, f"{where}: {key} {db[key]:.1f} dB >= {MAX_OTHER_DB}"
    assert db["bfloat16"] > MIN_BF16_DB, f"{where}: bfloat16 {db['bfloat16']:.1f} dB"
    assert db["half steps"] <= db["bfloat16"] - MIN_HALF_STEPS_GAP_DB, (
        f"{where}: half steps not {MIN_HALF_STEPS_GAP_DB} dB below bfloat16")
    # the product's own verdict (used by bench/tiny_fidelity.py) agrees with the test's
    assert row.failures() == [], where
