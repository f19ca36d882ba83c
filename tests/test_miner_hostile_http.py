"""The miner's HTTP face against hostile peers (real uvicorn on 127.0.0.1): idle connections
from one address, unproven hotkey claims, X-Forwarded-For, unread states answers, and
requests replayed across a restart."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
from bittensor import http_auth
from miner_support import StubEngine, make_request, module_net, running_miner, signed_post

from niche.auth import sign_request
from niche.protocol import ErrorResponse
from niche.validator.client import MinerClient, MinerTarget

net = module_net("hostilehttpnet")
MiB = 1024 * 1024


def _body() -> bytes:
    return make_request().model_dump_json(exclude_none=True).encode()


def _closed_by_peer(sock: socket.socket, wait: float) -> bool:
    """The miner closed `sock` within `wait` seconds (EOF or reset); False: still open."""
    sock.settimeout(wait)
    try:
        return sock.recv(64) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (TimeoutError, BlockingIOError):
        return False


def _one_line_error(text: str) -> ErrorResponse:
    assert "\n" not in text, text
    return ErrorResponse.model_validate_json(text)


# ----------------------------------------------------------------------------- connections
def test_one_address_cannot_take_every_connection(net):
    with running_miner(net, StubEngine(), max_connections_per_ip=4) as m:
        idle = [socket.create_connection(("127.0.0.1", m.server.port), timeout=10,
                                         source_address=("127.0.0.9", 0)) for _ in range(10)]
        try:
            closed = [_closed_by_peer(s, 0.5) for s in idle]
            assert closed == [False] * 4 + [True] * 6, closed
            resp = signed_post(m, net.wallets["hi"], _body())  # another address: served
            assert resp.status_code == 200, resp.text
        finally:
            for s in idle:
                s.close()
        time.sleep(0.2)  # the closed ones gave their places back
        again = socket.create_connection(("127.0.0.1", m.server.port), timeout=10,
                                         source_address=("127.0.0.9", 0))
        assert not _closed_by_peer(again, 0.3)
        again.close()


def test_the_overload_answer_is_a_one_line_error(net):
    with running_miner(net, StubEngine(), max_connections=4,
                       max_connections_per_ip=0) as m:
        idle = [socket.create_connection(("127.0.0.1", m.server.port), timeout=10)
                for _ in range(4)]
        try:
            time.sleep(0.2)
            resp = signed_post(m, net.wallets["hi"], _body())
        finally:
            for s in idle:
                s.close()
        assert resp.status_code == 503
        assert resp.headers["content-type"] == "application/json"
        assert _one_line_error(resp.text).reason == "busy"
        time.sleep(0.2)
        assert signed_post(m, net.wallets["hi"], _body()).status_code == 200


# ----------------------------------------------------------------------------- pre-auth caps
def _slow_head(miner, claimed: str, source: str = "127.0.0.1", extra=()) -> socket.socket:
    """A generate head claiming `claimed` with a garbage signature, then one body byte of
    4096: held until the body timeout unless refused from the head."""
    sock = socket.create_connection(("127.0.0.1", miner.server.port), timeout=10,
                                    source_address=(source, 0))
    headers = [(http_auth.HEADER_VERSION, "1"), (http_auth.HEADER_HOTKEY, claimed),
               (http_auth.HEADER_NONCE, str(time.time_ns())),
               (http_auth.HEADER_SIGNATURE, "0x" + "ab" * 64),
               (http_auth.HEADER_RECEIVER, miner.hotkey), ("Content-Length", "4096"), *extra]
    head = "POST /v1/generate HTTP/1.1\r\nHost: m\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    sock.sendall(head.encode() + b"{")
    return sock


def _held(socks: list[socket.socket], wait: float = 1.0) -> int:
    """How many of `socks` are still held open (not answered 503) after `wait` s."""
    time.sleep(wait)
    held = 0
    for s in socks:
        s.settimeout(0.05)
        try:
            if not s.recv(64).startswith(b"HTTP/1.1 503"):
                held += 1
        except (TimeoutError, BlockingIOError):
            held += 1
    return held


def test_a_claimed_hotkey_does_not_buy_its_stake_share_before_the_signature(net):
    hi = net.wallets["hi"].hotkey.ss58_address
    with running_miner(net, StubEngine(), requests_per_minute=60,
                       stake_proportional_rate=True, max_inflight_per_ip=2,
                       body_timeout=30.0) as m:
        assert m.service.inflight_cap(hi) > 10  # hi's verified share
        anon = [_slow_head(m, hi, source="127.0.0.7") for _ in range(6)]
        try:
            assert _held(anon) == 2
            # the real hi, elsewhere, is served; its verified share is untouched
            resp = signed_post(m, net.wallets["hi"], _body())
            assert resp.status_code == 200, resp.text
        finally:
            for s in anon:
                s.close()


def test_a_verified_caller_keeps_its_stake_share_after_the_signature(net):
    hi = net.wallets["hi"]
    engine = StubEngine()
    with running_miner(net, engine, stake_proportional_rate=True, max_inflight_per_ip=2,
                       max_queue=16) as m:
        async def scenario():
            engine.hold()

            async def one(i):
                body = make_request(f"p{i}", timeout=60).model_dump_json().encode()
                headers = http_auth.sign(hi, method="POST", path="/v1/generate", body=body,
                                         receiver_ss58=m.hotkey)
                async with httpx.AsyncClient(timeout=60) as client:
                    return await client.post(m.url + "/v1/generate", content=body, headers={
                        **headers, "Content-Type": "application/json"})

            tasks = []
            for i in range(5):  # one after another: each is proven before the next arrives
                tasks.append(asyncio.create_task(one(i)))
                await asyncio.sleep(0.3)
            engine.release()
            return await asyncio.gather(*tasks)

        codes = [r.status_code for r in asyncio.run(scenario())]
        assert codes == [200] * 5, codes  # 5 held at once from one address, over the base 2


def test_x_forwarded_for_does_not_choose_the_peer_address(net):
    hi = net.wallets["hi"].hotkey.ss58_address
    with running_miner(net, StubEngine(), max_inflight_per_ip=2, body_timeout=30.0) as m:
        socks = [_slow_head(m, hi, extra=[("X-Forwarded-For", f"10.0.0.{i}")])
                 for i in range(6)]
        try:
            assert _held(socks) == 2
        finally:
            for s in socks:
                s.close()


# ----------------------------------------------------------------------------- /v1/states
def _unread_states_fetch(m, wallet, request_id: str) -> socket.socket:
    body = json.dumps({"protocol_version": 4, "request_id": request_id,
                       "indices": list(range(1, 9))}).encode()
    headers = http_auth.sign(wallet, method="POST", path="/v1/states", body=body,
                             receiver_ss58=m.hotkey)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never reads
    sock.settimeout(10)
    sock.connect(("127.0.0.1", m.server.port))
    head = "POST /v1/states HTTP/1.1\r\nHost: m\r\nContent-Type: application/json\r\n" + \
        "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + \
        f"Content-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    return sock


def _status_and_body(sock: socket.socket) -> tuple[str, bytes]:
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(), rest


def _keep_states(m, wallet, request_id: str, count: int = 8, size: int = MiB) -> None:
    m.service.states.put_raw(wallet.hotkey.ss58_address, request_id,
                             [bytes([i]) * size for i in range(count)])


def test_unread_states_answers_are_bounded_per_caller_and_dropped_when_stalled(net):
    hi = net.wallets["hi"]
    with running_miner(net, StubEngine(), send_timeout=3.0) as m:
        rid = "flood" + "0" * 11
        _keep_states(m, hi, rid)
        socks = [_unread_states_fetch(m, hi, rid) for _ in range(10)]
        try:
            time.sleep(0.5)
            answers = [_status_and_body(s) for s in socks]
            lines = [line for line, _ in answers]
            assert lines.count("HTTP/1.1 200 OK") == 2, lines
            refused = [body for line, body in answers if line.startswith("HTTP/1.1 429")]
            assert len(refused) == 8
            assert _one_line_error(refused[0].decode()).reason == "too_many_fetches"
            time.sleep(4.0)  # the two unread answers stall past the 3 s send deadline
            held = [s for s, (line, _) in zip(socks, answers, strict=True)
                    if line.endswith("200 OK")]
            for s in held:  # their connections were dropped (what was in flight drains)
                s.settimeout(5)
                with_eof = False
                try:
                    while s.recv(1 << 20):
                        pass
                    with_eof = True
                except ConnectionResetError:
                    with_eof = True
                assert with_eof
            resp = signed_post(m, hi, json.dumps({"protocol_version": 4, "request_id": rid,
                                                  "indices": [1]}).encode(),
                               path="/v1/states")
            assert resp.status_code == 200, resp.text  # their slots were given back
        finally:
            for s in socks:
                s.close()


def test_states_have_their_own_rate_budget(net):
    hi = net.wallets["hi"]
    with running_miner(net, StubEngine(), states_requests_per_minute=6) as m:  # burst 1
        rid = "budget" + "0" * 10
        _keep_states(m, hi, rid, count=2, size=1024)
        body = json.dumps({"protocol_version": 4, "request_id": rid, "indices": [1]}).encode()
        codes = [signed_post(m, hi, body, path="/v1/states") for _ in range(3)]
        assert codes[0].status_code == 200
        assert codes[-1].status_code == 429
        assert _one_line_error(codes[-1].text).reason == "rate_limited"
        # generate's own budget is another bucket: untouched
        assert signed_post(m, hi, _body()).status_code == 200


def test_an_honest_audit_fetch_passes_the_states_limits_while_another_caller_floods(net):
    """The validator client fetches 14 states in requests of at most 8, one after another,
    retrying 429/503: the per-caller cap of 2 never refuses it, and a flooding caller's
    unread answers take only its own share."""
    engine = StubEngine()
    with running_miner(net, engine, send_timeout=30.0) as m:
        flood_rid = "flood" + "1" * 11
        _keep_states(m, net.wallets["lo"], flood_rid)
        flood = [_unread_states_fetch(m, net.wallets["lo"], flood_rid) for _ in range(6)]
        try:
            client = MinerClient(net.wallets["hi"])
            target = MinerTarget(1, m.hotkey, m.url)
            request = make_request("audited", seed=3, steps=14)
            result = asyncio.run(client.query(target, request))
            assert result.ok, result.reason
            fetch = asyncio.run(client.fetch_states(target, request.request_id,
                                                    result.response.states, range(1, 15),
                                                    timeout=20))
            assert fetch.ok, fetch.reason
            assert sorted(fetch.states) == list(range(1, 15))
        finally:
            for s in flood:
                s.close()


# ----------------------------------------------------------------------------- replays
def test_a_request_signed_before_a_restart_is_refused_after_it(net, tmp_path):
    body = _body()
    engine = StubEngine()
    with running_miner(net, engine, states_path=tmp_path / "s.sqlite") as m:
        headers = http_auth.sign(net.wallets["hi"], method="POST", path="/v1/generate",
                                 body=body, receiver_ss58=m.hotkey)

        def send(url: str) -> httpx.Response:
            return httpx.post(url + "/v1/generate", content=body, timeout=30,
                              headers={**headers, "Content-Type": "application/json"})

        assert send(m.url).status_code == 200
        assert send(m.url).json()["reason"] == "replayed_request"
    with running_miner(net, engine, states_path=tmp_path / "s.sqlite") as restarted:
        again = send(restarted.url)
        fresh = signed_post(restarted, net.wallets["hi"], _body())  # signed afresh: served
    assert again.status_code == 401, again.text
    error = _one_line_error(again.text)
    assert error.reason == "stale_request" and "before this miner started" in error.detail
    assert fresh.status_code == 200
    assert len(engine.calls) == 2  # the first answer and the fresh one, never the replay


# ----------------------------------------------------------------------------- odd callers
def test_a_nonce_longer_than_a_float_is_a_stale_request_not_a_500(net, caplog):
    """Anyone can send a validator's public hotkey with a 400-digit nonce: the stale-request
    refusal's clock note must not overflow into a 500 and a traceback per request."""
    with running_miner(net, StubEngine()) as m:
        for nonce in ("1" + "0" * 400, "-1" + "0" * 400):
            headers = {http_auth.HEADER_VERSION: "1",
                       http_auth.HEADER_HOTKEY: net.wallets["hi"].hotkey.ss58_address,
                       http_auth.HEADER_NONCE: nonce,
                       http_auth.HEADER_SIGNATURE: "0x" + "00" * 64,
                       http_auth.HEADER_RECEIVER: m.hotkey, "Content-Type": "application/json"}
            for path, body in (("/v1/generate", _body()), ("/v1/states", b"{}")):
                resp = httpx.post(m.url + path, content=body, headers=headers, timeout=10)
                assert resp.status_code == 401, (path, resp.text)
                assert _one_line_error(resp.text).reason == "stale_request"
    assert "Traceback" not in caplog.text and "unexpected error" not in caplog.text


def test_a_caller_gone_mid_upload_is_not_an_internal_error(net, caplog):
    """A validator past its timeout, or a dropped link, during the body: one log line, a 499
    in the metrics, no 500 and no traceback; the miner serves on."""
    with running_miner(net, StubEngine()) as m:
        for path in ("/v1/generate", "/v1/states"):
            body = _body() if path == "/v1/generate" else b'{"request_id": "x", "indices": [1]}'
            signed = sign_request(net.wallets["hi"], method="POST", path=path, body=body,
                                  receiver=m.hotkey)
            head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n"
                    + "".join(f"{k}: {v}\r\n" for k, v in signed.items()) + "\r\n").encode()
            with socket.create_connection(("127.0.0.1", m.server.port)) as sock:
                sock.sendall(head + body[:20])
                time.sleep(0.3)
        time.sleep(0.5)
        metrics = httpx.get(m.metrics_url + "/metrics", timeout=10).text
        assert signed_post(m, net.wallets["hi"], _body()).status_code == 200
    assert 'niche_miner_requests_total{status="499"} 1.0' in metrics, metrics
    assert 'reason="internal_error"' not in metrics and 'status="500"' not in metrics
    assert 'niche_miner_state_fetches_total{status="499"} 1.0' in metrics
    assert "Traceback" not in caplog.text and "unexpected error" not in caplog.text
