"""The gateway's OpenAI Images API with the official `openai` client, against real miners
(the tiny Engine behind real miner servers) on a real local chain."""
from __future__ import annotations

import base64
import hashlib
import io
import json

import httpx
import openai
import pytest
from gateway_support import shared_subnet
from PIL import Image

from niche.imaging import encode_b64, encode_image
from niche.protocol import GenerationParams


@pytest.fixture(scope="module")
def subnet(tmp_path_factory, tiny_engine, tiny_root):
    """Two FLUX.1-schnell miners and two Kolors miners; flux-dev is offered, served by none.
    Shared by this module and tests/test_gateway_images.py's fixture of the same subnet."""
    with shared_subnet(tmp_path_factory, tiny_engine, tiny_root) as gw:
        yield gw


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_openai_client_gets_two_images_for_the_seeds_it_is_told(subnet, tiny_engine):
    answer = subnet.client.images.generate(model="flux-schnell", prompt="a red circle", n=2,
                                           size="64x64", response_format="b64_json")
    assert len(answer.data) == 2
    seeds = [item.seed for item in answer.data]
    assert len(set(seeds)) == 2
    hotkeys = {m.hotkey for m in subnet.miners.values()}
    for item in answer.data:
        assert _png(item.b64_json).size == (64, 64)
        assert item.miner_hotkey in hotkeys and item.steps == 4
        # the reported seed reproduces the very bytes: the user can check the image
        params = tiny_engine.resolve(GenerationParams(model="flux-schnell",
                                                      prompt="a red circle", seed=item.seed,
                                                      width=64, height=64))
        local = encode_image(tiny_engine.generate(params))
        assert hashlib.sha256(local).hexdigest() == \
            hashlib.sha256(base64.b64decode(item.b64_json)).hexdigest()


def test_a_given_seed_gives_seed_and_seed_plus_one_and_the_same_pixels(subnet):
    raw = subnet.client.images.with_raw_response.generate(
        model="flux-schnell", prompt="a blue square", n=2, size="64x64",
        extra_body={"seed": 41})
    assert raw.headers["x-niche-seeds"] == "41,42"
    first = raw.parse()
    assert [d.seed for d in first.data] == [41, 42]
    again = subnet.client.images.generate(model="flux-schnell", prompt="a blue square",
                                          size="64x64", extra_body={"seed": 41})
    assert again.data[0].b64_json == first.data[0].b64_json


def test_url_answers_are_served_then_expire(subnet):
    answer = subnet.client.images.generate(model="flux-schnell", prompt="a tree",
                                           response_format="url")
    url = answer.data[0].url
    assert url.startswith(subnet.url + "/v1/files/")
    got = httpx.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(got.content)).size == (64, 64)  # the tiny model's default
    store = subnet.gateway.images
    clock = store._clock
    store._clock = lambda: clock() + store.ttl + 1
    try:
        gone = httpx.get(url)
    finally:
        store._clock = clock
    assert gone.status_code == 404 and "expire" in gone.json()["error"]["message"]


def test_models_lists_what_miners_serve_now(subnet):
    models = subnet.client.models.list()
    assert [m.id for m in models.data] == ["flux-schnell", "kolors"]  # flux-dev: no miner
    assert [m.miners for m in models.data] == [2, 2]


def test_bad_keys_are_401_in_openai_shape(subnet):
    for key in ("nk-wrong", "sk-openai-style"):
        bad = openai.OpenAI(api_key=key, base_url=subnet.base_url, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            bad.images.generate(model="flux-schnell", prompt="x")
        assert caught.value.status_code == 401
        assert caught.value.body["type"] == "authentication_error"
    missing = httpx.post(subnet.base_url + "/images/generations", json={"prompt": "x"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    secret, key = subnet.gateway.keys.create("gone")
    subnet.gateway.keys.revoke(key.id)
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        openai.OpenAI(api_key=secret, base_url=subnet.base_url, max_retries=0
                      ).images.generate(model="flux-schnell", prompt="x")


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"model": "flux-schnell", "prompt": "x", "size": "0x0"}, "size", "out of range"),
    ({"model": "flux-schnell", "prompt": "x", "size": "99999x99999"}, "size", "out of range"),
    ({"model": "flux-schnell", "prompt": "x", "size": "abc"}, "size", "WIDTHxHEIGHT"),
    ({"model": "flux-schnell", "prompt": "x", "size": "72x64"}, "size", "steps of 16"),
    ({"model": "flux-schnell", "prompt": "x", "size": "65x64"}, "size",
     "65 is not a multiple of 16; each side must be a multiple of 16 within [32, 128]"),
    ({"model": "flux-schnell", "prompt": "x", "size": "64x16"}, "size",
     "out of range: each side must be a multiple of 16 within [32, 128]"),
    ({"model": "flux-schnell", "prompt": "x", "output_format": "gif"}, "output_format",
     "'png', 'webp' or 'jpeg'"),
    ({"model": "flux-schnell", "prompt": "x", "output_compression": 50}, "output_compression",
     "webp or jpeg"),
    ({"model": "flux-schnell", "prompt": "x", "stream": True, "partial_images": 2},
     "partial_images", "only finished images"),
    ({"model": "flux-schnell", "prompt": "x", "background": "transparent"}, "background",
     "'auto' or 'opaque'"),
    ({"model": "flux-schnell", "prompt": "x", "stream": True, "response_format": "url"},
     "response_format", "a stream sends b64_json"),
    ({"model": "dall-e-3", "prompt": "x"}, "model", "unknown model"),
    ({"prompt": "x"}, "model", "required"),
    ({"model": "flux-schnell", "prompt": "x", "n": 0}, "n", "greater than or equal to 1"),
    ({"model": "flux-schnell", "prompt": "x", "n": 5}, "n", "less than or equal to 4"),
    ({"model": "flux-schnell", "prompt": "x", "n": "2"}, "n", "valid integer"),
    ({"model": "flux-schnell", "prompt": 5}, "prompt", "valid string"),
    ({"model": "flux-schnell", "prompt": "x", "guidance": "5"}, "guidance", "valid number"),
    ({"model": "flux-schnell", "prompt": "x", "n": 2.5}, "n", "valid integer"),
    ({"model": "flux-schnell", "prompt": "x" * 2001}, "prompt", "at most 2000"),
    ({"model": "flux-schnell", "prompt": ""}, "prompt", "at least 1"),
    ({"model": "flux-schnell", "prompt": "x", "seed": -1}, "seed", "greater than"),
    ({"model": "flux-schnell", "prompt": "x", "steps": 9}, "steps", "1..8"),
    ({"model": "flux-schnell", "prompt": "x", "guidance": 3.5}, "guidance", "at most 0.0"),
    ({"model": "flux-schnell", "prompt": "x", "response_format": "png"}, "response_format",
     "b64_json"),
    ({"model": "flux-schnell", "prompt": "x", "colour": "red"}, "colour", "unknown"),
    ({"model": "flux-schnell", "prompt": "x", "pipeline": "controlnet-canny"}, "pipeline",
     "does not serve"),
    ({"model": "kolors", "prompt": "x", "pipeline": "controlnet-canny"}, "image", "needs"),
    ({"model": "kolors", "prompt": "x", "pipeline": "controlnet-canny", "image": "%%%"},
     "image", "base64"),
    ({"model": "flux-schnell", "prompt": "x", "image": "aGVsbG8="}, "image", "only for"),
])
def test_hostile_requests_get_a_400_naming_the_field(subnet, body, param, words):
    resp = httpx.post(subnet.base_url + "/images/generations", json=body,
                      headers={"Authorization": f"Bearer {subnet.key}"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"], error["message"]


def test_image_bombs_and_lies_are_refused_before_any_miner(subnet):
    bomb = Image.new("L", (5000, 5000))  # 25 Mpx in 30 kB: over the model's pixel cap
    buf = io.BytesIO()
    bomb.save(buf, "PNG", optimize=True)
    not_png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 100).decode()
    sent = subnet.gateway.metrics.miner_failures.collect()
    for image in (base64.b64encode(buf.getvalue()).decode(), not_png):
        resp = httpx.post(subnet.base_url + "/images/generations", headers={
            "Authorization": f"Bearer {subnet.key}"}, json={
            "model": "kolors", "prompt": "x", "pipeline": "controlnet-canny", "image": image})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "image", resp.text
    assert subnet.gateway.metrics.miner_failures.collect() == sent


def test_bodies_that_are_not_requests(subnet):
    auth = {"Authorization": f"Bearer {subnet.key}"}
    for content in (b"not json", b"[1, 2]", b"null"):
        resp = httpx.post(subnet.base_url + "/images/generations", content=content,
                          headers=auth)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_body"
    huge = httpx.post(subnet.base_url + "/images/generations", headers=auth,
                      content=b"{" + b" " * (33 * 1024 * 1024) + b"}")
    assert huge.status_code == 413


def test_no_miner_for_a_model_is_503(subnet):
    with pytest.raises(openai.InternalServerError) as caught:
        subnet.client.images.generate(model="flux-dev", prompt="a cat")
    assert caught.value.status_code == 503
    assert caught.value.body["code"] == "no_miner_available"


def test_rate_limit_and_daily_quota_are_429(subnet):
    secret, _ = subnet.gateway.keys.create("slow", per_minute=1, per_day=100)
    slow = openai.OpenAI(api_key=secret, base_url=subnet.base_url, max_retries=0)
    slow.images.generate(model="flux-schnell", prompt="one")
    with pytest.raises(openai.RateLimitError) as caught:
        slow.images.generate(model="flux-schnell", prompt="two")
    assert caught.value.body["code"] == "rate_limit_exceeded"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    secret, key = subnet.gateway.keys.create("small", per_day=3)
    small = openai.OpenAI(api_key=secret, base_url=subnet.base_url, max_retries=0)
    small.images.generate(model="flux-schnell", prompt="one", n=2)
    with pytest.raises(openai.RateLimitError) as caught:
        small.images.generate(model="flux-schnell", prompt="three", n=2)
    assert caught.value.body["type"] == "insufficient_quota"
    assert subnet.gateway.keys.used_today(key.id) == 2
    # a refused request is not charged; a failed one is given back
    with pytest.raises(openai.InternalServerError):
        small.images.generate(model="flux-dev", prompt="none")
    assert subnet.gateway.keys.used_today(key.id) == 2


def test_metrics_are_on_their_own_port_not_the_api(subnet):
    from niche.metrics_server import start_metrics_server

    subnet.client.images.generate(model="flux-schnell", prompt="counted")
    public = httpx.get(subnet.url + "/metrics")
    assert public.status_code == 404  # the API port is public; metrics are not
    server = start_metrics_server(subnet.gateway.metrics.registry, 0)
    try:
        text = httpx.get(server.url).text
    finally:
        server.close()
    assert 'niche_gateway_requests_total{model="flux-schnell",status="200"}' in text
    assert 'niche_gateway_request_seconds_count{model="flux-schnell"}' in text
    assert 'niche_gateway_miners{model="flux-schnell"} 2.0' in text
    assert "niche_gateway_audits_queued_total" in text
    page = httpx.get(subnet.url + "/")
    assert page.status_code == 200 and 'id="generate"' in page.text
    assert json.loads(httpx.get(subnet.url + "/healthz").text)["miners"] == {
        "flux-schnell": 2, "kolors": 2}
    missing = httpx.get(subnet.url + "/v1/images/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == \
        "invalid_request_error"


def test_conditioning_image_reaches_a_kolors_miner(subnet):
    cond = Image.new("RGB", (64, 64))
    cond.paste((255, 255, 255), (16, 16, 48, 48))
    image, _ = encode_b64(cond)
    answer = subnet.client.images.generate(model="kolors", prompt="a square", size="64x64",
                                           extra_body={"pipeline": "controlnet-canny",
                                                       "image": image, "seed": 3})
    assert _png(answer.data[0].b64_json).size == (64, 64)
    assert answer.data[0].pipeline == "controlnet-canny"
