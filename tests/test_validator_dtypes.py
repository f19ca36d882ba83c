"""A validator recomputes each model in one dtype; an answer in a dtype it does not hold is
unverifiable (paid 0). Kolors' miners run float16 by default and FLUX's bfloat16, so a
validator started with one --dtype for every model (the docs once showed --dtype bfloat16)
would pay no Kolors miner: it says so at start, one line per model with the fix."""
from __future__ import annotations

from niche.commands.validator import unheld_default_dtypes
from niche.models.engine import Engine

MODELS = ["flux-schnell", "kolors"]


def _engine(tiny_root, dtype):
    return Engine(models=MODELS, model_root=tiny_root, device="cpu", dtype=dtype)


def test_the_configured_dtypes_need_no_warning(tiny_root):
    assert unheld_default_dtypes(_engine(tiny_root, None), [], MODELS) == []


def test_one_dtype_for_every_model_is_said_with_its_fix(tiny_root):
    engine = _engine(tiny_root, "bfloat16")
    (line,) = unheld_default_dtypes(engine, [], MODELS)
    assert line.startswith("kolors: this validator recomputes it in bfloat16")
    assert "float16 by default" in line and "--verify.dtypes float16" in line
    assert "\n" not in line
    # holding the default too (--verify.dtypes float16) is enough
    assert unheld_default_dtypes(engine, [_engine(tiny_root, "float16")], MODELS) == []
