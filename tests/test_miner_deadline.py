"""A generation whose request's deadline passes stops at the next step's end: its asker
(a validator past timeout + grace, a gateway past the attempt's time) no longer reads the
answer, and the requests queued behind it get the GPU instead of waiting out the rest of a
30-step chain. Real tiny Kolors at its production 30 steps, a real MinerService."""
from __future__ import annotations

import asyncio
import uuid

import pytest
from miner_support import NETUID, module_net

from niche.miner.limits import Refusal
from niche.miner.service import MinerConfig, MinerService
from niche.models.deadline import DeadlinePassed, stop_at
from niche.protocol import GenerateRequest, GenerationParams

net = module_net("deadline")


class JumpingClock:
    """Monotonic time that jumps `jump` seconds once the engine has run `after` steps."""

    def __init__(self, after: int, jump: float) -> None:
        self.t, self.after, self.jump, self.steps = 1000.0, after, jump, 0

    def __call__(self) -> float:
        return self.t

    def step(self) -> None:
        self.steps += 1
        if self.steps == self.after:
            self.t += self.jump


class CountingEngine:
    """The real engine, counting the steps it reports (its `on_state` calls)."""

    def __init__(self, engine, clock: JumpingClock) -> None:
        self.engine, self.clock, self.steps = engine, clock, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate_with_states(self, params, image=None, *, on_state=None):
        def counted(state):
            self.steps += 1
            self.clock.step()
            if on_state is not None:
                on_state(state)
        return self.engine.generate_with_states(params, image, on_state=counted)


def _request(timeout: float) -> GenerateRequest:
    return GenerateRequest(request_id=uuid.uuid4().hex, timeout=timeout,
                           params=GenerationParams(model="kolors", prompt="a red fox", seed=3,
                                                   steps=30, width=64, height=64))


def _serve(net, tiny_engine, clock):
    engine = CountingEngine(tiny_engine, clock)
    service = MinerService(engine, net.wallets["miner"],
                           MinerConfig(netuid=NETUID, requests_per_minute=0),
                           chain=net.chain, clock=clock)
    return engine, service


def test_a_generation_past_its_deadline_stops_at_the_next_step(net, tiny_engine):
    clock = JumpingClock(after=5, jump=60.0)  # 60 s pass during step 5 of 30
    engine, service = _serve(net, tiny_engine, clock)
    try:
        with pytest.raises(Refusal) as refused:
            asyncio.run(service.generate(_request(timeout=20.0), None, "5caller"))
        assert refused.value.status == 504 and refused.value.reason == "deadline_passed"
        assert "after step 5" in refused.value.detail
        assert engine.steps == 5  # not the other 25
        assert not service.gate.busy  # the GPU is free for the next request
        clock.after = 0  # no more jumps: the next request runs its 30 steps and answers
        answer = asyncio.run(service.generate(_request(timeout=20.0), None, "5caller"))
        assert answer.response.states is not None
        assert len(answer.response.states.sha256) == 30 and engine.steps == 35
    finally:
        service.close()


def test_a_generation_within_its_deadline_is_not_stopped(net, tiny_engine):
    clock = JumpingClock(after=29, jump=19.0)  # slow, but still inside its 20 s
    engine, service = _serve(net, tiny_engine, clock)
    try:
        answer = asyncio.run(service.generate(_request(timeout=20.0), None, "5caller"))
        assert len(answer.response.states.sha256) == 30 and engine.steps == 30
    finally:
        service.close()


def test_stop_at_checks_before_handing_the_state_on():
    seen: list[int] = []
    now = [0.0]
    checked = stop_at(10.0, lambda: now[0], seen.append)
    checked(1)
    now[0] = 10.5
    with pytest.raises(DeadlinePassed, match="after step 2"):
        checked(2)
    assert seen == [1]
