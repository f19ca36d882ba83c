"""`niche bench`: timings, determinism and the validator's own checks on this box."""
from __future__ import annotations

import json

import pytest

from niche.cli import main
from niche.commands.bench import p90

TINY = ["bench", "--tiny", "--model", "flux-schnell", "--runs", "2", "--device", "cpu"]


def test_bench_tiny_table_is_bit_identical_and_verifies(capsys):
    assert main(TINY) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert out.startswith("flux-schnell: 64x64, 4 steps, bfloat16 on cpu")
    for line in ("load", "warm-up", "seconds per image", "images per minute"):
        assert f"    {line} " in out
    assert "peak memory         cpu: n/a" in out
    assert "bit-identical       true" in out
    assert "verifies            true: ok" in out
    assert "step check        true: 4 steps" in out
    assert "flux-schnell cpu" in captured.err  # the progress bar is on stderr


def test_bench_json_parses(capsys):
    assert main([*TINY, "--json", "--model", "kolors"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bit_identical"] is True and data["verifies"] is True
    (kolors,) = data["models"]
    assert kolors["model"] == "kolors" and kolors["device"] == "cpu"
    (mode,) = kolors["modes"]
    assert mode["memory_mode"] == "cpu" and mode["peak_memory_gib"] is None
    assert mode["runs"] == 3 and mode["median_s"] > 0 and mode["p90_s"] >= mode["median_s"]
    check = kolors["verification"]["cpu"]
    assert check["verifies"] and check["step_check_ok"] and check["image_ok"]
    assert check["steps_checked"] == kolors["steps"]


@pytest.mark.parametrize("flag", [["--runs", "0"], ["--memory-modes", "vram"],
                                  ["--model", "sdxl"], ["--reference-memory-mode", "x"],
                                  ["--num-threads", "0"]])
def test_bad_flag_is_one_line_exit_2(flag, capsys):
    assert main([*TINY, *flag]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_p90_is_nearest_rank():
    assert p90([1.0]) == 1.0
    assert p90([3.0, 1.0, 2.0]) == 3.0
    assert p90([float(i) for i in range(1, 11)]) == 9.0
