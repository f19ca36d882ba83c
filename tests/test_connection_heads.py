"""What one connection without any key may hold, below the app, on the miner and the gateway.

- A request head (request line and headers) over `ConnectionLimits.max_head_bytes` gets a
  one-line JSON 431 and its connection closes: httptools has no bound of its own, and one
  connection sending an endless header grew the gateway by 185 MB and made every other
  request 100x slower until the header deadline (15 s).
- The gateway counts connections per address as the miner does (1030 idle connections from
  one address made it answer every user 503); trusted proxies (FORWARDED_ALLOW_IPS) are not
  counted, their one address carries every user; its refusals below the app are in OpenAI's
  error shape.

Raw sockets on 127.0.0.x play the attacker; a real miner and the real gateway app serve."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from gateway_support import make_chain, running_gateway
from miner_support import StubEngine, make_request, module_net, running_miner, signed_post

from niche.gateway.connections import gateway_limits, trusted_proxies
from niche.miner.server import ConnectionLimits

net = module_net("headnet")


def _endless_header(port: int, stop: threading.Event, sent: list[int],
                    answer: list[bytes]) -> None:
    """Sends a request line and one header that never ends until the server hangs up."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    chunk = b"a" * 16384
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        while not stop.is_set() and sent[0] < 64 << 20:
            sock.sendall(chunk)
            sent[0] += len(chunk)
    except OSError:
        pass
    sock.settimeout(5)
    try:
        while data := sock.recv(65536):
            answer.append(data)
    except OSError:
        pass
    sock.close()


def _attack(port: int) -> tuple[int, bytes]:
    stop, sent, answer = threading.Event(), [0], []
    attacker = threading.Thread(target=_endless_header, args=(port, stop, sent, answer))
    attacker.start()
    attacker.join(timeout=60)
    stop.set()
    attacker.join()
    return sent[0], b"".join(answer)


def _json_body(raw: bytes) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), raw[:200]
    assert b"connection: close" in head.lower()
    return json.loads(body)


def test_a_miner_refuses_an_endless_header_with_431_and_hangs_up(net):
    with running_miner(net, StubEngine()) as m:
        sent, raw = _attack(m.server.port)
        # cut off near the cap (the socket buffers on both sides hold a few MB more), not
        # after 64 MB or at the header deadline
        assert sent < 16 << 20, f"{sent} bytes accepted before the refusal"
        body = _json_body(raw)
        assert body["reason"] == "request_header_fields_too_large"
        assert str(ConnectionLimits().max_head_bytes) in body["detail"]
        assert httpx.get(m.url + "/healthz", timeout=10).json()["ok"]


def test_heads_under_the_cap_and_big_bodies_are_served(net):
    """The cap counts head bytes only: a body arriving with its head is not counted, and a
    30 KiB header (a browser's cookies) is within it."""
    hi = net.wallets["hi"]
    with running_miner(net, StubEngine()) as m:
        request = make_request(prompt="p" * 200)
        body = request.model_dump_json(exclude_none=True).encode()
        assert signed_post(m, hi, body).status_code == 200
        big = httpx.get(m.url + "/healthz", headers={"Cookie": "c=" + "v" * 30_000},
                        timeout=10)
        assert big.status_code == 200
        # a 300 KB body sent in the same write as its head: refused by the app's own checks
        # (not JSON the miner takes), never as a too-large head
        sock = socket.create_connection(("127.0.0.1", m.server.port), timeout=10)
        payload = b"{" + b" " * 300_000 + b"}"
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n"
                     + payload)
        sock.settimeout(20)
        status = sock.recv(200).split(b"\r\n", 1)[0]
        sock.close()
        assert status and not status.startswith(b"HTTP/1.1 431"), status


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, tiny_root):
    chain_net = make_chain(tmp_path_factory.mktemp("headgw"), miners=0)
    try:
        with running_gateway(chain_net, tiny_root, limits=gateway_limits(3)) as gw:
            yield gw
    finally:
        chain_net.chain.close()


def test_the_gateway_refuses_an_endless_header_in_openai_shape(gateway):
    sent, raw = _attack(gateway.server.port)
    assert sent < 16 << 20, f"{sent} bytes accepted before the refusal"
    error = _json_body(raw)["error"]
    assert error["code"] == "request_header_fields_too_large"
    assert error["type"] == "invalid_request_error" and "bytes" in error["message"]
    assert httpx.get(gateway.url + "/healthz", timeout=10).status_code == 200


def _idle(port: int, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.sendall(b"G")  # one byte of a request head, then nothing
    return sock


def _closed_at_once(sock: socket.socket) -> bool:
    sock.settimeout(2.0)
    try:
        return sock.recv(100) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_the_gateway_caps_connections_per_address_but_not_its_proxy(gateway):
    port = gateway.server.port
    held = [_idle(port, "127.0.0.2") for _ in range(3)]
    extra = _idle(port, "127.0.0.2")
    try:
        assert _closed_at_once(extra), "a 4th connection from one address was kept"
        assert not any(_closed_at_once(s) for s in held[:1])
        # another address is served, and so is the trusted proxy's with more than 3 open
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3")) as other:
            assert other.get(gateway.url + "/healthz", timeout=10).status_code == 200
        proxy = [_idle(port, "127.0.0.1") for _ in range(5)]
        time.sleep(0.3)
        assert not any(_closed_at_once(s) for s in proxy[-1:])
        for s in proxy:
            s.close()
    finally:
        for s in [*held, extra]:
            s.close()


@pytest.mark.parametrize(("setting", "exempt"), [
    ("127.0.0.1", {"127.0.0.1", "::/64"}),
    ("10.0.0.5, 127.0.0.1", {"10.0.0.5", "127.0.0.1", "::/64"}),
    ("*", set()),
    ("10.0.0.0/8,192.168.1.9", {"192.168.1.9"}),
    ("", set()),
])
def test_trusted_proxies_are_the_literal_addresses_uvicorn_trusts(setting, exempt):
    assert trusted_proxies(setting) == exempt
