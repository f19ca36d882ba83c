"""niche.auth without a network: the replay store on a fake clock, each refusal's status and
reason word, and response signatures. Keys are derived from dev URIs; no sleeps."""
from __future__ import annotations

import time

import pytest
from bittensor import http_auth
from bittensor.keyfiles import Keypair

from niche import auth
from niche.auth import (
    AuthFailure,
    BoundedNonceStore,
    NonceStoreFull,
    RequestVerifier,
    claimed_hotkey,
    has_auth_headers,
    sign_request,
    sign_response,
    verify_response,
)
from niche.protocol import PROTOCOL_VERSION

ALICE = Keypair.create_from_uri("//Alice")
BOB = Keypair.create_from_uri("//Bob")
BODY = b'{"prompt": "a red fox"}'


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# ----------------------------------------------------------------------------- nonce store
def test_nonce_store_defaults():
    store = BoundedNonceStore()
    assert (store.retention, store.max_entries, len(store)) == (30.0, 100_000, 0)


def test_replay_is_refused_until_the_entry_expires():
    clock = Clock()
    store = BoundedNonceStore(retention=30.0, max_entries=10, clock=clock)
    assert store.check_and_store("hk", 1)
    assert not store.check_and_store("hk", 1)
    assert store.check_and_store("other", 1)  # the key is (hotkey, nonce)
    assert store.check_and_store("hk", 2)
    assert len(store) == 3
    clock.t = 1000.0 + 29.999
    assert not store.check_and_store("hk", 1)
    assert len(store) == 3
    clock.t = 1000.0 + 30.0  # expiry == now: forgotten
    assert store.check_and_store("hk", 1)
    assert len(store) == 1  # the other two expired with it; the new entry is the one left


def test_expiry_runs_oldest_first_and_stops_at_a_live_entry():
    clock = Clock(0.0)
    store = BoundedNonceStore(retention=10.0, max_entries=10, clock=clock)
    store.check_and_store("hk", 1)  # expires at 10
    clock.t = 5.0
    store.check_and_store("hk", 2)  # expires at 15
    clock.t = 12.0
    assert store.check_and_store("hk", 3)
    assert len(store) == 2
    assert not store.check_and_store("hk", 2)  # still live
    assert store.check_and_store("hk", 1)  # expired


def test_nonce_is_normalised_to_an_integer():
    store = BoundedNonceStore(clock=Clock())
    assert store.check_and_store("hk", 1234)
    assert not store.check_and_store("hk", "1234")  # a header value is the same nonce


def test_a_full_store_refuses_then_recovers_once_entries_expire():
    """A store that never forgot would lock every caller out for good once full."""
    clock = Clock(0.0)
    store = BoundedNonceStore(retention=17.0, max_entries=3, clock=clock)
    assert [store.check_and_store("hk", n) for n in range(3)] == [True, True, True]
    with pytest.raises(NonceStoreFull, match="^replay store is full$"):
        store.check_and_store("hk", 3)
    assert not store.check_and_store("hk", 0)  # a replay is still a replay, not "full"
    assert len(store) == 3
    clock.t = 17.0
    assert store.check_and_store("hk", 3)
    assert len(store) == 1
    assert store.check_and_store("hk", 4) and store.check_and_store("hk", 5)
    with pytest.raises(NonceStoreFull):
        store.check_and_store("hk", 6)


def test_a_long_run_of_fresh_nonces_never_fills_a_store_that_forgets():
    clock = Clock(0.0)
    store = BoundedNonceStore(retention=2.0, max_entries=5, clock=clock)
    for n in range(200):  # 200 requests, 1 per 0.5 s: at most 4 live at once
        clock.t = n * 0.5
        assert store.check_and_store("hk", n)
        assert len(store) <= 4


# ----------------------------------------------------------------------------- headers
def test_header_helpers_are_case_insensitive():
    assert auth.AUTH_HEADERS == (
        "X-Bittensor-Version", "X-Bittensor-Hotkey", "X-Bittensor-Nonce",
        "X-Bittensor-Signature", "X-Bittensor-Receiver", "X-Bittensor-Crypto")
    assert has_auth_headers({"x-bittensor-nonce": "1"})
    assert has_auth_headers({"X-BITTENSOR-CRYPTO": "ed25519"})
    assert not has_auth_headers({"content-type": "application/json"})
    assert not has_auth_headers({})
    assert claimed_hotkey({"content-type": "x", "x-bittensor-hotkey": "5abc"}) == "5abc"
    assert claimed_hotkey({"X-Bittensor-Hotkey": "5def"}) == "5def"
    assert claimed_hotkey({"x-bittensor-nonce": "1"}) is None


def test_sign_request_binds_receiver_and_nonce():
    h = sign_request(ALICE, method="POST", path="/generate", body=BODY,
                     receiver=BOB.ss58_address, nonce_ns=42)
    assert h["X-Bittensor-Nonce"] == "42"
    assert h["X-Bittensor-Receiver"] == BOB.ss58_address
    assert h["X-Bittensor-Hotkey"] == ALICE.ss58_address
    fresh = sign_request(ALICE, method="POST", path="/generate", body=BODY,
                         receiver=BOB.ss58_address)
    assert abs(int(fresh["X-Bittensor-Nonce"]) - time.time_ns()) < 60e9


# ----------------------------------------------------------------------------- verifier
def _signed(nonce_ns=None, receiver=None, body=BODY, signer=ALICE):
    return sign_request(signer, method="POST", path="/generate", body=body,
                        receiver=receiver or BOB.ss58_address, nonce_ns=nonce_ns)


def _refusal(verifier, headers, body=BODY) -> tuple[int, str, str]:
    with pytest.raises(AuthFailure) as info:
        verifier.verify(headers, body, method="POST", path="/generate")
    return info.value.status, info.value.reason, str(info.value)


def test_verifier_default_store_outlives_the_freshness_window():
    v = RequestVerifier(BOB.ss58_address)
    assert (v.max_age, v.allowed_skew) == (10.0, 2.0)
    assert isinstance(v.nonce_store, BoundedNonceStore)
    assert v.nonce_store.retention == 10.0 + 2.0 + 5
    v = RequestVerifier(BOB.ss58_address, max_age=4.0, allowed_skew=1.0)
    assert v.nonce_store.retention == 4.0 + 1.0 + 5
    store = BoundedNonceStore(retention=99.0)
    assert RequestVerifier(BOB.ss58_address, nonce_store=store).nonce_store is store


def test_verifier_accepts_once_and_names_each_refusal():
    v = RequestVerifier(BOB.ss58_address, nonce_store=BoundedNonceStore(clock=Clock()))
    headers = _signed()
    assert v.verify(headers, BODY, method="POST", path="/generate") == ALICE.ss58_address
    status, reason, text = _refusal(v, headers)
    assert (status, reason) == (401, "replayed_request") and text.startswith(
        "replayed_request: ")
    assert _refusal(v, {}, BODY) == (
        401, "unsigned", "unsigned: sign requests with bittensor.http_auth (btauth/1 headers)")
    assert _refusal(v, _signed(receiver=ALICE.ss58_address))[:2] == (403, "wrong_receiver")
    now = time.time_ns()
    assert _refusal(v, _signed(nonce_ns=now - 60 * 10**9))[:2] == (401, "stale_request")
    assert _refusal(v, _signed(nonce_ns=now + 60 * 10**9))[:2] == (401, "stale_request")
    assert _refusal(v, _signed(body=b"other"))[:2] == (401, "bad_signature")
    broken = dict(_signed(), **{"X-Bittensor-Signature": "0xnothex"})
    assert _refusal(v, broken)[:2] == (401, "malformed_auth")


def test_a_full_store_answers_busy():
    clock = Clock()
    v = RequestVerifier(BOB.ss58_address,
                        nonce_store=BoundedNonceStore(max_entries=1, clock=clock))
    assert v.verify(_signed(), BODY, method="POST", path="/generate") == ALICE.ss58_address
    assert _refusal(v, _signed()) == (503, "busy", "busy: replay store full; retry later")
    clock.t += 30.0
    assert v.verify(_signed(), BODY, method="POST", path="/generate") == ALICE.ss58_address


def test_an_auth_error_with_no_mapping_is_unauthorized(monkeypatch):
    def refuse(*args, **kwargs):
        raise http_auth.AuthError("some future check")

    monkeypatch.setattr(http_auth, "verify", refuse)
    v = RequestVerifier(BOB.ss58_address)
    assert _refusal(v, _signed()) == (401, "unauthorized", "unauthorized: some future check")


def test_auth_failure_message():
    e = AuthFailure(401, "stale_request", "too old")
    assert (e.status, e.reason, e.detail, str(e)) == (401, "stale_request", "too old",
                                                      "stale_request: too old")
    assert str(AuthFailure(403, "low_stake")) == "low_stake"
    assert AuthFailure(403, "low_stake").detail == ""


# ----------------------------------------------------------------------------- responses
def test_response_signature_round_trip_and_refusals():
    sig = sign_response(ALICE, "req-1", "ab" * 32)
    assert sig.startswith("0x") and len(sig) == 2 + 128
    assert verify_response(ALICE.ss58_address, "req-1", "ab" * 32, sig)
    assert verify_response(ALICE.ss58_address, "req-1", "ab" * 32, sig[2:])  # prefix optional
    assert not verify_response(BOB.ss58_address, "req-1", "ab" * 32, sig)
    assert not verify_response(ALICE.ss58_address, "req-2", "ab" * 32, sig)
    assert not verify_response(ALICE.ss58_address, "req-1", "cd" * 32, sig)
    assert not verify_response(ALICE.ss58_address, "req-1", "ab" * 32, "0xzz")
    assert not verify_response(ALICE.ss58_address, "req-1", "ab" * 32, "0x" + "00" * 10)
    assert not verify_response("not-an-address", "req-1", "ab" * 32, sig)
    raw = bytes.fromhex(sig[2:])
    for wrong_type in (None, raw, 0, ["0x00"], {"sig": sig}):
        assert verify_response(ALICE.ss58_address, "req-1", "ab" * 32, wrong_type) is False


def test_response_signatures_are_bound_to_their_protocol_version():
    """An answer signed under one protocol version never verifies under another, in either
    direction: the version is part of the signed message (niche-response/v<N>:...)."""
    old = sign_response(ALICE, "req-1", "ab" * 32, version=PROTOCOL_VERSION - 1)
    new = sign_response(ALICE, "req-1", "ab" * 32)
    assert old != new
    assert verify_response(ALICE.ss58_address, "req-1", "ab" * 32, old,
                           version=PROTOCOL_VERSION - 1)
    assert not verify_response(ALICE.ss58_address, "req-1", "ab" * 32, old)
    assert not verify_response(ALICE.ss58_address, "req-1", "ab" * 32, new,
                               version=PROTOCOL_VERSION - 1)


def test_an_unbound_request_is_refused():
    """Signed for no receiver at all: replayable against every miner, so refused."""
    v = RequestVerifier(BOB.ss58_address, nonce_store=BoundedNonceStore(clock=Clock()))
    unbound = http_auth.sign(ALICE, method="POST", path="/generate", body=BODY)
    assert "X-Bittensor-Receiver" not in unbound
    status, reason, text = _refusal(v, unbound)
    assert (status, reason) == (403, "wrong_receiver")
    assert "receiver" in text.removeprefix("wrong_receiver: ")  # http_auth's reason carried


def test_the_freshness_window_is_the_verifiers_own():
    now = time.time_ns()
    wide = RequestVerifier(BOB.ss58_address, max_age=60.0, allowed_skew=40.0)
    assert wide.nonce_store.retention == 60.0 + 40.0 + 5
    # 20 s old and 20 s ahead: outside http_auth's defaults (10 s, 2 s), inside these
    for offset in (-20, 20):
        headers = _signed(nonce_ns=now + offset * 10**9)
        assert wide.verify(headers, BODY, method="POST", path="/generate") == \
            ALICE.ss58_address
    narrow = RequestVerifier(BOB.ss58_address, max_age=4.0, allowed_skew=0.5,
                             nonce_store=BoundedNonceStore(clock=Clock()))
    status, reason, text = _refusal(narrow, _signed(nonce_ns=now - 6 * 10**9))
    assert (status, reason) == (401, "stale_request")
    assert text.startswith("stale_request: nonce is older than the 4s freshness window "
                           "(the signer's clock is 6.")
    assert text.endswith("s behind this miner's: check NTP on both)")
    status, reason, text = _refusal(narrow, _signed(nonce_ns=now + 3 * 10**9))
    assert text.startswith("stale_request: nonce is more than 0.5s in the future (the "
                           "signer's clock is 3.0s ahead of this miner's")


def test_the_answer_signature_covers_the_states_digest():
    """An answer's signature binds its state commitment: the same image with another
    digest, or with none, does not verify (and the default is the no-states digest)."""
    from niche.protocol import NO_STATES

    sha = "ab" * 32
    with_states = sign_response(ALICE, "req-0000001", sha, "cd" * 32)
    assert verify_response(ALICE.ss58_address, "req-0000001", sha, with_states, "cd" * 32)
    assert not verify_response(ALICE.ss58_address, "req-0000001", sha, with_states, "ce" * 32)
    assert not verify_response(ALICE.ss58_address, "req-0000001", sha, with_states)
    plain = sign_response(ALICE, "req-0000001", sha)
    assert verify_response(ALICE.ss58_address, "req-0000001", sha, plain, NO_STATES)
    assert not verify_response(ALICE.ss58_address, "req-0000001", sha, plain, "cd" * 32)
    assert with_states != plain
