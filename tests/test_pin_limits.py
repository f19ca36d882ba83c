"""Rate buckets and the stake queue on an injected clock: exact token counts, LRU eviction,
queue order, every refusal. No sleeps; the gate runs on a private event loop."""
from __future__ import annotations

import asyncio

import pytest

from niche.miner.limits import PriorityGate, RateLimiter, Refusal


class Clock:
    def __init__(self, t: float = 500.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def run(coro):
    """Each scenario finishes in milliseconds; the bound only turns a hang into a failure."""
    async def bounded():
        return await asyncio.wait_for(coro, 30)

    return asyncio.run(bounded())


# ----------------------------------------------------------------------------- Refusal
def test_refusal_fields_and_message():
    r = Refusal(429, "cannot_finish_in_time", "too slow", field="timeout")
    assert (r.status, r.reason, r.detail, r.field) == (429, "cannot_finish_in_time",
                                                       "too slow", "timeout")
    assert str(r) == "cannot_finish_in_time: too slow"
    bare = Refusal(503, "queue_full")
    assert (str(bare), bare.detail, bare.field) == ("queue_full", "", None)


# ----------------------------------------------------------------------------- RateLimiter
def test_rate_limiter_defaults():
    limiter = RateLimiter(30)
    assert (limiter.rpm, limiter.burst, limiter.stake_proportional, limiter.max_keys) == (
        30.0, None, False, 10_000)


def test_rate_for():
    flat = RateLimiter(120)
    assert flat.rate_for(0.0) == 120.0 and flat.rate_for(0.3) == 120.0
    share = RateLimiter(120, stake_proportional=True)
    assert share.rate_for(0.25) == pytest.approx(30.0)
    assert share.rate_for(1.0) == 120.0
    assert share.rate_for(3.0) == 120.0  # clamped to the whole rate
    assert share.rate_for(0.005) == 1.0  # 0.6 rpm floored at 1
    assert share.rate_for(-2.0) == 1.0
    assert RateLimiter(600, stake_proportional=True).rate_for(0.5) == 300.0


def test_default_bucket_is_ten_seconds_of_rate():
    clock = Clock()
    limiter = RateLimiter(60, clock=clock)  # 1/s, bucket of 60 / 6 = 10
    assert [limiter.allow("a") for _ in range(11)] == [True] * 10 + [False]
    slow = RateLimiter(3, clock=clock)  # 3 / 6 = 0.5, floored at 1
    assert [slow.allow("a") for _ in range(2)] == [True, False]
    share = RateLimiter(120, stake_proportional=True, clock=clock)
    # a quarter of the stake: 30 rpm, bucket of 5
    assert [share.allow("a", 0.25) for _ in range(6)] == [True] * 5 + [False]


def test_tokens_refill_at_the_rate_up_to_the_bucket():
    clock = Clock()
    limiter = RateLimiter(60, burst=3, clock=clock)  # 1 token per second
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    clock.t += 1.5  # 1.5 tokens
    assert [limiter.allow("a") for _ in range(2)] == [True, False]
    clock.t += 0.5  # 0.5 left + 0.5 = exactly 1 token: enough
    assert [limiter.allow("a") for _ in range(2)] == [True, False]
    clock.t += 1000.0  # capped at the bucket of 3
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    clock.t += 0.999
    assert not limiter.allow("a")


def test_a_refused_request_costs_no_token():
    clock = Clock()
    limiter = RateLimiter(60, burst=1, clock=clock)
    assert limiter.allow("a")
    for _ in range(5):
        clock.t += 0.1
        assert not limiter.allow("a")
    clock.t += 0.5  # 1.0 s since the accepted one
    assert limiter.allow("a")


def test_stake_share_sets_the_refill_rate():
    clock = Clock()
    limiter = RateLimiter(240, burst=1, stake_proportional=True, clock=clock)
    assert limiter.allow("a", 0.25) and limiter.allow("b", 1.0)
    clock.t += 0.25  # b refills at 4/s: one token; a at 1/s: a quarter
    assert limiter.allow("b", 1.0) and not limiter.allow("a", 0.25)
    clock.t += 0.75
    assert limiter.allow("a", 0.25)


def test_disabled_limiter_allows_everything():
    for rpm in (0, -5):
        limiter = RateLimiter(rpm, burst=0, clock=Clock())
        assert all(limiter.allow("a") for _ in range(100))


def test_buckets_are_evicted_least_recently_used_first():
    clock = Clock()
    limiter = RateLimiter(1, burst=1, max_keys=2, clock=clock)  # no refill to speak of
    assert limiter.allow("a") and limiter.allow("b")
    assert not limiter.allow("a")  # a is now the most recently used
    assert limiter.allow("c")  # evicts b, the least recently used
    assert not limiter.allow("a")  # a kept its empty bucket
    assert not limiter.allow("c")
    assert limiter.allow("b")  # b was forgotten: a full bucket again (evicts a)
    assert limiter.allow("a")


def test_default_key_bound_is_ten_thousand():
    clock = Clock()
    limiter = RateLimiter(1, burst=1, clock=clock)
    assert limiter.allow("k0")
    for i in range(1, 10_000):
        limiter.allow(f"k{i}")
    assert not limiter.allow("k1")  # 10 000 remembered: k1 still drained (k0 now oldest)
    assert limiter.allow("new")  # the 10 001st key evicts k0
    assert limiter.allow("k0")


# ----------------------------------------------------------------------------- PriorityGate
def test_gate_defaults_and_estimate():
    gate = PriorityGate()
    assert (gate.max_queue, gate.initial_estimate, gate.busy, gate.depth) == (16, None, False, 0)
    assert gate.estimate() is None
    assert PriorityGate(initial_estimate=2.5).estimate() == 2.5
    gate.record(3.0)
    gate.record(1.0)
    assert gate.estimate() == 2.0  # median of 1 and 3
    gate.record(-4.0)  # clamped to 0
    assert gate.estimate() == 1.0
    sub = PriorityGate()
    sub.record(0.25)
    sub.record(-1.0)
    assert sub.estimate() == 0.125  # median of 0.25 and 0 (not floored at a second)


def test_estimate_remembers_the_last_twenty_by_default():
    gate = PriorityGate(initial_estimate=9.0)
    gate.record(100.0)
    for _ in range(10):
        gate.record(1.0)
    for _ in range(10):
        gate.record(2.0)
    # 100 has dropped out: the median of ten 1s and ten 2s (with it, 21 values: 2)
    assert gate.estimate() == 1.5
    short = PriorityGate(history=3)
    for s in (5.0, 1.0, 1.0, 9.0):
        short.record(s)
    assert short.estimate() == 1.0


def test_expected_wait():
    clock = Clock(100.0)
    gate = PriorityGate(initial_estimate=4.0, clock=clock)
    assert gate.expected_wait(1.0) == 0.0  # idle

    async def scenario():
        await gate.acquire(1.0, clock.t + 100)
        clock.t += 1.0
        assert gate.expected_wait(5.0) == pytest.approx(3.0)
        waiters = [asyncio.ensure_future(gate.acquire(s, clock.t + 100)) for s in (5.0, 2.0)]
        await asyncio.sleep(0)
        assert gate.depth == 2
        # ahead of a stake-5 newcomer: the stake-5 waiter (ties count), not the stake-2 one
        assert gate.expected_wait(5.0) == pytest.approx(3.0 + 4.0)
        assert gate.expected_wait(2.0) == pytest.approx(3.0 + 8.0)
        assert gate.expected_wait(9.0) == pytest.approx(3.0)
        clock.t += 10.0  # overran its estimate: nothing remains of it
        assert gate.expected_wait(9.0) == 0.0
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert gate.depth == 0

    run(scenario())


def test_idle_gate_admits_what_can_finish_exactly_at_its_deadline():
    clock = Clock(10.0)
    gate = PriorityGate(initial_estimate=5.0, clock=clock)

    async def scenario():
        with pytest.raises(Refusal) as info:
            await gate.acquire(1.0, 14.999)
        assert (info.value.status, info.value.reason) == (429, "cannot_finish_in_time")
        assert str(info.value) == ("cannot_finish_in_time: generation takes ~5.0s, "
                                   "timeout is 5.0s")
        assert not gate.busy
        assert await gate.acquire(1.0, 15.0) == 0.0
        assert gate.busy
        gate.release(2.0)
        assert gate.busy is False and gate.estimate() == 2.0

    run(scenario())


def test_idle_gate_with_no_estimate_admits_anything_not_past_due():
    clock = Clock(10.0)
    gate = PriorityGate(clock=clock)

    async def scenario():
        with pytest.raises(Refusal) as info:
            await gate.acquire(1.0, 9.0)
        assert str(info.value) == ("cannot_finish_in_time: generation takes ~0.0s, "
                                   "timeout is 0.0s")
        assert await gate.acquire(1.0, 10.0) == 0.0
        gate.release(None)
        assert gate.estimate() is None  # a generation that never ran is not recorded

    run(scenario())


def test_queue_serves_highest_stake_then_arrival_order_and_reports_wait():
    clock = Clock(0.0)
    gate = PriorityGate(initial_estimate=1.0, clock=clock)
    order = []

    async def waiter(name, stake):
        waited = await gate.acquire(stake, 1000.0)
        order.append((name, waited))

    async def scenario():
        await gate.acquire(0.0, 1000.0)
        tasks = [asyncio.ensure_future(waiter(n, s))
                 for n, s in (("lo", 1.0), ("hi-1", 7.0), ("mid", 3.0), ("hi-2", 7.0))]
        await asyncio.sleep(0)
        assert gate.depth == 4
        for step in range(4):
            clock.t += 2.0
            gate.release(1.0)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert len(order) == step + 1
            assert gate.busy
        gate.release(1.0)
        assert not gate.busy
        await asyncio.gather(*tasks)

    run(scenario())
    assert [name for name, _ in order] == ["hi-1", "hi-2", "mid", "lo"]
    assert [waited for _, waited in order] == [2.0, 4.0, 6.0, 8.0]


def test_full_queue_is_refused():
    """A full queue refuses a request with no more stake than its lowest waiter; one with
    more takes that waiter's place (the waiter gets the 503)."""
    clock = Clock(0.0)
    gate = PriorityGate(max_queue=2, initial_estimate=1.0, clock=clock)

    async def scenario():
        await gate.acquire(1.0, 100.0)
        tasks = [asyncio.ensure_future(gate.acquire(1.0, 100.0)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Refusal) as info:
            await gate.acquire(1.0, 100.0)
        assert (info.value.status, info.value.reason) == (503, "queue_full")
        assert str(info.value) == "queue_full: 2 requests already waiting"
        tasks[0].cancel()
        await asyncio.sleep(0)
        assert gate.depth == 1  # a cancelled waiter frees its place at once
        tasks.append(asyncio.ensure_future(gate.acquire(1.0, 100.0)))
        await asyncio.sleep(0)
        assert gate.depth == 2
        richer = asyncio.ensure_future(gate.acquire(99.0, 100.0))
        await asyncio.sleep(0)
        assert gate.depth == 2  # it took the latest stake-1 waiter's place
        with pytest.raises(Refusal) as displaced:
            await tasks[-1]
        assert (displaced.value.status, displaced.value.reason) == (503, "queue_full")
        for t in (*tasks, richer):
            t.cancel()
        await asyncio.gather(*tasks, richer, return_exceptions=True)

    run(scenario())


def test_busy_gate_refuses_what_cannot_start_in_time():
    clock = Clock(0.0)
    gate = PriorityGate(initial_estimate=4.0, clock=clock)

    async def scenario():
        await gate.acquire(1.0, 100.0)
        clock.t = 1.0  # 3 s remain of the running one, then 4 s of its own: done at 8
        with pytest.raises(Refusal) as info:
            await gate.acquire(1.0, 7.999)
        assert (info.value.status, info.value.reason) == (429, "cannot_start_in_time")
        assert str(info.value) == ("cannot_start_in_time: expected start in 3.0s + ~4.0s "
                                   "generation exceeds the 7.0s timeout")
        task = asyncio.ensure_future(gate.acquire(1.0, 8.0))  # exactly in time: queued
        await asyncio.sleep(0)
        assert gate.depth == 1
        clock.t = 4.0
        gate.release(4.0)
        assert await task == 3.0
        gate.release(4.0)

    run(scenario())


def test_waiter_whose_deadline_passed_is_dropped_before_the_gpu():
    clock = Clock(0.0)
    gate = PriorityGate(initial_estimate=2.0, clock=clock)

    async def scenario():
        await gate.acquire(1.0, 100.0)
        late = asyncio.ensure_future(gate.acquire(9.0, 6.0))
        on_time = asyncio.ensure_future(gate.acquire(1.0, 100.0))
        edge = asyncio.ensure_future(gate.acquire(0.5, 12.0))
        await asyncio.sleep(0)
        clock.t = 5.0  # the run took 5 s; the estimate becomes median(5) = 5
        gate.release(5.0)
        await asyncio.sleep(0)
        with pytest.raises(Refusal) as info:
            await late
        assert (info.value.status, info.value.reason) == (429, "deadline_passed")
        assert str(info.value) == "deadline_passed: could not start before its timeout"
        assert await on_time == 5.0
        clock.t = 7.0
        gate.release(5.0)  # 7 + 5 == 12: starts exactly in time
        assert await edge == 7.0
        gate.release(5.0)
        assert not gate.busy

    run(scenario())


def test_cancelled_waiter_is_skipped_and_a_grant_racing_a_cancel_passes_on():
    clock = Clock(0.0)
    gate = PriorityGate(initial_estimate=1.0, clock=clock)

    async def scenario():
        await gate.acquire(1.0, 100.0)
        first = asyncio.ensure_future(gate.acquire(5.0, 100.0))
        second = asyncio.ensure_future(gate.acquire(1.0, 100.0))
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.sleep(0)
        gate.release(1.0)  # the cancelled waiter is skipped
        assert await second == 0.0
        # grant and cancel in the same loop step: the slot must pass on, not leak
        racer = asyncio.ensure_future(gate.acquire(5.0, 100.0))
        after = asyncio.ensure_future(gate.acquire(1.0, 100.0))
        await asyncio.sleep(0)
        gate.release(1.0)  # grants racer ...
        racer.cancel()  # ... which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await racer
        assert await after == 0.0
        assert gate.busy
        gate.release(1.0)
        assert not gate.busy

    run(scenario())


def test_without_an_estimate_nothing_is_expected_to_wait():
    clock = Clock(0.0)
    gate = PriorityGate(clock=clock)

    async def scenario():
        await gate.acquire(1.0, 100.0)
        assert gate.expected_wait(1.0) == 0.0  # busy, but no duration known yet
        task = asyncio.ensure_future(gate.acquire(1.0, 0.5))  # 0.5 s left is enough
        await asyncio.sleep(0)
        assert gate.depth == 1
        gate.release(None)
        assert await task == 0.0
        gate.release(None)
        assert gate.busy is False

    run(scenario())


def test_equal_stakes_are_served_in_arrival_order():
    clock = Clock(0.0)
    gate = PriorityGate(initial_estimate=1.0, clock=clock)
    order = []

    async def waiter(name):
        await gate.acquire(2.0, 1000.0)
        order.append(name)

    async def scenario():
        await gate.acquire(2.0, 1000.0)
        tasks = [asyncio.ensure_future(waiter(n)) for n in "abcde"]
        await asyncio.sleep(0)
        for _ in range(5):
            gate.release(1.0)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        gate.release(1.0)
        await asyncio.gather(*tasks)

    run(scenario())
    assert order == list("abcde")


def test_cannot_start_message_with_under_a_second_left():
    clock = Clock(0.0)
    gate = PriorityGate(initial_estimate=0.2, clock=clock)

    async def scenario():
        await gate.acquire(1.0, 100.0)
        with pytest.raises(Refusal) as info:
            await gate.acquire(1.0, 0.3)  # 0.2 s remaining + 0.2 s of its own > 0.3 s
        assert str(info.value) == ("cannot_start_in_time: expected start in 0.2s + ~0.2s "
                                   "generation exceeds the 0.3s timeout")
        clock.t = 1.0
        with pytest.raises(Refusal) as info:
            await gate.acquire(1.0, 0.5)  # already past its deadline
        assert str(info.value).endswith("exceeds the 0.0s timeout")
        gate.release(0.2)

    run(scenario())


def test_a_refused_waiter_cancelled_in_the_same_step_does_not_release_the_slot():
    """release() refuses B (deadline passed) and grants C; B's task is cancelled before it
    runs. B never held the slot, so handling its cancellation must not pass the slot on."""
    clock = Clock(0.0)
    gate = PriorityGate(initial_estimate=2.0, clock=clock)

    async def scenario():
        await gate.acquire(1.0, 100.0)
        b = asyncio.ensure_future(gate.acquire(9.0, 6.0))
        c = asyncio.ensure_future(gate.acquire(1.0, 100.0))
        d = asyncio.ensure_future(gate.acquire(0.5, 100.0))
        await asyncio.sleep(0)
        clock.t = 5.0
        gate.release(5.0)  # estimate 5: B cannot start by 6, C is granted
        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await b
        assert await c == 5.0
        assert gate.busy is True and gate.depth == 1  # C runs, D still waits
        assert not d.done()
        gate.release(1.0)
        assert await d == 5.0  # waited from t=0 to t=5 (the clock did not move since)
        gate.release(1.0)

    run(scenario())


def test_gate_with_two_slots_runs_two_and_estimates_per_slot():
    t = [100.0]
    gate = PriorityGate(max_queue=4, initial_estimate=4.0, slots=2, clock=lambda: t[0])
    assert gate.slots == 2 and PriorityGate().slots == 1
    with pytest.raises(ValueError, match=r"^a gate needs at least one slot$"):
        PriorityGate(slots=0)

    async def main():
        assert await gate.acquire(1.0, 200.0) == 0.0
        assert gate.running == 1 and not gate.busy and gate.expected_wait(1.0) == 0.0
        t[0] = 101.0
        assert await gate.acquire(1.0, 200.0) == 0.0
        assert gate.running == 2 and gate.busy
        # the oldest started at 100 with a 4 s estimate: 3 s left at 101
        assert gate.expected_wait(1.0) == 3.0
        waiters = [asyncio.ensure_future(gate.acquire(5.0, 200.0)) for _ in range(3)]
        await asyncio.sleep(0)
        assert gate.depth == 3
        # three ahead with stake >= 5 over two slots freeing at +3 and +4 s: they start
        # at +3, +4 and +7 (4 s each), so the next slot frees at +8
        assert gate.expected_wait(5.0) == 8.0
        gate.release(2.0)  # one slot frees: one waiter starts, still two running
        await asyncio.sleep(0)
        assert gate.running == 2 and gate.depth == 2 and gate.estimate() == 2.0
        # the oldest running now started at 101 (the one at 100 finished)
        t[0] = 102.0
        assert gate.expected_wait(9.0) == 1.0
        gate.release(None)
        gate.release(None)
        await asyncio.sleep(0)
        assert gate.running == 2 and gate.depth == 0
        gate.release(None)
        gate.release(None)
        assert gate.running == 0 and not gate.busy
        gate.release(None)  # an extra release never goes negative
        assert gate.running == 0
        await asyncio.gather(*waiters)

    asyncio.run(main())
