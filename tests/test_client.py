"""The validator's client against miners that misbehave in every way we can think of.

A fake miner (a real FastAPI app on 127.0.0.1) answers according to the request's prompt;
by default it answers correctly and signs with a real miner wallet, so each case breaks one
thing only. The client must report a status per miner and never raise.
"""
from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from miner_support import make_request
from PIL import Image

from niche.auth import sign_response
from niche.chain.base import Endpoint, Neuron
from niche.chain.wallets import create_wallet
from niche.devnet.servers import BackgroundServer
from niche.imaging import encode_b64, image_sha256
from niche.protocol import PROTOCOL_VERSION, ErrorResponse, InfoResponse, ModelInfo
from niche.validator.client import MinerClient, MinerTarget, QueryStatus


@pytest.fixture(scope="module")
def wallets(tmp_path_factory):
    root = tmp_path_factory.mktemp("clientwallets")
    return {n: create_wallet(n, "hot", root) for n in ("validator", "miner", "other")}


SLOW_RELEASE = threading.Event()  # the "slow" answer waits for this (set by the test)


def fake_miner_app(miner_wallet, other_wallet) -> FastAPI:
    app = FastAPI()
    hotkey = miner_wallet.hotkey.ss58_address

    @app.get("/v1/info")
    async def info():
        return JSONResponse(InfoResponse(hotkey=hotkey, models=[ModelInfo(
            model="stub", pipelines=["txt2img"])], capacity_per_minute=1,
            miner_version="x").model_dump(mode="json"))

    @app.post("/v1/generate")
    async def generate(request: Request):
        req = json.loads(await request.body())
        how, rid = req["params"]["prompt"], req["request_id"]
        b64, digest = encode_b64(Image.new("RGB", (32, 32), (9, 9, 9)))
        answer = dict(request_id=rid, model=req["params"]["model"], image=b64,
                      image_sha256=digest, miner_hotkey=hotkey,
                      signature=sign_response(miner_wallet.hotkey, rid, digest),
                      generation_seconds=0.1, queue_seconds=0.0, miner_version="x")
        if how == "garbage":
            return Response(b"\x00not json", media_type="application/json")
        if how == "schema":
            answer.pop("image")
        if how == "wrong_sig":
            answer["signature"] = sign_response(other_wallet.hotkey, rid, digest)
        if how == "wrong_hash":
            fake = "0" * 64
            answer["image_sha256"] = fake
            answer["signature"] = sign_response(miner_wallet.hotkey, rid, fake)
        if how == "wrong_id":
            answer["request_id"] = "x" * 16
        if how == "proto":
            answer["protocol_version"] = PROTOCOL_VERSION + 1
        if how == "wrong_hotkey":
            answer["miner_hotkey"] = other_wallet.hotkey.ss58_address
        if how == "wrong_model":
            answer["model"] = "other"
        if how == "bad_image":
            import base64

            data = b"this is not a png at all"
            answer["image"] = base64.b64encode(data).decode()
            answer["image_sha256"] = image_sha256(data)
            answer["signature"] = sign_response(miner_wallet.hotkey, rid, image_sha256(data))
        if how == "huge":
            answer["miner_version"] = "v" * 2_000_000
        if how == "error503":
            return JSONResponse(ErrorResponse(reason="queue_full", detail="busy").model_dump(),
                                status_code=503)
        if how == "gzip":
            return Response(gzip.compress(json.dumps(answer).encode()),
                            media_type="application/json", headers={"Content-Encoding": "gzip"})
        if how == "slow":  # held until the test lets it go (60 s at most)
            await asyncio.to_thread(SLOW_RELEASE.wait, 60)
        return JSONResponse(answer)

    return app


@pytest.fixture(scope="module")
def fake(wallets):
    with BackgroundServer(fake_miner_app(wallets["miner"], wallets["other"])) as server:
        yield server


CASES = {
    "good": QueryStatus.OK,
    "garbage": QueryStatus.INVALID_RESPONSE,
    "schema": QueryStatus.INVALID_RESPONSE,
    "wrong_sig": QueryStatus.BAD_SIGNATURE,
    "wrong_hash": QueryStatus.HASH_MISMATCH,
    "wrong_id": QueryStatus.WRONG_REQUEST_ID,
    "proto": QueryStatus.PROTOCOL_MISMATCH,
    "wrong_hotkey": QueryStatus.WRONG_HOTKEY,
    "wrong_model": QueryStatus.INVALID_RESPONSE,
    "bad_image": QueryStatus.INVALID_IMAGE,
    "huge": QueryStatus.RESPONSE_TOO_LARGE,
    "error503": QueryStatus.HTTP_ERROR,
    "gzip": QueryStatus.INVALID_RESPONSE,
}


def test_every_kind_of_bad_answer_is_a_status_not_an_exception(wallets, fake):
    client = MinerClient(wallets["validator"], max_response_bytes=1_000_000)
    miner = wallets["miner"].hotkey.ss58_address
    pairs = [((uid, miner, fake.url), make_request(how))
             for uid, how in enumerate(CASES)]
    pairs.append(((98, miner, "http://127.0.0.1:9"), make_request("good")))  # closed port
    pairs.append((Neuron(99, miner, "c", 1.0, False, None, 0), make_request("good")))
    results = asyncio.run(client.query_many(pairs))
    got = {how: r.status for how, r in zip(CASES, results, strict=False)}
    assert got == CASES, {k: (v, r.reason) for (k, v), r in zip(got.items(), results, strict=False)}
    assert results[-2].status is QueryStatus.UNREACHABLE
    assert results[-1].status is QueryStatus.NO_ENDPOINT
    good = results[0]
    assert good.image.size == (32, 32) and good.response.request_id == pairs[0][1].request_id
    assert good.latency is not None and 0 < good.latency < pairs[0][1].timeout
    assert [r.uid for r in results] == list(range(len(CASES))) + [98, 99]
    err = results[list(CASES).index("error503")]
    assert err.http_status == 503 and err.error.reason == "queue_full"


def test_timeouts_are_per_miner_and_measured_on_our_clock(wallets, fake):
    client = MinerClient(wallets["validator"])
    miner = wallets["miner"].hotkey.ss58_address
    targets = [MinerTarget(1, miner, fake.url), MinerTarget(2, miner, fake.url)]
    prompts = {1: "slow", 2: "good"}
    deadline = 8.0  # the good answer is instant, but a starved 2-core box may take seconds
    SLOW_RELEASE.clear()
    try:
        started = time.monotonic()
        results = asyncio.run(client.query_many(
            targets, request_factory=lambda t: make_request(prompts[t.uid]), deadline=deadline))
        took = time.monotonic() - started
    finally:
        SLOW_RELEASE.set()
    assert [r.status for r in results] == [QueryStatus.TIMEOUT, QueryStatus.OK]
    # the slow miner answers only when released (after query_many returned, or in 60 s): the
    # client gave up on its own clock, not before the deadline, and was not held by it
    assert results[0].latency >= deadline - 0.05 and took < 30


def test_info_checks_the_hotkey(wallets, fake):
    client = MinerClient(wallets["validator"])
    miner, other = (wallets[n].hotkey.ss58_address for n in ("miner", "other"))
    ok, wrong, none = asyncio.run(client.info_many([
        Neuron(1, miner, "c", 0.0, False, Endpoint("127.0.0.1", fake.port), 0),
        (2, other, fake.url),
        (3, miner, None),
    ]))
    assert ok.ok and ok.info.models[0].model == "stub" and ok.uid == 1
    assert wrong.status is QueryStatus.WRONG_HOTKEY
    assert none.status is QueryStatus.NO_ENDPOINT
    client.close()


def test_a_round_larger_than_the_connection_pool_waits_for_no_connection(tmp_path):
    """A round's requests all go out at once: one waiting for a pooled connection would
    spend its own timeout on other miners' answers (a 256-miner subnet queried whole sends
    1024 requests; the pool's default is 256)."""
    app = FastAPI()

    @app.post("/v1/generate")
    async def slow_refusal():
        await asyncio.sleep(1.0)  # a generation's time, then a refusal: any answer will do
        return JSONResponse({"reason": "busy", "detail": "try later"}, status_code=503)

    client = MinerClient(create_wallet("v", "hot", tmp_path), max_connections=2)
    with BackgroundServer(app) as server:
        targets = [(uid, f"5miner{uid}", server.url) for uid in range(6)]
        results = asyncio.run(client.query_many(
            targets, lambda t: make_request(seed=t.uid).model_copy(update={"timeout": 1.5}),
            deadline=1.8))
    assert [r.status for r in results] == [QueryStatus.HTTP_ERROR] * 6, \
        [r.reason for r in results]
