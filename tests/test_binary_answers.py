"""Binary answers (protocol 4, niche/wire.py) over real HTTP on 127.0.0.1.

A miner answering protocol 4 sends the header and the PNG bytes as they are; a protocol-3
miner (or a protocol-3 validator) keeps JSON with base64, side by side with the real
validator client. Hostile binary bodies (truncated, oversized, wrong length, bad codec
header, a decompression bomb), each properly signed so that every check before it passes,
are refused with one line, and the client and the miner go on serving.
"""
from __future__ import annotations

import asyncio
import io
import struct
import zlib

import httpx
import pytest
import zstandard
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

from niche.auth import sign_request, sign_response
from niche.chain.wallets import create_wallet
from niche.devnet.servers import BackgroundServer
from niche.errors import InvalidRequest
from niche.imaging import (
    ANSWER_FORMATS,
    ImageLimits,
    bytes_to_image,
    encode_image,
    image_sha256,
    to_b64,
    to_png,
)
from niche.protocol import GenerateResponse, InfoResponse, ModelInfo
from niche.validator.client import MinerClient, QueryStatus
from niche.wire import (
    ANSWER_MAGIC,
    ANSWER_MEDIA_TYPE,
    AnswerHeader,
    BadBody,
    answer_accept,
    pack,
    pack_answer,
    unpack_answer,
)
from tests.miner_support import (
    StubEngine,
    make_request,
    module_net,
    round_with_two_versions,
    running_miner,
)

net = module_net("binary")


def _raw_post(miner, wallet, request, accept: str) -> httpx.Response:
    body = request.model_dump_json(exclude_none=True).encode()
    headers = sign_request(wallet, method="POST", path="/v1/generate", body=body,
                           receiver=miner.hotkey)
    return httpx.post(miner.url + "/v1/generate", content=body, timeout=30,
                      headers={**headers, "Content-Type": "application/json", "Accept": accept})


def _in(request, version: int):
    return request.model_copy(update={"protocol_version": version})


def test_protocol_3_and_4_miners_side_by_side(net):
    """One validator (2..4) asks a protocol-3 miner and a protocol-4 one: JSON from the
    first, a binary body from the second, the same checks and the same kind of result."""
    client = MinerClient(net.wallets["hi"])
    with running_miner(net, StubEngine(), protocol_versions=(2, 3)) as old, \
            running_miner(net, StubEngine()) as new:
        async def ask(miner, seed):
            info = await client.info(miner.url, miner.hotkey)
            return info, await client.query((0, miner.hotkey, miner.url),
                                            make_request(seed=seed, width=64, height=48))
        (old_info, old_answer), (new_info, new_answer) = asyncio.run(ask(old, 3)), \
            asyncio.run(ask(new, 4))
        assert (old_info.protocol_version, new_info.protocol_version) == (3, 4)
        # what each miner puts on the wire for such a request
        both = f"{ANSWER_MEDIA_TYPE}, application/json"  # what the client sends in v4
        v3 = _raw_post(old, net.wallets["hi"], _in(make_request(seed=5), 3), both)
        v4 = _raw_post(new, net.wallets["hi"], _in(make_request(seed=5), 4), both)
        v4_json = _raw_post(new, net.wallets["hi"], make_request(seed=5), "application/json")
        v4_fast = _raw_post(new, net.wallets["hi"], _in(make_request(seed=5), 4),
                            answer_accept(("rgb-zstd",)))
        v3_fast = _raw_post(old, net.wallets["hi"], _in(make_request(seed=5), 3),
                            answer_accept(("rgb-zstd",)))
        refused = _raw_post(new, net.wallets["hi"], _in(make_request(seed=5), 4),
                            f"{ANSWER_MEDIA_TYPE}; q=0, application/json")
    assert v3.headers["content-type"] == "application/json" and "image" in v3.json()
    assert v3_fast.headers["content-type"] == "application/json"  # v3 knows no binary
    assert v4.headers["content-type"] == ANSWER_MEDIA_TYPE and v4.content[:4] == ANSWER_MAGIC
    assert v4_json.headers["content-type"] == "application/json"  # asked for JSON: JSON
    assert refused.headers["content-type"] == "application/json"  # q=0: not acceptable
    answer, png, fmt = unpack_answer(v4.content)  # binary without image=: PNG
    assert fmt == "png" and image_sha256(png) == answer.image_sha256 and answer.image == ""
    assert png == to_png(png)  # users get the signed bytes themselves
    fast, raw, fmt = unpack_answer(v4_fast.content)
    assert fmt == "rgb-zstd" and raw[:4] == b"NRZ1" and image_sha256(raw) == fast.image_sha256
    same_pixels = bytes_to_image(raw, limits=ImageLimits(formats=ANSWER_FORMATS))
    assert same_pixels.tobytes() == bytes_to_image(png).tobytes()
    with pytest.raises(InvalidRequest, match="RGB-ZSTD not accepted"):
        bytes_to_image(raw)  # a user-facing reader (conditioning images) never takes it
    for result, version, head in ((old_answer, 3, b"\x89PNG"), (new_answer, 4, b"NRZ1")):
        assert result.status is QueryStatus.OK, result.reason
        assert result.response.protocol_version == version
        assert result.image.size == (64, 48)
        assert result.image_bytes[:4] == head  # the validator asks v4 miners for RGB-ZSTD
    assert old_answer.response.image == to_b64(old_answer.image_bytes)
    assert new_answer.response.image == ""  # binary: the bytes are in image_bytes only


def test_a_protocol_3_validator_gets_json_from_a_protocol_4_miner(net):
    client = MinerClient(net.wallets["hi"], protocol_versions=(2, 3))
    with running_miner(net, StubEngine()) as new:
        async def ask():
            await client.info(new.url, new.hotkey)
            return await client.query((0, new.hotkey, new.url), make_request(seed=6))
        result = asyncio.run(ask())
    assert result.status is QueryStatus.OK and result.response.protocol_version == 3


# ----------------------------------------------------------------------------- hostile
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width x height whose IDAT is a few bytes: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))


def _zstd(width: int, height: int, frame: bytes, filter_type: int = 1) -> bytes:
    """RGB-ZSTD bytes declaring width x height, with whatever frame a liar likes."""
    return struct.pack(">4sIIB", b"NRZ1", width, height, filter_type) + frame


_NOISE = Image.frombytes("RGB", (32, 32), bytes((i * 131 + 7) % 251 for i in range(32 * 32 * 3)))
_GOOD_ZSTD = encode_image(_NOISE, "RGB-ZSTD")


def _webp(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, "WEBP", **options)
    return out.getvalue()


_ZERO_BOMB = zstandard.ZstdCompressor(level=1).compress(bytes(4096 * 4096 * 3))  # ~1.5 KB
ZSTD_LIES: dict[str, tuple[bytes, str]] = {
    "zstd_honest": (_GOOD_ZSTD, "rgb-zstd"),
    "zstd_bomb": (_zstd(4096, 4096, _ZERO_BOMB), "rgb-zstd"),  # 48 MiB declared as such
    "zstd_bomb_small": (_zstd(32, 32, _ZERO_BOMB), "rgb-zstd"),  # the frame lies about size
    "zstd_size_mismatch": (_zstd(32, 32, zstandard.ZstdCompressor().compress(
        _NOISE.tobytes()[:-3])), "rgb-zstd"),
    "zstd_no_size": (_zstd(32, 32, zstandard.ZstdCompressor(write_content_size=False)
                           .compress(_NOISE.tobytes())), "rgb-zstd"),
    "zstd_truncated": (_GOOD_ZSTD[:-20], "rgb-zstd"),
    "zstd_trailing": (_GOOD_ZSTD + b"\x00" * 16, "rgb-zstd"),
    "zstd_two_frames": (_GOOD_ZSTD + _GOOD_ZSTD[13:], "rgb-zstd"),
    "zstd_filter": (_zstd(32, 32, _GOOD_ZSTD[13:], filter_type=4), "rgb-zstd"),
    "zstd_empty": (_zstd(0, 32, _GOOD_ZSTD[13:]), "rgb-zstd"),
    "zstd_garbage": (_zstd(32, 32, bytes(range(256)) * 2), "rgb-zstd"),
    "zstd_as_png": (_GOOD_ZSTD, "png"),  # header says png, bytes are RGB-ZSTD
    "png_as_zstd": (encode_image(_NOISE), "rgb-zstd"),  # and the other way round
    "zstd_as_webp": (_GOOD_ZSTD, "webp"),
    "lossy_webp": (_webp(_NOISE, quality=90), "webp"),  # smaller, and not the model's pixels
    "extended_webp": (_webp(_NOISE, lossless=True, xmp=b"<x/>"), "webp"),  # VP8X + metadata
}


def _hostile_miner(wallet) -> FastAPI:
    """Answers each request by the lie named in its prompt, signing whatever it sends."""
    app = FastAPI()
    hotkey = wallet.hotkey.ss58_address
    good_png = encode_image(Image.new("RGB", (32, 32), (9, 90, 200)))

    @app.get("/v1/info")
    async def info():
        return JSONResponse(InfoResponse(hotkey=hotkey, models=[ModelInfo(
            model="stub", pipelines=["txt2img"])], capacity_per_minute=1,
            miner_version="x", protocol_versions=[2, 3, 4]).model_dump(mode="json"))

    @app.post("/v1/generate")
    async def generate(request: Request):
        data = await request.json()
        lie, rid = data["params"]["prompt"], data["request_id"]
        image = {"bomb": _png_header_only(100_000, 100_000),  # Pillow's own guard
                 "bomb_in_caps": _png_header_only(5000, 5000)}.get(lie, good_png)
        if lie == "not_png":
            image = b"GIF89a" + b"\x00" * 64
        image_format = "png"
        if lie in ZSTD_LIES:  # RGB-ZSTD answers, as a protocol-4 validator asks for
            image, image_format = ZSTD_LIES[lie]
        digest = image_sha256(image)
        answer = GenerateResponse(
            protocol_version=data["protocol_version"], request_id=rid, model="stub", image="",
            image_sha256=digest, miner_hotkey=hotkey,
            signature=sign_response(wallet.hotkey, rid, digest,
                                    version=data["protocol_version"]),
            generation_seconds=0.1, miner_version="x")
        body = pack_answer(answer, image, image_format)
        if lie == "truncated":
            body = body[:-100]
        elif lie == "extra":
            body = body + b"\x00" * 10
        elif lie == "bad_magic":
            body = b"NIA9" + body[4:]
        elif lie == "short":
            body = body[:6]
        elif lie == "header_len":
            body = body[:4] + struct.pack(">I", 2**31) + body[8:]
        elif lie == "header_json":
            body = body[:8] + b"{" * (len(body) - 8)
        elif lie == "header_deep":  # json.loads raises RecursionError, not ValueError
            body = body[:4] + struct.pack(">I", 60000) + b"[" * 60000
        elif lie == "json_deep":
            return Response(b"[" * 100_000, media_type="application/json")
        elif lie == "declared_big":  # claims 20 MB of image, sends 1 KB
            head = body[8:8 + struct.unpack(">I", body[4:8])[0]]
            head = head.replace(f'"image_length":{len(image)}'.encode(),
                                b'"image_length":20000000')
            body = body[:4] + struct.pack(">I", len(head)) + head + image
        elif lie == "oversized":
            body = body + b"\x00" * (40 * 1024 * 1024)
        return Response(body, media_type=ANSWER_MEDIA_TYPE)

    return app


HOSTILE = {
    "truncated": (QueryStatus.INVALID_RESPONSE, "truncated"),
    "extra": (QueryStatus.INVALID_RESPONSE, "10 bytes after"),
    "short": (QueryStatus.INVALID_RESPONSE, "truncated"),
    "bad_magic": (QueryStatus.INVALID_RESPONSE, "not a NIA1 body"),
    "header_len": (QueryStatus.INVALID_RESPONSE, "more than 65536"),
    "header_json": (QueryStatus.INVALID_RESPONSE, "header is not JSON"),
    "header_deep": (QueryStatus.INVALID_RESPONSE, "header is not JSON"),
    "json_deep": (QueryStatus.INVALID_RESPONSE, "body is not JSON"),
    "declared_big": (QueryStatus.INVALID_RESPONSE, "image of 20000000 bytes declared"),
    "not_png": (QueryStatus.INVALID_RESPONSE, "image bytes are not PNG"),
    "oversized": (QueryStatus.RESPONSE_TOO_LARGE, ""),
    "bomb": (QueryStatus.INVALID_IMAGE, "decompression bomb refused"),
    "bomb_in_caps": (QueryStatus.INVALID_IMAGE, "5000x5000 exceeds 64 px per side"),
    "zstd_bomb": (QueryStatus.INVALID_IMAGE, "RGB-ZSTD: 4096x4096 exceeds 64 px per side"),
    "zstd_bomb_small": (QueryStatus.INVALID_IMAGE,
                        "zstd frame declares 50331648 bytes, 32x32 RGB is 3072"),
    "zstd_size_mismatch": (QueryStatus.INVALID_IMAGE,
                           "zstd frame declares 3069 bytes, 32x32 RGB is 3072"),
    "zstd_no_size": (QueryStatus.INVALID_IMAGE, "zstd frame declares no content size"),
    "zstd_truncated": (QueryStatus.INVALID_IMAGE, "RGB-ZSTD: corrupt zstd frame"),
    "zstd_trailing": (QueryStatus.INVALID_IMAGE, "RGB-ZSTD: corrupt zstd frame"),
    "zstd_two_frames": (QueryStatus.INVALID_IMAGE, "RGB-ZSTD: corrupt zstd frame"),
    "zstd_filter": (QueryStatus.INVALID_IMAGE, "RGB-ZSTD: unknown filter 4"),
    "zstd_empty": (QueryStatus.INVALID_IMAGE, "RGB-ZSTD: empty image 0x32"),
    "zstd_garbage": (QueryStatus.INVALID_IMAGE, "RGB-ZSTD: corrupt zstd frame header"),
    "zstd_as_png": (QueryStatus.INVALID_RESPONSE, "image bytes are not PNG"),
    "png_as_zstd": (QueryStatus.INVALID_RESPONSE, "image bytes are not RGB-ZSTD"),
    "zstd_as_webp": (QueryStatus.INVALID_RESPONSE, "image bytes are not WEBP"),
    "lossy_webp": (QueryStatus.INVALID_IMAGE, "lossy or extended WebP answer"),
    "extended_webp": (QueryStatus.INVALID_IMAGE, "lossy or extended WebP answer"),
}


def test_hostile_binary_answers_are_refused_in_one_line(tmp_path):
    wallets = {n: create_wallet(n, "hot", tmp_path) for n in ("validator", "miner")}
    client = MinerClient(wallets["validator"])
    hotkey = wallets["miner"].hotkey.ss58_address
    with BackgroundServer(_hostile_miner(wallets["miner"])) as server:
        async def round_() -> dict:
            await client.info(server.url, hotkey)
            prompts = [*HOSTILE, "honest", "zstd_honest"]
            results = await client.query_many(
                [((0, hotkey, server.url), make_request(p, width=32, height=32))
                 for p in prompts])
            return dict(zip(prompts, results, strict=True))
        results = asyncio.run(round_())
        again = asyncio.run(client.query((0, hotkey, server.url), make_request("honest")))
    for lie, (status, words) in HOSTILE.items():
        result = results[lie]
        assert result.status is status, (lie, result.status, result.reason)
        assert words in result.reason and "\n" not in result.reason, (lie, result.reason)
        assert result.image is None and result.response is None
    assert results["honest"].status is QueryStatus.OK, results["honest"].reason
    assert again.status is QueryStatus.OK  # the client goes on serving
    fast = results["zstd_honest"]  # an RGB-ZSTD answer from the same liar is read
    assert fast.status is QueryStatus.OK, fast.reason
    assert fast.image_bytes == _GOOD_ZSTD and fast.image.tobytes() == _NOISE.tobytes()


def test_binary_answer_in_protocol_3_is_refused(tmp_path):
    wallets = {n: create_wallet(n, "hot", tmp_path) for n in ("validator", "miner")}
    client = MinerClient(wallets["validator"], protocol_versions=(2, 3))
    hotkey = wallets["miner"].hotkey.ss58_address
    with BackgroundServer(_hostile_miner(wallets["miner"])) as server:
        result = asyncio.run(client.query((0, hotkey, server.url), make_request("honest")))
    assert result.status is QueryStatus.PROTOCOL_MISMATCH
    assert "binary answer in protocol 3" in result.reason


def test_the_miner_refuses_a_binary_request_body_and_serves_on(net):
    with running_miner(net, StubEngine()) as miner:
        refused = []
        for body in (ANSWER_MAGIC + b"\x00\x00\x00\x02{}", b"[" * 60_000):
            headers = sign_request(net.wallets["hi"], method="POST", path="/v1/generate",
                                   body=body, receiver=miner.hotkey)
            refused.append(httpx.post(miner.url + "/v1/generate", content=body,
                                      headers=headers, timeout=30))
        ok = _raw_post(miner, net.wallets["hi"], make_request(seed=9), ANSWER_MEDIA_TYPE)
    for answer in refused:
        assert answer.status_code == 400 and answer.json()["reason"] == "malformed_json"
    assert ok.status_code == 200 and ok.headers["content-type"] == ANSWER_MEDIA_TYPE


def test_unpack_checks_lengths_before_anything_else():
    answer = GenerateResponse(request_id="r" * 8, model="m", image="", image_sha256="0" * 64,
                              miner_hotkey="5x", signature="0x", generation_seconds=0.0,
                              miner_version="x")
    png = encode_image(Image.new("RGB", (4, 4)))
    body = pack_answer(answer, png, "png")
    assert unpack_answer(body)[1] == png
    with pytest.raises(BadBody, match="more than 10"):
        unpack_answer(body, max_image_bytes=10)
    with pytest.raises(BadBody, match="not WEBP"):
        unpack_answer(pack_answer(answer, png, "webp"))
    header = AnswerHeader(image_format="png", image_length=len(png),
                          answer=answer.model_copy(update={"image": "eA=="}))
    with pytest.raises(BadBody, match="header carries an image"):
        unpack_answer(pack(ANSWER_MAGIC, header, [png]))


class _MediaClient(MinerClient):
    """The validator's client, noting the media type each miner answered with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.media: dict[str, set[str]] = {}

    async def _exchange(self, http, method, url, path, body, receiver, cap,
                        accept="application/json"):
        status, media, raw = await super()._exchange(http, method, url, path, body, receiver,
                                                     cap, accept)
        if path == "/v1/generate":
            self.media.setdefault(receiver, set()).add(media)
        return status, media, raw


def test_a_validator_round_with_a_protocol_3_and_a_protocol_4_miner(tmp_path, tiny_engine):
    """The whole round on the real tiny Engine: the protocol-3 miner answers JSON, the
    protocol-4 one binary, both verified and weighted."""
    run = round_with_two_versions(tmp_path, tiny_engine, {"old": (2, 3), "new": (2, 3, 4)},
                                  _MediaClient, seed=12)
    old, new = run.hotkeys["old"], run.hotkeys["new"]
    assert run.client.version_for(old) == 3 and run.client.version_for(new) == 4
    assert run.client.media == {old: {"application/json"}, new: {ANSWER_MEDIA_TYPE}}


def test_png_for_users_and_the_fallback_writer(monkeypatch):
    """fpng writes answers; without it Pillow writes the same pixels. Users get the signed PNG
    as it is, other formats re-encoded."""
    import io

    import numpy as np

    import niche.imaging as imaging

    pixels = np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    fast = encode_image(image)
    monkeypatch.setattr(imaging, "_fpng", None)
    slow = encode_image(image)
    monkeypatch.undo()
    assert imaging._fpng is not None and fast != slow  # two writers, one format
    for data in (fast, slow):
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and to_png(data) is data
        assert np.array_equal(np.asarray(imaging.bytes_to_image(data)), pixels)
    webp = encode_image(image, "WEBP")
    assert np.array_equal(np.asarray(imaging.bytes_to_image(to_png(webp))), pixels)
    for fmt in ("png", "webp", "jpeg", "jpg"):
        out = imaging.encode_as(image, fmt)
        assert Image.open(io.BytesIO(out)).format == {"jpg": "JPEG"}.get(fmt, fmt.upper())
    with pytest.raises(InvalidRequest, match="cannot write GIF"):
        imaging.encode_as(image, "gif")


def test_the_miner_reads_repeated_accept_fields_as_one_list(net):
    """RFC 9110: Accept sent twice is one list. The second field asks for RGB-ZSTD."""
    request = _in(make_request(seed=11), 4)
    body = request.model_dump_json(exclude_none=True).encode()
    with running_miner(net, StubEngine()) as miner:
        headers = sign_request(net.wallets["hi"], method="POST", path="/v1/generate",
                               body=body, receiver=miner.hotkey)
        answer = httpx.post(miner.url + "/v1/generate", content=body, timeout=30,
                            headers=[*headers.items(), ("Content-Type", "application/json"),
                                     ("Accept", f"{ANSWER_MEDIA_TYPE}; note=\"a,b\"; q=0"),
                                     ("Accept", f"{ANSWER_MEDIA_TYPE}; image=rgb-zstd")])
    assert answer.status_code == 200 and answer.headers["content-type"] == ANSWER_MEDIA_TYPE
    _, image, fmt = unpack_answer(answer.content)
    assert fmt == "rgb-zstd" and image[:4] == b"NRZ1"
