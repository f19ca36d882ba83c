"""`multipart/form-data` bodies (what the openai client sends to /v1/images/edits and
/variations) turned into the same `ImagesRequest` the JSON endpoint takes.

Parsed with the standard library's MIME parser over a body already capped in size, so no
extra dependency. That parser is pure Python and slow on many parts or lines, so the part
count and each part's header block are bounded first (a few C-speed scans), and a large
body is parsed on a worker thread: one hostile form cannot stall the event loop. Form
values are text, so each is converted to the type its field takes, as strictly as JSON
would (a wrong one is a 400 naming the field)."""
from __future__ import annotations

import asyncio
import base64
import email.errors
import email.message
import email.parser
import email.policy
import re
import types
import typing
from dataclasses import dataclass, field

from niche.gateway.errors import bad_request, shown_name, unknown_parameter
from niche.gateway.schemas import ImagesRequest
from niche.protocol import MAX_IMAGE_B64_CHARS

FILE_FIELDS = ("image", "image[]", "mask", "markup")

MAX_IMAGE_BYTES = MAX_IMAGE_B64_CHARS * 3 // 4
"""An uploaded image's largest size: what the miners take as base64 (24 MiB), decoded."""
MB = 1024 * 1024

MAX_PARTS = len(ImagesRequest.model_fields) + 2
"""Every field of the images API once, plus the image and a mask (refused, but by name)."""
MAX_PART_HEAD_BYTES = 4096
"""A part's header block (Content-Disposition, Content-Type): a few hundred bytes in practice."""
INLINE_PARSE_BYTES = 256 * 1024
"""Bodies up to this size are parsed on the event loop (a thread hop costs more)."""

_INT = re.compile(r"-?[0-9]{1,19}")
_FLOAT = re.compile(r"-?(?:[0-9]{1,19}(?:\.[0-9]{0,19})?|\.[0-9]{1,19})(?:[eE][-+]?[0-9]{1,2})?")
"""What JSON accepts for a number: ASCII digits only (no " 2", "２", "1_0", "nan" or "inf")."""


@dataclass
class Form:
    values: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[bytes]] = field(default_factory=dict)


async def read_form(content_type: str | None, body: bytes) -> Form:
    """`parse_form`, on a worker thread when the body is large."""
    if len(body) <= INLINE_PARSE_BYTES:
        return parse_form(content_type, body)
    return await asyncio.to_thread(parse_form, content_type, body)


def _boundary(content_type: str | None) -> bytes:
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        raise bad_request("this endpoint takes multipart/form-data (an image file and "
                          "fields), as the openai client sends it", code="invalid_body")
    header = email.message.Message()
    header["Content-Type"] = content_type
    boundary = header.get_boundary()
    if not boundary:
        raise bad_request("multipart/form-data without a boundary parameter",
                          code="invalid_body")
    return boundary.encode("latin-1", errors="replace")


def _check_shape(boundary: bytes, body: bytes) -> None:
    """Bound what the MIME parser will walk before it starts: the number of parts and the
    size of each part's header block."""
    delimiter = b"--" + boundary
    if body.count(delimiter) > MAX_PARTS + 1:  # the closing delimiter is one more
        raise bad_request(f"the form has more than {MAX_PARTS} parts; an images request "
                          "takes each field at most once and one image",
                          code="too_many_parts")
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        if len(part) > MAX_PART_HEAD_BYTES and not _head_ends(part):
            raise bad_request(f"a form part has a header block over {MAX_PART_HEAD_BYTES} "
                              "bytes (or no blank line after its headers)",
                              code="invalid_body")


def _head_ends(part: bytes) -> bool:
    """The blank line closing the part's headers comes within MAX_PART_HEAD_BYTES."""
    window = part[:MAX_PART_HEAD_BYTES + 4]
    return b"\r\n\r\n" in window or b"\n\n" in window


def parse_form(content_type: str | None, body: bytes) -> Form:
    """Fields and files of a multipart body; a body that is not one is a 400, and so is one
    cut off before its closing boundary (else its last part, often the image, would be
    taken cut short and the fields after it reported missing)."""
    boundary = _boundary(content_type)
    _check_shape(boundary, body)
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    shown = shown_name(boundary.decode("latin-1"))
    if not message.is_multipart():
        raise bad_request(f"malformed multipart body: no part starts with the boundary "
                          f'"--{shown}" that the Content-Type header names', code="invalid_body")
    if any(isinstance(d, email.errors.CloseBoundaryNotFoundDefect) for d in message.defects):
        raise bad_request(f'the form body is incomplete: it ends without the closing boundary '
                          f'"--{shown}--" (was the upload cut off?); send the whole form',
                          code="invalid_body")
    form = Form()
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            continue
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        if name in FILE_FIELDS or part.get_filename():
            form.files.setdefault(name.removesuffix("[]"), []).append(data)
        else:
            if name in form.values:
                shown = shown_name(name)
                raise bad_request(f"{shown}: given twice", shown, code="invalid_parameter")
            form.values[name] = data.decode("utf-8", errors="replace")
    return form


def _kind(annotation: object) -> type:
    """The scalar type a field takes (int, float, bool or str)."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _kind(args[0])
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is not type(None):
                return _kind(arg)
    if annotation in (int, float, bool):
        return annotation
    return str


def _convert(name: str, text: str, kind: type) -> object:
    if kind is bool:
        if text.lower() in ("true", "1"):
            return True
        if text.lower() in ("false", "0"):
            return False
        raise bad_request(f"{name}: must be true or false, got {text[:20]!r}", name,
                          code="invalid_parameter")
    if kind in (int, float):
        if (_INT if kind is int else _FLOAT).fullmatch(text) is None:
            what = "an integer" if kind is int else "a number"
            raise bad_request(f"{name}: must be {what} in ASCII digits, got {text[:20]!r}",
                              name, code="invalid_parameter")
        return kind(text)
    return text


def form_fields(form: Form) -> dict[str, object]:
    """The form's text fields typed as `ImagesRequest` takes them; unknown names are kept
    (as text) so the request model refuses them by name."""
    out: dict[str, object] = {}
    fields = ImagesRequest.model_fields
    for name, text in form.values.items():
        info = fields.get(name)
        out[name] = _convert(name, text, _kind(info.annotation)) if info else text
    return out


def one_image(form: Form) -> str:
    """The single uploaded image, as the base64 the miners take."""
    if form.files.get("mask"):
        raise bad_request("mask: inpainting is not served; an edit redraws the whole image "
                          "guided by it (docs/gateway.md)", "mask")
    extra = sorted(set(form.files) - {"image", "mask"})
    if extra:
        raise _file_for_text(extra[0])
    images = form.files.get("image", [])
    if not images:
        raise bad_request("image: an image file is required (PNG, WebP or JPEG)", "image")
    if len(images) > 1:
        raise bad_request(f"image: one image per request, got {len(images)}", "image")
    _check_upload(images[0])
    return base64.b64encode(images[0]).decode()


def _file_for_text(name: str) -> Exception:
    """A file part under a name that is not the image: a text field sent as a file (curl's
    `-F prompt=@p.txt`) is told so; any other name is unknown."""
    if name not in ImagesRequest.model_fields:
        return unknown_parameter(name)
    return bad_request(f"{name}: send {name} as a text field, not a file (with curl, "
                       f"-F '{name}=<file.txt' reads a file into a text field)", name,
                       code="invalid_parameter")


def _check_upload(data: bytes) -> None:
    """An empty or oversized image file is refused by what it is, before decoding."""
    if not data:
        raise bad_request("image: the uploaded file is empty; send a PNG, WebP or JPEG",
                          "image", code="invalid_image")
    if len(data) > MAX_IMAGE_BYTES:
        raise bad_request(f"image: the file is {len(data) / MB:.1f} MB; at most "
                          f"{MAX_IMAGE_BYTES // MB} MB (send a smaller or compressed image, "
                          "e.g. a JPEG)", "image", code="image_too_large")
