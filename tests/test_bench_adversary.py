"""bench/adversary.py, the step-check adversary at production settings: its pieces (the
catch probability under the real plan, the suggested bands) and one real run on the tiny
FLUX.1-schnell that must end with both done-when counts at 0."""
from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "adversary.py"


@pytest.fixture(scope="module")
def adversary():
    spec = importlib.util.spec_from_file_location("bench_adversary", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_catch_probability_is_the_real_plans(adversary):
    """Exact, and what drawing the plan with choose_steps gives."""
    from niche.validator.audit import random_steps_needed
    from niche.validator.steps import choose_steps

    n = 28
    visible = [False] * n
    visible[3] = visible[17] = True
    k = random_steps_needed(n)
    exact = adversary.catch_probability(visible, n)
    assert exact == pytest.approx(1 - math.comb(25, k) / math.comb(27, k))
    rng = random.Random(0)
    drawn = sum(any(visible[s] for s in choose_steps(rng, n, k)) for _ in range(20000)) / 20000
    assert drawn == pytest.approx(exact, abs=0.015)
    assert adversary.catch_probability([True] + [False] * 3, 4) == 1.0  # step 0 always
    assert adversary.catch_probability([False] * 4, 4) == 0.0


def test_suggested_bands_sit_between_honest_and_cheats(adversary):
    calibration = {("flux-dev", "txt2img", 4): {"honest": [0.0, 1e-4, 0.0, 0.0],
                                                "cheat": [math.inf, 2e-2, 1e-2, 3e-2]}}
    bands, notes = adversary.suggest_bands(calibration)
    (band,) = bands["bands"]["flux-dev"]
    assert 2 * 1e-4 < band["bfloat16"] < 1e-2 and not notes
    clash = {("flux-dev", "txt2img", 4): {"honest": [0.0, 2e-2, 0.0, 0.0],
                                          "cheat": [math.inf, 2e-2, 1e-2, 3e-2]}}
    assert adversary.suggest_bands(clash)[1]  # no threshold separates them: said


def test_a_quick_run_ends_with_no_hole(adversary, tiny_root, tmp_path, capsys):
    bands = tmp_path / "bands.json"
    code = adversary.main(["--quick", "--models", "flux-schnell", "--steps", "production",
                           "--write-bands", str(bands)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "done-when: 0 cheat(s) saving >= 5% caught on < 0.33 of audits; 0 honest " \
        "variant(s) above half their threshold" in out
    rows = {r.name: r for r in adversary.LAST_RUN}
    assert rows["honest, 2 threads"].worst_ratio == 0.0
    assert rows["quantized compute int8 (W8A8)"].catch == 1.0
    assert rows["info: math attention NOT declared"].worst_ratio > 1.0
    from niche.validator.steps import StepThresholds

    assert StepThresholds.from_file(bands).threshold("flux-schnell", "txt2img", "bfloat16",
                                                     0, 4) > 0
    assert json.loads(bands.read_text())["bands"]["flux-schnell"]
