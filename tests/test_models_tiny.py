"""Tiny checkpoints: real architectures in the hub layout, small, reproducible to the byte."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from niche.cli import main
from niche.devnet import tiny


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_build_twice_gives_identical_files(tiny_root, tmp_path, capsys):
    assert main(["models", "build-tiny", "--out", str(tmp_path / "again")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "again")
    built, cached = files(tmp_path / "again"), files(tiny_root)
    assert built.keys() == cached.keys()
    assert [k for k in built if built[k] != cached[k]] == []


def test_small_and_in_the_hub_layout(tiny_root):
    total = sum(len(b) for b in files(tiny_root).values())
    # three FLUX models (each also as single files in <model>-files/, ~3 MB a folder) + Kolors
    assert total < 24 * 1024 * 1024, f"tiny build is {total} bytes"
    flux = json.loads((tiny_root / "flux-schnell/model_index.json").read_text())
    assert flux["_class_name"] == "FluxPipeline"
    assert flux["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    kolors = json.loads((tiny_root / "kolors/model_index.json").read_text())
    assert kolors["_class_name"] == "KolorsPipeline"
    assert kolors["text_encoder"] == ["kolors", "ChatGLMModel"]

    def arch(path):
        cfg = json.loads((tiny_root / path / "config.json").read_text())
        return cfg.get("_class_name") or cfg["architectures"][0]

    assert arch("flux-schnell/text_encoder") == "CLIPTextModel"
    assert arch("flux-schnell/text_encoder_2") == "T5EncoderModel"
    assert arch("kolors/unet") == "UNet2DConditionModel"
    assert json.loads((tiny_root / "kolors/unet/config.json").read_text())[
        "addition_embed_type"] == "text_time"
    assert arch("kolors/controlnet-canny") == "ControlNetModel"
    assert arch("kolors/ip-adapter/image_encoder") == "CLIPVisionModelWithProjection"
    assert arch("kolors/depth-estimator") == "DepthAnythingForDepthEstimation"
    assert (tiny_root / "kolors/tokenizer/tokenizer.model").is_file()
    ip = load_file(str(tiny_root / "kolors/ip-adapter/ip_adapter_plus_general.safetensors"))
    assert {k.split(".")[0] for k in ip} == {"image_proj", "ip_adapter"}
    assert "image_proj.latents" in ip and "ip_adapter.1.to_k_ip.weight" in ip


def test_weights_are_initialised_everywhere(tiny_root):
    glm = load_file(str(tiny_root / "kolors/text_encoder/model.safetensors"))
    assert all(torch.isfinite(t).all() for t in glm.values())
    norms = [t for k, t in glm.items() if "layernorm" in k]
    assert norms and all((t - 1).abs().max() < 0.2 for t in norms)
    cn = load_file(str(tiny_root / "kolors/controlnet-canny/diffusion_pytorch_model.safetensors"))
    zero_convs = [t for k, t in cn.items()
                  if k.startswith(("controlnet_down_blocks", "controlnet_mid_block"))
                  and k.endswith("weight")]
    assert zero_convs and all(t.abs().sum() > 0 for t in zero_convs)


def test_ensure_reuses_a_current_cache_and_refuses_a_stale_one(tmp_path):
    current = tmp_path / "current"
    current.mkdir()
    (current / tiny.MARKER).write_text(tiny.build_id() + "\n")
    assert tiny.ensure_tiny_models(current) == current  # no build: it stays empty
    assert [p.name for p in current.iterdir()] == [tiny.MARKER]
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / tiny.MARKER).write_text("tiny-v1:0000\n")
    assert not tiny._is_current(stale)
    assert not tiny._is_current(tmp_path / "partial")  # no marker: never used


def test_trained_weights_hook_replaces_random_ones(tmp_path, monkeypatch):
    module = tiny._no_global_rng(tiny.kolors_vae)
    trained = {k: torch.full_like(v, 0.25) for k, v in module.state_dict().items()}
    (tmp_path / "kolors").mkdir()
    save_file(trained, str(tmp_path / "kolors" / "vae.safetensors"))
    random_id = tiny.build_id()
    monkeypatch.setattr(tiny, "TRAINED_WEIGHTS_DIR", tmp_path)
    assert tiny.build_id() != random_id, "new trained weights must invalidate the cache"
    done = tiny._finish(tiny._no_global_rng(tiny.kolors_vae), "kolors", "vae")
    assert not done.training
    assert all(torch.equal(t, trained[k]) for k, t in done.state_dict().items())


def test_building_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    tiny._finish(tiny._no_global_rng(tiny.flux_transformer), "flux-schnell", "transformer")
    assert torch.equal(state, torch.random.get_rng_state())


def test_medium_scale_is_the_same_architecture_with_weights_that_dominate():
    """bench/engine.py's Kolors memory ratio runs on the medium scale: the same real modules,
    UNet and ChatGLM ~150 MB each in float32, dims that fit together (text_proj, text_time,
    the IP-Adapter Plus resampler). Built on the meta device to stay fast; the bench builds,
    loads and draws with the real thing."""
    medium = tiny.KOLORS_MEDIUM
    with torch.device("meta"):
        unet = tiny.kolors_unet(**medium["unet"])
        glm = tiny.kolors_text_encoder(512, **medium["text_encoder"])
        controlnet = tiny.kolors_controlnet(unet, medium["controlnet"])

    def mb(module):
        return sum(p.numel() for p in module.parameters()) * 4 / 1e6

    assert 100 < mb(unet) < 250 and 100 < mb(glm) < 250 and mb(controlnet) > 30
    width = glm.config.hidden_size
    assert unet.config.encoder_hid_dim == controlnet.config.encoder_hid_dim == width
    assert unet.config.addition_embed_type == "text_time"
    assert unet.config.projection_class_embeddings_input_dim == \
        6 * unet.config.addition_time_embed_dim + width
    state = tiny.kolors_ip_adapter_state(unet, **medium["ip_adapter"], model="kolors-medium")
    proj = unet._convert_ip_adapter_image_proj_to_diffusers(
        {k.removeprefix("image_proj."): v for k, v in state.items()
         if k.startswith("image_proj.")}, low_cpu_mem_usage=False)  # strict: shapes must fit
    tokens = proj(torch.randn(1, 5, medium["image_encoder"]["hidden_size"]))
    assert tokens.shape == (1, medium["ip_adapter"]["num_queries"],
                            unet.config.cross_attention_dim)
