"""A miner's states for one audit come out of one budget (`AuditConfig.fetch_timeout`).

Each audited answer's fetch used to get the whole timeout from the moment it got a fetch
slot, so a miner sending its honest states just before each deadline passed every audit
while stretching the round by a timeout per answer (and, past the organic queue's age
limit, made the validator skip users' answers unaudited). A miner's fetches now run one
after another on one budget: the slow miner's last answers are `unavailable` (its own
fault), the round waits at most one budget for it, and the other miners' audits go on
beside it."""
from __future__ import annotations

import asyncio
import time

import numpy as np
from audit_support import PeakFetches
from fastapi import FastAPI, Request
from fastapi.responses import Response

from niche.chain.wallets import create_wallet
from niche.devnet.servers import BackgroundServer
from niche.protocol import GenerateResponse, GenerationParams, StateBlob, StatesResponse
from niche.states import commit, encode_state
from niche.validator.audit import AuditConfig, Auditor
from niche.validator.challenges import Challenge
from niche.validator.client import MinerClient, MinerTarget, QueryResult, QueryStatus
from niche.validator.steps import StepChecker
from niche.validator.verify import Verifier

BUDGET, HOLD = 2.5, 1.0
"""The slow miner takes HOLD seconds per states request: two answers fit the budget."""


def _states_server(states, hold: float) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/states")
    async def serve(request: Request):
        body = await request.json()
        await asyncio.sleep(hold)
        blobs = [StateBlob(index=i, data=encode_state(states[i - 1]))
                 for i in body["indices"]]
        return Response(StatesResponse(request_id=body["request_id"], states=blobs)
                        .model_dump_json(), media_type="application/json")

    return app


def test_a_slow_miner_spends_one_budget_and_the_others_are_audited_beside_it(tiny_engine,
                                                                             tmp_path):
    params = tiny_engine.resolve(GenerationParams(model="flux-schnell", prompt="a cat",
                                                  seed=5, steps=4, width=64, height=64))
    image, states = tiny_engine.generate_with_states(params)
    commitment = commit(states, "float32")

    def answered(uid: int, hotkey: str, n: int) -> tuple[Challenge, QueryResult]:
        request_id = f"{hotkey}-answer-{n:04d}"
        response = GenerateResponse(request_id=request_id, model="flux-schnell", image="",
                                    image_sha256="0" * 64, miner_hotkey=hotkey,
                                    signature="00", generation_seconds=0.1,
                                    miner_version="x", states=commitment)
        return (Challenge(uid, hotkey, request_id, params, 30.0),
                QueryResult(uid, hotkey, QueryStatus.OK, latency=0.1, response=response,
                            image=image))

    auditor = Auditor(tiny_engine, Verifier(tiny_engine), StepChecker(tiny_engine),
                      MinerClient(create_wallet("v", "hot", tmp_path)),
                      AuditConfig(fetch_timeout=BUDGET, parallel_fetches=4))
    with BackgroundServer(_states_server(states, HOLD)) as slow, \
            BackgroundServer(_states_server(states, 0.0)) as fast:
        items = [(*answered(1, "slow", n), MinerTarget(1, "slow", slow.url))
                 for n in range(3)]
        items += [(*answered(2, "fast", n), MinerTarget(2, "fast", fast.url))
                  for n in range(3)]
        started = time.monotonic()
        results = asyncio.run(auditor.audit(items, np.random.default_rng(1)))
        elapsed = time.monotonic() - started
    slow_verdicts = [r.verdict for r in results[:3]]
    assert slow_verdicts == ["passed", "passed", "unavailable"], [r.reason for r in results]
    assert "used the round's" in results[2].reason or "not sent within" in results[2].reason
    assert [r.verdict for r in results[3:]] == ["passed"] * 3, [r.reason for r in results]
    # the three slow fetches would have taken 3 x HOLD, each within its own old deadline
    assert elapsed < BUDGET + 4.0, f"the audit took {elapsed:.1f}s"  # the checks: ~1 s


def test_fetches_of_several_miners_overlap_up_to_parallel_fetches(tiny_engine, tmp_path):
    """Memory at 1024x1024: at most `parallel_fetches` answers have their states fetched or
    waiting for their check at once, across miners; each miner's own fetches in turn."""
    params = tiny_engine.resolve(GenerationParams(model="flux-schnell", prompt="a fox",
                                                  seed=6, steps=4, width=64, height=64))
    image, states = tiny_engine.generate_with_states(params)
    commitment = commit(states, "float32")

    client = PeakFetches(create_wallet("v", "hot", tmp_path))
    auditor = Auditor(tiny_engine, Verifier(tiny_engine), StepChecker(tiny_engine),
                      client,
                      AuditConfig(parallel_fetches=2))
    servers = [BackgroundServer(_states_server(states, 0.2)).start() for _ in range(4)]
    try:
        items = []
        for uid, server in enumerate(servers):
            hotkey = f"miner{uid}"
            for n in range(2):
                request_id = f"{hotkey}-answer-{n:04d}"
                response = GenerateResponse(
                    request_id=request_id, model="flux-schnell", image="",
                    image_sha256="0" * 64, miner_hotkey=hotkey, signature="00",
                    generation_seconds=0.1, miner_version="x", states=commitment)
                items.append((Challenge(uid, hotkey, request_id, params, 30.0),
                              QueryResult(uid, hotkey, QueryStatus.OK, latency=0.1,
                                          response=response, image=image),
                              MinerTarget(uid, hotkey, server.url)))
        results = asyncio.run(auditor.audit(items, np.random.default_rng(2)))
    finally:
        for server in servers:
            server.stop()
    assert [r.verdict for r in results] == ["passed"] * 8, [r.reason for r in results]
    assert client.peak == 2


def test_answers_the_audit_reaches_after_the_states_keep_time_are_unaudited(tiny_engine,
                                                                            tmp_path):
    """Miners keep states 600 s; a validator whose audit runs longer (many answers, a slow
    GPU) would fetch a 404 and count it against an honest miner. What it reaches too late
    is its own failure: unaudited, no penalty."""
    params = tiny_engine.resolve(GenerationParams(model="flux-schnell", prompt="a cat",
                                                  seed=7, steps=4, width=64, height=64))
    image, states = tiny_engine.generate_with_states(params)
    commitment = commit(states, "float32")
    auditor = Auditor(tiny_engine, Verifier(tiny_engine), StepChecker(tiny_engine),
                      MinerClient(create_wallet("v", "hot", tmp_path)),
                      AuditConfig(states_kept=0.9))
    with BackgroundServer(_states_server(states, 0.5)) as server:
        items = []
        for n in range(3):
            request_id = f"kept-answer-{n:04d}"
            response = GenerateResponse(request_id=request_id, model="flux-schnell",
                                        image="", image_sha256="0" * 64, miner_hotkey="m",
                                        signature="00", generation_seconds=0.1,
                                        miner_version="x", states=commitment)
            items.append((Challenge(1, "m", request_id, params, 30.0),
                          QueryResult(1, "m", QueryStatus.OK, latency=0.1, response=response,
                                      image=image), MinerTarget(1, "m", server.url)))
        results = asyncio.run(auditor.audit(items, np.random.default_rng(3)))
    assert [r.verdict for r in results] == ["passed", "passed", "unaudited"], \
        [r.reason for r in results]
    assert "states keep time" in results[2].reason
