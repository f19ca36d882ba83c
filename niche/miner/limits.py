"""What keeps a miner's GPU for the callers that pay for it: rate limits and a stake queue.

- `RateLimiter`: a token bucket per hotkey (fixed rate, or a share of a total rate
  proportional to the caller's stake among permitted validators).
- `inflight_cap`: requests one address may hold open (fixed, or scaled by stake too).
- `PriorityGate`: one generation at a time per slot (one slot per GPU or replica); waiting
  requests are served highest stake first.
  A request that cannot finish before its own timeout (estimated from recent generation
  durations and its place in the queue) is refused at once with 429 rather than queued, and
  a waiter whose deadline passes while queued is dropped before it reaches the GPU.

Both live on the event loop (the gate) or behind a lock (the limiter); neither blocks.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import statistics
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field


class Refusal(Exception):
    """A request refused by policy: HTTP `status`, stable `reason`, human `detail`."""

    def __init__(self, status: int, reason: str, detail: str = "", *,
                 field: str | None = None):
        self.status, self.reason, self.detail, self.field = status, reason, detail, field
        super().__init__(f"{reason}: {detail}" if detail else reason)


# ----------------------------------------------------------------------------- rate limits
class RateLimiter:
    """Token buckets keyed by hotkey; at most `max_keys` buckets are remembered (LRU)."""

    def __init__(self, requests_per_minute: float, *, burst: float | None = None,
                 stake_proportional: bool = False, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self.rpm = float(requests_per_minute)
        self.burst = burst
        self.stake_proportional = stake_proportional
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def rate_for(self, stake_share: float) -> float:
        """Requests per minute for a caller with `stake_share` of validator stake."""
        if not self.stake_proportional:
            return self.rpm
        return max(1.0, self.rpm * max(0.0, min(1.0, stake_share)))

    def allow(self, hotkey: str, stake_share: float = 1.0) -> bool:
        if self.rpm <= 0:
            return True  # disabled
        rate = self.rate_for(stake_share) / 60.0
        capacity = self.burst if self.burst is not None else max(1.0, self.rate_for(
            stake_share) / 6.0)
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(hotkey, (capacity, now))
            tokens = min(capacity, tokens + (now - last) * rate)
            ok = tokens >= 1.0
            if ok:
                tokens -= 1.0
            self._buckets[hotkey] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return ok


def inflight_cap(per_address: int, total: int, stake_share: float | None) -> int:
    """Requests one peer address may hold in flight: `per_address`, or, with stake-scaled
    limits (`stake_share` given), the caller's stake share of the `total` slots when that is
    more, so a validator with 10x the stake may keep about 10x the requests open (0: no
    per-address bound)."""
    if not per_address or stake_share is None:
        return per_address
    return max(per_address, min(total, math.ceil(total * max(0.0, min(1.0, stake_share)))))


# ----------------------------------------------------------------------------- the queue
@dataclass(order=True)
class _Waiter:
    priority: float
    seq: int
    deadline: float = field(compare=False)
    future: asyncio.Future = field(compare=False)


class PriorityGate:
    """`slots` generations at once (one per GPU). `acquire(stake, deadline)` returns when the
    caller may generate; the caller must then call `release(seconds)` exactly once."""

    def __init__(self, max_queue: int = 16, *, history: int = 20,
                 initial_estimate: float | None = None, slots: int = 1,
                 clock: Callable[[], float] = time.monotonic):
        if slots < 1:
            raise ValueError("a gate needs at least one slot")
        self.max_queue = max_queue
        self.initial_estimate = initial_estimate
        self.slots = slots
        """Generations at once: 1 per GPU; an engine with N replicas has N."""
        self._durations: deque[float] = deque(maxlen=history)
        self._clock = clock
        self._heap: list[_Waiter] = []
        self._seq = itertools.count()
        self.running = 0
        self._started: deque[float] = deque()  # start times of the running ones, oldest first

    @property
    def busy(self) -> bool:
        """Every slot is taken (with one slot: a generation runs)."""
        return self.running >= self.slots

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the one running)."""
        return sum(1 for w in self._heap if not w.future.done())

    def estimate(self) -> float | None:
        """Typical generation seconds: median of recent ones (None before any is known)."""
        if self._durations:
            return statistics.median(self._durations)
        return self.initial_estimate

    def record(self, seconds: float) -> None:
        self._durations.append(max(0.0, float(seconds)))

    def expected_wait(self, stake: float) -> float:
        """Seconds until a new request with `stake` would start, by the current estimate."""
        est = self.estimate() or 0.0
        if not self.busy:
            return 0.0
        ahead = sum(1 for w in self._heap if not w.future.done() and -w.priority >= stake)
        remaining = max(0.0, est - (self._clock() - self._started[0]))
        return remaining + (ahead // self.slots) * est

    async def acquire(self, stake: float, deadline: float) -> float:
        """Wait for the slot; returns seconds waited. `deadline` is on this gate's clock.

        Raises Refusal(429) when the request cannot finish by its deadline, Refusal(503)
        when the queue is full."""
        start = self._clock()
        est = self.estimate() or 0.0
        if not self.busy and self.depth == 0:
            if start + est > deadline:
                raise Refusal(429, "cannot_finish_in_time",
                              f"generation takes ~{est:.1f}s, timeout is "
                              f"{max(0.0, deadline - start):.1f}s")
            self._start()
            return 0.0
        if self.depth >= self.max_queue:
            raise Refusal(503, "queue_full", f"{self.depth} requests already waiting")
        wait = self.expected_wait(stake)
        if start + wait + est > deadline:
            raise Refusal(429, "cannot_start_in_time",
                          f"expected start in {wait:.1f}s + ~{est:.1f}s generation exceeds "
                          f"the {max(0.0, deadline - start):.1f}s timeout")
        waiter = _Waiter(-float(stake), next(self._seq), deadline,
                         asyncio.get_running_loop().create_future())
        heapq.heappush(self._heap, waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            # Granted at the same moment we were cancelled: pass the slot on.
            if waiter.future.done() and not waiter.future.cancelled() \
                    and waiter.future.exception() is None:
                self.release(None)
            else:
                waiter.future.cancel()
            raise
        return self._clock() - start

    def _start(self) -> None:
        self.running += 1
        self._started.append(self._clock())

    def release(self, seconds: float | None) -> None:
        """A running generation ended (`seconds` it took, None if it never ran)."""
        if seconds is not None:
            self.record(seconds)
        self.running = max(0, self.running - 1)
        if self._started:
            self._started.popleft()
        est = self.estimate() or 0.0
        while self._heap:
            waiter = heapq.heappop(self._heap)
            if waiter.future.done():
                continue
            now = self._clock()
            if now + est > waiter.deadline:
                waiter.future.set_exception(Refusal(
                    429, "deadline_passed", "could not start before its timeout"))
                continue
            self._start()
            waiter.future.set_result(None)
            return
