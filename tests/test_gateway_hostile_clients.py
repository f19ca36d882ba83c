"""Hostile clients against a real gateway on 127.0.0.1 (real miners on the tiny engine):
forms built to stall the MIME parser, a trickled body, one key opening many requests, an
upload dropped half way, and the small validation gaps (sizes, numbers, one-line messages)."""
from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

import httpx
import openai
import pytest
from gateway_support import Only, make_chain, running_gateway, running_miners
from PIL import Image

from niche.gateway.forms import MAX_PART_HEAD_BYTES, MAX_PARTS
from niche.gateway.service import GatewayConfig

BODY_TIMEOUT = 2.0
INFLIGHT = 3
BOUNDARY = "b0und"
BASE = {"model": "flux-schnell", "prompt": "x", "size": "64x64"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory, tiny_engine, tiny_root):
    """Two FLUX.1-schnell miners and a gateway with a short body deadline and a small
    per-key in-flight cap (so the tests need neither 30 s nor 16 sockets)."""
    net = make_chain(tmp_path_factory.mktemp("hostile"), miners=2)
    config = GatewayConfig(audit_fraction=0.0, body_timeout=BODY_TIMEOUT,
                           max_inflight_per_key=INFLIGHT)
    try:
        with running_miners(net, {"miner1": Only(tiny_engine, "flux-schnell"),
                                  "miner2": Only(tiny_engine, "flux-schnell")}), \
                running_gateway(net, tiny_root, config=config) as gateway:
            gateway.client = openai.OpenAI(api_key=gateway.key, base_url=gateway.base_url,
                                           max_retries=0)
            yield gateway
    finally:
        net.chain.close()


def _auth(gw) -> dict[str, str]:
    return {"Authorization": f"Bearer {gw.key}"}


def _form(parts: list[tuple[str, bytes]]) -> bytes:
    out = b""
    for head, data in parts:
        out += f"--{BOUNDARY}\r\n{head}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def _post_form(gw, body: bytes, path: str = "/images/edits") -> httpx.Response:
    return httpx.post(gw.base_url + path, content=body, timeout=120,
                      headers={**_auth(gw),
                               "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})


def _health_while(gw, work) -> tuple[object, float]:
    """`work()`'s result and the slowest /healthz answer seen while it ran."""
    got: list = []
    thread = threading.Thread(target=lambda: got.append(work()))
    thread.start()
    slowest = 0.0
    while thread.is_alive():
        started = time.monotonic()
        assert httpx.get(gw.url + "/healthz", timeout=60).status_code == 200
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.05)
    thread.join()
    return got[0], slowest


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- forms (finding 1)
def test_a_form_of_many_parts_is_refused_before_parsing(gw):
    parts = [(f'Content-Disposition: form-data; name="f{i}"', b"x") for i in range(10_000)]
    resp, slowest = _health_while(gw, lambda: _post_form(gw, _form(parts)))
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "too_many_parts" and error["type"] == "invalid_request_error"
    assert f"more than {MAX_PARTS} parts" in error["message"]
    assert slowest < 1.0, f"/healthz took {slowest:.1f}s while the form was checked"


def test_a_form_part_with_a_huge_header_block_is_refused(gw):
    head = 'Content-Disposition: form-data; name="prompt"; x="' + "a" * 50_000 + '"'
    resp = _post_form(gw, _form([(head, b"a cat")]))
    assert resp.status_code == 400
    assert f"header block over {MAX_PART_HEAD_BYTES} bytes" in resp.json()["error"]["message"]


def test_a_large_slow_to_parse_form_does_not_stall_the_event_loop(gw):
    body = _form([('Content-Disposition: form-data; name="prompt"', b"x"),
                  ('Content-Disposition: form-data; name="model"', b"kolors"),
                  ('Content-Disposition: form-data; name="image"; filename="a.png"\r\n'
                   "Content-Type: image/png", b"\n" * (16 * 1024 * 1024))])
    resp, slowest = _health_while(gw, lambda: _post_form(gw, body))
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "image"
    assert slowest < 1.0, f"/healthz took {slowest:.1f}s while the form was parsed"


# ---------------------------------------------------------------- slow bodies (finding 2)
def _trickle(gw, path: str = "/v1/images/generations") -> socket.socket:
    """A connection whose headers are sent at once and whose body never completes."""
    url = urlparse(gw.url)
    sock = socket.create_connection((url.hostname, url.port))
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gw.key}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{").encode())
    return sock


def _answer(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends until it closes the connection (or `timeout` passes),
    trickling a byte of body every 0.5 s meanwhile."""
    sock.settimeout(0.5)
    got, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        except TimeoutError:
            try:
                sock.sendall(b" ")
            except OSError:
                break
    return got


def test_a_trickled_body_gets_408_in_openai_shape(gw):
    started = time.monotonic()
    with _trickle(gw) as sock:
        raw = _answer(sock, timeout=BODY_TIMEOUT + 10)
    waited = time.monotonic() - started
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), raw[:200]
    assert BODY_TIMEOUT - 0.5 < waited < BODY_TIMEOUT + 5
    error = json.loads(body)["error"]
    assert error["code"] == "body_timeout" and f"{BODY_TIMEOUT:g}s" in error["message"]


def test_a_client_still_uploading_past_the_size_cap_reads_the_413(gw):
    """urllib (like requests) writes its whole body before reading: the 413 comes first,
    and the gateway's staged close lets the client read it instead of a reset."""
    cap = GatewayConfig().max_body_bytes
    request = urllib.request.Request(gw.base_url + "/images/edits", data=b"a" * (cap + 1),
                                     headers={**_auth(gw), "Content-Type": "multipart/form-"
                                              f"data; boundary={BOUNDARY}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413
    assert json.loads(refused.value.read())["error"]["code"] == "body_too_large"


def test_a_key_cannot_hold_more_than_its_in_flight_cap(gw):
    socks = [_trickle(gw) for _ in range(INFLIGHT)]
    try:
        time.sleep(0.3)  # the server has them all in its handlers
        with pytest.raises(openai.RateLimitError) as caught:
            gw.client.images.generate(model="flux-schnell", prompt="a cat", size="64x64")
        assert caught.value.code == "too_many_concurrent_requests"
        assert caught.value.response.headers["retry-after"] == "1"
        assert f"{INFLIGHT} requests in flight" in caught.value.message
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # hung-up uploads give their slots back
        try:
            answer = gw.client.images.generate(model="flux-schnell", prompt="a cat",
                                               size="64x64")
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "slots never given back"
            time.sleep(0.2)
    assert answer.data[0].b64_json


# ---------------------------------------------------------------- dropped upload (finding 6)
@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/edits"])
def test_an_upload_cut_short_is_a_499_line_not_a_500(gw, caplog, path):
    caplog.set_level(logging.INFO)
    url = urlparse(gw.url)
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gw.key}\r\n"
                      "Content-Type: multipart/form-data; boundary=b\r\n"
                      "Content-Length: 100000\r\n\r\n").encode() + b"--b\r\n" + b"x" * 100)
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    lines: list[logging.LogRecord] = []
    while not lines and time.monotonic() < deadline:
        lines = [r for r in caplog.records
                 if r.name == "niche.gateway.access" and f"{path} " in r.getMessage()]
        time.sleep(0.1)
    assert [r.getMessage().split()[2] for r in lines] == ["499"]
    assert lines[0].levelno == logging.INFO
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], \
        [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# ---------------------------------------------------------------- validation (finding 7)
def _post(gw, body=None, content=None) -> httpx.Response:
    headers = {**_auth(gw), "Content-Type": "application/json"}
    return httpx.post(gw.base_url + "/images/generations", json=body, content=content,
                      headers=headers, timeout=60)


def test_size_with_a_trailing_newline_is_refused(gw):
    resp = _post(gw, {**BASE, "size": "64x64\n"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "size"


@pytest.mark.parametrize("body", [{**BASE, "model": "flux\nschnell"},
                                  {**BASE, "size": "64\nx64"}])
def test_error_messages_stay_on_one_line(gw, body):
    resp = _post(gw, body)
    assert resp.status_code == 400
    message = resp.json()["error"]["message"]
    assert "\n" not in message and "\\n" in message, message


def test_a_huge_integer_names_its_field(gw):
    resp = _post(gw, content=b'{"model":"flux-schnell","prompt":"x","n":' + b"9" * 5000 + b"}")
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "n" and "5000 digits is too long" in error["message"]


def test_nan_is_refused_as_such(gw):
    resp = _post(gw, content=b'{"model":"flux-schnell","prompt":"x","guidance":NaN}')
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "guidance" and "NaN is not a number" in error["message"]


@pytest.mark.parametrize("field,value", [("n", " 2"), ("n", "\uff12"), ("n", "1_0"),
                                         ("guidance", "nan"), ("guidance", "inf")])
def test_form_numbers_are_as_strict_as_json_ones(gw, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        gw.client.images.edit(image=("a.png", _png(), "image/png"), prompt="x",
                              model="flux-schnell", size="64x64", extra_body={field: value})
    assert caught.value.code == "invalid_parameter"
    assert caught.value.body["param"] == field
    assert "ASCII digits" in caught.value.message


def test_a_prompt_over_the_token_limit_is_refused_once_named(gw):
    resp = _post(gw, {**BASE, "prompt": "x " * 999})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "prompt"
    assert error["message"].startswith("prompt: refused by 2 of the miners"), error["message"]
    assert "token limit" in error["message"]
