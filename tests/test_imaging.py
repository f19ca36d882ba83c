"""imaging: deterministic lossless encoding, and decoding that refuses every abuse cleanly."""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import struct
import zlib

import pytest
from PIL import Image, PngImagePlugin

from niche.errors import InvalidRequest
from niche.imaging import (
    ImageLimits,
    b64_to_bytes,
    bytes_to_image,
    decode_image,
    encode_b64,
    encode_image,
    image_sha256,
    load_image_file,
)


def gradient(w: int = 48, h: int = 32, mode: str = "RGB") -> Image.Image:
    img = Image.new("RGB", (w, h))
    img.putdata([(x * 5 % 256, y * 7 % 256, (x + y) % 256) for y in range(h) for x in range(w)])
    return img.convert(mode) if mode != "RGB" else img


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def saved(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height with (almost) no pixel data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_png_is_lossless_deterministic_and_metadata_free():
    img = gradient()
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "secret")
    tagged = Image.open(io.BytesIO(saved(img, "PNG", pnginfo=info)))
    tagged.load()
    assert tagged.info.get("Comment") == "secret"
    a, b = encode_image(img), encode_image(tagged)
    assert a == b  # metadata never reaches the bytes
    assert b"tEXt" not in a and b"iCCP" not in a
    assert decode_image(b64(a)).tobytes() == img.tobytes()
    text, digest = encode_b64(img)
    assert digest == image_sha256(a) == hashlib.sha256(a).hexdigest() and text == b64(a)


def test_lossless_webp_round_trip():
    img = gradient()
    data = encode_image(img, "webp")
    assert data[8:12] == b"WEBP"
    assert decode_image(b64(data)).tobytes() == img.tobytes()
    assert encode_image(img, "WEBP") == data
    with pytest.raises(InvalidRequest):
        encode_image(img, "JPEG")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "1", "CMYK", "I;16"])
def test_modes_are_normalised_to_rgb(mode):
    img = gradient(mode=mode) if mode != "I;16" else Image.new(mode, (8, 8), 300)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_image(b64(saved(img, fmt)))
    assert out.mode == "RGB" and out.size == img.size and not out.info


def test_jpeg_is_accepted_as_input():
    out = decode_image(b64(saved(gradient(), "JPEG", quality=90)))
    assert out.size == (48, 32)


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("iVBORw0KGgo=\n", "length"),
    ("iVBORw0KGg o=", "malformed base64"),
    ("iVBORw0KG!!=", "malformed base64"),
    ("iVBORw0KGgo", "length"),
    ("iVBO-w0_Ggo=", "malformed base64"),  # url-safe alphabet is not accepted
])
def test_strict_base64(text, words):
    with pytest.raises(InvalidRequest, match=words) as exc:
        decode_image(text)
    assert exc.value.field == "image"


def test_non_string_and_field_name():
    with pytest.raises(InvalidRequest) as exc:
        b64_to_bytes(123, field="params.image")  # type: ignore[arg-type]
    assert exc.value.field == "params.image"


def test_caps_on_chars_bytes_sides_and_pixels():
    data = saved(gradient(64, 64), "PNG")
    with pytest.raises(InvalidRequest, match="base64 characters"):
        decode_image(b64(data), limits=ImageLimits(max_b64_chars=100))
    with pytest.raises(InvalidRequest, match="bytes"):
        decode_image(b64(data), limits=ImageLimits(max_bytes=100))
    with pytest.raises(InvalidRequest, match="per side"):
        decode_image(b64(data), limits=ImageLimits(max_side=63))
    with pytest.raises(InvalidRequest, match="pixels"):
        decode_image(b64(data), limits=ImageLimits(max_pixels=64 * 63))
    # exactly at every cap: decoded, pixel for pixel
    at_caps = ImageLimits(max_side=64, max_pixels=64 * 64, max_bytes=len(data),
                          max_b64_chars=len(b64(data)))
    out = decode_image(b64(data), limits=at_caps)
    assert out.size == (64, 64) and out.tobytes() == gradient(64, 64).tobytes()


def test_header_dimensions_are_checked_before_pixels():
    # 60000 x 60000 claimed in 100 bytes: refused from the header, nothing is allocated
    # (past twice Pillow's pixel cap its open() refuses it before our side check runs)
    with pytest.raises(InvalidRequest, match="decompression bomb refused"):
        bytes_to_image(png_header_only(60000, 60000))
    with pytest.raises(InvalidRequest, match="5000x5000 exceeds 4096"):
        bytes_to_image(png_header_only(5000, 5000))


def test_real_decompression_bomb_is_refused():
    bomb = saved(Image.new("1", (20000, 20000)), "PNG")  # ~50 KB, 400 Mpixels
    assert len(bomb) < 100_000
    with pytest.raises(InvalidRequest, match="decompression bomb refused"):
        decode_image(b64(bomb))
    # and with generous caps, Pillow's own guard still turns into InvalidRequest
    with pytest.raises(InvalidRequest, match="decompression bomb refused"):
        decode_image(b64(bomb), limits=ImageLimits(max_side=30000, max_pixels=10**9))


@pytest.mark.parametrize("data, words", [
    (b"GIF89a" + b"\0" * 32, "accepted format"),
    (None, "accepted format"),  # BMP
    (b"\x89PNG\r\n\x1a\n garbage", "accepted format|corrupt"),
    (b"random bytes that are no image", "accepted format"),
])
def test_wrong_formats_and_corrupt_files(data, words):
    if data is None:
        data = saved(gradient(), "BMP")
    with pytest.raises(InvalidRequest, match=words):
        bytes_to_image(data)


def test_truncated_png_is_corrupt():
    data = saved(gradient(64, 64), "PNG")
    with pytest.raises(InvalidRequest, match="corrupt|accepted"):
        bytes_to_image(data[: len(data) // 2])


def test_only_listed_formats():
    jpeg = saved(gradient(), "JPEG")
    with pytest.raises(InvalidRequest, match="accepted format"):
        bytes_to_image(jpeg, limits=ImageLimits(formats=("PNG",)))


def test_animated_images_are_refused():
    frames = [gradient(), gradient().rotate(90)]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    with pytest.raises(InvalidRequest, match="animated"):
        bytes_to_image(buf.getvalue())


def test_load_image_file(tmp_path):
    path = tmp_path / "cond.png"
    path.write_bytes(saved(gradient(), "PNG"))
    assert load_image_file(path).size == (48, 32)
    with pytest.raises(InvalidRequest, match="cannot read"):
        load_image_file(tmp_path / "missing.png")
    with pytest.raises(InvalidRequest, match="bytes"):
        load_image_file(path, limits=ImageLimits(max_bytes=10))


def test_arbitrary_bytes_and_text_only_ever_raise_invalid_request():
    """Fuzz: whatever arrives, decoding returns an RGB image or raises InvalidRequest."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    png = saved(gradient(16, 16), "PNG")

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(
        st.binary(max_size=512),
        # mutate a valid PNG: flip bytes in header and body
        st.lists(st.tuples(st.integers(0, len(png) - 1), st.integers(0, 255)), max_size=6)
        .map(lambda edits: bytes(_edit(png, edits))),
    ))
    def check_bytes(data):
        with contextlib.suppress(InvalidRequest):
            assert bytes_to_image(data).mode == "RGB"

    @settings(max_examples=100, deadline=None)
    @given(st.text(max_size=64))
    def check_text(text):
        with contextlib.suppress(InvalidRequest):
            assert decode_image(text).mode == "RGB"

    check_bytes()
    check_text()


def _edit(data: bytes, edits) -> bytearray:
    out = bytearray(data)
    for index, value in edits:
        out[index] = value
    return out
