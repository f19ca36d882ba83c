"""flux-dev / flux-mini and FLUX single files: the project's tiny checkpoints written in the
BFL/ComfyUI layout, as GGUF (Q8_0, Q4_0) and with fp8 weights, loaded through the real
loading code (niche/models/single_file.py, diffusers' from_single_file and GGUF loader)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from niche.errors import ConfigError
from niche.models.engine import Engine
from niche.protocol import GenerationParams

PROMPT = "a small red circle in the left on a blue background"


def _engine(tiny_root, model="flux-dev", folder=None, quant=None, dtype="bfloat16"):
    return Engine([model], model_paths={model: folder or tiny_root / f"{model}-files"},
                  dtype=dtype, quant={model: quant} if quant else None)


def _pixels(engine, model="flux-dev", seed=3):
    return np.asarray(engine.generate(GenerationParams(model=model, prompt=PROMPT, seed=seed)))


def test_bfl_layout_round_trips_to_diffusers_keys(tiny_root):
    from diffusers import FluxTransformer2DModel

    from niche.devnet.flux_files import diffusers_to_bfl
    from niche.models.single_file import bfl_to_diffusers, is_bfl

    model = FluxTransformer2DModel.from_pretrained(str(tiny_root / "flux-mini" / "transformer"))
    state = model.state_dict()
    bfl = diffusers_to_bfl(state)
    assert is_bfl(bfl) and "single_blocks.1.linear1.weight" in bfl
    assert "guidance_in.in_layer.weight" in bfl  # mini is guidance-distilled like dev
    back = bfl_to_diffusers({f"model.diffusion_model.{k}": v for k, v in bfl.items()})
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_single_files_load_the_same_weights_as_the_diffusers_folder(tiny_root):
    folder = _engine(tiny_root, folder=tiny_root / "flux-dev").family("flux-dev").pipe
    files = _engine(tiny_root).family("flux-dev").pipe
    for name in ("transformer", "vae", "text_encoder"):  # bf16 files: exactly the folder's
        ours, theirs = getattr(files, name).state_dict(), getattr(folder, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert files.transformer.config.guidance_embeds
    # t5xxl_fp16: fp16 rounding then bf16, close to but not the folder's float32 -> bf16
    t5, ref = files.text_encoder_2.state_dict(), folder.text_encoder_2.state_dict()
    assert all(torch.allclose(t5[k].float(), ref[k].float(), rtol=1e-2, atol=1e-3) for k in t5)


@pytest.mark.parametrize("model", ["flux-dev", "flux-mini"])
def test_new_models_generate_deterministically_from_their_folders(tiny_root, model):
    engine = _engine(tiny_root, model, folder=tiny_root / model)
    spec = engine.spec(model)
    assert spec.defaults.guidance == 3.5
    shape = (2, 2) if model == "flux-dev" else (1, 2)  # mini: half as many double blocks
    cfg = engine.family(model).pipe.transformer.config
    assert (cfg.num_layers, cfg.num_single_layers) == shape
    first = _pixels(engine, model)
    assert np.array_equal(first, _pixels(engine, model))
    assert not np.array_equal(first, _pixels(engine, model, seed=4))


@pytest.mark.parametrize("quant,qtype", [("gguf-q8", "Q8_0"), ("gguf-q4", "Q4_0")])
def test_gguf_transformers_load_quantized_and_generate_deterministically(tiny_root, quant,
                                                                          qtype):
    from diffusers.quantizers.gguf.utils import GGUFParameter

    engine = _engine(tiny_root, quant=quant)
    transformer = engine.family("flux-dev").pipe.transformer
    kinds = {p.quant_type.name for p in transformer.parameters() if isinstance(p, GGUFParameter)}
    assert kinds == {qtype}
    first = _pixels(engine)
    assert np.array_equal(first, _pixels(engine))


def test_fp8_storage_keeps_weights_in_float8_and_computes_in_bf16(tiny_root):
    engine = _engine(tiny_root, quant="fp8+t5-fp8")
    pipe = engine.family("flux-dev").pipe
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight.dtype \
        == torch.float8_e4m3fn
    assert engine.compute_dtype("flux-dev") == "bfloat16"
    first = _pixels(engine)
    assert np.array_equal(first, _pixels(engine))
    plain = _pixels(_engine(tiny_root))
    assert not np.array_equal(first, plain)  # fp8 really changed the computation


def _files_copy(tiny_root, tmp_path, model="flux-dev"):
    folder = tmp_path / model
    shutil.copytree(tiny_root / f"{model}-files", folder)
    return folder


def test_a_file_of_another_size_names_component_file_and_mismatch(tiny_root, tmp_path):
    folder = _files_copy(tiny_root, tmp_path)
    (folder / "flux1-dev.safetensors").unlink()
    shutil.copy(tiny_root / "flux-mini-files" / "flux-mini.safetensors", folder)
    with pytest.raises(ConfigError, match=r"component transformer .*flux-mini.safetensors: "
                       r"\d+ tensors missing"):
        _engine(tiny_root, folder=folder)


def test_a_wrong_layout_and_a_wrong_gguf_type_are_named(tiny_root, tmp_path):
    folder = _files_copy(tiny_root, tmp_path)
    (folder / "flux1-dev.safetensors").unlink()
    shutil.copy(folder / "ae.safetensors", folder / "flux1-dev.safetensors")
    with pytest.raises(ConfigError, match="not a FLUX transformer: expected BFL keys"):
        _engine(tiny_root, folder=folder)
    (folder / "flux1-dev-Q8_0.gguf").unlink()
    shutil.copy(folder / "flux1-dev-Q4_0.gguf", folder / "flux1-dev-Q8_0.gguf")
    with pytest.raises(ConfigError, match="holds Q4_0 tensors, quant gguf-q8 expects Q8_0"):
        _engine(tiny_root, folder=folder, quant="gguf-q8")


def test_missing_files_and_configs_are_named(tiny_root, tmp_path):
    folder = _files_copy(tiny_root, tmp_path)
    for f in folder.glob("*.gguf"):
        f.unlink()
    with pytest.raises(ConfigError, match="quant gguf-q4 needs a .gguf transformer"):
        _engine(tiny_root, folder=folder, quant="gguf-q4")
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"component vae .*no .*vae/config.json"):
        _engine(tiny_root, folder=folder)
    (folder / "niche_model.yaml").write_text(
        (folder / "niche_model.yaml").read_text()
        + "components:\n  transformer: {file: nowhere/flux1-dev.safetensors}\n")
    with pytest.raises(ConfigError, match="component transformer .*nowhere/flux1-dev.safetensors:"
                       " missing"):
        _engine(tiny_root, folder=folder)


def test_a_variant_that_does_not_verify_is_refused_with_its_figures(tiny_root):
    from niche.models.variants import check_models, measured

    table = measured()
    # the shipped measurements: the plain single files are the reference's bits; Q8_0
    # storage moves a step as far as a cache does, so it no longer verifies against bf16
    assert table[("flux-dev", "bf16", "none")].passed
    assert table[("flux-dev", "bf16", "none")].step_error == 0.0
    assert not table[("flux-dev", "bf16", "gguf-q8")].passed
    with pytest.raises(ConfigError, match=r"flux-dev with gguf-q8 does not verify against "
                       r"the bf16 reference: .*step error 0\.0\d+, threshold 0\.005"):
        check_models(["flux-dev"], tiny_root, quants={"flux-dev": "gguf-q8"})
    with pytest.raises(ConfigError, match=r"flux-schnell with gguf-q4 does not verify against "
                       r"the bf16 reference: similarity 0\.\d+, threshold 0\.956"):
        check_models(["flux-schnell"], tiny_root, quants={"flux-schnell": "gguf-q4"})
    with pytest.raises(ConfigError, match="quant 'q3' for flux-dev: expected one of"):
        check_models(["flux-dev"], tiny_root, quants={"flux-dev": "q3"})
    from niche.models.spec import load_spec, with_quant
    from niche.models.variants import check_variant

    fp16_ref = with_quant(load_spec("flux-dev"), "gguf-q8").model_copy(
        update={"reference_dtype": "float16"})
    with pytest.raises(ConfigError, match="flux-dev with gguf-q8 was never measured against "
                       "the fp16 reference"):
        check_variant(fp16_ref)
    assert check_variant(load_spec("flux-dev")) is None  # the reference itself


@pytest.mark.parametrize("model", ["flux-dev", "flux-mini"])
def test_niche_generate_tiny_serves_the_new_models(tiny_root, tmp_path, model, capsys):
    from niche.cli import main

    out = tmp_path / f"{model}.png"
    assert main(["generate", "--tiny", "--model", model, "--prompt", PROMPT, "--seed", "7",
                 "--out", str(out)]) == 0
    assert out.is_file() and model in capsys.readouterr().out


def test_niche_generate_loads_a_gguf_file_folder(tiny_root, tmp_path, capsys):
    from niche.cli import main

    out = tmp_path / "q8.png"
    assert main(["generate", "--model", "flux-mini", "--model-dir",
                 f"flux-mini={tiny_root / 'flux-mini-files'}", "--quant", "flux-mini=gguf-q8",
                 "--dtype", "bfloat16", "--prompt", PROMPT, "--seed", "7",
                 "--out", str(out)]) == 0
    assert out.is_file()


@pytest.mark.slow
def test_localnet_serves_and_scores_flux_dev_and_flux_mini(tmp_path, tiny_root):
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    niche = str(Path(sys.executable).with_name("niche"))
    env = dict(os.environ, NICHE_TINY_DIR=str(tiny_root))
    proc = subprocess.run([niche, "localnet", "--miners", "2", "--rounds", "1", "--models",
                           "flux-dev", "flux-mini", "--workdir", str(tmp_path / "ln")],
                          capture_output=True, text=True, env=env, timeout=500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    rows = {m.group(1): (int(m.group(2)), int(m.group(3)), float(m.group(4)))
            for m in re.finditer(r"^\s*\d+\s+miner\d\s+\S+\s+(flux-\w+)\s+honest\s+(\d)/(\d)\s+"
                                 r"\S+\s+[\d.]+\s+([\d.]+)", out, re.M)}
    assert set(rows) == {"flux-dev", "flux-mini"}, out
    for verified, audited, weight in rows.values():
        assert verified == audited == 1 and weight > 0, out
