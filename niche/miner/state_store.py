"""The sampler states of recent answers, kept until the validator that asked fetches the
ones it audits. Bounded twice: by age (a validator fetches within its round) and by bytes
(oldest answers go first), so a flood of requests cannot grow the miner's memory."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from niche.states import state_bytes


@dataclass(frozen=True)
class _Kept:
    expires: float
    states: tuple[bytes, ...]

    @property
    def size(self) -> int:
        return sum(len(s) for s in self.states)


class StateStore:
    """(caller hotkey, request_id) -> raw float32 states x_1..x_N of that answer."""

    def __init__(self, max_bytes: int = 512 * 1024 * 1024, ttl: float = 600.0,
                 clock: Callable[[], float] = time.monotonic):
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._clock = clock
        self._kept: OrderedDict[tuple[str, str], _Kept] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes_held(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._kept)

    def put(self, hotkey: str, request_id: str, states: Sequence[torch.Tensor]) -> None:
        kept = _Kept(self._clock() + self.ttl, tuple(state_bytes(s) for s in states))
        if kept.size > self.max_bytes:
            return  # larger than the whole budget: nothing to keep (the fetch says so)
        with self._lock:
            key = (hotkey, request_id)
            old = self._kept.pop(key, None)
            if old is not None:
                self._bytes -= old.size
            self._kept[key] = kept
            self._bytes += kept.size
            self._evict()

    def get(self, hotkey: str, request_id: str) -> tuple[bytes, ...] | None:
        """The states of that caller's answer, or None (never made, expired or evicted)."""
        with self._lock:
            self._evict()
            kept = self._kept.get((hotkey, request_id))
            return kept.states if kept is not None else None

    def _evict(self) -> None:
        now = self._clock()
        while self._kept:
            key, kept = next(iter(self._kept.items()))
            if kept.expires > now and self._bytes <= self.max_bytes:
                break
            del self._kept[key]
            self._bytes -= kept.size
