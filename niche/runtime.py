"""What a node's pixels depend on besides its weights: library versions, CUDA, device, GPU
and each model's dtype. Miners publish it in /v1/info and log it at start; validators compare
it with their own and warn once per miner and change (honest miners on other library versions
drift from the validator's step-check calibration)."""
from __future__ import annotations

import logging
from importlib import metadata
from typing import Any

from niche.protocol import RuntimeInfo

log = logging.getLogger("niche.runtime")

COMPARED = ("torch", "diffusers", "transformers", "cuda")
"""Fields whose difference is worth a warning (the GPU model may differ between honest
nodes; the validator's tolerance covers that, not a library's numerics)."""


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def runtime_info(engine: Any | None = None) -> RuntimeInfo:
    """This process's runtime; with an engine, its device and each model's dtype."""
    import torch

    device = str(getattr(engine, "device", "cpu")) if engine is not None else "cpu"
    gpu_name = None
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu_name = torch.cuda.get_device_name(torch.device(device))
    dtypes: dict[str, str] = {}
    if engine is not None:
        for model in engine.served():
            dtypes[model.model] = engine.compute_dtype(model.model)
    return RuntimeInfo(torch=torch.__version__, diffusers=_version("diffusers"),
                       transformers=_version("transformers"),
                       cuda=torch.version.cuda or "none", device=device, gpu_name=gpu_name,
                       dtypes=dtypes)


def describe(info: RuntimeInfo) -> str:
    """One log line: `torch 2.5.1, diffusers 0.32.2, ..., cuda none, device cpu, ...`."""
    dtypes = ", ".join(f"{m} {d}" for m, d in sorted(info.dtypes.items())) or "-"
    return (f"torch {info.torch}, diffusers {info.diffusers}, transformers "
            f"{info.transformers or '-'}, cuda {info.cuda}, device {info.device}, gpu "
            f"{info.gpu_name or '-'}, dtype {dtypes}")


def differences(mine: RuntimeInfo, theirs: RuntimeInfo) -> list[str]:
    """`field ours -> theirs` for every compared library and every shared model's dtype."""
    found = [f"{name} {getattr(mine, name)} vs {getattr(theirs, name)}" for name in COMPARED
             if getattr(mine, name) != getattr(theirs, name)]
    for model in sorted(set(mine.dtypes) & set(theirs.dtypes)):
        if mine.dtypes[model] != theirs.dtypes[model]:
            found.append(f"{model} dtype {mine.dtypes[model]} vs {theirs.dtypes[model]}")
    return found


class RuntimeWatch:
    """Remembers each miner's last runtime: a WARNING when it differs from ours, once per
    miner and change (not every round)."""

    def __init__(self, mine: RuntimeInfo) -> None:
        self.mine = mine
        self._seen: dict[str, tuple[str, ...]] = {}

    def observe(self, uid: int, hotkey: str, theirs: RuntimeInfo | None) -> list[str]:
        """The differences logged now ([] when none, unchanged, or the miner publishes no
        runtime)."""
        found = tuple(differences(self.mine, theirs)) if theirs is not None else ()
        if self._seen.get(hotkey) == found:
            return []
        self._seen[hotkey] = found
        if found:
            log.warning("miner uid %d (%s) runs another runtime than this validator "
                        "(ours vs theirs): %s; its answers may drift from the calibration",
                        uid, hotkey[:8], "; ".join(found))
        return list(found)
