"""Who may make a miner work: the holes other subnets were bitten by, closed.

bittensor's own axon accepted requests with no signature headers at all from 9.3 to 10.4,
and callers impersonated validators with them. Here every way of leaving the signature out,
or of borrowing a validator's identity without its key, is refused before the GPU runs, over
real HTTP with real wallets and a real LocalChain metagraph.
"""
from __future__ import annotations

import time

import httpx
import pytest
from bittensor import http_auth
from miner_support import (
    StubEngine,
    make_request,
    module_net,
    running_miner,
    signed_post,
)

from niche.protocol import ErrorResponse

net = module_net("secnet")


@pytest.fixture(scope="module")
def miner(net):
    with running_miner(net, StubEngine()) as m:
        yield m


def _body() -> bytes:
    return make_request().model_dump_json(exclude_none=True).encode()


def _post(miner, body: bytes, headers: dict) -> httpx.Response:
    return httpx.post(miner.url + "/v1/generate", content=body,
                      headers={"Content-Type": "application/json", **headers}, timeout=30)


def _reason(resp: httpx.Response) -> str:
    return ErrorResponse.model_validate(resp.json()).reason


def test_request_with_no_signature_headers_at_all_is_refused(miner):
    before = len(miner.engine.calls)
    for headers in ({}, {"Authorization": "Bearer validator"}, {"X-Forwarded-For": "1.2.3.4"}):
        resp = _post(miner, _body(), headers)
        assert resp.status_code == 401 and _reason(resp) == "unsigned", resp.text
    assert len(miner.engine.calls) == before


@pytest.mark.parametrize("drop", [
    http_auth.HEADER_SIGNATURE, http_auth.HEADER_NONCE, http_auth.HEADER_VERSION,
    http_auth.HEADER_RECEIVER, http_auth.HEADER_HOTKEY])
def test_validator_hotkey_without_its_full_signature_is_refused(net, miner, drop):
    """A caller copies a permitted validator's public hotkey and leaves out one header."""
    body = _body()
    headers = http_auth.sign(net.wallets["hi"], method="POST", path="/v1/generate", body=body,
                             receiver_ss58=miner.hotkey)
    headers.pop(drop)
    before = len(miner.engine.calls)
    resp = _post(miner, body, headers)
    assert resp.status_code in (401, 403), resp.text
    assert _reason(resp) in {"malformed_auth", "unsigned", "wrong_receiver"}
    assert len(miner.engine.calls) == before


def test_impersonating_a_validator_with_another_key_is_refused(net, miner):
    """Signed by the stranger's key, but claiming the top validator's hotkey."""
    body = _body()
    forged = http_auth.sign(net.wallets["stranger"], method="POST", path="/v1/generate",
                            body=body, receiver_ss58=miner.hotkey)
    forged[http_auth.HEADER_HOTKEY] = net.wallets["hi"].hotkey.ss58_address
    before = len(miner.engine.calls)
    resp = _post(miner, body, forged)
    assert resp.status_code == 401 and _reason(resp) == "bad_signature", resp.text
    assert len(miner.engine.calls) == before


def test_signature_is_bound_to_method_path_body_and_receiver(net, miner):
    body = _body()
    wallet = net.wallets["hi"]
    good = http_auth.sign(wallet, method="POST", path="/v1/generate", body=body,
                          receiver_ss58=miner.hotkey)
    other_path = http_auth.sign(wallet, method="POST", path="/v1/info", body=body,
                                receiver_ss58=miner.hotkey)
    other_miner = http_auth.sign(wallet, method="POST", path="/v1/generate", body=body,
                                 receiver_ss58=net.wallets["lo"].hotkey.ss58_address)
    assert _reason(_post(miner, body, other_path)) == "bad_signature"
    assert _reason(_post(miner, body, other_miner)) == "wrong_receiver"
    assert _reason(_post(miner, body + b" ", good)) == "bad_signature"
    assert _post(miner, body, good).status_code == 200
    again = _post(miner, body, good)  # captured and replayed
    assert again.status_code == 401 and _reason(again) == "replayed_request"


def test_stale_and_future_nonces_are_refused(net, miner):
    body = _body()
    for offset in (-60, +60):
        headers = http_auth.sign(net.wallets["hi"], method="POST", path="/v1/generate",
                                 body=body, receiver_ss58=miner.hotkey,
                                 nonce_ns=time.time_ns() + offset * 10**9)
        resp = _post(miner, body, headers)
        assert resp.status_code == 401 and _reason(resp) == "stale_request", resp.text


@pytest.mark.parametrize("who, reason", [("stranger", "not_registered"),
                                         ("nopermit", "no_validator_permit"),
                                         ("low", "low_stake")])
def test_properly_signed_but_unwelcome_callers_are_refused(net, miner, who, reason):
    before = len(miner.engine.calls)
    resp = signed_post(miner, net.wallets[who], _body())
    assert resp.status_code == 403 and _reason(resp) == reason, resp.text
    assert len(miner.engine.calls) == before


def test_replay_store_is_bounded_and_fails_closed(net):
    """A flood of fresh nonces cannot grow memory without bound: once the store is full
    new requests get 503 rather than the store forgetting nonces (which would reopen replay)."""
    with running_miner(net, StubEngine()) as m:
        m.service.verifier.nonce_store.max_entries = 3
        codes = [signed_post(m, net.wallets["hi"], _body()).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 503, 503]
        assert len(m.service.verifier.nonce_store) == 3
