"""Bad answers from miners: each is scored zero with its reason recorded, none raises, and
none stalls the round past its deadline. The hostile miners are real HTTP servers on
127.0.0.1 (FastAPI under uvicorn) that answer the validator's signed requests badly."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from PIL import Image

from niche.auth import sign_response
from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.devnet.servers import BackgroundServer
from niche.protocol import PROTOCOL_VERSION, InfoResponse, ModelInfo, PipelineKind
from niche.validator.client import MinerClient
from niche.validator.service import Validator, ValidatorConfig
from niche.validator.state import ValidatorState

NETUID = 2
# The instant hostile answers must land inside the deadline even on a starved 2-core box (a
# 1 s deadline measured a 32x32 PNG at 1.6 s under load), so the deadline is generous; the
# slow miner sleeps far past it, so "the round did not wait for it" stays a sharp claim.
TIMEOUT = 8.0
SLOW_SLEEP = 90.0


def png(size, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def hostile_app(behaviour: str, wallet, release: threading.Event) -> FastAPI:
    """`release`: set by the test once the round is over, so the slow miner's sleep ends and
    its server stops at once instead of after SLOW_SLEEP."""
    app = FastAPI()
    hotkey = wallet.hotkey.ss58_address

    @app.get("/v1/info")
    def info():
        return json.loads(InfoResponse(
            hotkey=hotkey, models=[ModelInfo(model="flux-schnell",
                                             pipelines=[PipelineKind.TXT2IMG])],
            capacity_per_minute=60, miner_version="evil").model_dump_json())

    def answer(request_id: str, data: bytes, **override) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        body = dict(protocol_version=PROTOCOL_VERSION, request_id=request_id, model="flux-schnell",
                    image=base64.b64encode(data).decode(), image_sha256=digest,
                    miner_hotkey=hotkey, signature=sign_response(wallet.hotkey, request_id,
                                                                  digest),
                    generation_seconds=0.1, queue_seconds=0.0, miner_version="evil")
        body.update(override)
        return body

    @app.post("/v1/generate")
    async def generate(request: Request):
        rid = json.loads(await request.body())["request_id"]
        if behaviour == "http500":
            return JSONResponse({"reason": "boom"}, status_code=500)
        if behaviour == "notjson":
            return PlainTextResponse("this is not json")
        if behaviour == "protocol":
            return JSONResponse(answer(rid, png((64, 64)), protocol_version=99))
        if behaviour == "badb64":
            return JSONResponse(answer(rid, png((64, 64)), image="@@@not base64@@@"))
        if behaviour == "nonimage":
            return JSONResponse(answer(rid, b"hello, I am not an image"))
        if behaviour == "wrongsize":
            return JSONResponse(answer(rid, png((32, 32))))
        if behaviour == "bomb":
            return JSONResponse(answer(rid, png((10000, 10000), mode="1")))
        if behaviour == "wrongid":
            return JSONResponse(answer("someone-elses-id", png((64, 64))))
        if behaviour == "slow":
            await asyncio.to_thread(release.wait, SLOW_SLEEP)
            return JSONResponse(answer(rid, png((64, 64))))
        if behaviour == "huge":
            return Response(b"{" + b" " * (33 * 1024 * 1024) + b"}",
                            media_type="application/json")
        raise AssertionError(behaviour)

    return app


EXPECTED = {
    "http500": ("http_error", "500"),
    "notjson": ("invalid_response", "not JSON"),
    "protocol": ("protocol_mismatch", "99"),
    "badb64": ("invalid_image", ""),
    "nonimage": ("invalid_image", ""),
    "wrongsize": ("wrong_size", "32x32, expected 64x64"),
    "bomb": ("invalid_image", "bomb"),
    "wrongid": ("wrong_request_id", "someone-elses-id"),
    "slow": ("timeout", ""),
    "huge": ("response_too_large", ""),
}


def test_every_bad_answer_scores_zero_with_a_reason(tmp_path, tiny_engine):
    wallets = {n: create_wallet(n, "hot", tmp_path / "w") for n in ["validator", *EXPECTED]}
    chain = LocalChain(tmp_path / "chain.db", create=True)
    chain.create_subnet(NETUID)
    chain.register(NETUID, wallets["validator"], stake=100.0)
    servers, uids = [], {}
    release = threading.Event()
    try:
        for name in EXPECTED:
            uids[name] = chain.register(NETUID, wallets[name])
            server = BackgroundServer(hostile_app(name, wallets[name], release)).start()
            servers.append(server)
            chain.serve(NETUID, wallets[name], "127.0.0.1", server.port)
        config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), timeout=TIMEOUT,
                                 state_path=tmp_path / "state.db", audit_fraction=1.0,
                                 seed=3, round_interval=0, rounds=1)
        wallet = wallets["validator"]
        state = ValidatorState(config.state_path)
        validator = Validator(config, chain, wallet, tiny_engine, MinerClient(wallet), state)
        started = time.monotonic()
        assert validator.run() == 0  # nothing raised
        elapsed = time.monotonic() - started
    finally:
        release.set()
        for server in servers:
            server.stop()
    (report,) = validator.reports
    table = validator.format_report(report)
    # The slow miner did not hold the round: the round ends at the deadline (timeout + the
    # client's grace) plus checks, far before the slow answer would come.
    deadline = TIMEOUT + MinerClient(wallet).grace
    assert deadline + 30 < SLOW_SLEEP
    assert elapsed < SLOW_SLEEP - 30, table
    by_uid = {o.uid: o for o in report.outcomes}
    for name, (status, reason) in EXPECTED.items():
        o = by_uid[uids[name]]
        assert o.status == status, f"{name}: {o}\n{table}"
        assert reason in o.reason and o.reason, f"{name}: {o.reason}"
        assert report.rewards[o.uid] == 0.0 and not o.audited
    with ValidatorState(config.state_path) as again:
        rows = {r.uid: r for r in again.history(limit=100)}
        assert {rows[uids[n]].status for n in EXPECTED} == {s for s, _ in EXPECTED.values()}
        assert all(rows[uids[n]].reason for n in EXPECTED)
    state.close()
    chain.close()
