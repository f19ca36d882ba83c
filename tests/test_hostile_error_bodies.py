"""Whatever a miner sends back is the miner's answer, never the validator's own failure.

A states fetch that failed on the validator's side is `unaudited` (neither paid nor
penalised), so a miner that could make reading its answer raise would dodge every audit for
free: a 401 whose body is 3,000 `[` made `json.loads` raise RecursionError in the clock-skew
check, and the fetch's catch-all called it the validator's error. Now only the validator's
own request (its signer, its request body) can fail on its side; anything raised while
reading the miner's bytes is a failed fetch, or an invalid answer for a challenge.

A raw-socket miner on 127.0.0.1 answers every request with one fixed status and body."""
from __future__ import annotations

import asyncio
import hashlib
import socket

import pytest

import niche.validator.client as client_module
from niche.chain.wallets import create_wallet
from niche.clock_skew import ClockOffsets
from niche.protocol import StatesCommitment
from niche.validator.client import MinerClient, QueryStatus
from niche.wire import STATES_MEDIA_TYPE
from tests.miner_support import make_request
from tests.raw_miner import RawMiner

DEEP = {
    "3000 [": b"[" * 3000,
    "3000 nested objects": b'{"reason":' * 3000,
    "100k [": b"[" * 100_000,
    "deep inside an error": b'{"reason": "stale_request", "detail": ' + b"[" * 3000,
}
UNDER_THE_CAP = {name: body for name, body in DEEP.items() if len(body) < 60_000}
COMMITMENT = StatesCommitment(shape=[1, 4, 8, 8], sha256=[hashlib.sha256(b"x").hexdigest()] * 4,
                              compute_dtype="float32")


class _FixedMiner(RawMiner):
    """Answers every request with `status`, `media` and `body`, then closes."""

    def __init__(self, status: int, body: bytes, media: str = "application/json"):
        self.head = (f"HTTP/1.1 {status} X\r\nContent-Type: {media}\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                     "Date: Mon, 07 Dec 2026 12:00:00 GMT\r\n\r\n").encode()
        self.body = body
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        conn.sendall(self.head + self.body)


@pytest.fixture(scope="module")
def wallets(tmp_path_factory):
    root = tmp_path_factory.mktemp("wallets")
    return create_wallet("v", "hot", root), create_wallet("m", "hot", root).hotkey.ss58_address


def _fetch(wallets, miner: _FixedMiner, timeout: float = 1.0):
    validator, hotkey = wallets
    return asyncio.run(MinerClient(validator).fetch_states(
        (3, hotkey, miner.url), "req-00000001", COMMITMENT, [1, 4], timeout=timeout,
        retry_delay=0.05))


@pytest.mark.parametrize("body", UNDER_THE_CAP.values(), ids=UNDER_THE_CAP.keys())
@pytest.mark.parametrize("status", [401, 403, 500, 429])
def test_a_refusal_with_a_hostile_body_is_the_miners_and_retried(wallets, status, body):
    with _FixedMiner(status, body) as miner:
        fetch = _fetch(wallets, miner)
    assert not fetch.validator_error, fetch.reason
    assert not fetch.ok and fetch.unavailable and "\n" not in fetch.reason
    # a fault of availability, retried (403 is about the caller: asked once), never ours
    assert miner.requests >= (1 if status == 403 else 2)


@pytest.mark.parametrize("media", ["application/json", STATES_MEDIA_TYPE])
@pytest.mark.parametrize("body", DEEP.values(), ids=DEEP.keys())
def test_a_hostile_states_body_fails_the_fetch(wallets, media, body):
    with _FixedMiner(200, body, media) as miner:
        fetch = _fetch(wallets, miner)
    assert not fetch.validator_error and not fetch.unavailable
    assert not fetch.ok and "\n" not in fetch.reason


def test_a_states_answer_that_makes_its_reader_raise_fails_the_fetch(wallets, monkeypatch,
                                                                      caplog):
    """Whatever raises while the miner's bytes are read counts against them (logged with
    its traceback, in case it is the validator's bug)."""
    def raising(*args):
        raise RuntimeError("a state no reader expected")

    monkeypatch.setattr(client_module, "_read_states", raising)
    with _FixedMiner(200, b'{"states": []}') as miner:
        fetch = _fetch(wallets, miner)
    assert not fetch.validator_error and not fetch.unavailable and not fetch.ok
    assert "unreadable states answer: RuntimeError" in fetch.reason
    assert "reading its states answer raised RuntimeError" in caplog.text


def test_only_the_validators_own_request_failing_is_its_error(wallets, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("keyfile unreadable")

    monkeypatch.setattr(client_module, "sign_request", broken)
    with _FixedMiner(200, b"{}") as miner:
        fetch = _fetch(wallets, miner)
    assert fetch.validator_error and "signing: OSError: keyfile unreadable" in fetch.reason
    assert miner.requests == 0


@pytest.mark.parametrize("body", DEEP.values(), ids=DEEP.keys())
@pytest.mark.parametrize("status", [200, 401, 500])
def test_a_challenge_answered_with_a_hostile_body_is_scored_not_raised(wallets, status, body):
    validator, hotkey = wallets
    with _FixedMiner(status, body) as miner:
        result = asyncio.run(MinerClient(validator).query(
            (3, hotkey, miner.url), make_request(timeout=2.0)))
    assert result.status in (QueryStatus.INVALID_RESPONSE, QueryStatus.HTTP_ERROR)
    assert "\n" not in result.reason


def test_an_answer_whose_check_raises_is_invalid_not_a_crash(wallets, monkeypatch):
    validator, hotkey = wallets

    def raising(*args, **kwargs):
        raise MemoryError("an image no check expected")

    monkeypatch.setattr(MinerClient, "_check_answer", raising)
    with _FixedMiner(200, b"{}") as miner:
        result = asyncio.run(MinerClient(validator).query(
            (3, hotkey, miner.url), make_request(timeout=2.0)))
    assert result.status is QueryStatus.INVALID_RESPONSE and result.response is None
    assert result.reason == "unreadable answer: MemoryError: an image no check expected"


@pytest.mark.parametrize("body", DEEP.values(), ids=DEEP.keys())
def test_the_clock_check_reads_any_body_without_raising(body):
    offsets = ClockOffsets(clock=lambda: 0)
    assert offsets.learn("miner", 401, body, "Mon, 07 Dec 2026 12:00:00 GMT") is False
