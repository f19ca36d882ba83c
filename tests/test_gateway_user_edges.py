"""The gateway as real users meet it at its edges: a miner that hangs, the official openai
SDK's nulls and browser headers, a failing miner beside a busy healthy one, quota headers on
errors, hostile field names, oversized or odd uploads, url answers and abandoned streams.

One subnet for the module: a LocalChain, two real FLUX.1-schnell miners on the tiny
checkpoint (miner1 switchable: ok, failing or hanging) and the real gateway (flux-schnell,
kolors and flux-dev, the last two without a miner) with one CORS origin."""
from __future__ import annotations

import base64
import io
import logging
import re
import time

import httpx
import openai
import pytest
from gateway_support import (
    CORS_ORIGIN,
    Only,
    Switch,
    make_chain,
    reset_routing,
    running_gateway,
    running_miners,
)
from PIL import Image

from niche.gateway.directory import Candidate
from niche.gateway.metrics import GatewayMetrics
from niche.gateway.router import HEDGE_FLOOR, Router
from niche.gateway.service import GatewayConfig
from niche.protocol import GenerationParams
from niche.validator.client import MinerTarget

MODEL = "flux-schnell"


@pytest.fixture(scope="module")
def subnet(tmp_path_factory, tiny_engine, tiny_root):
    net = make_chain(tmp_path_factory.mktemp("edges"), miners=2)
    switch = Switch(tiny_engine, MODEL)
    config = GatewayConfig(audit_fraction=0.0, cors_origins=(CORS_ORIGIN,))
    try:
        with running_miners(net, {"miner1": switch, "miner2": Only(tiny_engine, MODEL)}), \
                running_gateway(net, tiny_root, models=(MODEL, "kolors", "flux-dev"),
                                config=config, expect_miners=2) as gw:
            gw.net, gw.switch = net, switch
            gw.client = openai.OpenAI(api_key=gw.key, base_url=gw.base_url, max_retries=0)
            gw.auth = {"Authorization": f"Bearer {gw.key}"}
            yield gw
    finally:
        switch.release.set()
        net.chain.close()


@pytest.fixture
def gw(subnet):
    """The shared subnet with fresh routing and miner1 healthy, before and after."""
    subnet.switch.mode = "ok"
    subnet.switch.release.clear()
    reset_routing(subnet)
    try:
        yield subnet
    finally:
        subnet.switch.mode = "ok"
        subnet.switch.release.set()
        reset_routing(subnet)


def _miner1_first(gw) -> None:
    """The weighted draw picks miner1 (the switchable one) first, as it sometimes will."""
    gw.gateway.router.order = lambda model: sorted(gw.gateway.directory.serving(model),
                                                   key=lambda c: c.target.uid)


def _png(size: tuple[int, int] = (64, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (20, 40, 200)).save(out, "PNG")
    return out.getvalue()


def _metric(gw, line: str) -> float:
    for row in gw.gateway.metrics.render().decode().splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    return 0.0


# ---------------------------------------------------------------- 1. a miner that hangs
def test_a_hanging_miner_is_bypassed_by_default_and_cooled_down(gw):
    _miner1_first(gw)
    warm = gw.client.images.generate(model=MODEL, prompt="warm", size="64x64")
    assert warm.data[0].miner_uid == gw.net.uids["miner1"]  # its pace is now known
    gw.switch.mode, calls = "stall", gw.switch.calls
    timeouts = _metric(gw, 'niche_gateway_miner_failures_total{status="timeout"}')
    started = time.monotonic()
    item = gw.client.images.generate(model=MODEL, prompt="hung", size="64x64",
                                     extra_body={"timeout": 30}).data[0]
    took = time.monotonic() - started
    assert item.miner_uid == gw.net.uids["miner2"] and item.attempts == 2
    assert took < HEDGE_FLOOR + 5, f"waited {took:.1f}s on a hung miner"
    assert _metric(gw, 'niche_gateway_hedges_total{model="flux-schnell"}') >= 1
    # the hung miner is cooled down: the next images go straight to the healthy one
    assert _metric(gw, 'niche_gateway_miner_failures_total{status="timeout"}') == timeouts + 1
    again = gw.client.images.generate(model=MODEL, prompt="after", size="64x64", n=2)
    assert [(d.miner_uid, d.attempts) for d in again.data] == [(gw.net.uids["miner2"], 1)] * 2
    assert gw.switch.calls == calls + 1


def test_a_short_client_timeout_still_leaves_room_for_a_second_miner(gw, monkeypatch):
    """A fresh router (nothing observed yet) with the client's own 12 s: the first attempt
    gets half of it, not all of it. The beaten miner's pace is unknown, so its attempt is
    watched, not cancelled: stalled past its late time (the model's timeout, 14 s here,
    past the client's 12 s: the attempt runs on after the image is settled), it is cooled
    down then."""
    _miner1_first(gw)
    router = gw.gateway.router
    router._pace.clear()
    monkeypatch.setattr(router, "limit", lambda params: 14.0)
    gw.switch.mode = "stall"
    started = time.monotonic()
    item = gw.client.images.generate(model=MODEL, prompt="short", size="64x64",
                                     extra_body={"timeout": 12}).data[0]
    assert time.monotonic() - started < 12
    assert item.miner_uid == gw.net.uids["miner2"] and item.attempts == 2
    stalled = gw.net.wallets["miner1"].hotkey.ss58_address
    assert stalled not in router._cooling and router._watching  # not judged yet
    deadline = time.monotonic() + 20
    while router._watching and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not router._watching and stalled in router._cooling


def _router(hedge_after: float | None = None) -> tuple[Router, Candidate, GenerationParams]:
    router = Router(None, None, GatewayMetrics(), hedge_after=hedge_after,  # type: ignore[arg-type]
                    limit=lambda p: 24.0 * p.width * p.height * p.steps / (64 * 64 * 4))
    miner = Candidate(MinerTarget(1, "5a", None), frozenset({MODEL}), 1.0)
    return router, miner, GenerationParams(model=MODEL, prompt="x", seed=1, steps=4,
                                           width=64, height=64)


def test_attempt_timing_follows_the_observed_pace_with_a_floor_and_the_model_limit():
    router, miner, params = _router()
    assert router.timing(miner, params, cap=30.0) == (24.0, 24.0)  # unseen: the limit
    assert router.timing(miner, params, cap=4.0)[0] == 4.0  # half a short deadline
    router.observe(miner, params, 0.5)
    assert router.timing(miner, params, cap=30.0) == (HEDGE_FLOOR, HEDGE_FLOOR)
    assert router.slow(miner, params) == pytest.approx(1.5)  # no floor once beaten
    router.observe(miner, params, 10.0)  # slower lately: 0.5 + 0.3 x 9.5 = 3.35 s usual
    assert router.timing(miner, params, cap=30.0)[0] == pytest.approx(10.05)
    big = params.model_copy(update={"width": 128, "height": 128})  # 4x the work
    assert router.timing(miner, big, cap=60.0)[0] == pytest.approx(4 * 10.05)
    fixed, _, _ = _router(hedge_after=1.5)
    assert fixed.timing(miner, params, cap=30.0)[0] == 1.5  # --gateway.hedge_after


def test_a_miner_is_judged_stalled_by_its_own_pace_never_the_models():
    """The model's pace is the fastest miners' (maybe cheats with fewer steps): it may
    hedge an unseen miner early (asking a second miner costs nobody anything), but never
    cool it down; an honest 7 s miner was cooled as a timeout on every request, its own pace
    never learnt because the faster miner always ended its attempt first."""
    from types import SimpleNamespace

    from niche.gateway.router import _Attempt

    router, miner, params = _router()
    fast = Candidate(MinerTarget(2, "5b", None), frozenset({MODEL}), 1.0)
    router.observe(fast, params, 0.5)  # the model's pace, set by the fastest
    hedge, late = router.timing(miner, params, cap=30.0)
    assert (hedge, late) == (HEDGE_FLOOR, 24.0)
    attempt = _Attempt(miner, started=100.0, hedge_at=100.0 + hedge, late_at=100.0 + late)
    beaten = SimpleNamespace(delivered=True)
    assert router._too_long(beaten, attempt, params) == 124.0  # unseen: the model's timeout
    router.observe(miner, params, 2.0)  # its own pace, once it delivered
    assert router._too_long(beaten, attempt, params) == pytest.approx(106.0)  # 3 x 2 s


# ---------------------------------------------------------------- 2. explicit nulls
def test_explicit_nulls_from_the_openai_sdk_mean_the_defaults(gw):
    answer = gw.client.images.generate(model=MODEL, prompt="nulls", size="64x64", n=None,
                                       response_format=None, output_format=None, stream=None,
                                       quality=None, user=None)
    assert len(answer.data) == 1 and answer.output_format == "png"
    assert Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json))).format == "PNG"
    raw = httpx.post(gw.base_url + "/images/generations", headers=gw.auth, timeout=60, json={
        "model": MODEL, "prompt": "raw nulls", "size": "64x64", "stream": None,
        "negative_prompt": None, "pipeline": None, "output_compression": None})
    assert raw.status_code == 200, raw.text[:300]
    missing = httpx.post(gw.base_url + "/images/generations", headers=gw.auth,
                         json={"model": MODEL, "prompt": None})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"


# ---------------------------------------------------------------- 3. CORS for the SDKs
def test_a_browser_preflight_for_the_openai_sdk_headers_passes(gw):
    sent: dict[str, str] = {}
    hook = lambda request: sent.update({k.lower(): v for k, v in request.headers.items()})  # noqa: E731
    client = openai.OpenAI(api_key=gw.key, base_url=gw.base_url, max_retries=0,
                           http_client=httpx.Client(event_hooks={"request": [hook]}))
    client.models.list()
    stainless = sorted(h for h in sent if h.startswith("x-stainless"))
    assert len(stainless) >= 5, sent
    asked = ",".join(["authorization", "content-type", *stainless])
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": asked}
    allowed = httpx.options(gw.base_url + "/images/generations",
                            headers={"Origin": CORS_ORIGIN, **preflight})
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == CORS_ORIGIN
    granted = {h.strip().lower() for h in allowed.headers["access-control-allow-headers"]
               .split(",")}
    assert set(asked.split(",")) <= granted
    other = httpx.options(gw.base_url + "/images/generations",
                          headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


# ---------------------------------------------------------------- 4. cooling vs busy
def test_a_cooling_miner_gets_nothing_while_a_healthy_one_is_only_busy(gw):
    _miner1_first(gw)
    gw.switch.mode = "fail"
    first = gw.client.images.generate(model=MODEL, prompt="fails over", size="64x64")
    assert first.data[0].miner_uid == gw.net.uids["miner2"] and first.data[0].attempts == 2
    calls = gw.switch.calls
    both = gw.client.images.generate(model=MODEL, prompt="two", size="64x64", n=2)
    assert [(d.miner_uid, d.attempts) for d in both.data] == [(gw.net.uids["miner2"], 1)] * 2
    assert gw.switch.calls == calls  # the failing miner rested


# ---------------------------------------------------------------- 5. quota headers
def test_every_answer_to_a_keyed_request_carries_the_quota_headers(gw):
    secret, key = gw.gateway.keys.create("errors", per_minute=100, per_day=50)
    client = openai.OpenAI(api_key=secret, base_url=gw.base_url, max_retries=0)
    headers = {"Authorization": f"Bearer {secret}"}
    refused = [
        (openai.BadRequestError, dict(model=MODEL, prompt="x", size="65x64")),
        (openai.InternalServerError, dict(model="flux-dev", prompt="x", size="64x64")),
        (openai.APIStatusError, dict(model=MODEL, prompt="x", size="64x64",
                                     extra_body={"timeout": 0.001})),
    ]
    statuses = []
    for error, kwargs in refused:
        with pytest.raises(error) as caught:
            client.images.generate(**kwargs)
        statuses.append(caught.value.status_code)
        got = caught.value.response.headers
        assert got["x-ratelimit-limit-images"] == "50", (kwargs, dict(got))
        assert got["x-ratelimit-remaining-images"] == "50"  # nothing charged
        assert got["x-ratelimit-limit-requests"] == "100"
    assert statuses == [400, 503, 504]
    body = httpx.post(gw.base_url + "/images/generations", headers=headers, content=b"[")
    assert body.status_code == 400 and body.headers["x-ratelimit-remaining-images"] == "50"
    form = httpx.post(gw.base_url + "/images/edits", headers=headers, data={"prompt": "x"},
                      files={"mask": ("m.png", _png(), "image/png")})
    assert form.status_code == 400 and "x-ratelimit-reset-images" in form.headers
    assert gw.gateway.keys.used_today(key.id) == 0


# ---------------------------------------------------------------- 6. field names
EVIL = "evil\r\nX-Injected: 1"


def _form(*parts: bytes) -> tuple[bytes, dict[str, str]]:
    boundary = "XyZb0und"
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return body + f"--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"}


def _part(disposition: str, value: bytes) -> bytes:
    return f"Content-Disposition: form-data; {disposition}\r\n\r\n".encode() + value


def _edit(gw, *parts: bytes, prompt: bool = True) -> dict:
    """The 400 of an edit form with an image, a model, a prompt unless told and `parts`."""
    body, headers = _form(_part('name="image"; filename="a.png"', _png()),
                          *([_part('name="prompt"', b"x")] if prompt else []),
                          _part('name="model"', b"kolors"), *parts)
    answer = httpx.post(gw.base_url + "/images/edits", content=body,
                        headers={**gw.auth, **headers})
    assert answer.status_code == 400, answer.text[:300]
    return answer.json()["error"]


def _one_short_line(error: dict) -> None:
    for text in (error["message"], error["param"] or ""):
        assert "\r" not in text and "\n" not in text, error
    assert len(error["message"]) < 200 and len(error["param"] or "") <= 65, error


@pytest.mark.parametrize("disposition", [
    "name*=utf-8''evil%0D%0AX-Injected%3A%201",
    "name*=utf-8''evil%0D%0AX-Injected%3A%201; filename=\"f.png\"",
    'name="' + "A" * 3000 + '"',
])
def test_unknown_form_field_names_are_shown_on_one_short_line(gw, disposition):
    error = _edit(gw, _part(disposition, b"value"))
    _one_short_line(error)
    assert error["message"].endswith(": unknown parameter")


def test_a_field_given_twice_or_an_unknown_json_key_is_shown_on_one_short_line(gw):
    twice = _edit(gw, _part("name*=utf-8''evil%0D%0Ax", b"1"),
                  _part("name*=utf-8''evil%0D%0Ax", b"2"))
    _one_short_line(twice)
    for name in (EVIL, "B" * 3000):
        answer = httpx.post(gw.base_url + "/images/generations", headers=gw.auth,
                            json={"model": MODEL, "prompt": "x", name: 1})
        error = answer.json()["error"]
        assert answer.status_code == 400
        _one_short_line(error)
        assert error["message"].endswith(": unknown parameter")
    assert error["param"].endswith("…")


# ---------------------------------------------------------------- 7. oversized upload
def test_an_edit_upload_over_the_image_cap_names_its_size_and_the_limit(gw):
    big = _png() + bytes(19 * 1024 * 1024)
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client.images.edit(image=("big.png", big, "image/png"), prompt="x", model="kolors")
    message = caught.value.body["message"]
    assert message.startswith("image: the file is 19.0 MB; at most 18 MB"), message
    assert caught.value.body["param"] == "image"


# ---------------------------------------------------------------- 8. small things
def test_an_empty_upload_and_a_prompt_sent_as_a_file_say_what_is_wrong(gw):
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client.images.edit(image=("a.png", b"", "image/png"), prompt="x", model="kolors")
    assert caught.value.body["message"].startswith("image: the uploaded file is empty")
    error = _edit(gw, _part('name="prompt"; filename="p.txt"', b"a lighthouse"),
                  prompt=False)
    assert error["param"] == "prompt"
    assert error["message"].startswith("prompt: send prompt as a text field"), error


def test_405_says_allow_and_url_answers_take_head_and_their_own_name_only(gw):
    wrong = httpx.delete(gw.base_url + "/images/generations", headers=gw.auth)
    assert wrong.status_code == 405 and "POST" in wrong.headers["allow"]
    item = gw.client.images.generate(model=MODEL, prompt="linked", size="64x64",
                                     response_format="url", output_format="webp").data[0]
    assert item.url.endswith(".webp")
    got = httpx.get(item.url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
    assert got.headers["x-content-type-options"] == "nosniff"
    cache = got.headers["cache-control"]
    assert cache.startswith("private, max-age=") and 0 < int(cache.split("=")[1]) <= 3600
    head = httpx.head(item.url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == "image/webp"
    token = item.url.rsplit("/", 1)[1].split(".")[0]
    for name in (f"{token}.png", f"{token}.exe", token, f"{token}.webp.exe"):
        assert httpx.get(f"{gw.base_url}/files/{name}").status_code == 404, name


def test_an_abandoned_stream_is_logged_as_such(gw, caplog):
    caplog.set_level(logging.INFO, logger="niche.gateway.access")
    _miner1_first(gw)
    gw.switch.mode = "stall"
    with httpx.stream("POST", gw.base_url + "/images/generations", headers=gw.auth,
                      timeout=30, json={"model": MODEL, "prompt": "gone", "size": "64x64",
                                        "n": 2, "stream": True}) as answer:
        assert next(answer.iter_lines()).startswith(": niche: 2 images")
    pattern = re.compile(r"POST /v1/images/generations 200 \(stream abandoned, [01] of 2 "
                         r"images sent\) key=")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [r.getMessage() for r in caplog.records if r.name == "niche.gateway.access"]
        if any(pattern.match(line) for line in lines):
            return
        time.sleep(0.1)
    raise AssertionError(lines)



# ---------------------------------------------------------------- several images, one fails
def test_several_failed_images_leave_no_unread_failure(gw, monkeypatch, caplog):
    """n=2, both images fail in the same moment: the request fails as documented (all or
    nothing), and no failure is left unread (asyncio logged "Task exception was never
    retrieved" at ERROR for 1 in 5 two-image requests under load)."""
    import gc

    from niche.gateway.errors import GatewayError

    reset_routing(gw)

    async def all_fail(params, image, deadline):
        raise GatewayError(502, "every miner serving flux-schnell failed", code="x")

    monkeypatch.setattr(gw.gateway.router, "generate", all_fail)
    with caplog.at_level("ERROR", logger="asyncio"):
        with pytest.raises(openai.APIStatusError) as caught:
            gw.client.images.generate(model=MODEL, prompt="two", size="64x64", n=2)
        gc.collect()
        time.sleep(0.2)
        gc.collect()
    assert caught.value.status_code == 502
    assert "never retrieved" not in caplog.text
