"""The rest of the OpenAI Images API as people call it, through the official `openai` client
against a real gateway and real miners: edits and variations (ControlNet / IP-Adapter),
output formats, models.retrieve, usage, rate-limit headers, quota 429s, streaming, CORS,
the per-request log, and messages that say the rule."""
from __future__ import annotations

import base64
import io
import logging

import httpx
import openai
import pytest
from gateway_support import CORS_ORIGIN, shared_subnet
from PIL import Image


@pytest.fixture(scope="module")
def subnet(tmp_path_factory, tiny_engine, tiny_root):
    with shared_subnet(tmp_path_factory, tiny_engine, tiny_root) as gw:
        yield gw


def _square() -> bytes:
    image = Image.new("RGB", (64, 64), (20, 40, 200))
    image.paste((255, 255, 255), (16, 16, 48, 48))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _same_as_generation(subnet, answer, pipeline: str, prompt: str, seed: int) -> None:
    """The edit's image is, byte for byte, what the JSON endpoint makes for that pipeline."""
    direct = subnet.client.images.generate(
        model="kolors", prompt=prompt, size="64x64",
        extra_body={"pipeline": pipeline, "image": base64.b64encode(_square()).decode(),
                    "seed": seed})
    assert answer.data[0].pipeline == pipeline
    assert answer.data[0].b64_json == direct.data[0].b64_json


@pytest.mark.parametrize(("extra", "pipeline"), [
    ({}, "controlnet-canny"),
    ({"pipeline": "controlnet-depth"}, "controlnet-depth"),
    ({"input_fidelity": "low"}, "ip-adapter"),
])
def test_images_edit_maps_to_controlnet_and_ip_adapter(subnet, extra, pipeline):
    answer = subnet.client.images.edit(
        image=("square.png", _square(), "image/png"), prompt="a lighthouse", model="kolors",
        size="64x64", input_fidelity=extra.get("input_fidelity", openai.omit),
        extra_body={"seed": 5, **{k: v for k, v in extra.items() if k != "input_fidelity"}})
    assert _decoded(answer.data[0].b64_json).size == (64, 64)
    _same_as_generation(subnet, answer, pipeline, "a lighthouse", 5)


def test_images_create_variation_is_ip_adapter(subnet):
    answer = subnet.client.images.create_variation(
        image=("square.png", _square(), "image/png"), model="kolors", n=2, size="64x64",
        extra_body={"seed": 9})
    assert [d.pipeline for d in answer.data] == ["ip-adapter", "ip-adapter"]
    assert [d.seed for d in answer.data] == [9, 10]
    assert answer.usage.images == 2
    _same_as_generation(subnet, answer, "ip-adapter", "a variation of the image", 9)


def test_edit_refusals_say_why(subnet):
    square = ("square.png", _square(), "image/png")
    with pytest.raises(openai.BadRequestError, match="inpainting is not served"):
        subnet.client.images.edit(image=square, mask=square, prompt="x", model="kolors")
    with pytest.raises(openai.BadRequestError, match="one image per request"):
        subnet.client.images.edit(image=[square, square], prompt="x", model="kolors")
    with pytest.raises(openai.BadRequestError, match="does not serve pipeline"):
        subnet.client.images.edit(image=square, prompt="x", model="flux-schnell")
    with pytest.raises(openai.BadRequestError, match="n: must be an integer"):
        subnet.client.images.edit(image=square, prompt="x", model="kolors",
                                  extra_body={"n": "two"})
    not_image = ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 50, "image/png")
    with pytest.raises(openai.BadRequestError) as caught:
        subnet.client.images.edit(image=not_image, prompt="x", model="kolors")
    assert caught.value.body["param"] == "image"
    json_body = httpx.post(subnet.base_url + "/images/edits", json={"prompt": "x"},
                           headers={"Authorization": f"Bearer {subnet.key}"})
    assert json_body.status_code == 400 and "multipart/form-data" in json_body.text


@pytest.mark.parametrize(("fmt", "pil", "compression"), [
    ("webp", "WEBP", None), ("jpeg", "JPEG", 60), ("png", "PNG", None)])
def test_output_format(subnet, fmt, pil, compression):
    answer = subnet.client.images.generate(
        model="flux-schnell", prompt="a red circle", size="64x64", output_format=fmt,
        output_compression=compression if compression is not None else openai.omit,
        extra_body={"seed": 1})
    assert answer.output_format == fmt
    image = _decoded(answer.data[0].b64_json)
    assert image.format == pil and image.size == (64, 64)


def test_url_answers_keep_the_format(subnet):
    answer = subnet.client.images.generate(model="flux-schnell", prompt="a tree",
                                           response_format="url", output_format="webp")
    assert answer.data[0].url.endswith(".webp")
    got = httpx.get(answer.data[0].url)
    assert got.headers["content-type"] == "image/webp"


def test_models_retrieve_and_public_list(subnet):
    card = subnet.client.models.retrieve("flux-schnell")
    assert card.id == "flux-schnell" and card.miners == 2 and card.object == "model"
    assert subnet.client.models.retrieve("flux-dev").miners == 0  # offered, no miner now
    with pytest.raises(openai.NotFoundError, match="unknown model 'dall-e-3'"):
        subnet.client.models.retrieve("dall-e-3")
    public = httpx.get(subnet.base_url + "/models")  # no key: the playground lists models
    assert public.status_code == 200
    assert [m["id"] for m in public.json()["data"]] == ["flux-schnell", "kolors"]
    assert "x-ratelimit-remaining-images" not in public.headers
    wrong = httpx.get(subnet.base_url + "/models", headers={"Authorization": "Bearer nk-no"})
    assert wrong.status_code == 401


def test_usage_and_rate_limit_headers(subnet):
    secret, _ = subnet.gateway.keys.create("headers", per_minute=10, per_day=20)
    client = openai.OpenAI(api_key=secret, base_url=subnet.base_url, max_retries=0)
    raw = client.images.with_raw_response.generate(model="flux-schnell", prompt="a", n=2)
    answer = raw.parse()
    assert answer.usage.images == 2 and answer.usage.steps == 8
    assert answer.usage.total_tokens == 0 and answer.size == "64x64"
    h = raw.headers
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("10", "9")
    assert (h["x-ratelimit-limit-images"], h["x-ratelimit-remaining-images"]) == ("20", "18")
    assert h["x-ratelimit-reset-requests"].endswith("s")
    assert h["x-ratelimit-reset-images"][0].isdigit() and "m" in h["x-ratelimit-reset-images"]
    again = client.images.with_raw_response.generate(model="flux-schnell", prompt="b")
    assert again.headers["x-ratelimit-remaining-images"] == "17"
    listing = client.models.with_raw_response.list()
    assert listing.headers["x-ratelimit-remaining-images"] == "17"


def test_quota_exhaustion_is_429_with_retry_after_and_what_is_left(subnet):
    secret, key = subnet.gateway.keys.create("three", per_day=3)
    client = openai.OpenAI(api_key=secret, base_url=subnet.base_url, max_retries=0)
    client.images.generate(model="flux-schnell", prompt="one", n=2)
    with pytest.raises(openai.RateLimitError) as caught:
        client.images.generate(model="flux-schnell", prompt="two more", n=2)
    message = caught.value.body["message"]
    assert "asked for 2 images, 1 left of the daily quota of 3" in message, message
    headers = caught.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 86400
    assert headers["x-ratelimit-remaining-images"] == "1"
    assert subnet.gateway.keys.used_today(key.id) == 2
    client.images.generate(model="flux-schnell", prompt="the last one")
    assert subnet.gateway.keys.used_today(key.id) == 3


def test_streaming_sends_one_completed_event_per_image(subnet):
    events = list(subnet.client.images.generate(
        model="flux-schnell", prompt="a red circle", n=2, size="64x64", stream=True,
        extra_body={"seed": 21}))
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert sorted(e.seed for e in events) == [21, 22]
    for event in events:
        assert _decoded(event.b64_json).size == (64, 64) and event.size == "64x64"
        assert event.usage.images == 1
    streamed = {e.seed: e.b64_json for e in events}
    plain = subnet.client.images.generate(model="flux-schnell", prompt="a red circle", n=2,
                                          size="64x64", extra_body={"seed": 21})
    assert {d.seed: d.b64_json for d in plain.data} == streamed
    auth = {"Authorization": f"Bearer {subnet.key}"}
    with httpx.stream("POST", subnet.base_url + "/images/generations", headers=auth, json={
            "model": "flux-schnell", "prompt": "raw", "stream": True, "n": 2}) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers["x-ratelimit-limit-images"] == "1000"
        text = raw.read().decode()
    assert text.startswith(": niche: 2 images asked of the miners\n\n"), text[:200]
    assert text.count("event: image_generation.completed\ndata: {") == 2
    edit = list(subnet.client.images.edit(
        image=("square.png", _square(), "image/png"), prompt="x", model="kolors",
        size="64x64", stream=True))
    assert [e.type for e in edit] == ["image_edit.completed"]


def test_a_failure_mid_stream_is_an_error_event_and_refunded(subnet):
    secret, key = subnet.gateway.keys.create("stream-fail", per_day=10)
    client = openai.OpenAI(api_key=secret, base_url=subnet.base_url, max_retries=0)
    stream = client.images.generate(model="flux-schnell", prompt="x", stream=True,
                                    extra_body={"timeout": 0.001})
    with pytest.raises(openai.APIError, match="no miner delivered an image"):
        list(stream)
    assert subnet.gateway.keys.used_today(key.id) == 0


def test_a_tiny_timeout_gives_a_complete_sentence(subnet):
    with pytest.raises(openai.APIStatusError) as caught:
        subnet.client.images.generate(model="flux-schnell", prompt="x",
                                      extra_body={"timeout": 0.001})
    message = caught.value.body["message"]
    assert caught.value.status_code == 504
    assert message.endswith("retry, or raise 'timeout'"), message
    assert message.count("(") == message.count(")"), message


def test_a_long_miner_reason_is_cut_at_a_word_not_mid_sentence():
    from niche.gateway.router import clip

    reason = ("HTTP 429 cannot_start_in_time: expected start in 0.8s + ~0.4s generation "
              "exceeds the 1.0s timeout")
    assert clip(reason) == reason  # the miner's whole sentence fits
    long = "word " * 40
    assert clip(long).endswith("word …") and len(clip(long)) <= 122
    assert clip(reason, limit=80) == ("HTTP 429 cannot_start_in_time: expected start in 0.8s "
                                      "+ ~0.4s generation …")


def test_cors_only_for_the_origins_given(subnet):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(subnet.base_url + "/images/generations",
                            headers={"Origin": CORS_ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == CORS_ORIGIN
    other = httpx.options(subnet.base_url + "/images/generations",
                          headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    answer = httpx.get(subnet.base_url + "/models", headers={"Origin": CORS_ORIGIN})
    assert answer.headers["access-control-allow-origin"] == CORS_ORIGIN


def test_one_log_line_per_request_with_status_key_latency_and_miners(subnet, caplog):
    caplog.set_level(logging.INFO, logger="niche.gateway.access")
    answer = subnet.client.images.generate(model="flux-schnell", prompt="logged", n=2)
    with pytest.raises(openai.BadRequestError):
        subnet.client.images.generate(model="flux-schnell", prompt="x", size="65x64")
    httpx.post(subnet.base_url + "/images/generations", json={})
    key_id = subnet.gateway.keys.authenticate(f"Bearer {subnet.key}").id
    lines = [r.getMessage() for r in caplog.records if r.name == "niche.gateway.access"]
    miners = ",".join(str(d.miner_uid) for d in answer.data)
    assert any(line.startswith("POST /v1/images/generations 200 key=" + key_id)
               and line.endswith("miners=" + miners) for line in lines), lines
    assert any(line.startswith(f"POST /v1/images/generations 400 key={key_id} ")
               for line in lines), lines
    assert any(line.startswith("POST /v1/images/generations 401 key=- ") for line in lines)


def test_a_lossless_webp_answer_reaches_users_as_png():
    """Miners may answer in lossless WebP; a user who asked for PNG gets PNG bytes of the
    same pixels (a PNG answer passes through as the bytes the miner signed)."""
    import asyncio
    import base64
    import io
    import random
    from types import SimpleNamespace

    from niche.gateway.schemas import ImagesRequest
    from niche.gateway.service import Gateway
    from niche.protocol import GenerateRequest, GenerationParams

    picture = Image.new("RGB", (32, 32), (200, 30, 90))
    webp = io.BytesIO()
    picture.save(webp, "WEBP", lossless=True)
    params = GenerationParams(model="flux-schnell", prompt="x", seed=1, steps=4, width=32,
                              height=32)
    item = SimpleNamespace(
        request=GenerateRequest(request_id="webp-answer", params=params),
        result=SimpleNamespace(image_bytes=webp.getvalue(), image=None, latency=0.1),
        candidate=SimpleNamespace(target=SimpleNamespace(uid=1, hotkey="5miner")), attempts=1)
    gateway = SimpleNamespace(queue=None, config=SimpleNamespace(audit_fraction=0.0),
                              rng=random.Random(0))
    request = ImagesRequest(model="flux-schnell", prompt="x", response_format="b64_json")
    data = asyncio.run(Gateway.image_data(gateway, item, request, "http://x"))  # type: ignore[arg-type]
    png = base64.b64decode(data.b64_json)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(png)).convert("RGB").tobytes() == picture.tobytes()
