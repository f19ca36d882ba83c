"""Images across the wire: deterministic encoding, and decoding that a stranger cannot abuse.

Every image a miner or validator receives comes from someone it does not trust. Decoding is
therefore bounded at each step, cheapest first: base64 length, strict base64 alphabet, byte
count, container format, header dimensions (read WITHOUT decoding pixels), then the pixel
decode itself under Pillow's decompression-bomb guard turned into an error. Any failure is an
`InvalidRequest(field=...)` with a message a caller can act on.

Encoding is lossless and byte-for-byte deterministic (a fresh image with no metadata, fixed
encoder settings), so the sha256 of an answer identifies its pixels and cannot be altered by
EXIF/ICC/text chunks. PNG is written by fpng (a PNG writer 20-40x faster than zlib at
1024x1024: bench/image_codecs.py, docs/models.md) and read by Pillow; without fpng installed, by
Pillow at zlib level 1. Either is a plain PNG any decoder reads, so the gateway hands a PNG
answer's bytes to users as they were signed. A validator that asks for it gets RGB-ZSTD
(niche/rawimage.py) instead, which it reads 3-4x faster than Pillow reads a PNG.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from niche import rawimage
from niche.errors import InvalidRequest
from niche.protocol import MAX_IMAGE_B64_CHARS

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "WEBP", "JPEG")
ANSWER_FORMATS: tuple[str, ...] = (rawimage.FORMAT, "PNG", "WEBP")
"""What a validator accepts as an answer image: lossless formats only (a JPEG answer would
not be the pixels the model made). RGB-ZSTD (niche/rawimage.py) is read by niche itself, the
others by Pillow."""
PNG_COMPRESS_LEVEL = 1
"""zlib level of PNGs when fpng is not installed: at 1024x1024 level 1 encodes 3-4x faster
than level 6 for ~15 % more bytes (bench/image_codecs.py): latency is what the subnet pays for."""
ENCODE_FORMATS: tuple[str, ...] = ("PNG", "WEBP", rawimage.FORMAT)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OUTPUT_FORMATS: tuple[str, ...] = ("PNG", "WEBP", "JPEG")
"""What `encode_as` writes for users (the gateway's output_format); answers are PNG."""
TOO_BIG_TO_DECODE = "image too large to decode here: send a smaller image"

try:  # fpng: a fast PNG writer (SSE4.1); optional so a platform without its wheel still runs
    from fpng import fpng_ext as _fpng
except ImportError:  # pragma: no cover - fpng is a dependency; this is the fallback
    _fpng = None


@dataclass(frozen=True)
class ImageLimits:
    """Hard caps for one decoded image. Defaults fit a 4096x4096 conditioning image."""

    max_b64_chars: int = MAX_IMAGE_B64_CHARS
    max_bytes: int = MAX_IMAGE_B64_CHARS * 3 // 4
    max_pixels: int = 4096 * 4096
    max_side: int = 4096
    formats: tuple[str, ...] = ALLOWED_FORMATS


DEFAULT_LIMITS = ImageLimits()


def image_sha256(data: bytes) -> str:
    """Lowercase hex sha256 of encoded image bytes (what a miner signs)."""
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- encode
def _clean_rgb(image: Image.Image) -> Image.Image:
    """A metadata-free RGB copy: nothing but pixels reaches the encoder."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return Image.frombytes("RGB", rgb.size, rgb.tobytes())


def _png(image: Image.Image) -> bytes:
    """PNG of `image` as RGB: fpng when installed (it writes pixels and nothing else), else
    Pillow at PNG_COMPRESS_LEVEL from a metadata-free copy."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    raw = rgb.tobytes()
    width, height = rgb.size
    if _fpng is not None and len(raw) == width * height * 3:  # fpng reads exactly this much
        data = _fpng.encode_image_to_memory(raw, width, height, 3)
        if data[:8] == PNG_SIGNATURE:
            return data
    buf = io.BytesIO()
    Image.frombytes("RGB", rgb.size, raw).save(buf, format="PNG", optimize=False,
                                               compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def encode_image(image: Image.Image, fmt: str = "PNG") -> bytes:
    """Lossless, deterministic bytes of `image` as RGB: PNG (default), lossless WebP or
    RGB-ZSTD (a miner's answer to a validator that asked for it)."""
    fmt = fmt.upper()
    if fmt not in ENCODE_FORMATS:
        raise InvalidRequest(f"cannot encode {fmt}; use one of {', '.join(ENCODE_FORMATS)}",
                             field="format")
    if fmt == "PNG":
        return _png(image)
    if fmt == rawimage.FORMAT:
        return rawimage.encode(image)
    buf = io.BytesIO()
    _clean_rgb(image).save(buf, format="WEBP", lossless=True, quality=100, method=4, exact=True)
    return buf.getvalue()


def encode_as(image: Image.Image, fmt: str, *, quality: int = 90) -> bytes:
    """`image` for a user in `fmt` (PNG, WEBP or JPEG; `quality` for the lossy JPEG/WebP):
    what the gateway returns when a user asks for an output format."""
    fmt = fmt.upper().replace("JPG", "JPEG")
    if fmt not in OUTPUT_FORMATS:
        raise InvalidRequest(f"cannot write {fmt}; use one of {', '.join(OUTPUT_FORMATS)}",
                             field="output_format")
    if fmt == "PNG":
        return encode_image(image, "PNG")
    buf = io.BytesIO()
    _clean_rgb(image).save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def lossy_webp(data: bytes) -> bool:
    """Whether `data` is a WebP other than the simple lossless kind (a "VP8L" bitstream and
    nothing else) that `encode_image` writes: lossy, or extended with alpha or metadata. An
    answer in it is not the pixels the model made, whatever it looks like."""
    return sniff_format(data) == "WEBP" and data[12:16] != b"VP8L"


def to_png(data: bytes, *, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """PNG bytes of an encoded answer: a PNG as it is (the bytes the miner signed), anything
    else (in `limits.formats`) decoded under `limits` and written as PNG."""
    if data[:8] == PNG_SIGNATURE:
        return data
    return encode_image(bytes_to_image(data, limits=limits), "PNG")


def to_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode_b64(image: Image.Image, fmt: str = "PNG") -> tuple[str, str]:
    """(base64 text, sha256 of the encoded bytes)."""
    data = encode_image(image, fmt)
    return to_b64(data), image_sha256(data)


# ----------------------------------------------------------------------------- decode
def b64_to_bytes(text: str, *, field: str = "image",
                 limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """Strict base64 (standard alphabet, padding required, no whitespace) under the caps."""
    if not isinstance(text, str):
        raise InvalidRequest(f"expected a base64 string, got {type(text).__name__}", field=field)
    if not text:
        raise InvalidRequest("empty image", field=field)
    if len(text) > limits.max_b64_chars:
        raise InvalidRequest(f"{len(text)} base64 characters, more than {limits.max_b64_chars}",
                             field=field)
    if len(text) % 4:
        raise InvalidRequest("malformed base64: length is not a multiple of 4", field=field)
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise InvalidRequest("malformed base64", field=field) from None
    if len(data) > limits.max_bytes:
        raise InvalidRequest(f"{len(data)} bytes, more than {limits.max_bytes}", field=field)
    return data


def bytes_to_image(data: bytes, *, field: str = "image",
                   limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode encoded bytes to an RGB image, checking format and header size before pixels."""
    if len(data) > limits.max_bytes:
        raise InvalidRequest(f"{len(data)} bytes, more than {limits.max_bytes}", field=field)
    if rawimage.looks_like(data):
        if rawimage.FORMAT not in limits.formats:
            raise InvalidRequest(f"format {rawimage.FORMAT} not accepted (use "
                                 f"{', '.join(limits.formats)})", field=field)
        try:
            return rawimage.decode(data, max_side=limits.max_side, max_pixels=limits.max_pixels)
        except rawimage.BadRawImage as exc:
            raise InvalidRequest(f"{rawimage.FORMAT}: {exc}", field=field) from None
        except MemoryError:
            raise InvalidRequest(TOO_BIG_TO_DECODE, field=field) from None
    pillow_formats = [f for f in limits.formats if f != rawimage.FORMAT]
    if not pillow_formats:
        raise InvalidRequest(f"not an image in an accepted format "
                             f"({', '.join(limits.formats)})", field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # formats= restricts which decoders Pillow even tries; open() reads the header only.
            img = Image.open(io.BytesIO(data), formats=pillow_formats)
            fmt = (img.format or "").upper()
            if fmt not in limits.formats:
                raise InvalidRequest(f"format {fmt or '?'} not accepted (use "
                                     f"{', '.join(limits.formats)})", field=field)
            width, height = img.size
            if width < 1 or height < 1:
                raise InvalidRequest(f"empty image {width}x{height}", field=field)
            if width > limits.max_side or height > limits.max_side:
                raise InvalidRequest(f"{width}x{height} exceeds {limits.max_side} px per side",
                                     field=field)
            if width * height > limits.max_pixels:
                raise InvalidRequest(f"{width}x{height} exceeds {limits.max_pixels} pixels",
                                     field=field)
            if getattr(img, "n_frames", 1) != 1:
                raise InvalidRequest("animated images are not accepted: send a single still "
                                     "frame", field=field)
            img.load()
            rgb = _to_rgb(img, field)
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequest("decompression bomb refused", field=field) from None
    except MemoryError:
        raise InvalidRequest(TOO_BIG_TO_DECODE, field=field) from None
    except UnidentifiedImageError:
        sniffed = sniff_format(data)
        if sniffed in pillow_formats:  # its signature, then nothing Pillow reads: damaged
            raise InvalidRequest(_undecodable(sniffed, data, "its header does not parse"),
                                 field=field) from None
        raise InvalidRequest(f"not an image in an accepted format "
                             f"({', '.join(limits.formats)})", field=field) from None
    except (OSError, ValueError, SyntaxError, EOFError):
        raise InvalidRequest(_undecodable(sniff_format(data), data,
                                         "its image data does not decode"),
                             field=field) from None
    return rgb


def sniff_format(data: bytes) -> str | None:
    """PNG, JPEG or WEBP by the file's signature alone (what a damaged file still shows),
    else None: a failed decode names the format the sender chose rather than blaming it,
    and a binary answer's bytes are checked against the format its header declares."""
    if data[:8] == PNG_SIGNATURE:
        return "PNG"
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _cut_short(fmt: str | None, data: bytes) -> bool:
    """Whether a `fmt` file ends before its container does (no PNG IEND chunk, no JPEG
    end-of-image marker, fewer bytes than the WebP RIFF header declares): an upload or a
    download cut off, which the sender fixes by sending the whole file."""
    if fmt == "PNG":
        return data.rfind(b"IEND") < 0
    if fmt == "JPEG":
        return data.rfind(b"\xff\xd9") < 0
    if fmt == "WEBP":
        return len(data) < 8 + int.from_bytes(data[4:8], "little")
    return False


def _undecodable(fmt: str | None, data: bytes, why: str) -> str:
    """One line for a file Pillow could not decode: which format, truncated or damaged, and
    what to do (never Pillow's exception text: it names Python objects, not the file)."""
    kind = f"{fmt} file" if fmt else "image file"
    if _cut_short(fmt, data):
        return (f"the {kind} is truncated or corrupt (it ends before its image data does): "
                "send the whole file")
    return f"the {kind} is corrupt ({why}): re-save it as PNG, WebP or JPEG and send that"


def _to_rgb(img: Image.Image, field: str) -> Image.Image:
    """RGB with no metadata. Transparency is dropped (the pipelines take RGB)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = img.point(lambda v: v / 256 if mode.startswith("I;16") else v).convert("L")
    elif mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    try:
        rgb = img.convert("RGB")  # a plain Image (one copy; RGB stays RGB), not the file
    except (ValueError, OSError):
        raise InvalidRequest(f"unsupported image mode {mode}: re-save it as 8-bit RGB",
                             field=field) from None
    rgb.info = {}  # nothing but pixels leaves the decoder
    return rgb


def decode_image(text: str, *, field: str = "image",
                 limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """base64 text -> RGB PIL image, or InvalidRequest(field=...)."""
    return bytes_to_image(b64_to_bytes(text, field=field, limits=limits), field=field,
                          limits=limits)


def load_image_file(path: str | Path, *, limits: ImageLimits = DEFAULT_LIMITS,
                    field: str = "image") -> Image.Image:
    """Read an image file for the CLI with the same caps as the wire."""
    path = Path(path).expanduser()
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise InvalidRequest(f"{path} is {size} bytes, more than {limits.max_bytes}",
                                 field=field)
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidRequest(f"cannot read {path}: no such file", field=field) from None
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror or exc}", field=field) from None
    return bytes_to_image(data, field=field, limits=limits)
