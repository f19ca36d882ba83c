"""RGB-ZSTD: the lossless answer format a validator decodes in a few milliseconds.

At 1024x1024 a PNG costs its reader 7-18 ms of zlib inflate (Pillow, single-threaded) and its
writer 3 ms even with fpng; raw RGB rows with PNG's "sub" filter, compressed by zstd level 1,
cost 3-6 ms to read and 3-5 ms to write, for fewer bytes than fpng's PNG on photo-like content
and ~15 % more on smooth outputs (bench/image_codecs.py, docs/models.md). It is an answer
format between miner and validator only: users of the gateway get PNG (or their
`output_format`).

Layout (13-byte header, then one zstd frame):

    b"NRZ1" | width (uint32 BE) | height (uint32 BE) | filter (uint8, 1 = sub) | zstd frame

The frame's declared content size must be exactly width * height * 3; filter "sub" stores
each byte minus the same channel of the pixel to its left (mod 256; the first pixel of a row
as is), row-major RGB. A reader checks the magic, the filter, the size against its caps and
the frame's declared content size against width * height * 3 before it decompresses a byte,
and refuses a frame that lacks a content size, decodes to another size, or is followed by
anything. So the memory a hostile answer can make a validator allocate is the caps' pixels
times three, never what the frame would like it to be.
"""
from __future__ import annotations

import struct
import threading

import numpy as np
import zstandard
from PIL import Image

MAGIC = b"NRZ1"
FORMAT = "RGB-ZSTD"
"""The format's name among imaging's formats (upper case, like Pillow's)."""
WIRE_NAME = "rgb-zstd"
"""Its name on the wire (a binary answer's `image_format`, an Accept parameter)."""
FILTER_SUB = 1
LEVEL = 1
"""zstd level: 1 is the fastest that still beats PNG on bytes for photo-like content; 3 costs
twice the encode time for ~5 % fewer bytes (bench/image_codecs.py)."""
_HEADER = struct.Struct(">4sIIB")
HEADER_BYTES = _HEADER.size
_MAX_WINDOW = 1 << 26
"""Largest zstd window a reader accepts (64 MiB covers a 4096x4096 frame in one window)."""


_contexts = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    """This thread's compressor (a zstd context is not thread-safe). A new one per image
    allocates and clears zstd's tables each time: twice the cost of compressing a 64x64
    answer; the frames are the same bytes either way."""
    compressor = getattr(_contexts, "compressor", None)
    if compressor is None:
        compressor = _contexts.compressor = zstandard.ZstdCompressor(
            level=LEVEL, write_content_size=True)
    return compressor


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor, with the window cap (see `_compressor`)."""
    decompressor = getattr(_contexts, "decompressor", None)
    if decompressor is None:
        decompressor = _contexts.decompressor = zstandard.ZstdDecompressor(
            max_window_size=_MAX_WINDOW)
    return decompressor


class BadRawImage(ValueError):
    """Bytes that are not a readable RGB-ZSTD image under the caps: the message is one line."""


def looks_like(data: bytes) -> bool:
    return data[:4] == MAGIC


def encode(image: Image.Image) -> bytes:
    """RGB-ZSTD bytes of `image` as RGB (nothing but its pixels); deterministic for one zstd
    version and level."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    width, height = rgb.size
    # tobytes, not np.asarray: the array interface calls it anyway, through more Python
    pixels = np.frombuffer(rgb.tobytes(), dtype=np.uint8).reshape(height, width, 3)
    filtered = np.empty_like(pixels)
    filtered[:, 0] = pixels[:, 0]
    np.subtract(pixels[:, 1:], pixels[:, :-1], out=filtered[:, 1:])  # uint8: mod 256
    frame = _compressor().compress(filtered.data)  # the buffer itself, not a copy
    return _HEADER.pack(MAGIC, width, height, FILTER_SUB) + frame


def read_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone; BadRawImage if the header is not one."""
    if len(data) < HEADER_BYTES:
        raise BadRawImage(f"truncated: {len(data)} bytes, the header alone is {HEADER_BYTES}")
    magic, width, height, filter_type = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BadRawImage(f"not an RGB-ZSTD image (starts {magic!r})")
    if filter_type != FILTER_SUB:
        raise BadRawImage(f"unknown filter {filter_type} (only {FILTER_SUB}, sub)")
    if width < 1 or height < 1:
        raise BadRawImage(f"empty image {width}x{height}")
    return width, height


def decode(data: bytes, *, max_side: int, max_pixels: int) -> Image.Image:
    """The RGB image in `data`, refused (BadRawImage, one line) unless its size is within the
    caps and its frame decodes to exactly width * height * 3 bytes with nothing after it."""
    width, height = read_size(data)
    if width > max_side or height > max_side:
        raise BadRawImage(f"{width}x{height} exceeds {max_side} px per side")
    if width * height > max_pixels:
        raise BadRawImage(f"{width}x{height} exceeds {max_pixels} pixels")
    expected = width * height * 3
    frame = memoryview(data)[HEADER_BYTES:]
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        raise BadRawImage("corrupt zstd frame header") from None
    if declared != expected:
        what = "no content size" if declared < 0 else f"{declared} bytes"
        raise BadRawImage(f"zstd frame declares {what}, {width}x{height} RGB is {expected}")
    try:
        raw = _decompressor().decompress(frame, max_output_size=expected,
                                         allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise BadRawImage(f"corrupt zstd frame: {str(exc)[:120]}") from None
    if len(raw) != expected:
        raise BadRawImage(f"zstd frame decoded to {len(raw)} bytes, expected {expected}")
    filtered = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
    pixels = np.cumsum(filtered, axis=1, dtype=np.uint8)  # undoes sub, mod 256
    # what Image.fromarray ends in for RGB (Pillow unpacks the rows into its own pixels),
    # without its inspection of the array interface first
    return Image.frombytes("RGB", (width, height), pixels)
