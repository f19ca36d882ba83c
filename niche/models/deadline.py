"""The deadline of the request a thread is serving, for engines that can retry (the Ray
backend retries a call lost with its replica, but never past the caller's timeout).

Thread-local on purpose: the miner runs each generation in a worker thread, and the
engine's methods keep their `ImageEngine` signatures.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

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
