"""Binary bodies (protocol 4+): an answer's image, or a fetch's sampler states, as raw bytes
beside a small JSON header, instead of base64 inside JSON.

One layout for both, read before anything in it is trusted:

    magic (4 bytes) | header length H (uint32, big-endian) | H bytes of JSON | payload

The header declares the length of every payload part; the reader checks, in this order and
before parsing or decoding anything: the magic, H against its cap, H against the bytes
received, the header's schema, each declared length against its cap, and the declared
lengths against the payload actually received (no byte missing, none extra). Only then are
the parts handed out; decoding them (an image, under imaging's caps; a state, against its
hash) is the caller's next step. Each failure is a `BadBody` with a one-line reason.

Why not multipart: a boundary must be searched for in the payload, and a part's length is
only known after the scan; here every length is declared up front and checked against caps.
"""
from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator, Sequence
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from niche import rawimage
from niche.imaging import sniff_format
from niche.protocol import (
    MAX_STATE_ELEMENTS,
    MAX_STATES_PER_FETCH,
    GenerateResponse,
    first_validation_error,
)

ANSWER_MEDIA_TYPE = "application/vnd.niche.answer"
"""Content-Type of a binary answer; a validator asks for it with Accept (protocol 4+)."""
STATES_MEDIA_TYPE = "application/vnd.niche.states"
"""Content-Type of a binary states fetch (protocol 4+)."""
BINARY_SINCE = 4
"""The first protocol version whose answers and states may travel as binary bodies."""
IMAGE_PARAMETER = "image"
"""The Accept parameter by which a validator asks for an answer's image format:
`application/vnd.niche.answer; image=rgb-zstd` (a listing without it means PNG)."""
MAX_ACCEPT_CHARS = 8192
"""What of an Accept header is read for the answer's media type and image format."""
ANSWER_IMAGE_FORMATS: tuple[str, ...] = (rawimage.WIRE_NAME, "png", "webp")
"""Image formats a binary answer may carry (lossless only)."""
ANSWER_MAGIC = b"NIA1"
STATES_MAGIC = b"NIS1"
MAX_HEADER_BYTES = 64 * 1024
"""An answer header is its metadata and a states commitment of at most 200 hashes (~15 KB)."""
MAX_ANSWER_IMAGE_BYTES = 24 * 1024 * 1024
"""A 4096x4096 RGB image stored uncompressed (48 MiB) is refused long before: the validator
caps each answer by the size it asked for (MinerClient._answer_bounds)."""

_PREFIX = struct.Struct(">4sI")


class BadBody(ValueError):
    """A binary body that does not follow the layout: the message is one line."""


class _Header(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AnswerHeader(_Header):
    """The header of a binary answer: the answer itself with an empty `image`, the format of
    the image bytes that follow and their length."""

    image_format: Literal["rgb-zstd", "png", "webp"]
    image_length: int = Field(ge=1, le=MAX_ANSWER_IMAGE_BYTES)
    answer: GenerateResponse


class StatePart(_Header):
    index: int = Field(ge=1)
    length: int = Field(ge=4, le=MAX_STATE_ELEMENTS * 4)


class StatesHeader(_Header):
    """The header of a binary states fetch: which states follow, in order, and their sizes
    (raw float32 little-endian, C order: the bytes the commitment hashed)."""

    protocol_version: int
    request_id: str = Field(max_length=64)
    states: list[StatePart] = Field(max_length=MAX_STATES_PER_FETCH)


Header = TypeVar("Header", bound=_Header)


def pack(magic: bytes, header: BaseModel, parts: Sequence[bytes | memoryview]) -> bytes:
    """magic | len(header) | header JSON | parts, as one body."""
    encoded = header.model_dump_json().encode()
    if len(encoded) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(encoded)} bytes exceeds {MAX_HEADER_BYTES}")
    return b"".join([_PREFIX.pack(magic, len(encoded)), encoded, *parts])


def unpack(body: bytes, magic: bytes, model: type[Header]) -> tuple[Header, memoryview]:
    """(header, payload) of a body in the layout, checked up to the header's schema; the
    caller checks the payload against the lengths the header declares."""
    if len(body) < _PREFIX.size:
        raise BadBody(f"truncated: {len(body)} bytes, not even the {_PREFIX.size}-byte prefix")
    found, length = _PREFIX.unpack_from(body)
    if found != magic:
        raise BadBody(f"not a {magic.decode()} body (starts {found!r})")
    if length > MAX_HEADER_BYTES:
        raise BadBody(f"header of {length} bytes declared, more than {MAX_HEADER_BYTES}")
    end = _PREFIX.size + length
    if end > len(body):
        raise BadBody(f"truncated: header of {length} bytes declared, "
                      f"{len(body) - _PREFIX.size} received")
    view = memoryview(body)
    try:
        data = json.loads(bytes(view[_PREFIX.size:end]))
        header = model.model_validate(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        if isinstance(exc, ValidationError):
            where, message = first_validation_error(exc)
            raise BadBody(f"header {where}: {message}") from None
        raise BadBody("header is not JSON") from None
    return header, view[end:]


def _exact(payload: memoryview, declared: int) -> None:
    if len(payload) < declared:
        raise BadBody(f"truncated: {declared} payload bytes declared, {len(payload)} received")
    if len(payload) > declared:
        raise BadBody(f"{len(payload) - declared} bytes after the {declared} declared")


# ----------------------------------------------------------------------------- answers
def pack_answer(answer: GenerateResponse, image: bytes, image_format: str) -> bytes:
    """A binary answer: `answer` without its base64 image, then the image bytes."""
    header = AnswerHeader(image_format=image_format.lower(),  # type: ignore[arg-type]
                          image_length=len(image),
                          answer=answer.model_copy(update={"image": ""}) if answer.image
                          else answer)
    return pack(ANSWER_MAGIC, header, [image])


def unpack_answer(body: bytes, *, max_image_bytes: int = MAX_ANSWER_IMAGE_BYTES
                  ) -> tuple[GenerateResponse, bytes, str]:
    """(answer with an empty `image`, image bytes, image format) of a binary answer; the
    image's declared length checked against `max_image_bytes` and the body, and its first
    bytes against the declared format, before anything is decoded."""
    header, payload = unpack(body, ANSWER_MAGIC, AnswerHeader)
    if header.image_length > max_image_bytes:
        raise BadBody(f"image of {header.image_length} bytes declared, more than "
                      f"{max_image_bytes}")
    if header.answer.image:
        raise BadBody("header carries an image: the image follows the header")
    _exact(payload, header.image_length)
    image = bytes(payload)
    if not _looks_like(image, header.image_format):
        raise BadBody(f"image bytes are not {header.image_format.upper()} "
                      f"(start {image[:8]!r})")
    return header.answer, image, header.image_format


def _looks_like(data: bytes, fmt: str) -> bool:
    if fmt == rawimage.WIRE_NAME:
        return rawimage.looks_like(data)
    return sniff_format(data) == fmt.upper()  # png or webp


def answer_accept(image_formats: tuple[str, ...]) -> str:
    """The Accept header of a protocol-4+ generate request that takes binary answers with
    `image_formats`, in order of preference (PNG last in any case: every miner writes it),
    and JSON from a miner that sends nothing else."""
    ranges = [f"{ANSWER_MEDIA_TYPE}; {IMAGE_PARAMETER}={fmt}" for fmt in image_formats
              if fmt != "png"]
    return ", ".join([*ranges, ANSWER_MEDIA_TYPE, "application/json"])


def accept_listings(accept: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(media type, parameters) of each listing of an Accept header, names lower-cased,
    values unquoted; a listing with q=0 is left out: RFC 9110 says it is *not* acceptable.
    Only the first MAX_ACCEPT_CHARS are read (a real Accept is a few hundred)."""
    for media_range in _split_unquoted(accept[:MAX_ACCEPT_CHARS], ","):
        media_type, *parts = (part.strip() for part in _split_unquoted(media_range, ";"))
        params: dict[str, str] = {}
        for key, _, value in (part.partition("=") for part in parts):
            params.setdefault(key.strip().lower(), _unquote(value.strip()))
        if _refused(params.get("q")):
            continue
        yield media_type.lower(), params


def _split_unquoted(text: str, separator: str) -> Iterator[str]:
    """`text` split at `separator`, except inside a quoted string (`"a,b"`, with backslash
    escapes), where a comma or semicolon is part of a parameter's value."""
    if '"' not in text:  # every Accept a niche peer sends: str.split's speed
        yield from text.split(separator)
        return
    start, quoted, escaped = 0, False, False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            yield text[start:i]
            start = i + 1
    yield text[start:]


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _refused(q: str | None) -> bool:
    """Whether a q value says "not acceptable" (0, 0.0, ...); a malformed one does not."""
    try:
        return q is not None and float(q) <= 0.0
    except ValueError:
        return False


def accepts(accept: str, media_type: str) -> bool:
    """Whether an Accept header lists `media_type` itself, not with q=0 (a wildcard does
    not count: the binary bodies are for peers that name them)."""
    return any(listed == media_type for listed, _ in accept_listings(accept))


def requested_image_format(accept: str, writable: tuple[str, ...] = ANSWER_IMAGE_FORMATS
                           ) -> str | None:
    """The image format a binary answer should carry for this Accept header: the first
    listing of the answer media type whose `image` parameter is in `writable` ("png" for a
    listing without it); None when the header does not ask for binary answers at all."""
    chosen: str | None = None
    for media_type, params in accept_listings(accept):
        if media_type != ANSWER_MEDIA_TYPE:
            continue
        fmt = params.get(IMAGE_PARAMETER, "png").lower()
        if fmt in writable:
            return fmt
        chosen = chosen or ("png" if "png" in writable else None)
    return chosen


# ----------------------------------------------------------------------------- states
def pack_states(protocol_version: int, request_id: str,
                states: Sequence[tuple[int, bytes | memoryview]]) -> bytes:
    """A binary states fetch: (index, raw float32 bytes) in order."""
    header = StatesHeader(protocol_version=protocol_version, request_id=request_id,
                          states=[StatePart(index=i, length=len(raw)) for i, raw in states])
    return pack(STATES_MAGIC, header, [raw for _, raw in states])


def unpack_states(body: bytes, *, state_bytes: int
                  ) -> tuple[StatesHeader, dict[int, memoryview]]:
    """(header, {index: raw bytes}) of a binary states fetch whose every state must be
    `state_bytes` long (the committed shape's), checked before any state is read."""
    header, payload = unpack(body, STATES_MAGIC, StatesHeader)
    indices = [part.index for part in header.states]
    if len(set(indices)) != len(indices):
        raise BadBody(f"state indices repeat: {indices}")
    for part in header.states:
        if part.length != state_bytes:
            raise BadBody(f"state {part.index}: {part.length} bytes declared, expected "
                          f"{state_bytes} for the committed shape")
    _exact(payload, state_bytes * len(header.states))
    return header, {part.index: payload[n * state_bytes:(n + 1) * state_bytes]
                    for n, part in enumerate(header.states)}
