"""Whose fault is an exception in the audit's recomputation? The validator's (unaudited: no
charge) unless the miner's declared attention backend is what fails: the same recomputation
on the default backend then runs here, and the answer is unverifiable (earns nothing, else
declaring a backend that breaks here would dodge every audit). A device error that breaks
every backend is the validator's, whatever the miner declared.

The step checker here is a double that raises on chosen backends: the question is only how
`Auditor` judges an exception, which the real recomputation cannot raise on demand."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from niche.models.kernels import KernelUnavailable
from niche.validator.audit import Auditor


class BreakingSteps:
    """`check` raises `error` on the backends in `broken` ("*": every one, the default too)."""

    def __init__(self, broken: set[str], error: Exception) -> None:
        self.broken, self.error, self.calls = broken, error, []

    def check(self, params, image, claimed, steps, dtype=None, answer=None, kernels=None):
        attention = (kernels or {}).get("attention", "default")
        self.calls.append(attention)
        if "*" in self.broken or attention in self.broken:
            raise self.error
        return SimpleNamespace(passed=True, errors={0: 0.0}, thresholds={0: 1.0}, reason="")


def _verdict(steps: BreakingSteps, declared: dict[str, str]):
    auditor = Auditor(engine=None, verifier=None, steps=steps, client=None)
    challenge = SimpleNamespace(request_id="r1", params=None, image=None)
    answer = SimpleNamespace(image=None, response=SimpleNamespace(
        states=SimpleNamespace(kernels=declared, compute_dtype="float32")))
    return asyncio.run(auditor._check_safely(challenge, answer, {}, [0]))


CUDA_FAULT = RuntimeError("CUDA error: unspecified launch failure")


@pytest.mark.parametrize("declared", [{"attention": "math"}, {"attention": "flash"}])
def test_a_device_fault_on_every_backend_is_the_validators(declared):
    steps = BreakingSteps({"*"}, CUDA_FAULT)
    result = _verdict(steps, declared)
    assert result.unaudited and not result.unverifiable, result.reason
    assert steps.calls == [declared["attention"], "default"]  # asked the default too


def test_a_fault_of_the_declared_backend_alone_is_the_miners_choice():
    steps = BreakingSteps({"flash"}, RuntimeError("No available kernel. Aborting execution."))
    result = _verdict(steps, {"attention": "flash"})
    assert result.unverifiable and "declared attention backend flash" in result.reason


def test_a_backend_this_machine_cannot_run_is_unverifiable_without_a_second_run():
    steps = BreakingSteps({"cudnn"}, KernelUnavailable("cudnn attention needs a GPU"))
    result = _verdict(steps, {"attention": "cudnn"})
    assert result.unverifiable and steps.calls == ["cudnn"]


def test_on_the_default_backend_any_fault_is_the_validators():
    steps = BreakingSteps({"*"}, CUDA_FAULT)
    result = _verdict(steps, {})
    assert result.unaudited and steps.calls == ["default"]


def test_out_of_memory_is_the_validators_whatever_was_declared():
    steps = BreakingSteps({"*"}, torch.OutOfMemoryError("CUDA out of memory. Tried to "
                                                         "allocate 2.00 GiB"))
    result = _verdict(steps, {"attention": "flash"})
    assert result.unaudited and steps.calls == ["flash"]
