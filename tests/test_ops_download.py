"""`niche models download` against a fake hub on 127.0.0.1 (HF_ENDPOINT): the disk space
needed is stated first from the hub's file metadata, files already on disk are not counted,
HF_TOKEN reaches the hub, and an unreachable hub, a gated repository or a full disk is one
line. (The fake answers the metadata call only; the snapshot download itself is
huggingface_hub's and is not exercised without a hub.) Also: a missing model names what is
missing and the command that fetches it; progress bars are on for the neurons."""
from __future__ import annotations

import shutil

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from niche.cli import main
from niche.devnet.localnet.supervisor import free_port
from niche.devnet.servers import BackgroundServer
from niche.errors import ConfigError
from niche.models.download import select_files
from niche.models.engine import Engine
from niche.models.spec import ComponentSource, load_spec

GB = 10**9
TOKEN = "hf_fake_token_for_the_test"


def _files(repo: str, huge: bool) -> dict[str, int]:
    if repo == "Kwai-Kolors/Kolors-diffusers":
        return {"model_index.json": 1000, "Kolors.safetensors": 20 * GB,
                "unet/config.json": 2000,
                "unet/diffusion_pytorch_model.safetensors": 10 * GB,
                "unet/diffusion_pytorch_model.fp16.safetensors": (10**15 if huge else 5 * GB),
                "unet/diffusion_pytorch_model.bin": 10 * GB, "README.md": 10, "a.png": 99}
    return {"config.json": 500, "model.safetensors": 1 * GB, "model.bin": 1 * GB,
            "ip_adapter_plus_general.safetensors": 2 * GB}


def fake_hub(*, gated: set[str] = frozenset(), huge: bool = False) -> FastAPI:
    app = FastAPI()
    app.state.seen = []

    @app.get("/api/models/{org}/{name}")
    @app.get("/api/models/{org}/{name}/revision/{rev:path}")
    async def model_info(org: str, name: str, request: Request, rev: str = "main"):
        repo = f"{org}/{name}"
        auth = request.headers.get("authorization", "")
        app.state.seen.append((repo, rev, request.query_params.get("blobs"), auth))
        if repo in gated and auth != f"Bearer {TOKEN}":
            return JSONResponse({"error": "gated"}, status_code=401,
                                headers={"X-Error-Code": "GatedRepo"})
        return {"id": repo, "sha": "0" * 40, "siblings": [
            {"rfilename": f, "size": s} for f, s in _files(repo, huge).items()]}

    return app


def test_files_are_the_ones_the_loaders_read():
    names = list(_files("Kwai-Kolors/Kolors-diffusers", False))
    base = ComponentSource(hub="x", variant="fp16")
    assert select_files(names, base, "float16") == [
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"]
    assert select_files(names, base, "bfloat16") == [
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    adapter = ComponentSource(hub="y", weight_name="ip_adapter_plus_general.safetensors")
    assert select_files(list(_files("y", False)), adapter, "float16") == [
        "config.json", "ip_adapter_plus_general.safetensors"]


def _sizes(dtype: str) -> int:
    """What the fake hub says kolors needs in `dtype` (independently of the planner)."""
    spec = load_spec("kolors")
    total = 0
    for comp in spec.components.values():
        files = _files(comp.hub, False)
        total += sum(files[f] for f in select_files(files, comp, dtype))
    return total


def test_dry_run_states_the_space_needed_and_skips_what_is_here(tmp_path, monkeypatch, capsys):
    with BackgroundServer(fake_hub()) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        present = tmp_path / "models" / "kolors" / "controlnet-canny" / "config.json"
        present.parent.mkdir(parents=True)
        present.write_bytes(b"x" * 500)  # the hub's size: already here
        rc = main(["models", "download", "--model", "kolors", "--dest",
                   str(tmp_path / "models"), "--dry-run"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    needed = _sizes("float16") - 500
    assert out[0].startswith(f"kolors: {needed / GB:.1f} GB to download (")
    assert "from 5 repositories; 0.0 GB already here" in out[0]
    assert f"into {tmp_path / 'models'}" in out[0] and out[0].endswith("free")
    assert len(out) == 1 + 5


def test_hf_token_reaches_the_hub_and_a_gated_repo_is_one_line(tmp_path, monkeypatch, capsys):
    app = fake_hub(gated={"Kwai-Kolors/Kolors-diffusers"})
    with BackgroundServer(app) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no token file either
        argv = ["models", "download", "--model", "kolors", "--dest", str(tmp_path),
                "--dry-run"]
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "gated or private" in err[0] and "HF_TOKEN" in err[0]
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        assert main(argv) == 0
    assert app.state.seen[-1][3] == f"Bearer {TOKEN}"
    assert all(blobs == "True" or blobs == "true" for _, _, blobs, _ in app.state.seen)
    assert ("Kwai-Kolors/Kolors-IP-Adapter-Plus", "refs/pr/4") in {s[:2] for s in
                                                                   app.state.seen}


def test_not_enough_disk_is_one_line_before_any_download(tmp_path, monkeypatch, capsys):
    with BackgroundServer(fake_hub(huge=True)) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        rc = main(["models", "download", "--model", "kolors", "--dest", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    free = shutil.disk_usage(tmp_path).free
    assert free < 10**15 and rc == 1 and len(err) == 1
    assert err[0].startswith("error: not enough disk space: 1000")
    assert not any(tmp_path.iterdir())  # nothing written


def test_offline_is_one_line_with_advice(tmp_path, monkeypatch, capsys):
    port = free_port()  # nobody listens here once closed
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    rc = main(["models", "download", "--model", "flux-schnell", "--dest", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert err[0].startswith(f"error: cannot reach the hub at http://127.0.0.1:{port} for "
                             "black-forest-labs/FLUX.1-schnell")
    assert "--model-path" in err[0]


def test_unknown_model_fails_before_the_network(capsys):
    assert main(["models", "download", "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_a_missing_model_names_the_files_and_the_command(tmp_path, tiny_root):
    with pytest.raises(ConfigError) as err:
        Engine(models=["flux-schnell"], model_root=tmp_path / "empty")
    message = str(err.value)
    assert "missing" in message and str(tmp_path / "empty" / "flux-schnell") in message
    assert (f"`niche models download --model flux-schnell --dest {tmp_path / 'empty'}`"
            in message)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_root / "flux-schnell", broken / "flux-schnell")
    for weights in (broken / "flux-schnell" / "transformer").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ConfigError, match=r"missing .*transformer/ weights; fetch it with "
                                          r"`niche models download --model flux-schnell"):
        Engine(models=["flux-schnell"], model_root=broken)


def test_neurons_keep_progress_bars_the_one_shot_commands_do_not():
    from diffusers.utils import logging as dlog
    from huggingface_hub.utils import are_progress_bars_disabled

    from niche.logging_setup import setup_logging
    from niche.models.quiet import quiet_libraries

    quiet_libraries()
    assert are_progress_bars_disabled() and not dlog.is_progress_bar_enabled()
    setup_logging()
    assert not are_progress_bars_disabled() and dlog.is_progress_bar_enabled()
    quiet_libraries()
