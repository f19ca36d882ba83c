"""The stake-priority queue: unit tests on a hand-driven clock, then the same over HTTP."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
from miner_support import (
    NETUID,
    StubEngine,
    make_request,
    module_net,
    running_miner,
    signed_post,
)

from niche.miner.limits import PriorityGate, RateLimiter, Refusal, Work
from niche.miner.service import MinerConfig, MinerService
from niche.protocol import ErrorResponse


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_gate_serves_highest_stake_first():
    async def scenario():
        clock = Clock()
        gate = PriorityGate(max_queue=8, clock=clock)
        order: list[str] = []
        assert await gate.acquire(1.0, clock.t + 100) == 0.0  # runs at once

        async def wait(name, stake):
            await gate.acquire(stake, clock.t + 100)
            order.append(name)
            gate.release(1.0)

        tasks = [asyncio.create_task(wait(n, s))
                 for n, s in (("lo", 1), ("hi", 100), ("mid", 50), ("hi2", 100))]
        await asyncio.sleep(0)
        assert gate.depth == 4 and gate.busy
        gate.release(1.0)
        await asyncio.gather(*tasks)
        assert order == ["hi", "hi2", "mid", "lo"]  # stake, then arrival
        assert not gate.busy and gate.depth == 0

    asyncio.run(scenario())


def test_gate_refuses_what_cannot_finish_in_time_and_when_full():
    async def scenario():
        clock = Clock()
        gate = PriorityGate(max_queue=1, clock=clock)
        gate.record(4.0)  # generations take ~4 s
        with pytest.raises(Refusal) as exc:
            await gate.acquire(10, clock.t + 3)  # idle, but 4 s > 3 s timeout
        assert exc.value.status == 429 and exc.value.reason == "cannot_finish_in_time"
        await gate.acquire(10, clock.t + 30)  # running now
        clock.t += 1  # ~3 s left on the running one
        with pytest.raises(Refusal) as exc:
            await gate.acquire(10, clock.t + 6.5)  # 3 s wait + 4 s run > 6.5 s
        assert exc.value.reason == "cannot_start_in_time"
        waiter = asyncio.create_task(gate.acquire(10, clock.t + 7.5))  # 7 s fits
        await asyncio.sleep(0)
        assert gate.depth == 1
        with pytest.raises(Refusal) as exc:
            await gate.acquire(10, clock.t + 100)
        assert exc.value.status == 503 and exc.value.reason == "queue_full"
        # a higher stake arriving later waits only for the running job: admitted
        clock.t += 2.5
        gate.max_queue = 2
        hi = asyncio.create_task(gate.acquire(1000, clock.t + 100))
        await asyncio.sleep(0)
        gate.release(4.0)
        await hi
        clock.t += 4  # hi ran 4 s: the waiter can no longer finish by its deadline
        with pytest.raises(Refusal) as exc:
            gate.release(4.0)
            await waiter
        assert exc.value.reason == "deadline_passed"
        assert not gate.busy

    asyncio.run(scenario())


def test_cancelled_waiter_does_not_leak_the_slot():
    async def scenario():
        clock = Clock()
        gate = PriorityGate(clock=clock)
        await gate.acquire(1, clock.t + 100)
        waiter = asyncio.create_task(gate.acquire(5, clock.t + 100))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        gate.release(1.0)
        assert not gate.busy and gate.depth == 0
        await asyncio.wait_for(gate.acquire(1, clock.t + 100), 1)

    asyncio.run(scenario())


def test_rate_limiter_token_bucket_and_stake_share():
    clock = Clock()
    limiter = RateLimiter(60, burst=2, clock=clock)  # 1 per second, bucket of 2
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]
    assert limiter.allow("b")
    clock.t += 1.0
    assert limiter.allow("a") and not limiter.allow("a")
    share = RateLimiter(120, stake_proportional=True, clock=clock)
    assert share.rate_for(0.5) == 60 and share.rate_for(0.0) == 1.0
    assert RateLimiter(0).allow("x")  # disabled


net = module_net("queuenet")


def test_busy_gpu_serves_biggest_stake_first_over_http(net):
    """One generation holds the GPU; lo, mid, hi arrive in that order; hi runs first."""
    engine = StubEngine()
    with running_miner(net, engine) as m:
        engine.hold()
        results: dict[str, int] = {}

        def send(name: str, prompt: str) -> None:
            resp = signed_post(m, net.wallets[name], make_request(prompt).model_dump_json(
                exclude_none=True).encode())
            results[prompt] = resp.status_code

        threads = [threading.Thread(target=send, args=("hi", "first"))]
        threads[0].start()
        assert engine.running.wait(10)
        for name in ("lo", "mid", "hi"):
            t = threading.Thread(target=send, args=(name, f"by-{name}"))
            t.start()
            threads.append(t)
            deadline = time.monotonic() + 10
            while m.service.gate.depth < len(threads) - 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert m.service.gate.depth == 3
        engine.release()
        for t in threads:
            t.join(20)
    assert engine.calls == ["first", "by-hi", "by-mid", "by-lo"]
    assert set(results.values()) == {200}


def test_request_that_cannot_start_in_time_is_refused_at_once(net):
    engine = StubEngine()
    with running_miner(net, engine) as m:
        p = engine.resolve(make_request().params)  # recent ones of this work took 60 s:
        m.service.gate.record(60.0, Work.of(p.model, p.width, p.height, p.steps,
                                            p.pipeline.value))  # a 20 s request: no
        engine.hold()
        holder = threading.Thread(target=signed_post, args=(
            m, net.wallets["hi"], make_request("long", timeout=300.0).model_dump_json().encode()))
        holder.start()
        assert engine.running.wait(10)
        started = time.monotonic()
        resp = signed_post(m, net.wallets["hi"],
                           make_request(timeout=20.0).model_dump_json().encode())
        took = time.monotonic() - started
        # answered while the first generation still holds the engine: it never queued
        queued, calls = m.service.gate.depth, list(engine.calls)
        engine.release()
        holder.join(20)
    assert resp.status_code == 429, resp.text
    assert ErrorResponse.model_validate(resp.json()).reason == "cannot_start_in_time"
    assert queued == 0 and calls == ["long"]
    assert took < 20.0  # not after waiting out its own timeout (a bound no load can break)


def test_a_cancelled_generate_holds_the_gpu_until_its_work_ends(net):
    """A handler cancelled mid-generation (a server shutdown, a client gone) frees its gate
    slot when the GPU is done with the work, not before: the next request must not start
    beside a generation that is still running."""
    engine = StubEngine()
    service = MinerService(engine, net.wallets["miner"],
                           MinerConfig(netuid=NETUID, requests_per_minute=0), chain=net.chain)

    async def scenario() -> None:
        engine.hold()
        task = asyncio.create_task(service.generate(make_request("held"), None, "caller"))
        while not engine.running.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert service.gate.busy  # the GPU is still generating
        engine.release()
        for _ in range(400):
            if not service.gate.busy:
                break
            await asyncio.sleep(0.005)
        assert not service.gate.busy
        answer = await asyncio.wait_for(
            service.generate(make_request("next"), None, "caller"), 10)
        assert answer.response.image_sha256 and engine.calls == ["held", "next"]
        with pytest.raises(Refusal) as failed:  # an engine error: a 500, and the slot freed
            await service.generate(make_request("explode"), None, "caller")
        assert failed.value.status == 500 and failed.value.reason == "generation_failed"
        assert not service.gate.busy

    try:
        asyncio.run(scenario())
    finally:
        service.close()


DEV = Work.of("flux-dev", 1024, 1024, 28)
SCHNELL = Work.of("flux-schnell", 1024, 1024, 4)


def test_a_multi_model_miner_judges_each_request_by_its_own_models_pace():
    """FLUX.1-dev takes 26 s, FLUX.1-schnell 3.7 s on this miner: a schnell challenge with
    a 24 s timeout fits whether the GPU is idle or running a dev generation with 13 s left,
    and is not refused by dev's pace (it was, with one median over every model)."""
    async def scenario():
        clock = Clock()
        gate = PriorityGate(max_queue=4, clock=clock)
        for _ in range(5):
            gate.record(26.0, DEV)
        # schnell never measured yet: admitted (its pace is learnt from this one)
        assert await gate.acquire(10, clock.t + 24, SCHNELL) == 0.0
        clock.t += 3.7
        gate.release(3.7, SCHNELL)
        assert gate.estimate(SCHNELL) == pytest.approx(3.7)
        assert gate.estimate(DEV) == pytest.approx(26.0)
        # idle: admitted at once
        assert await gate.acquire(10, clock.t + 24, SCHNELL) == 0.0
        clock.t += 3.7
        gate.release(3.7, SCHNELL)
        # a dev generation running, 13 s left: 13 + 3.7 fits in 24
        assert await gate.acquire(10, clock.t + 600, DEV) == 0.0
        clock.t += 13.0
        waiter = asyncio.create_task(gate.acquire(10, clock.t + 24, SCHNELL))
        await asyncio.sleep(0)
        assert gate.depth == 1 and gate.expected_wait(10) == pytest.approx(13.0 + 3.7)
        # a dev request behind them with the same 24 s does not fit: refused at once
        with pytest.raises(Refusal) as refused:
            await gate.acquire(10, clock.t + 24, DEV)
        assert refused.value.reason == "cannot_start_in_time"
        clock.t += 13.0
        gate.release(26.0, DEV)
        assert await waiter > 0

    asyncio.run(scenario())


def test_the_pace_scales_with_the_requests_work():
    """Seconds per pixel-step: a 512x512 request of a model measured at 1024x1024 is
    expected to take a quarter of the time."""
    gate = PriorityGate()
    gate.record(8.0, Work.of("kolors", 1024, 1024, 30))
    assert gate.estimate(Work.of("kolors", 512, 512, 30)) == pytest.approx(2.0)
    assert gate.estimate(Work.of("kolors", 1024, 1024, 15)) == pytest.approx(4.0)
    assert gate.estimate(Work.of("flux-dev", 1024, 1024, 28)) is None  # never measured
