"""What a real gateway on 127.0.0.1 says about a damaged upload to /v1/images/edits and
/variations: a truncated or corrupt image file, and a form body cut off before its closing
boundary. Each is a 400 in the OpenAI error shape with one line that names the actual fault
and what to do (it used to be `image: corrupt image: OSError`, a truncated PNG was blamed
on its format, and a form cut off in its image part was `prompt: Field required`).

No miner is needed: both are refused before any is asked, and the same form with the whole
file reaching the 503 of a model nobody serves shows that only the damage is refused."""
from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from gateway_support import make_chain, running_gateway
from PIL import Image

BOUNDARY = "b0undary"
PATHS = ("/images/edits", "/images/variations")
TRUNCATED = {fmt: f"image: the {fmt} file is truncated or corrupt (it ends before its image "
                  "data does): send the whole file" for fmt in ("PNG", "JPEG", "WEBP")}
CORRUPT = ("image: the PNG file is corrupt (its image data does not decode): re-save it as "
           "PNG, WebP or JPEG and send that")
INCOMPLETE = (f'the form body is incomplete: it ends without the closing boundary '
              f'"--{BOUNDARY}--" (was the upload cut off?); send the whole form')


@pytest.fixture(scope="module")
def gw(tmp_path_factory, tiny_root):
    """A gateway offering Kolors (edits and variations) on its tiny checkpoints' limits."""
    net = make_chain(tmp_path_factory.mktemp("uploads"), miners=0)
    try:
        with running_gateway(net, tiny_root, models=("kolors",)) as gateway:
            yield gateway
    finally:
        net.chain.close()


def _image(fmt: str) -> bytes:
    """A 64x64 noise image (within the tiny checkpoints' pixel cap) as `fmt` bytes."""
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, fmt)
    return buf.getvalue()


def _part(name: str, value: bytes, filename: str | None = None) -> bytes:
    head = f'Content-Disposition: form-data; name="{name}"'
    if filename:
        head += f'; filename="{filename}"\r\nContent-Type: application/octet-stream'
    return f"--{BOUNDARY}\r\n{head}\r\n\r\n".encode() + value + b"\r\n"


FIELDS = _part("prompt", b"a cat") + _part("model", b"kolors") + _part("size", b"64x64")
CLOSE = f"--{BOUNDARY}--\r\n".encode()


def _post(gw, path: str, body: bytes, boundary: str = BOUNDARY) -> httpx.Response:
    return httpx.post(gw.base_url + path, content=body, timeout=60, headers={
        "Authorization": f"Bearer {gw.key}",
        "Content-Type": f"multipart/form-data; boundary={boundary}"})


def _refused(resp: httpx.Response, message: str, param: str | None, code: str) -> None:
    assert resp.status_code == 400, resp.text[:300]
    assert resp.json() == {"error": {"message": message, "type": "invalid_request_error",
                                     "param": param, "code": code}}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_a_whole_upload_passes_the_checks(gw, path, fmt):
    """The same forms with the whole file: past every check, to the 503 of no miner."""
    resp = _post(gw, path, FIELDS + _part("image", _image(fmt), "a") + CLOSE)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_miner_available"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("kept", [0.003, 0.5, 0.95])
def test_a_truncated_image_file_says_so(gw, path, fmt, kept):
    """A file cut short (a partial download) in a complete form: the format it is, that it
    is truncated, and to send all of it; at 0.3 % the PNG's header is cut too, which used to
    be blamed on the format."""
    data = _image(fmt)
    cut = data[:max(20, int(len(data) * kept))]
    resp = _post(gw, path, FIELDS + _part("image", cut, "a") + CLOSE)
    _refused(resp, TRUNCATED[fmt], "image", "invalid_image")


@pytest.mark.parametrize("path", PATHS)
def test_a_corrupt_image_file_of_full_length_says_so(gw, path):
    data = bytearray(_image("PNG"))
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # inside the IDAT chunk: its CRC and zlib break
    resp = _post(gw, path, FIELDS + _part("image", bytes(data), "a") + CLOSE)
    _refused(resp, CORRUPT, "image", "invalid_image")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("order", ["image_first", "image_last"])
def test_a_form_cut_off_in_its_image_part_is_incomplete(gw, path, order):
    """A body cut in the middle of the image part: with the fields after the image this used
    to be `prompt: Field required`, with them before it the image was decoded cut short."""
    image = _part("image", _image("PNG"), "a.png")
    body = image + FIELDS if order == "image_first" else FIELDS + image
    cut = body.index(b"\r\n\r\n", body.index(b'name="image"')) + 200
    resp = _post(gw, path, body[:cut])
    _refused(resp, INCOMPLETE, None, "invalid_body")


def test_a_form_without_its_closing_boundary_is_incomplete(gw):
    resp = _post(gw, "/images/edits", _part("image", _image("PNG"), "a.png") + FIELDS)
    _refused(resp, INCOMPLETE, None, "invalid_body")


def test_a_form_whose_boundary_is_not_the_headers_names_it(gw):
    resp = _post(gw, "/images/edits", FIELDS + _part("image", _image("PNG"), "a") + CLOSE,
                 boundary="other")
    _refused(resp, 'malformed multipart body: no part starts with the boundary "--other" '
                   "that the Content-Type header names", None, "invalid_body")
