"""RGB-ZSTD (niche/rawimage.py): the lossless answer format a protocol-4 validator asks for.

The format itself (exact round trips, the layout and the "sub" filter as documented), hostile
bytes refused in one line before anything is decompressed beyond the caps, the negotiation by
Accept against a real miner, the organic queue keeping a binary answer's pixels, and a
gateway user who asks for PNG getting PNG of the pixels a miner sent as RGB-ZSTD. Hostile
RGB-ZSTD answers over HTTP, signed so that every check before the image passes, are in
tests/test_binary_answers.py's hostile table.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import sqlite3
import struct
import time
import tracemalloc

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from niche import rawimage
from niche.chain.wallets import create_wallet
from niche.devnet.servers import BackgroundServer
from niche.errors import InvalidRequest
from niche.imaging import (
    ANSWER_FORMATS,
    PNG_SIGNATURE,
    ImageLimits,
    bytes_to_image,
    encode_image,
    image_sha256,
    to_png,
)
from niche.miner.server import binary_image_format
from niche.protocol import GENERATE_PATH, GenerateResponse, GenerationParams
from niche.rawimage import HEADER_BYTES, BadRawImage
from niche.validator.client import MinerClient, MinerTarget, QueryStatus
from niche.validator.organic import OrganicQueue
from niche.wire import (
    ANSWER_MEDIA_TYPE,
    STATES_MEDIA_TYPE,
    accepts,
    answer_accept,
    requested_image_format,
)
from tests.miner_support import (
    RecordingClient,
    StubEngine,
    make_request,
    module_net,
    running_miner,
)
from tests.test_binary_answers import _hostile_miner

CAPS = {"max_side": 1024, "max_pixels": 1024 * 1024}


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _header(width: int, height: int, filter_type: int = rawimage.FILTER_SUB,
            magic: bytes = rawimage.MAGIC) -> bytes:
    return struct.pack(">4sIIB", magic, width, height, filter_type)


def _frame(raw: bytes, **kwargs) -> bytes:
    return zstandard.ZstdCompressor(level=1, **kwargs).compress(raw)


def _answer_limits(**caps) -> ImageLimits:
    return ImageLimits(formats=ANSWER_FORMATS, **caps)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("size", [(1, 1), (1, 4096), (4096, 1), (3, 5), (33, 17), (257, 2),
                                  (64, 64)])
def test_round_trip_is_exact(size):
    width, height = size
    image = _noise(width, height, seed=width * 7 + height)
    data = rawimage.encode(image)
    assert data[:4] == b"NRZ1" and rawimage.read_size(data) == (width, height)
    back = rawimage.decode(data, max_side=4096, max_pixels=4096 * 4096)
    assert back.mode == "RGB" and back.size == (width, height)
    assert np.array_equal(np.asarray(back), np.asarray(image))
    # and through imaging, as a validator reads an answer
    via = bytes_to_image(data, limits=_answer_limits())
    assert via.tobytes() == image.tobytes()


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "1", "I;16"])
def test_other_modes_are_stored_as_their_rgb(mode):
    base = _noise(19, 11, seed=5)
    if mode == "P":
        image = base.quantize(colors=37)
    elif mode == "RGBA":
        image = base.convert("RGBA")
        image.putalpha(Image.linear_gradient("L").resize(base.size))  # alpha is dropped
    else:
        image = base.convert(mode)
    expected = np.asarray(image.convert("RGB"))
    data = rawimage.encode(image)
    back = rawimage.decode(data, **CAPS)
    assert back.mode == "RGB" and np.array_equal(np.asarray(back), expected)
    assert data == encode_image(image.convert("RGB"), "RGB-ZSTD")  # nothing but the pixels


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1,
                                             max_side=24).map(lambda s: (s[0], s[1], 3))))
def test_round_trip_property(pixels):
    image = Image.fromarray(pixels, "RGB")
    data = rawimage.encode(image)
    back = rawimage.decode(data, max_side=24, max_pixels=24 * 24)
    assert np.array_equal(np.asarray(back), pixels)


def test_encode_is_deterministic_and_follows_the_documented_layout():
    """Same bytes twice (and via imaging); the header, the frame's content size and the
    "sub" filter exactly as the module says, checked without rawimage's own decoder."""
    image = _noise(37, 23, seed=9)
    first, second = rawimage.encode(image), rawimage.encode(image.copy())
    assert first == second == encode_image(image, "rgb-zstd")
    magic, width, height, filter_type = struct.unpack(">4sIIB", first[:13])
    assert (magic, width, height, filter_type) == (b"NRZ1", 37, 23, 1) and HEADER_BYTES == 13
    frame = first[13:]
    assert zstandard.frame_content_size(frame) == 37 * 23 * 3
    filtered = np.frombuffer(zstandard.ZstdDecompressor().decompress(frame),
                             np.uint8).reshape(23, 37, 3)
    pixels = np.asarray(image)
    assert np.array_equal(filtered[:, 0], pixels[:, 0])  # first pixel of a row as is
    left = pixels[:, :-1].astype(np.int16)
    assert np.array_equal(filtered[:, 1:], ((pixels[:, 1:] - left) % 256).astype(np.uint8))
    # a frame written by any zstd encoder (another level) in that layout reads the same
    other = first[:13] + _frame(filtered.tobytes(), write_content_size=True)
    assert rawimage.decode(other, **CAPS).tobytes() == image.tobytes()


# ----------------------------------------------------------------------------- hostile bytes
_GOOD = rawimage.encode(_noise(32, 32, seed=1))
_GOOD_FRAME = _GOOD[HEADER_BYTES:]
_RAW_32 = np.asarray(_noise(32, 32, seed=1)).tobytes()
_BOMB = _frame(bytes(4096 * 4096 * 3))  # 48 MiB of zeros in ~1.5 KB
_CORRUPT = b"\x28\xb5\x2f\xfd" + bytes(range(256)) * 4  # zstd magic, then nonsense

HOSTILE = {
    "empty": (b"", "truncated: 0 bytes"),
    "truncated_header": (_GOOD[:9], "truncated: 9 bytes, the header alone is 13"),
    "magic_only": (b"NRZ1", "truncated: 4 bytes"),
    "wrong_magic": (b"NRZ2" + _GOOD[4:], "not an RGB-ZSTD image"),
    "unknown_filter": (_header(32, 32, 2) + _GOOD_FRAME, "unknown filter 2"),
    "no_filter": (_header(32, 32, 0) + _GOOD_FRAME, "unknown filter 0"),
    "zero_width": (_header(0, 32) + _GOOD_FRAME, "empty image 0x32"),
    "zero_height": (_header(32, 0) + _GOOD_FRAME, "empty image 32x0"),
    "over_side": (_header(1025, 1) + _frame(bytes(1025 * 3)), "1025x1 exceeds 1024 px per side"),
    "over_pixels": (_header(1024, 1024) + _CORRUPT, "1024x1024 exceeds 1000000 pixels"),
    "huge_dims_corrupt_frame": (_header(2**32 - 1, 2**32 - 1) + _CORRUPT,
                                "4294967295x4294967295 exceeds 1024 px per side"),
    "no_frame": (_GOOD[:HEADER_BYTES], "corrupt zstd frame header"),
    "no_content_size": (_header(32, 32) + _frame(_RAW_32, write_content_size=False),
                        "zstd frame declares no content size, 32x32 RGB is 3072"),
    "content_size_mismatch": (_header(32, 32) + _frame(_RAW_32[:-3]),
                              "zstd frame declares 3069 bytes, 32x32 RGB is 3072"),
    "truncated_frame": (_GOOD[:-10], "corrupt zstd frame"),
    "trailing_bytes": (_GOOD + b"\x00" * 8, "corrupt zstd frame"),
    "two_frames": (_GOOD + _GOOD_FRAME, "corrupt zstd frame"),
    "bomb_declared": (_header(4096, 4096) + _BOMB, "4096x4096 exceeds 1024 px per side"),
    "bomb_in_small_image": (_header(64, 64) + _BOMB,
                            "zstd frame declares 50331648 bytes, 64x64 RGB is 12288"),
    "garbage_after_header": (_header(32, 32) + np.random.default_rng(3).bytes(500),
                             "corrupt zstd frame header"),
    "skippable_frame_first": (_header(32, 32) + struct.pack("<II", 0x184D2A50, 4) + b"abcd"
                              + _GOOD_FRAME, "zstd frame declares 0 bytes"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_bytes_are_refused_in_one_line(name):
    data, words = HOSTILE[name]
    limits = _answer_limits(max_side=1024, max_pixels=1_000_000)
    with pytest.raises(BadRawImage) as refused:
        rawimage.decode(data, max_side=1024, max_pixels=1_000_000)
    message = str(refused.value)
    assert words in message and "\n" not in message, message
    if not data.startswith(b"NRZ1"):  # not RGB-ZSTD at all: imaging hands it to Pillow
        with pytest.raises(InvalidRequest, match="not an image in an accepted format"):
            bytes_to_image(data, limits=limits)
        return
    with pytest.raises(InvalidRequest) as via:
        bytes_to_image(data, limits=limits)
    assert via.value.field == "image"
    assert str(via.value) == f"image: RGB-ZSTD: {message}"


@pytest.mark.parametrize("name", ["huge_dims_corrupt_frame", "over_pixels", "bomb_declared",
                                  "bomb_in_small_image", "no_content_size"])
def test_refusals_allocate_nothing_near_the_declared_size(name):
    """The size and the frame's declared content size are checked before a byte is
    decompressed: a corrupt frame still gets the size error (above), and refusing a 48 MiB
    bomb allocates a few KB and takes no time."""
    data, _ = HOSTILE[name]
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(BadRawImage):
            rawimage.decode(data, max_side=1024, max_pixels=1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, peak
    assert time.perf_counter() - started < 0.5


def test_the_bomb_within_caps_decodes_to_exactly_what_it_declares():
    """The same 48 MiB frame declared as the 4096x4096 it is, under caps that allow it, is
    an image (a black one): the refusals above are the caps' doing, not an accident."""
    image = rawimage.decode(_header(4096, 4096) + _BOMB, max_side=4096,
                            max_pixels=4096 * 4096)
    assert image.size == (4096, 4096) and image.getextrema() == ((0, 0),) * 3


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_mutated_answers_are_an_image_within_caps_or_a_one_line_refusal(data):
    """Flip, cut or append bytes anywhere in a valid answer: the reader returns an image of
    the declared size within its caps, or BadRawImage in one line, nothing else."""
    raw = bytearray(_GOOD)
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "append", "set"]))
        if action == "flip":
            raw[where] ^= data.draw(st.integers(1, 255))
        elif action == "set":
            raw[where] = data.draw(st.sampled_from([0, 1, 255, 0x80]))
        elif action == "cut":
            del raw[where:]
            if not raw:
                raw = bytearray(b"N")
        else:
            raw += data.draw(st.binary(min_size=1, max_size=16))
    try:
        image = rawimage.decode(bytes(raw), max_side=64, max_pixels=64 * 64)
    except BadRawImage as exc:
        assert "\n" not in str(exc) and str(exc)
    else:
        width, height = rawimage.read_size(bytes(raw))
        assert image.size == (width, height) and width <= 64 and height <= 64


def test_default_limits_do_not_read_rgb_zstd():
    """Users' conditioning images (imaging's default limits) are never RGB-ZSTD; a validator
    reads it only when its limits say so."""
    with pytest.raises(InvalidRequest, match="format RGB-ZSTD not accepted") as refused:
        bytes_to_image(_GOOD)
    assert refused.value.field == "image" and "\n" not in str(refused.value)
    with pytest.raises(InvalidRequest, match="RGB-ZSTD not accepted"):
        bytes_to_image(_GOOD, limits=ImageLimits(formats=("PNG", "WEBP")))
    png = to_png(_GOOD, limits=_answer_limits())  # what a user gets instead
    assert png[:8] == PNG_SIGNATURE and bytes_to_image(png).tobytes() == _RAW_32
    only_zstd = ImageLimits(formats=(rawimage.FORMAT,))
    assert bytes_to_image(_GOOD, limits=only_zstd).tobytes() == _RAW_32
    with pytest.raises(InvalidRequest, match="not an image in an accepted format"):
        bytes_to_image(png, limits=only_zstd)


# ----------------------------------------------------------------------------- negotiation
A = ANSWER_MEDIA_TYPE


@pytest.mark.parametrize("accept, expected", [
    ("", None),
    ("application/json", None),
    ("application/json, image/png", None),
    ("application/vnd.niche.answerx, application/json", None),
    (f"{A}", "png"),
    (f"{A}, application/json", "png"),
    (f"application/json, {A}", "png"),
    (f"{A}; image=rgb-zstd", "rgb-zstd"),
    (f"{A}; image=rgb-zstd, {A}, application/json", "rgb-zstd"),
    (f'{A}; image="rgb-zstd"', "rgb-zstd"),
    (f"{A.upper()};IMAGE=RGB-ZSTD", "rgb-zstd"),
    (f"{A} ; image = Rgb-Zstd ; q=0.9", "rgb-zstd"),
    (f"{A}; image=avif", "png"),
    (f"{A}; image=avif, {A}; image=rgb-zstd", "rgb-zstd"),
    (f"{A}, {A}; image=rgb-zstd", "png"),  # the first listing that can be written wins
    (f"{A}; image=webp, {A}; image=rgb-zstd", "webp"),
    (f"{A}; image=png, {A}; image=rgb-zstd", "png"),
    (f"{A}; charset=utf-8; image=rgb-zstd", "rgb-zstd"),
    # q=0 says "not acceptable" (RFC 9110): such a listing is skipped, whatever it names
    (f"{A}; q=0, application/json", None),
    (f"{A};q=0.000", None),
    (f"{A}; image=rgb-zstd; q=0, {A}, application/json", "png"),
    (f"{A}; image=rgb-zstd; Q=0, {A}; image=webp", "webp"),
    (f"{A}; q=0.001; image=rgb-zstd", "rgb-zstd"),
    (f"{A}; q=high", "png"),  # a malformed q does not refuse
    (f"{A}; q", "png"),
    # a quoted value keeps its commas and semicolons (RFC 9110 quoted-string)
    (f'{A}; foo="x,y"; q=0, application/json', None),
    (f'{A}; foo="a,b;c"; image=rgb-zstd', "rgb-zstd"),
    (f'{A}; image="rgb-zstd"; note="say \\"hi\\", then go"', "rgb-zstd"),
    (f'{A}; foo="unterminated, {A}; image=rgb-zstd', "png"),
    # only the first MAX_ACCEPT_CHARS are read
    ("x/y, " * 2000 + f"{A}; image=rgb-zstd", None),
    ("x/y, " * 1000 + f"{A}; image=rgb-zstd", "rgb-zstd"),
])
def test_requested_image_format(accept, expected):
    assert requested_image_format(accept) == expected


@pytest.mark.parametrize("accept, expected", [
    (STATES_MEDIA_TYPE, True),
    (f"application/json, {STATES_MEDIA_TYPE.upper()}; q=0.5", True),
    (f"{STATES_MEDIA_TYPE}; q=0, application/json", False),
    (f'{STATES_MEDIA_TYPE}; foo="a,b"; q=0, application/json', False),
    ("*/*", False),  # binary bodies are for peers that name them
    (f"{STATES_MEDIA_TYPE}x", False),
    ("", False),
])
def test_accepts_names_the_media_type_itself(accept, expected):
    assert accepts(accept, STATES_MEDIA_TYPE) is expected


def test_what_a_validator_sends_and_what_a_miner_writes():
    fast, plain = answer_accept(("rgb-zstd",)), answer_accept(())
    assert fast == f"{A}; image=rgb-zstd, {A}, application/json"
    assert plain == f"{A}, application/json"
    assert requested_image_format(fast) == "rgb-zstd"
    assert requested_image_format(plain) == "png"
    assert requested_image_format(fast, writable=("png",)) == "png"  # an older miner
    assert requested_image_format(f"{A}; image=avif", writable=("rgb-zstd",)) is None
    assert binary_image_format(fast, 4) == "rgb-zstd" and binary_image_format(plain, 4) == "png"
    assert binary_image_format(fast, 3) is None and binary_image_format("application/json", 4) \
        is None
    assert MinerClient(None)._answer_accept == fast
    png_only = MinerClient(None, image_limits=ImageLimits(formats=("PNG",)))
    assert png_only._answer_accept == plain


net = module_net("rgbzstd")


def test_a_validator_that_reads_only_png_gets_png_from_a_v4_miner(net):
    png_only = RecordingClient(net.wallets["hi"], image_limits=ImageLimits(formats=("PNG",)))
    fast = RecordingClient(net.wallets["hi"])
    with running_miner(net, StubEngine()) as miner:
        async def ask(client, seed):
            info = await client.info(miner.url, miner.hotkey)
            assert info.protocol_version == 4
            return await client.query((0, miner.hotkey, miner.url),
                                      make_request(seed=seed, width=48, height=40))
        plain, quick = asyncio.run(ask(png_only, 300)), asyncio.run(ask(fast, 300))
    for result in (plain, quick):
        assert result.status is QueryStatus.OK, result.reason
        assert result.response.protocol_version == 4 and result.image.size == (48, 40)
        assert result.response.image_sha256 == image_sha256(result.image_bytes)
    def generate_exchanges(client: RecordingClient) -> list[tuple[str, str]]:
        return [(accept, media) for path, accept, media in client.exchanges
                if path == GENERATE_PATH]

    assert generate_exchanges(png_only) == [(answer_accept(()), ANSWER_MEDIA_TYPE)]
    assert generate_exchanges(fast) == [(answer_accept(("rgb-zstd",)), ANSWER_MEDIA_TYPE)]
    assert plain.image_bytes[:8] == PNG_SIGNATURE and quick.image_bytes[:4] == b"NRZ1"
    assert plain.image.tobytes() == quick.image.tobytes() == \
        Image.new("RGB", (48, 40), (300 % 256, 1, 7)).tobytes()


def test_a_validator_that_reads_only_png_refuses_rgb_zstd_it_did_not_ask_for(tmp_path):
    wallets = {n: create_wallet(n, "hot", tmp_path) for n in ("validator", "miner")}
    client = MinerClient(wallets["validator"], image_limits=ImageLimits(formats=("PNG",)))
    hotkey = wallets["miner"].hotkey.ss58_address
    with BackgroundServer(_hostile_miner(wallets["miner"])) as server:
        async def ask():
            await client.info(server.url, hotkey)
            return await client.query_many(
                [((0, hotkey, server.url), make_request(p, width=32, height=32))
                 for p in ("zstd_honest", "honest")])
        refused, honest = asyncio.run(ask())
    assert refused.status is QueryStatus.INVALID_IMAGE, (refused.status, refused.reason)
    assert refused.reason == "format rgb-zstd not accepted" and refused.image is None
    assert honest.status is QueryStatus.OK and honest.image_bytes[:8] == PNG_SIGNATURE


# ----------------------------------------------------------------------------- organic queue
def test_the_organic_queue_keeps_a_binary_answer_s_pixels(tmp_path):
    """The gateway queues a binary answer (its `image` field empty) with the bytes that came
    after the header; the validator claims the answer with the same bytes and pixels."""
    picture = _noise(40, 24, seed=11)
    data = rawimage.encode(picture)
    request = make_request("organic", seed=3, model="flux-schnell", width=40, height=24,
                           steps=4)
    answer = GenerateResponse(protocol_version=4, request_id=request.request_id,
                              model="flux-schnell", image="", image_sha256=image_sha256(data),
                              miner_hotkey="5miner", signature="00", generation_seconds=0.1,
                              miner_version="t")
    queue = OrganicQueue(tmp_path / "q.sqlite", signer="5validator")
    target = MinerTarget(3, "5miner", "http://127.0.0.1:1")
    assert queue.submit(target, request, answer, 0.25, image=data)
    (item,) = queue.claim(limit=5, max_age=300)
    assert item.result.ok and item.target == target and item.result.latency == 0.25
    assert item.result.image_bytes == data
    assert item.result.response.image_sha256 == image_sha256(item.result.image_bytes)
    assert item.result.image.size == (40, 24)
    assert np.array_equal(np.asarray(item.result.image), np.asarray(picture))
    assert item.challenge.request_id == request.request_id
    queue.close()


# ----------------------------------------------------------------------------- gateway
def test_a_gateway_user_gets_png_of_the_pixels_a_miner_sent_as_rgb_zstd(tmp_path, tiny_engine,
                                                                         tiny_root):
    """The real gateway asks its miners for RGB-ZSTD (its client reads it) and hands users
    PNG of the same pixels: PNG signature, the pixels the tiny engine makes for that seed,
    while the answer it received, and queued for audit, was RGB-ZSTD."""
    import openai
    from gateway_support import Only, make_chain, running_gateway, running_miners

    net = make_chain(tmp_path, miners=1)
    try:
        with running_miners(net, {"miner1": Only(tiny_engine, "flux-schnell")}), \
                running_gateway(net, tiny_root, models=("flux-schnell",)) as gw:
            client = openai.OpenAI(api_key=gw.key, base_url=gw.base_url, max_retries=0)
            item = client.images.generate(model="flux-schnell", prompt="a green cube",
                                          size="64x64", response_format="b64_json",
                                          extra_body={"seed": 77}).data[0]
            accept = gw.gateway.router.client._answer_accept
    finally:
        net.chain.close()
    png = base64.b64decode(item.b64_json)
    assert png[:8] == PNG_SIGNATURE
    params = tiny_engine.resolve(GenerationParams(model="flux-schnell", prompt="a green cube",
                                                  seed=77, width=64, height=64))
    local = tiny_engine.generate(params)
    assert Image.open(io.BytesIO(png)).convert("RGB").tobytes() == local.tobytes()
    assert png == encode_image(local)  # deterministic: the very bytes a miner's PNG has
    assert requested_image_format(accept) == "rgb-zstd"
    # what the gateway's client received is what it queued for the validator's audit
    (response_json,) = sqlite3.connect(tmp_path / "organic.sqlite").execute(
        "SELECT response FROM organic").fetchone()
    answer = GenerateResponse.model_validate_json(response_json)
    received = base64.b64decode(answer.image)
    assert received[:4] == b"NRZ1" and rawimage.read_size(received) == (64, 64)
    assert answer.image_sha256 == hashlib.sha256(received).hexdigest()
    assert answer.protocol_version == 4
    assert bytes_to_image(received, limits=_answer_limits()).tobytes() == local.tobytes()
