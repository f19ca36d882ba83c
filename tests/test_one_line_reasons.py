"""A peer's words reach the validator's reasons (and so its logs) on one line.

A miner controls the keys of its JSON, its claimed hotkey and its error details. Written
as they are, a newline in any of them would start a forged line in the validator's log
("uid 7 audit passed"). Every reason of a query, an info call and a states fetch is stored
with its control characters escaped, and pydantic's multi-line dumps never reach them."""
from __future__ import annotations

import asyncio
import json
import struct

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from niche.auth import sign_response
from niche.chain.wallets import create_wallet
from niche.devnet.servers import BackgroundServer
from niche.errors import one_line
from niche.imaging import encode_image, image_sha256
from niche.protocol import GenerateResponse, StatesCommitment
from niche.validator.client import MinerClient, QueryResult, QueryStatus, StatesFetch
from niche.wire import ANSWER_MAGIC, ANSWER_MEDIA_TYPE, STATES_MAGIC, STATES_MEDIA_TYPE
from tests.miner_support import make_request

FORGED = "x\n2026-12-07 00:00:00 INFO niche.validator uid 7 audit passed"
PNG = encode_image(Image.new("RGB", (32, 32), (1, 2, 3)))


def test_one_line_escapes_control_characters_only():
    assert one_line("a\nb\r\tc\x1b[31m\x00\u2028\u2029") == \
        "a\\nb\\r\\tc\\x1b[31m\\x00\\u2028\\u2029"
    assert one_line("plain text, ünïcödé and 画像") == "plain text, ünïcödé and 画像"
    assert one_line("") == ""


def test_results_store_every_reason_on_one_line():
    for result in (QueryResult(0, "hk", QueryStatus.ERROR, reason=FORGED), StatesFetch({})):
        result.reason = FORGED
        assert "\n" not in result.reason and "\\n2026" in result.reason


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("one-line")
    return create_wallet("v", "hot", root), create_wallet("m", "hot", root)


def _answer(miner, request_id: str, **update) -> dict:
    digest = image_sha256(PNG)
    answer = GenerateResponse(protocol_version=4, request_id=request_id, model="stub",
                              image="", image_sha256=digest,
                              miner_hotkey=miner.hotkey.ss58_address, generation_seconds=0.1,
                              miner_version="x",
                              signature=sign_response(miner.hotkey, request_id, digest,
                                                      version=4))
    return {**answer.model_dump(mode="json"), **update}


def _binary(answer: dict, **extra) -> bytes:
    header = json.dumps({"image_format": "png", "image_length": len(PNG), "answer": answer,
                         **extra}).encode()
    return ANSWER_MAGIC + struct.pack(">I", len(header)) + header + PNG


ANSWERS = {
    "a key of the binary header": lambda m, rid: (
        _binary(_answer(m, rid), **{FORGED: 1}), ANSWER_MEDIA_TYPE),
    "a key of a JSON answer": lambda m, rid: (
        json.dumps({**_answer(m, rid), "image": "AAAA", FORGED: 1}).encode(),
        "application/json"),
    "the claimed hotkey": lambda m, rid: (
        _binary(_answer(m, rid, miner_hotkey=FORGED)), ANSWER_MEDIA_TYPE),
}


@pytest.mark.parametrize("where", ANSWERS)
def test_a_hostile_answer_is_refused_on_one_line(keys, where):
    validator, miner = keys
    request = make_request(width=32, height=32).model_copy(update={"protocol_version": 4})
    body, media = ANSWERS[where](miner, request.request_id)
    result = QueryResult(0, miner.hotkey.ss58_address, QueryStatus.ERROR)
    MinerClient(validator)._check_answer(result, request, body, media)
    assert result.status in (QueryStatus.INVALID_RESPONSE, QueryStatus.WRONG_HOTKEY)
    assert "\n" not in result.reason and "\\n2026" in result.reason, result.reason


def _hostile_miner() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/info")
    async def info():
        return JSONResponse({"hotkey": 1, "models": "all of them"})

    @app.post("/v1/states")
    async def states(request: Request):
        header = json.dumps({"protocol_version": 4, "request_id": "r" * 8, "states": [],
                             FORGED: 1}).encode()
        return Response(STATES_MAGIC + struct.pack(">I", len(header)) + header,
                        media_type=STATES_MEDIA_TYPE)

    @app.post("/v1/generate")
    async def generate(request: Request):
        return JSONResponse({"reason": "busy", "detail": FORGED}, status_code=503)

    return app


def test_info_states_and_errors_of_a_hostile_miner_read_on_one_line(keys):
    validator, miner = keys
    client = MinerClient(validator)
    commitment = StatesCommitment(shape=[4], sha256=["0" * 64], compute_dtype="float32")
    with BackgroundServer(_hostile_miner()) as server:
        target = (0, miner.hotkey.ss58_address, server.url)

        async def ask():
            return (await client.info(server.url, miner.hotkey.ss58_address),
                    await client.fetch_states(target, "r" * 8, commitment, [1], timeout=5),
                    await client.query(target, make_request(width=32, height=32), timeout=5))
        info, fetch, query = asyncio.run(ask())
    assert info.status is QueryStatus.INVALID_RESPONSE
    assert info.reason.startswith("hotkey: ") and "(+" in info.reason  # pydantic's first error
    assert not fetch.ok and "\\n2026" in fetch.reason
    assert query.status is QueryStatus.HTTP_ERROR and "\\n2026" in query.reason
    for reason in (info.reason, fetch.reason, query.reason):
        assert "\n" not in reason, reason
