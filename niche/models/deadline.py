"""The deadline of the request a thread is serving, for engines that can retry (the Ray
backend retries a call lost with its replica, but never past the caller's timeout), and the
step-end check that stops a generation once its asker has stopped waiting (`stop_at`).

Thread-local on purpose: the miner runs each generation in a worker thread, and the
engine's methods keep their `ImageEngine` signatures.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_local = threading.local()


@contextlib.contextmanager
def request_deadline(seconds_left: float) -> Iterator[None]:
    """Calls made by this thread inside the block should finish within `seconds_left`."""
    previous = getattr(_local, "deadline", None)
    _local.deadline = time.monotonic() + max(0.0, seconds_left)
    try:
        yield
    finally:
        _local.deadline = previous


def remaining_seconds() -> float | None:
    """Seconds left of this thread's request deadline (None when no deadline is set)."""
    deadline = getattr(_local, "deadline", None)
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class DeadlinePassed(Exception):
    """The request's deadline passed between two steps of its generation: whoever asked has
    stopped waiting, so the rest of the steps would only delay the requests queued behind."""


def stop_at(deadline: float, clock: Callable[[], float],
            on_state: Callable[[torch.Tensor], None]) -> Callable[[torch.Tensor], None]:
    """`on_state` that first raises DeadlinePassed once `clock()` is past `deadline`: the
    engine calls it as each step ends, so a late generation stops within one step."""
    steps = 0

    def checked(state: torch.Tensor) -> None:
        nonlocal steps
        steps += 1
        if clock() > deadline:
            raise DeadlinePassed(f"the request's deadline passed after step {steps}")
        on_state(state)
    return checked
