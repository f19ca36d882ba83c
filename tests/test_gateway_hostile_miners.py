"""Hostile miners against a real gateway on 127.0.0.1: a miner whose 400 blames the user's
prompt (with text of its own), a miner whose PNG carries chunks of its choosing, and the
organic audit queue written from many threads at once."""
from __future__ import annotations

import base64
import io
import threading

import httpx
import openai
import pytest
from gateway_support import Only, make_chain, running_gateway, running_miners
from PIL import Image, PngImagePlugin

import niche.miner.server as miner_server
import niche.miner.service as miner_service
from niche.errors import InvalidRequest
from niche.gateway.service import Gateway
from niche.imaging import encode_image, image_sha256

PHISH = ("your prompt is flagged.\nTo restore access visit http://evil.example/login "
         "and paste your API key there." + " padding" * 2000)


class Liar(Only):
    """Answers every generation with a 400 blaming the user's prompt, in its own words."""

    def resolve(self, params):
        raise InvalidRequest(PHISH, field="prompt")


def _liar_first(gw) -> None:
    """Route to miner1 first (as the weighted draw sometimes will)."""
    gw.gateway.router.order = lambda model: sorted(gw.gateway.directory.serving(model),
                                                   key=lambda c: c.target.uid)


def _generate(gw, **extra) -> httpx.Response:
    return httpx.post(gw.base_url + "/images/generations", timeout=60,
                      headers={"Authorization": f"Bearer {gw.key}"},
                      json={"model": "flux-schnell", "prompt": "a red circle", "size": "64x64",
                            **extra})


def test_a_miner_blaming_the_prompt_is_skipped_and_cooled_down(tmp_path, tiny_engine,
                                                               tiny_root):
    net = make_chain(tmp_path, miners=2)
    try:
        with running_miners(net, {"miner1": Liar(tiny_engine, "flux-schnell"),
                                  "miner2": Only(tiny_engine, "flux-schnell")}), \
                running_gateway(net, tiny_root, models=("flux-schnell",)) as gw:
            _liar_first(gw)
            resp = _generate(gw)
            assert resp.status_code == 200, resp.text[:300]
            assert resp.json()["data"][0]["miner_uid"] == net.uids["miner2"]
            assert resp.json()["data"][0]["attempts"] == 2
            liar = net.wallets["miner1"].hotkey.ss58_address
            assert liar in gw.gateway.router._cooling
    finally:
        net.chain.close()


def test_miners_that_all_blame_the_prompt_never_speak_to_the_user(tmp_path, tiny_engine,
                                                                  tiny_root):
    net = make_chain(tmp_path, miners=2)
    try:
        with running_miners(net, {"miner1": Liar(tiny_engine, "flux-schnell"),
                                  "miner2": Liar(tiny_engine, "flux-schnell")}), \
                running_gateway(net, tiny_root, models=("flux-schnell",)) as gw:
            client = openai.OpenAI(api_key=gw.key, base_url=gw.base_url, max_retries=0)
            with pytest.raises(openai.BadRequestError) as caught:
                client.images.generate(model="flux-schnell", prompt="a red circle",
                                       size="64x64")
            message = caught.value.body["message"]
            assert caught.value.body["param"] == "prompt"
            assert message.startswith("prompt: refused by 2 of the miners serving "
                                      "flux-schnell"), message
            assert "evil.example" not in message and "\n" not in message
            assert len(message) < 200
            assert gw.gateway.keys.used_today(gw.gateway.keys.list()[0].id) == 0
    finally:
        net.chain.close()


def _dirty_png(image, fmt="png"):
    """The miner's PNG with a text chunk of its choosing and 100 kB of padding."""
    if fmt.upper() != "PNG":
        return encode_image(image, fmt)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "Your account is suspended: http://evil.example/login")
    info.add_text("Padding", "A" * 100_000)
    out = io.BytesIO()
    image.convert("RGB").save(out, "PNG", pnginfo=info)
    return out.getvalue()


def test_users_get_the_pixels_not_the_miners_png_chunks(tmp_path, tiny_engine, tiny_root,
                                                        monkeypatch):
    monkeypatch.setattr(miner_service, "encode_image", _dirty_png)
    real = miner_server.binary_image_format
    monkeypatch.setattr(miner_server, "binary_image_format",
                        lambda accept, version: real(accept, version) and "png")
    net = make_chain(tmp_path, miners=1)
    try:
        with running_miners(net, {"miner1": Only(tiny_engine, "flux-schnell")}), \
                running_gateway(net, tiny_root, models=("flux-schnell",)) as gw:
            queued: list = []
            real_queue = gw.gateway._queue_audit
            gw.gateway._queue_audit = lambda item: (queued.append(item), real_queue(item))
            resp = _generate(gw)
            assert resp.status_code == 200, resp.text[:300]
            png = base64.b64decode(resp.json()["data"][0]["b64_json"])
            user = Image.open(io.BytesIO(png))
            assert "Comment" not in user.text and "Padding" not in user.text
            assert len(png) < 50_000, f"{len(png)} bytes for a 64x64 image"
            # the audit still gets the bytes the miner signed, chunks and all
            signed = queued[0].result.image_bytes
            assert b"evil.example" in signed
            assert image_sha256(signed) == queued[0].result.response.image_sha256
            assert list(user.convert("RGB").getdata()) == list(
                Image.open(io.BytesIO(signed)).convert("RGB").getdata())
    finally:
        net.chain.close()


def test_concurrent_audit_submissions_are_all_queued(tmp_path, tiny_engine, tiny_root):
    net = make_chain(tmp_path, miners=1)
    try:
        with running_miners(net, {"miner1": Only(tiny_engine, "flux-schnell")}), \
                running_gateway(net, tiny_root, models=("flux-schnell",)) as gw:
            gateway = gw.gateway
            seen: list = []
            gateway._queue_audit = lambda item: (seen.append(item),
                                                 Gateway._queue_audit(gateway, item))
            assert _generate(gw).status_code == 200
            queue = gateway.queue
            queue.max_pending = 10**9
            before = sum(queue.counts().values())

            def submit_many() -> None:
                for _ in range(50):
                    Gateway._queue_audit(gateway, seen[0])

            threads = [threading.Thread(target=submit_many) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert sum(queue.counts().values()) - before == 400
    finally:
        net.chain.close()
