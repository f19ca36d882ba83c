"""The miner's queue against hostile or careless callers (real HTTP on 127.0.0.1): stake
priority holds when the queue is full, a waiter leaves at its own deadline, a caller that
disconnected never reaches the GPU, and /healthz tells a hung engine from a busy one."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from bittensor import http_auth
from miner_support import StubEngine, make_request, module_net, running_miner, signed_post

from niche.miner.limits import PriorityGate, Refusal
from niche.protocol import ErrorResponse

net = module_net("hostilequeuenet")


def _one_line_error(resp: httpx.Response) -> ErrorResponse:
    assert "\n" not in resp.text, resp.text
    return ErrorResponse.model_validate_json(resp.text)


async def _post(m, wallet, prompt: str, *, timeout: float, client_timeout: float = 60):
    body = make_request(prompt, timeout=timeout).model_dump_json(exclude_none=True).encode()
    headers = http_auth.sign(wallet, method="POST", path="/v1/generate", body=body,
                             receiver_ss58=m.hotkey)
    async with httpx.AsyncClient(timeout=client_timeout) as client:
        return await client.post(m.url + "/v1/generate", content=body,
                                 headers={**headers, "Content-Type": "application/json"})


async def _until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def _hold_one(m, wallet, engine: StubEngine, prompt: str = "running", timeout: float = 60
              ) -> threading.Thread:
    """A generation that runs (held by the engine) until engine.release()."""
    engine.hold()
    first = threading.Thread(target=signed_post, args=(
        m, wallet, make_request(prompt, timeout=timeout).model_dump_json().encode()))
    first.start()
    assert engine.running.wait(10)
    return first


def test_a_full_queue_gives_a_higher_stake_request_the_lowest_waiters_place(net):
    engine = StubEngine()
    with running_miner(net, engine, max_queue=2) as m:
        async def scenario():
            engine.hold()
            lo = net.wallets["lo"]
            flood = [asyncio.create_task(_post(m, lo, f"lo{i}", timeout=600)) for i in range(3)]
            await _until(lambda: m.service.gate.running == 1 and m.service.gate.depth == 2)
            hi = asyncio.create_task(_post(m, net.wallets["hi"], "hi", timeout=600))
            await _until(lambda: any(t.done() for t in flood))
            engine.release()
            return await hi, await asyncio.gather(*flood)

        hi, flood = asyncio.run(scenario())
        assert hi.status_code == 200, hi.text
        displaced = [r for r in flood if r.status_code != 200]
        assert len(displaced) == 1 and displaced[0].status_code == 503
        assert _one_line_error(displaced[0]).reason == "queue_full"
        assert engine.calls[-1] != "hi" and "hi" in engine.calls  # ahead of the last lo


def test_the_gate_displaces_only_for_more_stake_and_the_latest_lowest_first():
    async def scenario():
        gate = PriorityGate(max_queue=2)
        far = time.monotonic() + 600
        await gate.acquire(1.0, far)
        first = asyncio.ensure_future(gate.acquire(5.0, far))
        second = asyncio.ensure_future(gate.acquire(5.0, far))
        await asyncio.sleep(0)
        for stake in (1.0, 5.0):  # less, or as much: refused, nobody displaced
            with pytest.raises(Refusal) as info:
                await gate.acquire(stake, far)
            assert (info.value.status, info.value.reason) == (503, "queue_full")
        third = asyncio.ensure_future(gate.acquire(9.0, far))
        await asyncio.wait([second], timeout=1)
        assert second.done() and not first.done() and gate.depth == 2
        with pytest.raises(Refusal) as info:
            second.result()
        assert (info.value.status, info.value.reason) == (503, "queue_full")
        gate.release(1.0)
        await third  # the newcomer with more stake goes first
        gate.release(1.0)
        await first
        gate.release(1.0)
        assert not gate.busy and gate.depth == 0

    asyncio.run(scenario())


def test_a_waiter_leaves_the_queue_at_its_own_deadline():
    async def scenario():
        gate = PriorityGate()
        await gate.acquire(1.0, time.monotonic() + 600)  # runs, and is never released
        started = time.monotonic()
        with pytest.raises(Refusal) as info:
            await gate.acquire(1.0, started + 0.3)
        assert (info.value.status, info.value.reason) == (429, "deadline_passed")
        assert 0.25 < time.monotonic() - started < 2.0
        assert gate.depth == 0

    asyncio.run(scenario())


def test_a_queued_request_is_answered_at_its_timeout_not_when_the_gpu_frees(net):
    engine = StubEngine()
    with running_miner(net, engine) as m:
        first = _hold_one(m, net.wallets["hi"], engine)
        try:
            started = time.monotonic()
            resp = signed_post(m, net.wallets["mid"],
                               make_request("short", timeout=1.5).model_dump_json().encode())
            took = time.monotonic() - started
        finally:
            engine.release()
            first.join()
        assert resp.status_code == 429 and _one_line_error(resp).reason == "deadline_passed"
        assert took < 5, f"a 1.5 s request was answered after {took:.1f}s"
        assert "short" not in engine.calls


def test_healthz_reports_a_generation_stuck_far_past_its_timeout(net):
    engine = StubEngine()
    with running_miner(net, engine, stuck_after=0.5) as m:
        assert httpx.get(m.url + "/healthz").json()["ok"] is True
        first = _hold_one(m, net.wallets["hi"], engine, "hung", timeout=1.0)
        try:
            time.sleep(2.0)  # 1 s timeout + 0.5 s grace, passed
            health = httpx.get(m.url + "/healthz")
        finally:
            engine.release()
            first.join()
        assert health.status_code == 503, health.text
        body = health.json()
        assert body["ok"] is False and "past its request's timeout" in body["reason"]
        assert "\n" not in body["reason"]
        assert httpx.get(m.url + "/healthz").json()["ok"] is True  # it finished: healthy


def test_a_waiter_whose_caller_disconnected_never_reaches_the_gpu(net):
    engine = StubEngine()
    with running_miner(net, engine) as m:
        first = _hold_one(m, net.wallets["hi"], engine)
        try:
            with pytest.raises(httpx.TimeoutException):  # queued; the caller gives up
                asyncio.run(_post(m, net.wallets["mid"], "abandoned", timeout=600,
                                  client_timeout=1.0))
            deadline = time.monotonic() + 5
            while m.service.gate.depth and time.monotonic() < deadline:
                time.sleep(0.02)
            assert m.service.gate.depth == 0  # it left the queue at once
        finally:
            engine.release()
            first.join()
        time.sleep(0.5)
        assert "abandoned" not in engine.calls, engine.calls
        assert signed_post(m, net.wallets["mid"], make_request("next").model_dump_json(
            ).encode()).status_code == 200
