"""Out of GPU memory, through the real engine's call path: a generation that runs out is one
log line naming the memory mode to try, its request gets 503 out_of_memory, and the miner
serves the next request; a load that runs out is a one-line configuration error (exit 2,
which pm2 does not restart). torch.OutOfMemoryError is raised by a double of the pipeline's
__call__ / from_pretrained: a CPU box cannot run out of GPU memory on demand."""
from __future__ import annotations

import logging

import httpx
import pytest
import torch
from diffusers import FluxPipeline
from miner_support import build_net, make_request, running_miner, signed_post

from niche.cli import main
from niche.errors import ConfigError
from niche.models.engine import Engine
from niche.models.memory import memory_advice, next_memory_mode
from niche.protocol import ErrorResponse


def _out_of_memory(*_args, **_kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")


@pytest.fixture
def net(tmp_path):
    return build_net(tmp_path)


def test_generation_out_of_memory_is_one_line_and_the_miner_serves_on(
        net, tiny_engine, monkeypatch, caplog):
    pipe = tiny_engine.family("flux-schnell").pipe
    with running_miner(net, tiny_engine) as miner:
        monkeypatch.setattr(type(pipe), "__call__", _out_of_memory)
        caplog.set_level(logging.INFO, logger="niche.miner")
        body = make_request(model="flux-schnell").model_dump_json(exclude_none=True).encode()
        resp = signed_post(miner, net.wallets["hi"], body)
        assert resp.status_code == 503
        refusal = ErrorResponse.model_validate(resp.json())
        assert refusal.reason == "out_of_memory"
        assert "memory mode gpu" in refusal.detail
        assert "--memory-mode model-offload" in refusal.detail
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].exc_info is None  # one line, no traceback
        assert "--memory-mode model-offload" in errors[0].getMessage()
        monkeypatch.undo()  # memory is back: the same miner answers the next request
        again = make_request(model="flux-schnell", seed=2).model_dump_json(
            exclude_none=True).encode()
        assert signed_post(miner, net.wallets["hi"], again).status_code == 200
        assert httpx.get(miner.url + "/healthz").json()["ok"] is True


def test_load_out_of_memory_is_a_config_error_naming_the_mode(tiny_root, monkeypatch, capsys):
    monkeypatch.setattr(FluxPipeline, "from_pretrained", _out_of_memory)
    with pytest.raises(ConfigError, match="memory mode model-offload: try --memory-mode "
                                          "sequential-offload"):
        Engine(models=["flux-schnell"], model_root=tiny_root, memory_mode="model-offload")
    rc = main(["generate", "--tiny", "--model", "flux-schnell", "--prompt", "a", "--seed", "1",
               "--out", "unused.png"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: out of GPU memory running flux-schnell in memory mode gpu")


def test_the_smallest_mode_says_so():
    assert next_memory_mode("sequential-offload") is None
    assert next_memory_mode("unknown") is None
    assert "already the smallest mode" in memory_advice("kolors", "sequential-offload")
