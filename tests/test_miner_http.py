"""The miner over real HTTP: uvicorn on 127.0.0.1, httpx, real wallets, a real LocalChain file.

Every refusal must come back as a clear status + ErrorResponse while the miner keeps serving.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import httpx
import pytest
from miner_support import (
    MIN_STAKE,
    NETUID,
    StubEngine,
    make_request,
    module_net,
    running_miner,
    signed_post,
)
from PIL import Image

from niche.errors import NicheError
from niche.imaging import encode_b64
from niche.miner.server import bind_socket
from niche.protocol import ErrorResponse, GenerateResponse, InfoResponse
from niche.validator.client import MinerClient, QueryStatus

net = module_net("minernet")


@pytest.fixture(scope="module")
def miner(net):
    with running_miner(net, StubEngine(), max_body_bytes=1_000_000) as m:
        yield m


def body_of(request) -> bytes:
    return request.model_dump_json(exclude_none=True).encode()


def error(resp: httpx.Response) -> ErrorResponse:
    return ErrorResponse.model_validate(resp.json())


def test_signed_request_from_validator_gets_a_signed_image(net, miner):
    req = make_request(seed=3)
    resp = signed_post(miner, net.wallets["hi"], body_of(req))
    assert resp.status_code == 200, resp.text
    answer = GenerateResponse.model_validate(resp.json())
    assert answer.request_id == req.request_id and answer.miner_hotkey == miner.hotkey
    # the full client validation (hash, signature, image) accepts it
    result = asyncio.run(MinerClient(net.wallets["hi"]).query(
        (0, miner.hotkey, miner.url), make_request(seed=3)))
    assert result.status is QueryStatus.OK, result.reason
    assert result.image.size == (32, 32) and result.image.getpixel((0, 0)) == (3, 0, 7)


@pytest.mark.parametrize("mutate, status, reason", [
    ("unsigned", 401, "unsigned"),
    ("tampered_body", 401, "bad_signature"),
    ("wrong_receiver", 403, "wrong_receiver"),
    ("stale", 401, "stale_request"),
    ("garbage_signature", 401, "malformed_auth"),
])
def test_authentication_refusals(net, miner, mutate, status, reason):
    from bittensor import http_auth

    body = body_of(make_request())
    wallet = net.wallets["hi"]
    headers = http_auth.sign(wallet, method="POST", path="/v1/generate", body=body,
                             receiver_ss58=miner.hotkey)
    if mutate == "unsigned":
        headers = {}
    elif mutate == "tampered_body":
        body = body.replace(b"a cat", b"a dog")
    elif mutate == "wrong_receiver":
        headers = http_auth.sign(wallet, method="POST", path="/v1/generate", body=body,
                                 receiver_ss58=net.wallets["lo"].hotkey.ss58_address)
    elif mutate == "stale":
        headers = http_auth.sign(wallet, method="POST", path="/v1/generate", body=body,
                                 receiver_ss58=miner.hotkey,
                                 nonce_ns=time.time_ns() - 60 * 10**9)
    elif mutate == "garbage_signature":
        headers[http_auth.HEADER_SIGNATURE] = "0xzz"
    before = len(miner.engine.calls)
    resp = httpx.post(miner.url + "/v1/generate", content=body, headers=headers)
    assert resp.status_code == status, resp.text
    assert error(resp).reason == reason
    assert len(miner.engine.calls) == before  # the GPU never saw it


def test_replayed_request_is_refused(net, miner):
    from bittensor import http_auth

    body = body_of(make_request())
    headers = http_auth.sign(net.wallets["hi"], method="POST", path="/v1/generate", body=body,
                             receiver_ss58=miner.hotkey)
    first = httpx.post(miner.url + "/v1/generate", content=body, headers=headers)
    again = httpx.post(miner.url + "/v1/generate", content=body, headers=headers)
    assert first.status_code == 200
    assert again.status_code == 401 and error(again).reason == "replayed_request"


@pytest.mark.parametrize("who, reason", [
    ("stranger", "not_registered"),
    ("nopermit", "no_validator_permit"),
    ("low", "low_stake"),
])
def test_blacklist(net, miner, who, reason):
    resp = signed_post(miner, net.wallets[who], body_of(make_request()))
    assert resp.status_code == 403 and error(resp).reason == reason, resp.text


def test_allow_list_and_dev_flag(net):
    engine = StubEngine()
    stranger = net.wallets["stranger"].hotkey.ss58_address
    with running_miner(net, engine, allow_hotkeys=(stranger,),
                       allow_non_validators=True) as m:
        assert signed_post(m, net.wallets["stranger"], body_of(make_request())).status_code == 200
        assert signed_post(m, net.wallets["nopermit"], body_of(make_request(),
                                                               )).status_code == 403  # stake 0
    with running_miner(net, engine, allow_non_validators=True, min_stake=0) as m:
        assert signed_post(m, net.wallets["nopermit"], body_of(make_request())).status_code == 200


@pytest.mark.parametrize("case, status, reason, field", [
    ("malformed_json", 400, "malformed_json", None),
    ("protocol", 400, "unsupported_protocol_version", "protocol_version"),
    ("wrong_type", 422, "invalid_request", "params.seed"),
    ("extra_field", 422, "invalid_request", "params.evil"),
    ("unknown_model", 400, "invalid_request", "model"),
    ("too_wide", 400, "invalid_request", "width"),
    ("bad_base64", 400, "invalid_image", "image"),
    ("image_bomb", 400, "invalid_image", "image"),
    ("not_an_image", 400, "invalid_image", "image"),
    ("missing_image", 400, "invalid_image", "image"),
])
def test_bad_requests_are_refused_before_the_gpu(net, miner, case, status, reason, field):
    req = json.loads(body_of(make_request()))
    if case == "malformed_json":
        body = b"{not json"
    else:
        if case == "protocol":
            req["protocol_version"] = 99
        elif case == "wrong_type":
            req["params"]["seed"] = "abc"
        elif case == "extra_field":
            req["params"]["evil"] = 1
        elif case == "unknown_model":
            req["params"]["model"] = "sdxl"
        elif case == "too_wide":
            req["params"]["width"] = 4096
        elif case in ("bad_base64", "image_bomb", "not_an_image", "missing_image"):
            req["params"]["pipeline"] = "controlnet-canny"
            if case == "bad_base64":
                req["image"] = "iVBORw0K!!!="
            elif case == "image_bomb":
                bomb = Image.new("1", (20000, 20000))
                buf = io.BytesIO()
                bomb.save(buf, "PNG")
                req["image"] = base64.b64encode(buf.getvalue()).decode()
            elif case == "not_an_image":
                req["image"] = base64.b64encode(b"GIF89a" + b"\0" * 64).decode()
        body = json.dumps(req).encode()
    before = len(miner.engine.calls)
    resp = signed_post(miner, net.wallets["hi"], body)
    assert resp.status_code == status, resp.text
    err = error(resp)
    assert err.reason == reason and err.field == field, err
    assert len(miner.engine.calls) == before


def test_conditioning_image_is_decoded_and_passed(net, miner):
    sent = Image.new("RGB", (40, 24), (1, 2, 3))
    sent.putpixel((39, 23), (250, 128, 9))  # one odd pixel: orientation and values survive
    b64, _ = encode_b64(sent)
    req = make_request("conditioned", pipeline="controlnet-canny", image=b64)
    before = len(miner.engine.calls)
    resp = signed_post(miner, net.wallets["hi"], body_of(req))
    assert resp.status_code == 200, resp.text
    assert miner.engine.calls[before:] == ["conditioned"]
    got = miner.engine.images[before]
    assert got is not None and got.mode == "RGB" and got.size == (40, 24)
    assert got.tobytes() == sent.tobytes()


def test_body_too_big_is_refused_with_413(net, miner):
    big = b"x" * 1_100_000
    resp = signed_post(miner, net.wallets["hi"], big)
    assert resp.status_code == 413 and error(resp).reason == "body_too_large"

    def chunks():  # no content-length: the stream itself is cut at the cap
        for _ in range(20):
            yield b"y" * 100_000

    claimed = {"X-Bittensor-Version": "1",
               "X-Bittensor-Hotkey": net.wallets["hi"].hotkey.ss58_address}
    resp = httpx.post(miner.url + "/v1/generate", content=chunks(), headers=claimed)
    assert resp.status_code == 413
    # strangers are refused from their headers alone: the body is never read
    resp = httpx.post(miner.url + "/v1/generate", content=chunks())
    assert resp.status_code == 401 and error(resp).reason == "unsigned"


def test_requests_in_flight_are_bounded(net):
    engine = StubEngine()
    with running_miner(net, engine, max_inflight=1) as m:
        engine.hold()
        holder = threading.Thread(target=signed_post, args=(
            m, net.wallets["hi"], body_of(make_request("held"))))
        holder.start()
        assert engine.running.wait(10)
        resp = signed_post(m, net.wallets["mid"], body_of(make_request()))
        engine.release()
        holder.join(20)
        assert resp.status_code == 503 and error(resp).reason == "busy"
        assert signed_post(m, net.wallets["mid"], body_of(make_request())).status_code == 200


def test_generation_failure_is_500_and_the_miner_lives_on(net, miner):
    resp = signed_post(miner, net.wallets["hi"], body_of(make_request("explode")))
    assert resp.status_code == 500 and error(resp).reason == "generation_failed"
    assert signed_post(miner, net.wallets["hi"], body_of(make_request())).status_code == 200
    assert httpx.get(miner.url + "/healthz").json()["ok"] is True


def test_info_health_openapi(net, miner):
    info = InfoResponse.model_validate(httpx.get(miner.url + "/v1/info").json())
    assert info.hotkey == miner.hotkey and info.models[0].model == "stub"
    health = httpx.get(miner.url + "/healthz").json()
    assert health["ok"] and health["queue"] == 0
    schema = httpx.get(miner.url + "/openapi.json").json()
    names = set(schema["components"]["schemas"])
    assert {"GenerateRequest", "GenerateResponse", "ErrorResponse", "GenerationParams",
            "InfoResponse"} <= names
    body = schema["paths"]["/v1/generate"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("/GenerateRequest")
    info = asyncio.run(MinerClient(net.wallets["hi"]).info(miner.url, miner.hotkey))
    assert info.ok and info.info.hotkey == miner.hotkey


def test_signed_endpoints_take_only_post_on_their_exact_path(miner):
    """The signed handlers are reached directly (niche/miner/direct_routes.py); every other
    method or path still goes through FastAPI's routing: 405, 404 or its redirect."""
    for path in ("/v1/generate", "/v1/states"):
        assert httpx.get(miner.url + path).status_code == 405
        assert httpx.put(miner.url + path, content=b"{}").status_code == 405
        trailing = httpx.post(miner.url + path + "/", content=b"{}")
        assert trailing.status_code in (307, 404)
    assert httpx.post(miner.url + "/v1/nothing", content=b"{}").status_code == 404
    unsigned = httpx.post(miner.url + "/v1/generate", content=b"{}")
    assert unsigned.status_code == 401 and error(unsigned).reason == "unsigned"


def test_rate_limit_429(net):
    with running_miner(net, StubEngine(), requests_per_minute=6) as m:  # bucket of 1
        codes = [signed_post(m, net.wallets["hi"], body_of(make_request())).status_code
                 for _ in range(3)]
        assert codes[0] == 200 and codes[1:] == [429, 429]
        resp = signed_post(m, net.wallets["hi"], body_of(make_request()))
        assert error(resp).reason == "rate_limited"
        # buckets are per hotkey: another validator is still served
        assert signed_post(m, net.wallets["mid"], body_of(make_request())).status_code == 200


def test_metrics_count_requests_refusals_and_generations(net):
    with running_miner(net, StubEngine()) as m:
        signed_post(m, None, body_of(make_request()))
        signed_post(m, net.wallets["stranger"], body_of(make_request()))
        signed_post(m, net.wallets["hi"], body_of(make_request()))
        text = httpx.get(m.metrics_url).text
    assert 'niche_miner_requests_total{status="200"} 1.0' in text
    assert 'niche_miner_requests_total{status="401"} 1.0' in text
    assert 'niche_miner_refusals_total{reason="unsigned"} 1.0' in text
    assert 'niche_miner_refusals_total{reason="not_registered"} 1.0' in text
    assert 'niche_miner_generation_seconds_count{model="stub"} 1.0' in text
    assert "niche_miner_queue_depth 0.0" in text


def test_metagraph_refresh_picks_up_stake_changes(net):
    lo = net.wallets["lo"]
    with running_miner(net, StubEngine(), metagraph_refresh=0.2) as m:
        assert signed_post(m, lo, body_of(make_request())).status_code == 200
        net.chain.set_stake(NETUID, lo.hotkey.ss58_address, MIN_STAKE / 2)
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                resp = signed_post(m, lo, body_of(make_request()))
                if resp.status_code == 403:
                    break
                time.sleep(0.1)
            assert resp.status_code == 403 and error(resp).reason == "low_stake"
        finally:
            net.chain.set_stake(NETUID, lo.hotkey.ss58_address, 10.0)


def test_port_in_use_is_one_line_error(miner):
    with pytest.raises(NicheError, match="already in use"):
        bind_socket("127.0.0.1", miner.server.port)


def test_served_connections_send_without_nagle_delay():
    """Connections accepted on bind_socket's socket get TCP_NODELAY from asyncio (it sets it
    only for IPPROTO_TCP sockets): without it a response's body, written after its head,
    waits for the client's delayed ACK (~40 ms per small answer on a kept-alive connection)."""
    import socket

    async def accepted_nodelay() -> int:
        listener = bind_socket("127.0.0.1", 0)
        options: list[int] = []

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            options.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
            while not options:
                await asyncio.sleep(0.01)
            writer.close()
        return options[0]

    assert asyncio.run(accepted_nodelay()) != 0


def test_fuzzed_bodies_get_4xx_never_5xx(net, miner):
    """Signed junk of every shape: always a 4xx ErrorResponse, never a crash or a 500."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    valid = json.loads(body_of(make_request()))
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=False), st.text(max_size=20))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                          max_leaves=8)

    def mutate(field_path, value):
        data = json.loads(json.dumps(valid))
        target = data
        for key in field_path[:-1]:
            target = target[key]
        target[field_path[-1]] = value
        return json.dumps(data).encode()

    fields = st.sampled_from([("protocol_version",), ("request_id",), ("params",),
                              ("timeout",), ("image",), ("params", "model"),
                              ("params", "seed"), ("params", "pipeline"),
                              ("params", "width"), ("params", "prompt")])
    bodies = st.one_of(st.binary(max_size=200),
                       values.map(lambda v: json.dumps(v).encode()),
                       st.builds(mutate, fields, values))
    seen = set()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(bodies)
    def check(body):
        resp = signed_post(miner, net.wallets["hi"], body)
        if resp.status_code != 200:
            assert 400 <= resp.status_code < 500, (body, resp.text)
            seen.add(error(resp).reason)

    check()
    assert seen & {"malformed_json", "invalid_request"}
    assert httpx.get(miner.url + "/healthz").json()["ok"]
