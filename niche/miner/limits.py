"""What keeps a miner's GPU for the callers that pay for it: rate limits and a stake queue.

- `RateLimiter`: a token bucket per hotkey (fixed rate, or a share of a total rate
  proportional to the caller's stake among permitted validators).
- `inflight_cap`: requests one address may hold open (fixed, or scaled by stake too);
  `PeerSlots` counts them, an unauthenticated request only ever at the base cap.
- `FetchSlots`: states answers being made or sent, per caller and in all.
- `PriorityGate`: one generation at a time per slot (one slot per GPU or replica); waiting
  requests are served highest stake first, and a full queue gives a newcomer with more stake
  the place of its lowest-stake waiter.
  A request that cannot finish before its own timeout (estimated from recent generation
  durations and its place in the queue) is refused at once with 429 rather than queued, and
  a waiter leaves the queue (429) as soon as it can no longer finish in time.

Both live on the event loop (the gate) or behind a lock (the limiter); neither blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import statistics
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from niche.protocol import RATE_BURST_DIVISOR


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
            stake_share) / RATE_BURST_DIVISOR)
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


def add_count(counts: dict[str, int], key: str, n: int) -> None:
    """`counts[key] += n`, the key gone at 0: per-peer counts stay as large as the peers."""
    left = counts.get(key, 0) + n
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class PeerSlots:
    """Generate requests held per peer address, those not yet authenticated counted apart.

    Before its signature is checked a request is bounded by the base cap alone: a claimed
    hotkey is a header anyone can write, so it must not buy the claimed validator's
    stake-scaled share. Once the signature verifies, the request counts against the cap of
    the hotkey that signed it (`prove`). With fixed caps (`scaled` False) the base cap bounds
    everything an address holds, as it always did."""

    def __init__(self, base: int, *, scaled: bool = False):
        self.base, self.scaled = base, scaled
        self.held: dict[str, int] = {}
        self.unproven: dict[str, int] = {}

    def enter(self, peer: str) -> None:
        """A request's headers arrived from `peer`; Refusal(503) over the base cap."""
        counted = self.unproven if self.scaled else self.held
        if self.base and counted.get(peer, 0) >= self.base:
            raise Refusal(503, "busy", f"{self.base} requests in flight from {peer}; "
                          "retry later")
        add_count(self.held, peer, 1)
        add_count(self.unproven, peer, 1)

    def prove(self, peer: str, cap: int) -> None:
        """Its signature verified; Refusal(503) when `peer` now holds more than `cap` (the
        signer's own cap). The request is proven either way: `leave(peer, proven=True)`."""
        add_count(self.unproven, peer, -1)
        if cap and self.held.get(peer, 0) > cap:
            raise Refusal(503, "busy", f"{cap} requests in flight from {peer}; retry later")

    def leave(self, peer: str, *, proven: bool) -> None:
        add_count(self.held, peer, -1)
        if not proven:
            add_count(self.unproven, peer, -1)


class FetchSlots:
    """States answers being read, encoded or sent: at most `per_caller` for one hotkey (429)
    and `total` in all (503; 0: no bound). An answer of 8 FLUX.1-dev states is ~11 MB of
    JSON held until the peer has read it, so these bound the miner's memory; an honest
    validator fetches one answer's states one request after another."""

    def __init__(self, per_caller: int, total: int):
        self.per_caller, self.total = per_caller, total
        self.held: dict[str, int] = {}
        self.in_all = 0

    def take(self, caller: str) -> Callable[[], None]:
        """A slot for `caller`, or Refusal; returns its release (safe to call twice)."""
        if self.per_caller and self.held.get(caller, 0) >= self.per_caller:
            raise Refusal(429, "too_many_fetches", f"{self.per_caller} states requests of "
                          "this caller in flight; send them one after another")
        if self.total and self.in_all >= self.total:
            raise Refusal(503, "busy", f"{self.in_all} states requests in flight; retry later")
        add_count(self.held, caller, 1)
        self.in_all += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                add_count(self.held, caller, -1)
                self.in_all -= 1

        return release


# ----------------------------------------------------------------------------- the queue
@dataclass(frozen=True)
class Work:
    """What a generation's time grows with: its model (each has its own pace) and its
    pixel-steps. A multi-model miner's FLUX.1-schnell challenge is not judged by the time
    its FLUX.1-dev generations take."""

    kind: str = ""
    units: float = 1.0

    @classmethod
    def of(cls, model: str, width: int | None, height: int | None, steps: int | None,
           pipeline: str = "") -> Work:
        """A generation of `model` (through `pipeline`: a ControlNet's steps cost more than
        text-to-image's) of width x height pixels in `steps` steps."""
        return cls(f"{model}/{pipeline}" if pipeline else model,
                   float(max(1, (width or 1) * (height or 1) * (steps or 1))))


@dataclass(order=True)
class _Waiter:
    priority: float
    seq: int
    deadline: float = field(compare=False)
    future: asyncio.Future = field(compare=False)
    work: Work | None = field(default=None, compare=False)
    """What its generation is (its time: the gate's estimate of it, as it stands)."""
    timer: asyncio.TimerHandle | None = field(default=None, compare=False)


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
        self._history = history
        self._durations: deque[float] = deque(maxlen=history)
        self._paces: dict[str, deque[float]] = {}
        """Recent seconds per unit of work, per kind (model)."""
        self._clock = clock
        self._heap: list[_Waiter] = []
        self._seq = itertools.count()
        self.running = 0
        self._runs: deque[tuple[float, float, Work | None]] = deque()
        """(start, deadline, work) of the running generations, oldest first."""

    @property
    def busy(self) -> bool:
        """Every slot is taken (with one slot: a generation runs)."""
        return self.running >= self.slots

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the one running)."""
        return sum(1 for w in self._heap if not w.future.done())

    def estimate(self, work: Work | None = None) -> float | None:
        """Typical generation seconds: for `work`, its kind's recent pace times its units;
        without, the median of recent generations of any kind (None before any is known,
        and for a kind never measured: admitted until it is)."""
        if work is not None:
            paces = self._paces.get(work.kind)
            if paces:
                return statistics.median(paces) * work.units
            return self.initial_estimate
        if self._durations:
            return statistics.median(self._durations)
        return self.initial_estimate

    def record(self, seconds: float, work: Work | None = None) -> None:
        seconds = max(0.0, float(seconds))
        self._durations.append(seconds)
        if work is not None:
            self._paces.setdefault(work.kind, deque(maxlen=self._history)).append(
                seconds / max(work.units, 1e-9))

    def expected_wait(self, stake: float) -> float:
        """Seconds until a new request with `stake` would start: the slots played forward
        by the estimates of what runs and of each waiter ahead of it (as much stake or more,
        in the queue's order), each taking the slot that frees first."""
        if not self.busy:
            return 0.0
        now = self._clock()
        free = sorted(max(0.0, self._seconds(work) - (now - start))
                      for start, _, work in self._runs)
        free = (free + [0.0] * self.slots)[:self.slots]
        heapq.heapify(free)
        for waiter in sorted(w for w in self._heap if not w.future.done()
                             and -w.priority >= stake):
            heapq.heappush(free, heapq.heappop(free) + self._seconds(waiter.work))
        return free[0]

    def _seconds(self, work: Work | None) -> float:
        return self.estimate(work) or 0.0

    def overdue(self) -> float:
        """Seconds the most overdue running generation is past its request's deadline (0
        when none is): far past it, the engine is hung rather than slow."""
        now = self._clock()
        return max([0.0, *(now - deadline for _, deadline, _ in self._runs)])

    async def acquire(self, stake: float, deadline: float, work: Work | None = None
                      ) -> float:
        """Wait for the slot; returns seconds waited. `deadline` is on this gate's clock;
        `work`: what the generation is (its time is estimated from its kind's pace).

        Raises Refusal(429) when the request cannot finish by its deadline (at once, or
        later while it waits), Refusal(503) when the queue is full of waiters with as much
        stake or more (a lower-stake waiter gives up its place, with that 503)."""
        start = self._clock()
        est = self.estimate(work) or 0.0
        if not self.busy and self.depth == 0:
            if start + est > deadline:
                raise Refusal(429, "cannot_finish_in_time",
                              f"generation takes ~{est:.1f}s, timeout is "
                              f"{max(0.0, deadline - start):.1f}s")
            self._start(deadline, work)
            return 0.0
        displaced = self._displaced_by(stake) if self.depth >= self.max_queue else None
        wait = self.expected_wait(stake)
        if start + wait + est > deadline:
            raise Refusal(429, "cannot_start_in_time",
                          f"expected start in {wait:.1f}s + ~{est:.1f}s generation exceeds "
                          f"the {max(0.0, deadline - start):.1f}s timeout")
        if displaced is not None:
            self._drop(displaced, Refusal(503, "queue_full", "displaced from the full queue "
                                          "by a request with more stake"))
        waiter = _Waiter(-float(stake), next(self._seq), deadline,
                         asyncio.get_running_loop().create_future(), work)
        heapq.heappush(self._heap, waiter)
        self._arm(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            # Granted at the same moment we were cancelled: pass the slot on.
            if waiter.future.done() and not waiter.future.cancelled() \
                    and waiter.future.exception() is None:
                self.release(None)
            else:
                self._drop(waiter, None)
            raise
        return self._clock() - start

    def _displaced_by(self, stake: float) -> _Waiter:
        """The full queue's lowest-stake waiter (the latest of equals), which a newcomer with
        more `stake` replaces; Refusal(503) when there is none with less."""
        live = [w for w in self._heap if not w.future.done()]
        lowest = max(live, key=lambda w: (w.priority, w.seq), default=None)
        if lowest is None or -lowest.priority >= stake:
            raise Refusal(503, "queue_full", f"{len(live)} requests already waiting")
        return lowest

    def _drop(self, waiter: _Waiter, refusal: Refusal | None) -> None:
        """Take `waiter` out of the queue: refused with `refusal`, or cancelled (None)."""
        if waiter.timer is not None:
            waiter.timer.cancel()
        with contextlib.suppress(ValueError):
            self._heap.remove(waiter)
            heapq.heapify(self._heap)
        if waiter.future.done():
            return
        if refusal is None:
            waiter.future.cancel()
        else:
            waiter.future.set_exception(refusal)

    def _arm(self, waiter: _Waiter) -> None:
        """Wake at the last moment `waiter` could still start and finish by its deadline: a
        waiter leaves the queue then (429), not only when the running generation ends."""
        left = waiter.deadline - self._seconds(waiter.work) - self._clock()
        waiter.timer = asyncio.get_running_loop().call_later(max(0.0, left), self._expire,
                                                             waiter)

    def _expire(self, waiter: _Waiter) -> None:
        waiter.timer = None
        if waiter.future.done():
            return
        if self._clock() + self._seconds(waiter.work) >= waiter.deadline:
            self._drop(waiter, _deadline_passed())
        else:  # woke early (the estimate shrank, or an injected clock): wait again
            self._arm(waiter)

    def _start(self, deadline: float, work: Work | None) -> None:
        self.running += 1
        self._runs.append((self._clock(), deadline, work))

    def release(self, seconds: float | None, work: Work | None = None) -> None:
        """A running generation ended (`seconds` it took, None if it never ran; `work`:
        what it was, the pace its kind is estimated by)."""
        if seconds is not None:
            self.record(seconds, work)
        self.running = max(0, self.running - 1)
        if self._runs:
            self._runs.popleft()
        while self._heap:
            waiter = heapq.heappop(self._heap)
            if waiter.timer is not None:
                waiter.timer.cancel()
            if waiter.future.done():
                continue
            now = self._clock()
            if now + self._seconds(waiter.work) > waiter.deadline:
                waiter.future.set_exception(_deadline_passed())
                continue
            self._start(waiter.deadline, waiter.work)
            waiter.future.set_result(None)
            return


def _deadline_passed() -> Refusal:
    return Refusal(429, "deadline_passed", "could not start before its timeout")


T = TypeVar("T")


async def unless_gone(work: Awaitable[T], gone: Callable[[], Awaitable[None]]) -> T:
    """`work`, cancelled if `gone()` returns first (the caller disconnected): Refusal 499
    client_gone. A queued request whose caller gave up so leaves the queue instead of taking
    the GPU for an answer nobody reads."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    await asyncio.wait((task,))  # its cleanup (leaving the queue) ran
    raise Refusal(499, "client_gone", "the client disconnected before its answer")
