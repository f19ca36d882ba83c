"""End to end on the real path: the real Engine on tiny checkpoints behind the miner server,
queried by the validator's client over signed HTTP, checked against a local regeneration."""
from __future__ import annotations

import asyncio

import httpx
import pytest
from miner_support import make_request, module_net, running_miner
from PIL import Image

from niche.imaging import encode_b64, encode_image, image_sha256
from niche.validator.client import MinerClient, QueryStatus


@pytest.fixture(scope="module")
def engine(tiny_engine):
    """The engine engineer's session Engine (flux-schnell + kolors on tiny checkpoints)."""
    return tiny_engine


net = module_net("e2enet")


def test_real_engine_behind_the_miner(net, engine):
    client = MinerClient(net.wallets["hi"])
    cond = Image.new("RGB", (64, 64), (0, 0, 0))
    cond.paste((255, 255, 255), (16, 16, 48, 48))
    cond_b64, _ = encode_b64(cond)
    with running_miner(net, engine) as m:
        info = asyncio.run(client.info(m.url, m.hotkey))
        assert {mi.model for mi in info.info.models} == {"flux-schnell", "kolors"}
        reqs = [make_request("a red fox", 7, model="flux-schnell"),
                make_request("a square", 3, model="kolors", pipeline="controlnet-canny",
                             image=cond_b64)]
        target = (1, m.hotkey, m.url)
        results = asyncio.run(client.query_many([(target, r) for r in reqs]))
        bad = asyncio.run(client.query(target, make_request("x", 1, model="kolors",
                                                            pipeline="controlnet-canny")))
        metrics = httpx.get(m.metrics_url).text
    for req, res in zip(reqs, results, strict=False):
        assert res.status is QueryStatus.OK, res.reason
        assert res.image.size == (64, 64) and res.image.mode == "RGB"
        # the same request regenerated here gives the very same bytes the miner signed (the
        # validator asked for RGB-ZSTD: protocol 4, niche/rawimage.py)
        local = engine.generate(engine.resolve(req.params), cond if req.image else None)
        assert res.image_bytes[:4] == b"NRZ1"
        assert image_sha256(encode_image(local, "RGB-ZSTD")) == res.response.image_sha256
    assert bad.status is QueryStatus.HTTP_ERROR and bad.http_status == 400
    assert bad.error.field == "image"
    assert 'niche_miner_generation_seconds_count{model="kolors"} 1.0' in metrics
