"""bench/gpu.py measures only on CUDA; elsewhere it says so in one line and exits 0."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def test_without_cuda_it_prints_one_line_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(BENCH), "--runs", "1"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        "no CUDA device: bench/gpu.py measures nothing on this machine"]


def test_importable_with_the_real_sizes():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    assert spec is not None and spec.loader is not None
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    t = gpu.FLUX_TRANSFORMER
    assert (t["num_layers"], t["num_single_layers"]) == (19, 38)
    assert t["num_attention_heads"] * t["attention_head_dim"] == 3072
    assert gpu.KOLORS_UNET["transformer_layers_per_block"] == [1, 2, 10]
    assert gpu.KOLORS_UNET["projection_class_embeddings_input_dim"] == 4096 + 6 * 256
