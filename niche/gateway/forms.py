"""`multipart/form-data` bodies (what the openai client sends to /v1/images/edits and
/variations) turned into the same `ImagesRequest` the JSON endpoint takes.

Parsed with the standard library's MIME parser over a body already capped in size, so no
extra dependency; form values are text, so each is converted to the type its field takes
(a wrong one is a 400 naming the field)."""
from __future__ import annotations

import base64
import email.parser
import email.policy
import types
import typing
from dataclasses import dataclass, field

from niche.gateway.errors import bad_request
from niche.gateway.schemas import ImagesRequest

FILE_FIELDS = ("image", "image[]", "mask", "markup")


@dataclass
class Form:
    values: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[bytes]] = field(default_factory=dict)


def parse_form(content_type: str | None, body: bytes) -> Form:
    """Fields and files of a multipart body; a body that is not one is a 400."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        raise bad_request("this endpoint takes multipart/form-data (an image file and "
                          "fields), as the openai client sends it", code="invalid_body")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise bad_request("malformed multipart body (no parts)", code="invalid_body")
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
                raise bad_request(f"{name}: given twice", name, code="invalid_parameter")
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
        try:
            return kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise bad_request(f"{name}: must be {what}, got {text[:20]!r}", name,
                              code="invalid_parameter") from None
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
        raise bad_request(f"{extra[0]}: unknown parameter", extra[0], code="invalid_parameter")
    images = form.files.get("image", [])
    if not images:
        raise bad_request("image: an image file is required (PNG, WebP or JPEG)", "image")
    if len(images) > 1:
        raise bad_request(f"image: one image per request, got {len(images)}", "image")
    return base64.b64encode(images[0]).decode()
