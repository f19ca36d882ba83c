"""Helpers for audit tests."""
from __future__ import annotations

import asyncio

from niche.validator.client import MinerClient


class PeakFetches(MinerClient):
    """A real MinerClient that records how many states fetches were in flight at once.
    `delay`: seconds each fetch waits first (a network's latency: fetches could overlap)."""

    def __init__(self, *args, delay: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay, self.active, self.peak = delay, 0, 0

    async def fetch_states(self, *args, **kwargs):
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            return await super().fetch_states(*args, **kwargs)
        finally:
            self.active -= 1
