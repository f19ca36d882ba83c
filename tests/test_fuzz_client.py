"""Fuzzing the validator's client with hostile miners: whatever a miner answers (any status,
any headers, any bytes, a valid answer with one field replaced by anything), `query` and
`info` return a result with a status and never raise, and only a fully valid, signed answer
is OK.

The "miner" is a real FastAPI app on 127.0.0.1 whose next answer each example sets.
"""
from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from miner_support import make_request
from PIL import Image

from niche.auth import sign_response
from niche.chain.wallets import create_wallet
from niche.devnet.servers import BackgroundServer
from niche.imaging import encode_b64
from niche.validator.client import MinerClient, QueryStatus

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=3),
    max_leaves=8)
FIELDS = ["protocol_version", "request_id", "model", "image", "image_sha256", "miner_hotkey",
          "signature", "generation_seconds", "queue_seconds", "miner_version", "extra"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzclient")
    miner, validator = create_wallet("m", "hot", root), create_wallet("v", "hot", root)
    nxt: dict = {}
    app = FastAPI()

    @app.post("/v1/generate")
    async def generate(request: Request):
        req = json.loads(await request.body())
        body = nxt["make"](req)
        return Response(body, status_code=nxt["status"], headers=nxt["headers"],
                        media_type="application/json")

    @app.get("/v1/info")
    async def info():
        return Response(nxt["info"], status_code=nxt["status"], media_type="application/json")

    with BackgroundServer(app) as server:
        yield miner, validator, nxt, server


def _valid_answer(miner, req) -> dict:
    b64, digest = encode_b64(Image.new("RGB", (64, 64), (5, 6, 7)))
    rid = req["request_id"]
    return dict(request_id=rid, model=req["params"]["model"], image=b64, image_sha256=digest,
                miner_hotkey=miner.hotkey.ss58_address,
                signature=sign_response(miner.hotkey, rid, digest), generation_seconds=0.1,
                queue_seconds=0.0, miner_version="x")


answers = st.one_of(
    st.tuples(st.just("bytes"), st.binary(max_size=200)),
    st.tuples(st.just("json"), json_values),
    st.tuples(st.just("mutated"), st.tuples(st.sampled_from(FIELDS), json_values)),
    st.tuples(st.just("valid"), st.none()),
)
statuses = st.sampled_from([200, 200, 200, 400, 404, 413, 429, 500, 503])
headers = st.sampled_from([{}, {"Content-Encoding": "gzip"}, {"Content-Encoding": "br"},
                           {"X-Odd": "1"}])


def test_client_never_raises_and_accepts_only_valid_signed_answers(setup):
    miner, validator, nxt, server = setup
    client = MinerClient(validator, max_response_bytes=200_000)
    target = (1, miner.hotkey.ss58_address, server.url)

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(answers, statuses, headers)
    def check(answer, status, extra_headers):
        kind, payload = answer

        def make(req):
            if kind == "bytes":
                return payload
            if kind == "json":
                return json.dumps(payload).encode()
            data = _valid_answer(miner, req)
            if kind == "mutated":
                data[payload[0]] = payload[1]
            return json.dumps(data).encode()

        nxt.update(make=make, status=status, headers=extra_headers)
        result = asyncio.run(client.query(target, make_request(model="flux-schnell", width=64,
                                                               height=64)))
        assert isinstance(result.status, QueryStatus)
        plain = status == 200 and not extra_headers.get("Content-Encoding")
        if kind == "valid" and plain:
            assert result.status is QueryStatus.OK, result.reason
        if result.status is QueryStatus.OK:
            assert plain and result.image is not None and result.image.size == (64, 64)
            assert kind == "valid" or (kind == "mutated" and payload[0] in (
                "generation_seconds", "queue_seconds", "miner_version", "extra")
                and result.response is not None)
        else:
            assert result.image is None

    check()


def test_info_never_raises(setup):
    miner, validator, nxt, server = setup
    client = MinerClient(validator)

    @settings(max_examples=30, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=100), json_values.map(lambda v: json.dumps(v).encode())),
           statuses)
    def check(body, status):
        nxt.update(info=body, status=status)
        result = asyncio.run(client.info(server.url, miner.hotkey.ss58_address))
        assert isinstance(result.status, QueryStatus)
        assert result.status is not QueryStatus.OK or result.info is not None

    check()
