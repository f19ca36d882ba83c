"""Protocol 2 over real HTTP: an answer commits to its sampler states, the validator fetches
the ones it names afterwards, each checked against the commitment; old or hostile peers get
clear refusals. Miner and validator are the real ones (signed requests, a local chain)."""
from __future__ import annotations

import asyncio
import base64
import json

import pytest
import torch
from miner_support import StubEngine, build_net, make_request, running_miner, signed_post

from niche.miner.state_store import StateStore
from niche.protocol import StatesCommitment, StatesRequest
from niche.states import BadState, commit, decode_state, encode_state, state_bytes
from niche.validator.client import MinerClient, QueryStatus


@pytest.fixture
def net(tmp_path):
    net = build_net(tmp_path)
    yield net
    net.chain.close()


def _states(request, steps=2):
    gen = torch.Generator().manual_seed(request.params.seed)
    return [torch.randn((1, 4, 4, 4), generator=gen) for _ in range(steps)]


def test_answer_commits_to_states_and_the_asker_fetches_them(net):
    client = MinerClient(net.wallets["hi"])
    with running_miner(net, StubEngine()) as m:
        target = (1, m.hotkey, m.url)
        request = make_request("a cat", 5, steps=3)
        result = asyncio.run(client.query(target, request))
        assert result.status is QueryStatus.OK, result.reason
        commitment = result.response.states
        assert commitment is not None and len(commitment.sha256) == 3
        assert commitment.compute_dtype == "float32" and commitment.shape == [1, 4, 4, 4]
        expected = _states(request, 3)
        assert commitment.sha256 == commit(expected, "float32").sha256
        fetched = asyncio.run(client.fetch_states(target, request.request_id, commitment,
                                                  [3, 1]))
        assert fetched.ok, fetched.reason
        assert sorted(fetched.states) == [1, 3]
        assert torch.equal(fetched.states[1], expected[0])
        assert torch.equal(fetched.states[3], expected[2])
        # another validator cannot read this validator's answer
        other = MinerClient(net.wallets["mid"])
        refused = asyncio.run(other.fetch_states(target, request.request_id, commitment, [1]))
        assert not refused.ok and "404" in refused.reason
        # indices beyond the committed ones are refused, not answered with garbage
        beyond = asyncio.run(client.fetch_states(target, request.request_id, commitment, [4]))
        assert not beyond.ok and "400" in beyond.reason


def test_signature_covers_the_states(net):
    """An answer whose commitment was swapped after signing fails the signature check."""
    client = MinerClient(net.wallets["hi"])
    with running_miner(net, StubEngine()) as m:
        request = make_request("a dog", 9)
        body = request.model_dump_json(exclude_none=True).encode()
        answer = signed_post(m, net.wallets["hi"], body).json()
    forged = dict(answer, states=dict(answer["states"], compute_dtype="bfloat16"))
    result = client_check(client, request, forged, m.hotkey)
    assert result.status is QueryStatus.BAD_SIGNATURE
    honest = client_check(client, request, answer, m.hotkey)
    assert honest.status is QueryStatus.OK, honest.reason
    fewer = dict(answer, states=dict(answer["states"], sha256=answer["states"]["sha256"][:1]))
    assert client_check(client, request, fewer, m.hotkey).status in (
        QueryStatus.BAD_SIGNATURE, QueryStatus.INVALID_RESPONSE)


def client_check(client, request, answer: dict, hotkey: str):
    from niche.validator.client import QueryResult

    result = QueryResult(1, hotkey, QueryStatus.ERROR, request_id=request.request_id)
    client._check_answer(result, request, json.dumps(answer).encode())
    return result


def test_protocol_1_peers_get_a_clear_refusal(net):
    with running_miner(net, StubEngine()) as m:
        request = make_request("a cat", 1)
        body = json.loads(request.model_dump_json(exclude_none=True))
        body["protocol_version"] = 1
        response = signed_post(m, net.wallets["hi"], json.dumps(body).encode())
    assert response.status_code == 400
    error = response.json()
    assert error["reason"] == "unsupported_protocol_version"
    assert "upgrade niche" in error["detail"] and error["field"] == "protocol_version"


@pytest.mark.parametrize("body,status", [
    (b"{", 400),
    (b'{"request_id": "abcdefgh", "indices": []}', 422),
    (b'{"request_id": "abcdefgh", "indices": [1,2,3,4,5,6,7,8,9]}', 422),
    (b'{"request_id": "abcdefgh", "indices": [1], "extra": 1}', 422),
    (b'{"request_id": "abcdefgh", "indices": [1]}', 404),
])
def test_states_endpoint_refuses_bad_requests(net, body, status):
    with running_miner(net, StubEngine()) as m:
        response = signed_post(m, net.wallets["hi"], body, path="/v1/states")
        unsigned = signed_post(m, None, body, path="/v1/states")
        huge = signed_post(m, net.wallets["hi"], b" " * 10_000, path="/v1/states")
    assert response.status_code == status, response.text
    assert unsigned.status_code == 401
    assert huge.status_code == 413


def test_state_blob_decoding_refuses_every_mismatch():
    state = torch.arange(64, dtype=torch.float32).reshape(1, 4, 4, 4) / 7
    commitment = commit([state, state * 2], "bfloat16")
    good = encode_state(state)
    assert torch.equal(decode_state(good, 1, commitment), state)
    nan = state.clone()
    nan[0, 0, 0, 0] = float("nan")
    tampered = commitment.model_copy(update={"sha256": [
        __import__("hashlib").sha256(state_bytes(nan)).hexdigest(), commitment.sha256[1]]})
    cases = {
        "not among": (good, 3, commitment),
        "does not match the hash": (good, 2, commitment),
        "base64 characters": (good[:-4], 1, commitment),
        "malformed base64": ("!" * len(good), 1, commitment),
        "NaN": (encode_state(nan), 1, tampered),
        "out of bounds": (good, 1, commitment.model_copy(update={"shape": [10**9, 10**9]})),
    }
    for message, (data, index, com) in cases.items():
        with pytest.raises(BadState, match=message):
            decode_state(data, index, com)


def test_commitment_digest_is_canonical_and_binding():
    a = StatesCommitment(shape=[1, 2], sha256=["a" * 64], compute_dtype="float32")
    b = StatesCommitment.model_validate_json(a.model_dump_json())
    assert a.digest() == b.digest()
    assert a.digest() != a.model_copy(update={"compute_dtype": "float16"}).digest()
    assert a.digest() != a.model_copy(update={"shape": [2, 1]}).digest()
    with pytest.raises(ValueError):
        StatesCommitment(shape=[1], sha256=["a" * 64], compute_dtype="int8")
    with pytest.raises(ValueError):
        StatesRequest(request_id="abcdefgh", indices=list(range(1, 10)))
    assert base64.b64decode(encode_state(torch.zeros(2))) == bytes(8)


def test_state_store_forgets_by_age_and_by_bytes():
    now = [0.0]
    store = StateStore(max_bytes=3 * 64 * 4, ttl=10.0, clock=lambda: now[0])
    one = [torch.zeros((1, 4, 4, 4))]  # 256 bytes
    store.put("v", "r1", one)
    store.put("v", "r2", one)
    store.put("v", "r3", one)
    assert len(store) == 3 and store.bytes_held == 768
    store.put("v", "r4", one)  # over budget: the oldest goes
    assert store.get("v", "r1") is None and store.get("v", "r4") is not None
    assert store.bytes_held == 768
    assert store.get("w", "r4") is None  # keyed by the caller too
    now[0] = 10.5  # past the ttl: everything goes
    assert store.get("v", "r4") is None and store.bytes_held == 0 and len(store) == 0
    store.put("v", "big", [torch.zeros(1000)])  # larger than the whole budget: not kept
    assert store.get("v", "big") is None and store.bytes_held == 0
    store.put("v", "again", one)
    store.put("v", "again", one)  # replacing an entry does not count it twice
    assert store.bytes_held == 256


def test_state_views_are_the_hashed_bytes_without_a_copy(tmp_path):
    """`states_bytes` views the engine's fresh tensors instead of copying them (a 28 MiB copy
    per FLUX.1-dev answer); the views are the bytes `state_bytes` gives for every layout an
    engine may hand over, they outlive the engine's list, and the memory and disk stores
    keep and serve them as such."""
    import gc
    import hashlib

    import numpy as np

    from niche.states import commit_raw, states_bytes

    gen = torch.Generator().manual_seed(3)
    base = torch.randn((1, 8, 6, 4), generator=gen)
    layouts = [base, base.to(torch.bfloat16), base.transpose(2, 3).contiguous().transpose(2, 3),
               base.double(), base.clone().requires_grad_(True)]
    expected = [state_bytes(s) for s in layouts]
    shape, raw = states_bytes(layouts)
    assert shape == [1, 8, 6, 4] and [bytes(r) for r in raw] == expected
    assert np.shares_memory(raw[0].obj, base.numpy())  # float32 CPU: no copy
    batch = torch.randn((4, 8, 6, 4), generator=gen)  # a slice pins the whole batch: copied
    _, (sliced,) = states_bytes([batch[1:2]])
    assert bytes(sliced) == state_bytes(batch[1:2])
    assert not np.shares_memory(sliced.obj, batch.numpy())
    from niche.states import state_view

    for odd in (torch.zeros(0, 4), torch.tensor(2.5)):  # no element; no dimension
        assert bytes(state_view(odd)) == state_bytes(odd)
    assert all(r.readonly and len(r) == base.numel() * 4 for r in raw)
    digests = commit_raw(shape, raw, "float32").sha256
    assert digests == [hashlib.sha256(e).hexdigest() for e in expected]

    store = StateStore(path=tmp_path / "states.db")
    store.put_raw("5caller", "req", raw)
    del layouts, base, raw
    gc.collect()
    kept = store.get("5caller", "req")
    assert kept is not None and [bytes(k) for k in kept] == expected
    store.disk.flush()
    on_disk = store.disk.get("5caller", "req")
    assert on_disk is not None and list(on_disk) == expected
    store.close()
