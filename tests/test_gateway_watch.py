"""Beaten attempts of miners whose pace the gateway does not know yet are watched, not
cancelled: the answer teaches the miner's pace, silence past its late time cools it down,
and whatever ends such an attempt is judged as the request path judges it.

The router runs against a scripted client (each miner's behaviour over time, no HTTP), as
its own unit; the real-wire case (a hung miner behind a client's short `timeout`) runs the
real gateway and tiny-model miners on 127.0.0.1 in tests/test_gateway_user_edges.py."""
from __future__ import annotations

import asyncio
import time

import pytest

from niche.gateway.directory import Candidate
from niche.gateway.metrics import GatewayMetrics
from niche.gateway.router import Router
from niche.protocol import GenerationParams
from niche.validator.client import MinerTarget, QueryResult, QueryStatus

MODEL = "flux-schnell"
PARAMS = GenerationParams(model=MODEL, prompt="x", seed=1, steps=4, width=64, height=64)


class _Directory:
    def __init__(self, candidates):
        self.candidates = candidates

    def serving(self, model):
        return list(self.candidates)


class _Scripted:
    """The router's client: each hotkey's behaviour(target, request, timeout)."""

    def __init__(self, plan):
        self.plan = plan

    async def query(self, target, request, *, timeout=None, http=None):
        return await self.plan[target.hotkey](target, request, timeout)


def _after(delay, status=QueryStatus.OK, http_status=None):
    async def run(target, request, timeout):
        await asyncio.sleep(delay)
        return QueryResult(target.uid, target.hotkey, status, latency=delay,
                           http_status=http_status, request_id=request.request_id)
    return run


def _hang():
    async def run(target, request, timeout):
        await asyncio.sleep(timeout)
        return QueryResult(target.uid, target.hotkey, QueryStatus.TIMEOUT,
                           request_id=request.request_id)
    return run


def _router(candidates, plan, *, limit=3.0, hedge_after=0.2):
    router = Router(_Directory(candidates), _Scripted(plan), GatewayMetrics(),
                    hedge_after=hedge_after, limit=lambda params: limit)
    router.order = lambda model: list(candidates)  # this draw order
    return router


def _miner(uid, hotkey, concurrency=1):
    return Candidate(MinerTarget(uid, hotkey, None), frozenset({MODEL}), 1.0,
                     concurrency=concurrency)


@pytest.fixture(autouse=True)
def _images_need_no_pixels(monkeypatch):
    import niche.gateway.router as router_module

    monkeypatch.setattr(router_module, "_answer_problem", lambda params, result: "")


def test_a_watched_slower_miner_teaches_its_pace_and_is_not_cooled():
    slow, fast = _miner(1, "5slow"), _miner(2, "5fast")
    router = _router([slow, fast], {"5slow": _after(0.6), "5fast": _after(0.3)})

    async def main():
        delivered = await router.generate(PARAMS, None, time.monotonic() + 10)
        assert delivered.candidate is fast and router._watching
        await asyncio.gather(*router._watching)

    asyncio.run(main())
    assert "5slow" not in router._cooling
    assert router.usual(slow, PARAMS, own=True) == pytest.approx(0.6)


def test_a_watched_miner_that_never_answers_is_cooled_at_its_late_time():
    hung, fast = _miner(1, "5hung"), _miner(2, "5fast")
    router = _router([hung, fast], {"5hung": _hang(), "5fast": _after(0.3)}, limit=2.0)

    async def main():
        # the client's own deadline (1 s) is shorter than the late time (the model's
        # timeout, 2 s here): the attempt still runs to its late time
        await router.generate(PARAMS, None, time.monotonic() + 1.0)
        await asyncio.gather(*router._watching)

    asyncio.run(main())
    assert router.cooling(hung) and router._budgets["5hung"].inflight == 0


def test_a_watched_attempt_refused_for_load_gets_the_short_pause():
    busy, fast = _miner(1, "5busy"), _miner(2, "5fast")
    router = _router([busy, fast], {"5busy": _after(0.6, QueryStatus.HTTP_ERROR, 503),
                                    "5fast": _after(0.3)})

    async def main():
        await router.generate(PARAMS, None, time.monotonic() + 10)
        await asyncio.gather(*router._watching)

    asyncio.run(main())
    assert not router.cooling(busy)  # not the 30 s failure cooldown
    assert router._budgets["5busy"].busy_until > time.monotonic()


def test_the_gateways_own_failure_cools_no_miner():
    """Out of file descriptors on the gateway (the client's VALIDATOR_ERROR) says nothing of
    the miner: the image goes to the next miner and the first is not cooled for 30 s."""
    first, second = _miner(1, "5first"), _miner(2, "5second")
    router = _router([first, second], {"5first": _after(0.01, QueryStatus.VALIDATOR_ERROR),
                                       "5second": _after(0.05)})

    async def main():
        return await router.generate(PARAMS, None, time.monotonic() + 10)

    assert asyncio.run(main()).candidate is second
    assert not router.cooling(first)


def test_watching_stays_within_the_hung_miners_slots_and_ends():
    hostile, honest = _miner(1, "5hostile", 4), _miner(2, "5honest", 64)
    router = _router([hostile, honest], {"5hostile": _hang(), "5honest": _after(0.2)},
                     limit=1.0, hedge_after=0.1)
    peak = 0

    async def main():
        nonlocal peak

        async def sample():
            nonlocal peak
            while True:
                peak = max(peak, len(router._watching))
                await asyncio.sleep(0.01)

        sampler = asyncio.ensure_future(sample())
        await asyncio.gather(*(router.generate(PARAMS, None, time.monotonic() + 10)
                               for _ in range(30)))
        await asyncio.gather(*router._watching)
        sampler.cancel()

    asyncio.run(main())
    assert 1 <= peak <= 4 and not router._watching
    assert router._budgets["5hostile"].inflight == 0 and router.cooling(hostile)


def test_no_watcher_outlives_close():
    hung, fast = _miner(1, "5hung"), _miner(2, "5fast")
    router = _router([hung, fast], {"5hung": _hang(), "5fast": _after(0.3)}, limit=5.0)

    async def main():
        search = asyncio.ensure_future(router.generate(PARAMS, None, time.monotonic() + 20))
        await asyncio.sleep(0.1)
        await router.close()  # the gateway stops while a search is in flight
        await search  # it delivers afterwards: its beaten attempt is cancelled, not watched
        await asyncio.sleep(0)
        return len(router._watching), router._budgets["5hung"].inflight

    assert asyncio.run(main()) == (0, 0)
