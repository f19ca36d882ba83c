"""Denial of service from the open internet: what a caller without a validator's key can
hold, and for how long.

A caller can CLAIM any validator's public hotkey in its headers; the claim is only checked
against the signature once the body has arrived (the signature covers the body's sha256).
So a body that trickles in must not hold a slot for ever, and one address must not hold all
the slots. Raw sockets on 127.0.0.x play the attacker; real signed requests play validators.
"""
from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
from bittensor import http_auth
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from miner_support import (
    StubEngine,
    make_request,
    module_net,
    running_miner,
    signed_post,
)

net = module_net("dosnet")


def _body() -> bytes:
    return make_request().model_dump_json(exclude_none=True).encode()


def _slow_body(miner, claimed_hotkey: str, source: str = "127.0.0.1") -> socket.socket:
    """Headers that pass every header-only check (a validator's claimed hotkey, a plausible
    signature), a declared 4 KB body, and then only its first byte."""
    sock = socket.create_connection(("127.0.0.1", miner.server.port), timeout=10,
                                    source_address=(source, 0))
    headers = {
        http_auth.HEADER_VERSION: "1", http_auth.HEADER_HOTKEY: claimed_hotkey,
        http_auth.HEADER_NONCE: str(time.time_ns()), http_auth.HEADER_SIGNATURE: "0x" + "ab" * 64,
        http_auth.HEADER_RECEIVER: miner.hotkey, "Content-Type": "application/json",
        "Content-Length": "4096",
    }
    head = "POST /v1/generate HTTP/1.1\r\nHost: miner\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode() + b"{")
    return sock


def _status_line(sock: socket.socket, timeout: float) -> str:
    sock.settimeout(timeout)
    try:
        data = sock.recv(200)
    except TimeoutError:
        return "still open"
    return data.split(b"\r\n", 1)[0].decode() if data else "closed"


def _read_response(sock: socket.socket, timeout: float) -> str:
    """The status line of one whole response (headers and Content-Length body consumed)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(rest) < length:
        chunk = sock.recv(4096)
        assert chunk, "connection closed mid-body"
        rest += chunk
    return head.split(b"\r\n", 1)[0].decode()


def test_trickled_body_is_cut_off_and_frees_its_slot(net):
    hi = net.wallets["hi"]
    with running_miner(net, StubEngine(), max_inflight=3, body_timeout=8.0) as m:
        slow = [_slow_body(m, hi.hotkey.ss58_address) for _ in range(3)]
        # the three trickling bodies hold all the slots once the miner has admitted them (for
        # the body timeout: long enough that a starved probe still lands in that window);
        # until then a signed request still gets through, so ask until it is turned away
        deadline = time.monotonic() + 30
        while True:
            busy = signed_post(m, hi, _body())
            if busy.status_code != 200 or time.monotonic() > deadline:
                break
        assert busy.status_code == 503 and busy.json()["reason"] == "busy"  # slots all held
        # a body that never completes is answered 408 by the miner's body timeout (the wait
        # here only bounds a hang; the 408 itself is the proof the miner cut it)
        lines = [_status_line(s, 30.0) for s in slow]
        assert all(line.startswith("HTTP/1.1 408") for line in lines), lines
        for s in slow:
            s.close()
        assert signed_post(m, hi, _body()).status_code == 200


def test_one_address_cannot_hold_every_slot(net):
    """Slow bodies from one address take at most its share; a validator elsewhere is served."""
    hi = net.wallets["hi"]
    with running_miner(net, StubEngine(), max_inflight=6, max_inflight_per_ip=2,
                       body_timeout=30.0) as m:
        slow = [_slow_body(m, hi.hotkey.ss58_address, source="127.0.0.3") for _ in range(4)]
        # the two over its share are answered at once; only then are the first two checked,
        # which are held open until their 30 s body timeout
        refused = [_status_line(s, 30.0) for s in slow[2:]]
        assert all(line.startswith("HTTP/1.1 503") for line in refused), refused
        assert [_status_line(s, 0.5) for s in slow[:2]] == ["still open"] * 2
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        body = _body()
        headers = http_auth.sign(hi, method="POST", path="/v1/generate", body=body,
                                 receiver_ss58=m.hotkey)
        with httpx.Client(transport=transport, timeout=30) as client:
            resp = client.post(m.url + "/v1/generate", content=body,
                               headers={**headers, "Content-Type": "application/json"})
        assert resp.status_code == 200, resp.text
        for s in slow:
            s.close()


def test_declared_huge_body_is_refused_from_the_headers(net):
    """A 1 GB upload announced by a 'validator': 413 at once, nothing read."""
    hi = net.wallets["hi"]
    with running_miner(net, StubEngine(), max_body_bytes=100_000) as m:
        sock = socket.create_connection(("127.0.0.1", m.server.port), timeout=10)
        head = ("POST /v1/generate HTTP/1.1\r\nHost: miner\r\nX-Bittensor-Version: 1\r\n"
                f"X-Bittensor-Hotkey: {hi.hotkey.ss58_address}\r\n"
                "Content-Length: 1000000000\r\n\r\n")
        sock.sendall(head.encode())
        # not one body byte is sent: an answer at all proves it came from the headers alone
        assert _status_line(sock, 30.0).startswith("HTTP/1.1 413")
        sock.close()
        assert httpx.get(m.url + "/healthz").json()["ok"]


def test_half_sent_headers_are_cut_off(net):
    """Slowloris: connections that never finish their headers (or go quiet before a second
    request) are closed after header_timeout instead of being held for ever."""
    # header_timeout: enough that a starved test still sends its first full request in time
    with running_miner(net, StubEngine(), header_timeout=5.0) as m:
        silent = socket.create_connection(("127.0.0.1", m.server.port), timeout=10)
        partial = socket.create_connection(("127.0.0.1", m.server.port), timeout=10)
        partial.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: miner\r\nX-Bittensor-")
        reused = socket.create_connection(("127.0.0.1", m.server.port), timeout=10)
        reused.sendall(b"GET /healthz HTTP/1.1\r\nHost: miner\r\n\r\n")
        assert _read_response(reused, 30.0) == "HTTP/1.1 200 OK"
        reused.sendall(b"GET /healthz HTTP/1.1\r\nHost: mi")  # second request stalls
        # the miner closes all three (the 30 s wait only bounds a hang: "closed" is the
        # miner's doing, a connection it had kept would read "still open")
        assert [_status_line(s, 30.0) for s in (silent, partial, reused)] == ["closed"] * 3
        for s in (silent, partial, reused):
            s.close()
        assert signed_post(m, net.wallets["hi"], _body()).status_code == 200


def test_validator_refuses_an_image_bomb_answer_before_decoding(tmp_path):
    """A miner answers a 64x64 challenge with a 7.8 KB PNG of 8000x8000 pixels (192 MB once
    decoded; 64 miners doing it at once would take a validator down). The client checks the
    header dimensions against what it asked for and never decodes the pixels."""
    import base64
    import io

    from PIL import Image

    from niche.auth import sign_response
    from niche.chain.wallets import create_wallet
    from niche.devnet.servers import BackgroundServer
    from niche.imaging import image_sha256
    from niche.validator.client import MinerClient, QueryStatus

    miner, validator = (create_wallet(n, "hot", tmp_path) for n in ("m", "v"))
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, "PNG")
    bomb = buf.getvalue()
    assert len(bomb) < 10_000
    app = FastAPI()

    @app.post("/v1/generate")
    async def generate(request: Request):
        req = json.loads(await request.body())
        rid, digest = req["request_id"], image_sha256(bomb)
        return JSONResponse(dict(
            request_id=rid, model=req["params"]["model"], image=base64.b64encode(bomb).decode(),
            image_sha256=digest, miner_hotkey=miner.hotkey.ss58_address,
            signature=sign_response(miner.hotkey, rid, digest), generation_seconds=0.1,
            miner_version="x"))

    with BackgroundServer(app) as server:
        result = asyncio.run(MinerClient(validator).query(
            (0, miner.hotkey.ss58_address, server.url),
            make_request(model="flux-schnell", width=64, height=64)))
    assert result.status is QueryStatus.INVALID_IMAGE, (result.status, result.reason)
    assert "8000x8000" in result.reason and result.image is None


def test_validator_caps_an_answer_by_the_size_it_asked_for(tmp_path):
    """A 64x64 answer padded to 5 MB (a 32 MB body from each of 64 miners would be 2 GB in
    the validator): refused as too large once past what a 128x128 noise PNG could need."""
    from PIL import Image

    from niche.auth import sign_response
    from niche.chain.wallets import create_wallet
    from niche.devnet.servers import BackgroundServer
    from niche.imaging import encode_b64
    from niche.validator.client import MinerClient, QueryStatus

    miner, validator = (create_wallet(n, "hot", tmp_path) for n in ("m", "v"))
    app = FastAPI()

    @app.post("/v1/generate")
    async def generate(request: Request):
        req = json.loads(await request.body())
        b64, digest = encode_b64(Image.new("RGB", (64, 64), (1, 2, 3)))
        rid = req["request_id"]
        pad = "v" * (5 * 1024 * 1024) if req["params"]["prompt"] == "padded" else "x"
        return JSONResponse(dict(
            request_id=rid, model=req["params"]["model"], image=b64, image_sha256=digest,
            miner_hotkey=miner.hotkey.ss58_address, generation_seconds=0.1,
            signature=sign_response(miner.hotkey, rid, digest), miner_version=pad))

    target = (0, miner.hotkey.ss58_address)
    with BackgroundServer(app) as server:
        client = MinerClient(validator)
        padded, normal = (asyncio.run(client.query(
            (*target, server.url), make_request(prompt, model="flux-schnell", width=64,
                                                height=64))) for prompt in ("padded", "plain"))
    assert padded.status is QueryStatus.RESPONSE_TOO_LARGE, (padded.status, padded.reason)
    assert normal.status is QueryStatus.OK, normal.reason
