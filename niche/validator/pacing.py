"""How often a validator may ask a miner: the miner's advertised rate for this caller (its
/v1/info `requests_per_minute`, its share by stake when it says `stake_proportional`). A
validator whose rounds send more than that gets 429s it caused itself, and would score
honest miners zero for its own pace: the round interval is stretched instead."""
from __future__ import annotations

from niche.protocol import InfoResponse

DEFAULT_MINER_RATE = 60.0
"""Requests per minute assumed of a miner that does not say (the miner's default)."""
HEADROOM = 0.9
"""Share of a miner's rate a validator (with its gateway) plans to use: the rest absorbs
clock drift between the miner's token bucket and ours."""


def caller_rate(info: InfoResponse, stake_share: float) -> float | None:
    """Requests per minute `info`'s miner allows a caller holding `stake_share` of the
    validators' stake; None when it sets no limit."""
    rpm = DEFAULT_MINER_RATE if info.requests_per_minute is None else info.requests_per_minute
    if rpm <= 0:
        return None
    if info.stake_proportional:
        rpm = max(1.0, rpm * max(0.0, min(1.0, stake_share)))
    return rpm


def paced_interval(requests: int, rate: float | None) -> float:
    """Seconds a round sending `requests` to a miner allowing `rate` a minute must last
    (0: no limit) to stay within HEADROOM of it."""
    if rate is None or requests <= 0:
        return 0.0
    return 60.0 * requests / (HEADROOM * rate)
