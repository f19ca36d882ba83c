"""`niche generate` / `niche models`: same bits in a fresh process as in this one."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from niche.cli import main
from niche.imaging import encode_image as png_bytes
from niche.protocol import GenerationParams


def test_subprocess_generate_matches_in_process(tiny_root, tiny_engine, tmp_path):
    out = tmp_path / "cat.png"
    env = {**os.environ, "NICHE_TINY_DIR": str(tiny_root)}
    proc = subprocess.run(
        [sys.executable, "-m", "niche.cli", "generate", "--model", "kolors", "--tiny",
         "--prompt", "a bowl of fruit on a wooden table", "--seed", "1234",
         "--negative-prompt", "blurry", "--dtype", "float32", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["model"] == "kolors" and summary["seed"] == 1234
    assert summary["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    here = tiny_engine.generate(GenerationParams(
        model="kolors", prompt="a bowl of fruit on a wooden table", seed=1234,
        negative_prompt="blurry"))
    assert hashlib.sha256(png_bytes(here)).hexdigest() == summary["sha256"]


def test_generate_with_image_and_model_path(tiny_root, tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "in.png"
    Image.new("RGB", (70, 50), (200, 30, 30)).save(src)
    out = tmp_path / "edges.png"
    rc = main(["generate", "--model", "kolors", "--pipeline", "controlnet-canny",
               "--model-dir", f"kolors={tiny_root / 'kolors'}", "--image", str(src),
               "--prompt", "a red square", "--seed", "3", "--controlnet-scale", "0.5",
               "--out", str(out)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["pipeline"] == "controlnet-canny"
    assert Image.open(out).size == (64, 64)


@pytest.mark.parametrize("extra,field", [
    (["--pipeline", "controlnet-depth"], "image"),
    (["--width", "70"], "width"),
    (["--steps", "0"], "steps"),
    (["--model", "no-such-model"], None),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, extra, field):
    args = ["generate", "--model", "kolors", "--tiny", "--prompt", "a cat", "--seed", "1",
            "--out", str(tmp_path / "x.png")] + extra
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    if field:
        assert err.startswith(f"error: {field}: ")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 64])
def test_corrupt_image_file_is_refused(tmp_path, capsys, content):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    rc = main(["generate", "--model", "kolors", "--tiny", "--pipeline", "ip-adapter",
               "--image", str(bad), "--prompt", "a cat", "--seed", "1",
               "--out", str(tmp_path / "x.png")])
    assert rc == 2 and "error: image: " in capsys.readouterr().err


def test_models_list_json(capsys):
    assert main(["models", "list", "--json"]) == 0
    specs = {s["name"]: s for s in json.loads(capsys.readouterr().out)}
    assert specs["flux-schnell"]["components"]["base"]["hub"] == "black-forest-labs/FLUX.1-schnell"
    assert specs["flux-schnell"]["defaults"]["steps"] == 4
    kolors = specs["kolors"]
    assert kolors["defaults"]["steps"] == 30 and kolors["defaults"]["guidance"] == 5.0
    assert {c["hub"] for c in kolors["components"].values()} >= {
        "Kwai-Kolors/Kolors-diffusers", "Kwai-Kolors/Kolors-IP-Adapter-Plus",
        "Kwai-Kolors/Kolors-ControlNet-Canny", "Kwai-Kolors/Kolors-ControlNet-Depth"}


def test_repo_configs_are_the_packaged_ones():
    repo = Path(__file__).resolve().parents[1]
    for name in ("flux-schnell", "kolors"):
        assert (repo / "configs/models" / f"{name}.yaml").read_text() == (
            repo / "niche/models/configs" / f"{name}.yaml").read_text()


def test_model_path_is_a_folder_of_models_everywhere(tiny_root, tmp_path, capsys):
    """--model-path means the same for generate as for miner and validator: <DIR>/<model>/."""
    out = tmp_path / "a.png"
    rc = main(["generate", "--model", "flux-schnell", "--model-path", str(tiny_root),
               "--prompt", "a red fox", "--seed", "7", "--num-threads", "1", "--out", str(out)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["width"] == 64
    again = tmp_path / "b.png"
    rc = main(["generate", "--model", "flux-schnell", "--tiny", "--prompt", "a red fox",
               "--seed", "7", "--threads", "1", "--out", str(again)])  # the old spelling
    assert rc == 0 and again.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("value,message", [
    ("kolors", "expected MODEL=PATH"),
    ("flux-schnell=/nowhere", "not loaded"),
])
def test_bad_model_dir_is_one_line(tmp_path, capsys, value, message):
    rc = main(["generate", "--model", "kolors", "--tiny", "--model-dir", value,
               "--prompt", "a cat", "--seed", "1", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err
