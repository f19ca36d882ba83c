"""How often a validator may ask a miner: the miner's advertised rate for this caller (its
/v1/info `requests_per_minute`, its share by stake when it says `stake_proportional`). A
validator whose rounds send more than that gets 429s it caused itself, and would score
honest miners zero for its own pace: the round interval is stretched to what the median
miner allows, and a slower miner is asked only as often as its own rate allows."""
from __future__ import annotations

import math
import time
from collections.abc import Callable

from niche.protocol import RATE_BURST_DIVISOR, InfoResponse

DEFAULT_MINER_RATE = 60.0
"""Requests per minute assumed of a miner that does not say (the miner's default)."""
HEADROOM = 0.9
"""Share of a miner's rate a validator (with its gateway) plans to use: the rest absorbs
clock drift between the miner's token bucket and ours."""


def caller_rate(info: InfoResponse, stake_share: float) -> float | None:
    """Requests per minute `info`'s miner allows a caller holding `stake_share` of the
    validators' stake; None when it sets no limit."""
    rpm = DEFAULT_MINER_RATE if info.requests_per_minute is None else info.requests_per_minute
    if not math.isfinite(rpm) or rpm <= 0:  # inf is refused at parsing; never trust it here
        return None
    if info.stake_proportional:
        rpm = max(1.0, rpm * max(0.0, min(1.0, stake_share)))
    return rpm


MAX_PACED_INTERVAL = 30.0
"""Most seconds the miners' rates may space rounds beyond --neuron.round_interval: miners
advertising tiny rates (a sybil majority of a round's sample) must not stop scoring for
hours; slower miners sit rounds out instead."""


def paced_interval(requests: int, rate: float | None) -> float:
    """Seconds a round sending `requests` to a miner allowing `rate` a minute must last
    (0: no limit) to stay within HEADROOM of it; at most MAX_PACED_INTERVAL."""
    if rate is None or requests <= 0:
        return 0.0
    return min(MAX_PACED_INTERVAL, 60.0 * requests / (HEADROOM * rate))


class RateBudgets:
    """This validator's copy of each miner's token bucket for its hotkey (a miner refills
    `rate / 60` a second up to `max(1, rate / RATE_BURST_DIVISOR)`; ours refills HEADROOM
    of that): a miner is never sent more than it advertised, even when its rate is far
    below the others' (the
    rounds are paced to the median miner; one miner advertising 1 request a minute must not
    slow every round to a minute)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def allowance(self, hotkey: str, rate: float | None) -> int | None:
        """Requests `hotkey` may be sent now (None: it sets no limit)."""
        if rate is None:
            return None
        now = self._clock()
        capacity = max(1.0, HEADROOM * rate / RATE_BURST_DIVISOR)
        tokens, last = self._buckets.get(hotkey, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * HEADROOM * rate / 60.0)
        self._buckets[hotkey] = (tokens, now)
        return int(min(tokens, capacity) + 1e-9)

    def spend(self, hotkey: str, requests: int) -> None:
        if hotkey in self._buckets:
            tokens, last = self._buckets[hotkey]
            self._buckets[hotkey] = (tokens - requests, last)

    def drained(self, hotkey: str) -> None:
        """The miner refused for its rate: its bucket is empty whatever ours says (its
        gateway shares it, or a restart left ours full); ours starts again from empty."""
        if hotkey in self._buckets:
            tokens, last = self._buckets[hotkey]
            self._buckets[hotkey] = (min(tokens, 0.0), last)

    def forget(self, keep: set[str]) -> None:
        """Drop the buckets of hotkeys no longer on the subnet."""
        for hotkey in [h for h in self._buckets if h not in keep]:
            del self._buckets[hotkey]
