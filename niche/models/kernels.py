"""The kernel choices that change a denoising step's bits, and how to reproduce them.

In one dtype, thread counts and fused batches leave a step bit-identical on this platform,
but the scaled-dot-product attention backend does not: math, flash and memory-efficient
attention round differently (up to 2.3e-2 of a FLUX.1-dev step's update measured on the tiny
checkpoints, as large as what a well-chosen cache changes). So a miner declares its backend
in the answer (`StatesCommitment.kernels`) and the validator recomputes with the same one;
the step thresholds then only cover what other hardware adds to the same kernels.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Mapping

import torch

from niche.errors import ConfigError
from niche.protocol import ATTENTION_BACKENDS

DEFAULT_ATTENTION = "default"


def _backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}[name]


class KernelUnavailable(ValueError):
    """A declared kernel this machine cannot run, so it cannot reproduce the answer's bits."""


_SWITCH = threading.RLock()
"""torch keeps the SDPA backend switch per process, not per thread: every engine call runs
under this lock, so one engine's declared backend never leaks into another's call."""


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Run the block's scaled-dot-product attention on backend `name` (`default`: torch's
    own choice), holding the process-wide switch for its duration."""
    if name != DEFAULT_ATTENTION and name not in ATTENTION_BACKENDS:
        raise KernelUnavailable(f"unknown attention backend {name!r} (known: "
                                f"{', '.join(ATTENTION_BACKENDS)})")
    with _SWITCH:
        if name == DEFAULT_ATTENTION:
            yield
            return
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([_backend(name)]):
            yield


def attention_problem(name: str, device: str | torch.device, dtype: str | None = None
                      ) -> str | None:
    """Why backend `name` cannot run on `device` in `dtype` (None: it can). Probed once per
    backend, device and dtype (every audit asks) with one small attention call, in `dtype`
    (an audit's: the recomputation runs in the miner's declared dtype, and flash attention,
    for one, takes no float32), else in the half precision the GPU backends need."""
    if name == DEFAULT_ATTENTION:
        return None
    if name not in ATTENTION_BACKENDS:
        return f"unknown attention backend {name!r} (known: {', '.join(ATTENTION_BACKENDS)})"
    return _probe(name, str(torch.device(device)), dtype)


@functools.lru_cache(maxsize=64)
def _probe(name: str, device_name: str, dtype_name: str | None) -> str | None:
    device = torch.device(device_name)
    if dtype_name is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    elif isinstance(getattr(torch, dtype_name, None), torch.dtype):
        dtype = getattr(torch, dtype_name)
    else:
        return f"unknown dtype {dtype_name!r}"
    q = torch.zeros(1, 1, 8, 64, device=device, dtype=dtype)
    try:
        with attention_backend(name), torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError as exc:
        where = device.type if dtype_name is None else f"{device.type} in {dtype_name}"
        return f"attention backend {name} does not run on {where}: " \
               f"{str(exc).splitlines()[0][:160]}"
    return None


def check_attention(name: str, device: str | torch.device) -> str:
    """`name` when it runs on `device`, else a ConfigError with advice (start-up check)."""
    problem = attention_problem(name, device)
    if problem:
        raise ConfigError(f"{problem}; pick another with --engine.attention "
                          f"({', '.join(ATTENTION_BACKENDS)})")
    return name


def declared_attention(kernels: Mapping[str, str] | None) -> str:
    """The attention backend an answer declares (protocol 2/3 answers declare none: the
    default)."""
    return (kernels or {}).get("attention", DEFAULT_ATTENTION)
