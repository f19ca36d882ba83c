"""Runtime in /v1/info (torch, diffusers, CUDA, device, GPU, dtype per model) and the
validator's warning when a miner's differs from its own: once per miner and change."""
from __future__ import annotations

import logging
from importlib import metadata

import httpx
import pytest
import torch
from miner_support import build_net, running_miner

from niche.protocol import InfoResponse, RuntimeInfo
from niche.runtime import RuntimeWatch, describe, differences, runtime_info


def test_info_reports_the_runtime_of_the_real_engine(tmp_path, tiny_engine):
    net = build_net(tmp_path)
    with running_miner(net, tiny_engine) as miner:
        info = InfoResponse.model_validate(httpx.get(miner.url + "/v1/info").json())
    rt = info.runtime
    assert rt is not None
    assert rt.torch == torch.__version__ and rt.diffusers == metadata.version("diffusers")
    assert rt.cuda == (torch.version.cuda or "none") and rt.device == "cpu"
    assert rt.gpu_name is None
    assert rt.dtypes == {"flux-schnell": tiny_engine.compute_dtype("flux-schnell"),
                         "kolors": tiny_engine.compute_dtype("kolors")}
    line = describe(rt)
    assert f"torch {torch.__version__}" in line and "device cpu" in line


def _other(mine: RuntimeInfo, **changes) -> RuntimeInfo:
    return mine.model_copy(update=changes)


def test_mismatch_warns_once_per_miner_and_change(caplog):
    mine = RuntimeInfo(torch="2.13.0", diffusers="0.36.0", transformers="4.57.0", cuda="12.8",
                       device="cuda", gpu_name="H200", dtypes={"kolors": "float16"})
    watch = RuntimeWatch(mine)
    caplog.set_level(logging.WARNING, logger="niche.runtime")
    assert watch.observe(1, "5Fsame", _other(mine, gpu_name="A100")) == []  # GPU: not warned
    drift = _other(mine, diffusers="0.35.1", dtypes={"kolors": "float32", "flux-schnell": "x"})
    assert watch.observe(2, "5Fdrift", drift) == ["diffusers 0.36.0 vs 0.35.1",
                                                   "kolors dtype float16 vs float32"]
    assert watch.observe(2, "5Fdrift", drift) == []  # the next round: no new warning
    assert watch.observe(3, "5Fother", drift) != []  # another miner: its own warning
    newer = _other(drift, torch="2.12.0")
    assert watch.observe(2, "5Fdrift", newer)[0] == "torch 2.13.0 vs 2.12.0"  # a change
    assert watch.observe(2, "5Fdrift", None) == []  # a miner publishing nothing is not warned
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3 and "uid 2" in warnings[0] and "diffusers" in warnings[0]


@pytest.mark.parametrize("field", ["torch", "diffusers", "transformers", "cuda"])
def test_each_library_field_is_compared(field):
    mine = runtime_info()
    assert differences(mine, _other(mine, **{field: "other"}))[0].startswith(field)
