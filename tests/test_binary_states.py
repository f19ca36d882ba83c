"""Sampler states on the wire in float32 binary (protocol 4, niche/wire.py), over real HTTP.

A protocol-4 validator fetches an answer's states from a real miner as raw float32 bytes
(chunked as the audit fetches them), a protocol-3 one as base64 JSON; both come back as the
same tensors, checked against the commitment's hashes. Hostile states bodies (truncated,
wrong declared length, extra bytes, repeated or unasked indices, a state that is not the
committed one, NaN) fail the fetch with one line and the client fetches on.
"""
from __future__ import annotations

import asyncio
import json
import struct

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from hypothesis import given, settings
from hypothesis import strategies as st

from niche.chain.wallets import create_wallet
from niche.devnet.servers import BackgroundServer
from niche.protocol import STATES_PATH
from niche.states import commit, state_bytes
from niche.validator.client import MinerClient
from niche.wire import STATES_MAGIC, STATES_MEDIA_TYPE, BadBody, pack_states, unpack_states
from tests.miner_support import (
    RecordingClient,
    StubEngine,
    make_request,
    module_net,
    running_miner,
)

net = module_net("binstates")


def test_protocol_4_fetches_raw_float32_and_protocol_3_base64(net):
    with running_miner(net, StubEngine()) as miner:
        fetched, media = {}, {}
        for versions in ((2, 3), (2, 3, 4)):
            client = RecordingClient(net.wallets["hi"], protocol_versions=versions)

            async def audit(client=client):
                await client.info(miner.url, miner.hotkey)
                target = (0, miner.hotkey, miner.url)
                answer = await client.query(target, make_request(seed=8, steps=12))
                assert answer.ok, answer.reason
                commitment = answer.response.states
                return await client.fetch_states(target, answer.response.request_id,
                                                 commitment, list(range(1, 13)))
            fetched[versions[-1]] = asyncio.run(audit())
            media[versions[-1]] = [got for path, _, got in client.exchanges
                                   if path == STATES_PATH]
    assert media == {3: ["application/json"] * 2, 4: [STATES_MEDIA_TYPE] * 2}  # two chunks
    for version, result in fetched.items():
        assert result.ok, (version, result.reason)
        assert sorted(result.states) == list(range(1, 13))  # 12 states: two chunks
    gen = torch.Generator().manual_seed(8)
    expected = [torch.randn((1, 4, 4, 4), generator=gen) for _ in range(12)]
    for i, state in enumerate(expected, start=1):
        assert torch.equal(fetched[4].states[i], state) and torch.equal(fetched[3].states[i],
                                                                        state)


STATES = [torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(i))
          for i in range(4)]
COMMITMENT = commit(STATES, "float32")


def _hostile_states(lie: str, request_id: str, indices: list[int]) -> bytes:
    raws = [(i, state_bytes(STATES[i - 1])) for i in indices]
    if lie == "not_committed":
        raws[0] = (raws[0][0], state_bytes(STATES[0] + 1))
    if lie == "nan":
        nan = STATES[0].clone()
        nan[0, 0, 0, 0] = float("nan")
        raws[0] = (raws[0][0], state_bytes(nan))
    if lie == "repeated":
        raws = [raws[0], raws[0]]
    if lie == "other_indices":
        raws = [(4, state_bytes(STATES[3]))]
    body = pack_states(4, "other-request-01" if lie == "other_request" else request_id, raws)
    if lie == "truncated":
        body = body[:-7]
    elif lie == "extra":
        body += b"\x00" * 4
    elif lie == "declared_short":
        body = body.replace(b'"length":1024', b'"length":1000', 1)
    elif lie == "bad_magic":
        body = b"NIA1" + body[4:]
    elif lie == "oversized":  # refused from its content-length, before it is read
        body += b"\x00" * 200_000
    return body


def _states_miner() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/states")
    async def states(request: Request):
        data = await request.json()  # the lie to tell is named in the request id
        lie = data["request_id"].rsplit("-", 1)[0]
        return Response(_hostile_states(lie, data["request_id"], data["indices"]),
                        media_type=STATES_MEDIA_TYPE)

    return app


HOSTILE_STATES = {
    "truncated": "truncated",
    "extra": "4 bytes after",
    "declared_short": "1000 bytes declared, expected 1024",
    "bad_magic": "not a NIS1 body",
    "oversized": "content-length",
    "repeated": "indices repeat",
    "other_indices": "sent states [4], asked [1, 2]",
    "other_request": "states for 'other-request-01'",
    "not_committed": "does not match the hash",
    "nan": "does not match the hash",  # the hash is checked first; a NaN state is not x_1
}


def test_hostile_states_bodies_fail_the_fetch_in_one_line(tmp_path):
    wallet = create_wallet("validator", "hot", tmp_path)
    miner = create_wallet("miner", "hot", tmp_path).hotkey.ss58_address
    client = MinerClient(wallet)  # speaks protocol 4 with a miner it never asked for info
    with BackgroundServer(_states_miner()) as server:
        target = (0, miner, server.url)
        for lie, words in [*HOSTILE_STATES.items(), ("honest", "")]:
            result = asyncio.run(client.fetch_states(target, f"{lie}-000001", COMMITMENT,
                                                     [1, 2], timeout=5))
            if lie == "honest":
                assert result.ok and torch.equal(result.states[2], STATES[1]), result.reason
                continue
            assert not result.ok and not result.unavailable, (lie, result.reason)
            assert words in result.reason and "\n" not in result.reason, (lie, result.reason)


def test_unpack_states_checks_lengths_before_reading():
    body = pack_states(4, "r" * 8, [(1, b"\x00" * 16), (3, b"\x00" * 16)])
    header, parts = unpack_states(body, state_bytes=16)
    assert [p.index for p in header.states] == [1, 3] and bytes(parts[3]) == b"\x00" * 16
    with pytest.raises(BadBody, match="expected 32"):
        unpack_states(body, state_bytes=32)
    with pytest.raises(BadBody, match="truncated"):
        unpack_states(STATES_MAGIC + struct.pack(">I", 10) + b"{}", state_bytes=16)
    head = json.dumps({"protocol_version": 4, "request_id": "r" * 8, "states": [
        {"index": i, "length": 4} for i in range(1, 10)]}).encode()
    too_many = STATES_MAGIC + struct.pack(">I", len(head)) + head + b"\x00" * 36
    with pytest.raises(BadBody, match="at most 8"):
        unpack_states(too_many, state_bytes=4)



def _seed_bodies() -> list[bytes]:
    from PIL import Image

    from niche.imaging import encode_image
    from niche.protocol import GenerateResponse
    from niche.wire import pack_answer

    answer = GenerateResponse(request_id="r" * 8, model="m", image="", image_sha256="0" * 64,
                              miner_hotkey="5x", signature="0x", generation_seconds=0.0,
                              miner_version="x", states=COMMITMENT)
    return [pack_answer(answer, encode_image(Image.new("RGB", (8, 8))), "png"),
            pack_states(4, "r" * 8, [(1, state_bytes(STATES[0]))])]


@settings(max_examples=150, deadline=None, database=None)
@given(seed=st.sampled_from(_seed_bodies()), cut=st.integers(0, 4000),
       flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 255)), max_size=4),
       tail=st.binary(max_size=16))
def test_any_mutated_body_is_a_bad_body_or_reads(seed, cut, flips, tail):
    """Truncated, bit-flipped or padded bodies raise BadBody (one line) or read; nothing else."""
    from niche.wire import unpack_answer

    body = bytearray(seed[:cut] + tail if cut < len(seed) else seed + tail)
    for at, xor in flips:
        if at < len(body):
            body[at] ^= xor
    for read in (lambda b: unpack_answer(b), lambda b: unpack_states(b, state_bytes=1024)):
        try:
            read(bytes(body))
        except BadBody as exc:
            assert "\n" not in str(exc)
