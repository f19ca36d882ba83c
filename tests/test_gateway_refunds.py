"""What a key pays for: a refusal the caller did not cause (the subnet saturated) costs it
nothing and its 429 shows the key's own standing, and a client that hangs up on a request
pays only for what it was sent, its remaining work cancelled and its log line a 499.

One subnet for the module: a LocalChain; two FLUX.1-schnell miners on the tiny checkpoint
behind gates (a generation waits until its gate opens, so a client can hang up mid-way);
one Kolors miner advertising 6 requests a minute, of which the validator's challenges leave
the gateway 0.4 (its first image takes the one token; the next comes in 150 s: kolors is
saturated); the real gateway under uvicorn, with one request in flight per key; the
official openai client."""
from __future__ import annotations

import logging
import threading
import time

import httpx
import openai
import pytest
from gateway_support import NETUID, Only, make_chain, running_gateway
from miner_support import announced_miners

from niche.gateway.service import GatewayConfig
from niche.miner.service import MinerConfig

MODEL = "flux-schnell"
PER_MINUTE, PER_DAY = 3, 20
"""A test key's limits: 3 a minute, so one request charged shows (a token refills in 20 s)."""
STANDING = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
            "x-ratelimit-limit-images", "x-ratelimit-remaining-images")


class Held(Only):
    """The tiny engine behind a gate (open unless a test closes it), counting the
    generations it was asked for."""

    def __init__(self, engine, model: str):
        super().__init__(engine, model)
        self.open = threading.Event()
        self.open.set()
        self.calls = 0

    def generate_with_states(self, params, image=None):
        self.calls += 1
        self.open.wait(30)
        return self._engine.generate_with_states(params, image)


@pytest.fixture(scope="module")
def gw(tmp_path_factory, tiny_engine, tiny_root):
    net = make_chain(tmp_path_factory.mktemp("refunds"), miners=3)
    held = [Held(tiny_engine, MODEL), Held(tiny_engine, MODEL)]

    def config(per_minute: int) -> MinerConfig:
        return MinerConfig(netuid=NETUID, requests_per_minute=per_minute,
                           allow_hotkeys=(net.validator_hotkey,))

    miners = {"miner1": (held[0], net.wallets["miner1"], config(0)),
              "miner2": (held[1], net.wallets["miner2"], config(0)),
              "miner3": (Only(tiny_engine, "kolors"), net.wallets["miner3"], config(6))}
    try:
        with announced_miners(net.chain, miners), running_gateway(
                net, tiny_root, models=(MODEL, "kolors"), expect_miners=3,
                config=GatewayConfig(audit_fraction=0.0, max_inflight_per_key=1)) as gw:
            gw.held = held
            yield gw
    finally:
        for gate in held:
            gate.open.set()
        net.chain.close()


def _key(gw, name: str) -> tuple[str, str, openai.OpenAI]:
    """A fresh key (its secret and id) and an openai client on it that does not retry."""
    secret, key = gw.gateway.keys.create(name, per_minute=PER_MINUTE, per_day=PER_DAY)
    return secret, key.id, openai.OpenAI(api_key=secret, base_url=gw.base_url, max_retries=0)


def _standing(gw, secret: str) -> dict[str, str]:
    """The key's limits and what is left, as GET /v1/models shows them (charging nothing)."""
    headers = httpx.get(gw.base_url + "/models", timeout=30,
                        headers={"Authorization": f"Bearer {secret}"}).headers
    return {name: headers[name] for name in STANDING}


@pytest.fixture(scope="module")
def saturated(gw):
    """Kolors with its one token spent (the first image of the module takes it)."""
    client = openai.OpenAI(api_key=gw.key, base_url=gw.base_url, max_retries=0)
    for _ in range(3):
        try:
            client.images.generate(model="kolors", prompt="warm", size="64x64")
        except openai.RateLimitError as exc:
            assert exc.code == "capacity_exhausted", exc.message
            return
    raise AssertionError("kolors never saturated")


def test_a_saturated_subnet_costs_the_key_nothing_and_its_429_shows_the_keys_standing(
        gw, saturated):
    secret, _, client = _key(gw, "capacity")
    before = _standing(gw, secret)
    assert before == {"x-ratelimit-limit-requests": str(PER_MINUTE),
                      "x-ratelimit-remaining-requests": str(PER_MINUTE),
                      "x-ratelimit-limit-images": str(PER_DAY),
                      "x-ratelimit-remaining-images": str(PER_DAY)}
    for _ in range(PER_MINUTE + 1):  # charged, the last would be rate_limit_exceeded
        with pytest.raises(openai.RateLimitError) as caught:
            client.images.generate(model="kolors", prompt="a red circle", size="64x64")
        assert caught.value.code == "capacity_exhausted"
        headers = caught.value.response.headers
        assert {name: headers[name] for name in STANDING} == before
        retry = headers["retry-after"]
        assert 1 <= int(retry) <= 60
        # the subnet's figures, under their own names: 0.4 kolors requests a minute
        assert headers["x-niche-capacity-limit-requests"] == "0.4"
        assert headers["x-niche-capacity-remaining-requests"] == "0"
        assert headers["x-niche-capacity-reset-requests"] == f"{retry}s"
    assert _standing(gw, secret) == before


def test_a_saturated_subnet_mid_stream_costs_the_key_nothing(gw, saturated):
    secret, _, client = _key(gw, "capacity-stream")
    before = _standing(gw, secret)
    with pytest.raises(openai.APIError) as caught:
        for _ in client.images.generate(model="kolors", prompt="a red circle", size="64x64",
                                        n=2, stream=True):
            pass
    assert caught.value.code == "capacity_exhausted", caught.value.message
    assert _standing(gw, secret) == before


def _access_lines(caplog, key_id: str) -> list[logging.LogRecord]:
    """The key's image requests in the access log."""
    return [r for r in caplog.records if r.name == "niche.gateway.access"
            and r.getMessage().startswith("POST /v1/images/generations ")
            and f" key={key_id} " in r.getMessage()]


def _requests_metric(gw, status: str) -> float:
    line = f'niche_gateway_requests_total{{model="{MODEL}",status="{status}"}} '
    rows = [row for row in gw.gateway.metrics.render().decode().splitlines()
            if row.startswith(line)]
    return float(rows[0].split()[-1]) if rows else 0.0


def test_a_client_that_hangs_up_pays_nothing_and_its_work_is_cancelled(gw, caplog):
    """n=3 on two miners (one generation at a time each): two images are being made and the
    third waits for a slot when the client gives up. The third is never asked of a miner,
    the key gets its 3 images back, its in-flight slot is free at once, and the log line is
    a 499, as nginx logs a request the client closed."""
    caplog.set_level(logging.INFO, logger="niche.gateway.access")
    secret, key_id, client = _key(gw, "hangup")
    assert _standing(gw, secret)["x-ratelimit-remaining-images"] == str(PER_DAY)
    gone = _requests_metric(gw, "499")
    calls = sum(gate.calls for gate in gw.held)
    for gate in gw.held:
        gate.open.clear()
    try:
        with pytest.raises(openai.APITimeoutError):
            client.images.generate(model=MODEL, prompt="gone", size="64x64", n=3,
                                   timeout=1.5)
        assert sum(gate.calls for gate in gw.held) == calls + 2
        deadline = time.monotonic() + 5
        while not _access_lines(caplog, key_id) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for gate in gw.held:  # the two images in the miners finish, for nobody
            gate.open.set()
    lines = _access_lines(caplog, key_id)
    assert lines, "no log line while the miners still worked: the hang-up went unnoticed"
    [line] = lines
    assert line.getMessage().startswith(f"POST /v1/images/generations 499 key={key_id} "), \
        line.getMessage()
    assert line.getMessage().endswith(" miners=-") and line.levelno == logging.INFO
    assert _requests_metric(gw, "499") == gone + 1
    after = _standing(gw, secret)
    assert after["x-ratelimit-remaining-images"] == str(PER_DAY)  # all 3 refunded
    # the hang-up was the caller's doing: its request stays charged (3 a minute, 2 left)
    assert after["x-ratelimit-remaining-requests"] == str(PER_MINUTE - 1)
    # the key's one in-flight slot came back: the next request is served, not 429
    answer = client.images.generate(model=MODEL, prompt="back", size="64x64", timeout=60)
    assert len(answer.data) == 1
    time.sleep(0.5)  # a third image still routed would have reached a miner by now
    assert sum(gate.calls for gate in gw.held) == calls + 3  # 2 abandoned + this one
    assert _standing(gw, secret)["x-ratelimit-remaining-images"] == str(PER_DAY - 1)


def test_a_client_that_hangs_up_on_a_stream_pays_alike(gw, caplog):
    """The same hang-up on a stream: refunded the same way (one bill for both paths), and
    logged as the stream it was."""
    caplog.set_level(logging.INFO, logger="niche.gateway.access")
    secret, key_id, _ = _key(gw, "hangup-stream")
    for gate in gw.held:
        gate.open.clear()
    try:
        with httpx.stream("POST", gw.base_url + "/images/generations", timeout=30,
                          headers={"Authorization": f"Bearer {secret}"},
                          json={"model": MODEL, "prompt": "gone", "size": "64x64", "n": 2,
                                "stream": True}) as answer:
            assert next(answer.iter_lines()).startswith(": niche: 2 images")
        deadline = time.monotonic() + 5
        while not _access_lines(caplog, key_id) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for gate in gw.held:
            gate.open.set()
    assert [r.getMessage().split(" key=")[0] for r in _access_lines(caplog, key_id)] == \
        ["POST /v1/images/generations 200 (stream abandoned, 0 of 2 images sent)"]
    assert _standing(gw, secret)["x-ratelimit-remaining-images"] == str(PER_DAY)


def _bomb_png() -> bytes:
    """A small PNG (a few KB) of 4096x4096 flat pixels: 48 MB once decoded."""
    import io

    from PIL import Image
    out = io.BytesIO()
    Image.new("RGB", (4096, 4096), (9, 9, 9)).save(out, format="PNG", optimize=True)
    return out.getvalue()


def test_a_key_pays_one_request_for_each_refusal_and_none_is_decoded_past_its_rate(
        gw, monkeypatch):
    """The key's request is taken before its body is read: a 400 (its own bad field) and a
    413 (its own upload) cost one request each, as the docs say, and a key with none left
    gets its 429 without the gateway decoding its upload."""
    secret, _, client = _key(gw, "pays-refusals")
    auth = {"Authorization": f"Bearer {secret}"}
    bad = httpx.post(gw.base_url + "/images/generations", headers=auth, timeout=30,
                     json={"model": MODEL, "prompt": "x", "size": "65x64"})
    assert bad.status_code == 400 and bad.headers["x-ratelimit-remaining-requests"] == "2"
    huge = httpx.post(gw.base_url + "/images/edits", headers=auth, timeout=60,
                      files={"image": ("a.png", b"\x89PNG" + b"\0" * (40 << 20), "image/png")},
                      data={"model": MODEL, "prompt": "x"})
    assert huge.status_code == 413 and huge.headers["x-ratelimit-remaining-requests"] == "1"
    client.images.generate(model=MODEL, prompt="a blue square", size="64x64")
    decoded = []
    catalog = type(gw.gateway.catalog)  # frozen: counted on its class
    real = catalog.check_image
    monkeypatch.setattr(catalog, "check_image",
                        lambda self, *a, **kw: decoded.append(1) or real(self, *a, **kw))
    bomb = _bomb_png()
    for _ in range(3):
        with pytest.raises(openai.RateLimitError) as caught:
            client.images.edit(model=MODEL, prompt="x", image=("bomb.png", bomb, "image/png"))
        assert caught.value.code == "rate_limit_exceeded", caught.value.message
    assert decoded == []  # refused before the body was read, let alone decoded


def test_more_images_than_the_whole_daily_quota_says_so_without_retry_after(gw):
    secret, _ = gw.gateway.keys.create("small-day", per_minute=PER_MINUTE, per_day=3)
    client = openai.OpenAI(api_key=secret, base_url=gw.base_url, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        client.images.generate(model=MODEL, prompt="x", size="64x64", n=4)
    assert caught.value.code == "insufficient_quota"
    assert "more than this key's whole daily quota of 3" in caught.value.message
    assert "retry-after" not in caught.value.response.headers  # no wait makes it fit
    assert caught.value.response.headers["x-ratelimit-remaining-images"] == "3"


@pytest.mark.parametrize("path", ["/images/generations/", "/models/"])
def test_a_trailing_slash_is_a_json_404_not_an_empty_redirect(gw, path):
    method = httpx.post if path.startswith("/images") else httpx.get
    resp = method(gw.base_url + path, headers={"Authorization": f"Bearer {gw.key}"},
                  timeout=30, follow_redirects=False)
    assert resp.status_code == 404, resp.status_code
    assert resp.json()["error"]["message"]
