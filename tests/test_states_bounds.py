"""A committed state shape is bounded before anything trusts it.

A shape no state can have (a negative size, a product that overflows int64, more than
MAX_STATE_ELEMENTS elements) is refused with the answer itself, as the miner's fault: were it
accepted, every audit of that answer would fail on the validator's side (`unaudited`: neither
paid nor penalised) and the states fetch would size its byte cap from it (a miner could
stream gigabytes into the validator's memory)."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import socket

import pytest
from PIL import Image
from pydantic import ValidationError

from niche.auth import sign_response
from niche.chain.wallets import create_wallet
from niche.imaging import encode_image, image_sha256
from niche.protocol import MAX_STATE_ELEMENTS, GenerateResponse, StatesCommitment
from niche.states import BadState, decode_state, decode_state_bytes
from niche.validator.client import MinerClient, QueryResult, QueryStatus
from niche.wire import ANSWER_MEDIA_TYPE, STATES_MEDIA_TYPE, pack_answer
from tests.miner_support import make_request
from tests.raw_miner import RawMiner

HASHES = [hashlib.sha256(b"x").hexdigest()] * 2
IMPOSSIBLE = {
    "negative sizes": [-1, -256],
    "a zero size": [0, 4, 64],
    "int64 wraps to 256": [2**62 + 1, 4, 64],
    "2^80 elements": [2**40, 2**40],
    "one element too many": [MAX_STATE_ELEMENTS + 1],
    "too many elements in 4 sizes": [4, 512, 512, 100],
}


@pytest.mark.parametrize("shape", IMPOSSIBLE.values(), ids=IMPOSSIBLE.keys())
def test_a_commitment_refuses_a_shape_no_state_has(shape):
    with pytest.raises(ValidationError, match="state shape"):
        StatesCommitment(shape=shape, sha256=HASHES, compute_dtype="float32")


@pytest.mark.parametrize("shape", [[1, 4096, 64], [1, 4, 128, 128], [MAX_STATE_ELEMENTS],
                                   [1, 16, 512, 128], [1]])
def test_every_real_shape_is_accepted(shape):
    assert StatesCommitment(shape=shape, sha256=HASHES, compute_dtype="float32").shape == shape


def _unchecked(shape) -> StatesCommitment:
    """A commitment built past its validation (what a bug elsewhere could hand over)."""
    return StatesCommitment.model_construct(shape=shape, sha256=HASHES,
                                            compute_dtype="float32", kernels={})


@pytest.mark.parametrize("shape", IMPOSSIBLE.values(), ids=IMPOSSIBLE.keys())
def test_decoding_under_an_impossible_shape_is_the_miners_fault(shape):
    raw = b"\x00\x00\x80\x3f" * 256
    with pytest.raises(BadState, match="out of bounds"):
        decode_state_bytes(raw, 1, _unchecked(shape))
    with pytest.raises(BadState, match="out of bounds"):
        decode_state("AACAPw==" * 256, 1, _unchecked(shape))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("shape", [[-1, -256], [2**62 + 1, 4, 64]], ids=["negative", "wraps"])
def test_an_answer_committing_to_an_impossible_shape_is_refused(tmp_path, binary, shape):
    validator, miner = create_wallet("v", "hot", tmp_path), create_wallet("m", "hot", tmp_path)
    version = 4 if binary else 3
    request = make_request(width=32, height=32, steps=2).model_copy(
        update={"protocol_version": version})
    png = encode_image(Image.new("RGB", (32, 32)))
    digest, commitment = image_sha256(png), _unchecked(shape)
    answer = GenerateResponse.model_construct(
        protocol_version=version, request_id=request.request_id, model="stub",
        image="" if binary else base64.b64encode(png).decode(),
        image_sha256=digest, miner_hotkey=miner.hotkey.ss58_address, generation_seconds=0.1,
        queue_seconds=0.0, miner_version="x", states=commitment,
        signature=sign_response(miner.hotkey, request.request_id, digest, commitment.digest(),
                                version=version))
    if binary:
        body, media = pack_answer(answer, png, "png"), ANSWER_MEDIA_TYPE
    else:
        body, media = answer.model_dump_json().encode(), "application/json"
    result = QueryResult(0, miner.hotkey.ss58_address, QueryStatus.ERROR)
    MinerClient(validator)._check_answer(result, request, body, media)
    assert result.status is QueryStatus.INVALID_RESPONSE
    assert "state shape" in result.reason and "\n" not in result.reason


class _FloodingMiner(RawMiner):
    """Answers every states request with a chunked body of `total` bytes, counting what it
    managed to send before the validator hung up."""

    def __init__(self, total: int):
        self.total, self.sent = total, 0
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: " + STATES_MEDIA_TYPE.encode()
                     + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        block = bytes(1 << 20)
        while self.sent < self.total:
            conn.sendall(b"%x\r\n" % len(block) + block + b"\r\n")
            self.sent += len(block)
        conn.sendall(b"0\r\n\r\n")


def test_a_states_fetch_reads_no_more_than_the_largest_real_state(tmp_path):
    """Even handed a commitment whose shape was never checked, the fetch's byte cap is that
    of MAX_STATE_ELEMENTS float32 values per state, not the shape's product."""
    validator = create_wallet("v", "hot", tmp_path)
    miner = create_wallet("m", "hot", tmp_path).hotkey.ss58_address
    flood = _FloodingMiner(64 << 20)
    try:
        fetch = asyncio.run(MinerClient(validator).fetch_states(
            (0, miner, flood.url), "flood-000001", _unchecked([2**40, 2**40]), [1],
            timeout=20))
    finally:
        flood.close()
    assert not fetch.ok and not fetch.validator_error
    cap = int(re.search(r"body larger than (\d+) bytes", fetch.reason).group(1))
    assert cap <= MAX_STATE_ELEMENTS * 4 * 4 // 3 + 256 + 64 * 1024  # one state's base64
    # it hung up there: what the miner got out is the cap plus the two sockets' buffers
    assert flood.sent < 32 << 20, f"the miner sent {flood.sent} bytes before the refusal"
