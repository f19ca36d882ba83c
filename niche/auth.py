"""Who sent a request, and who made an image: thin wrappers over `bittensor.http_auth`.

Requests carry btauth/1 headers (sr25519 over method, path, sha256 of the raw body, a
nanosecond nonce, sender and receiver). The miner refuses a request with no such headers,
one bound to another receiver, a stale or replayed nonce, or a bad signature. Responses carry
the miner hotkey's signature over `response_signing_message(request_id, image_sha256,
states_digest)`, so a validator can prove which hotkey answered with which image and states.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from bittensor import http_auth
from bittensor.sp_core import CRYPTO_SR25519
from bittensor.sp_core import verify as _sr_verify

from niche.protocol import NO_STATES, PROTOCOL_VERSION, response_signing_message

AUTH_HEADERS = (
    http_auth.HEADER_VERSION, http_auth.HEADER_HOTKEY, http_auth.HEADER_NONCE,
    http_auth.HEADER_SIGNATURE, http_auth.HEADER_RECEIVER, http_auth.HEADER_CRYPTO,
)
_AUTH_LOWER = tuple(h.lower() for h in AUTH_HEADERS)


class AuthFailure(Exception):
    """Authentication refused: `status` is the HTTP code, `reason` a stable word."""

    def __init__(self, status: int, reason: str, detail: str = ""):
        self.status, self.reason, self.detail = status, reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


_REASONS: dict[type, tuple[int, str]] = {
    http_auth.WrongReceiver: (403, "wrong_receiver"),
    http_auth.StaleRequest: (401, "stale_request"),
    http_auth.ReplayedRequest: (401, "replayed_request"),
    http_auth.BadSignature: (401, "bad_signature"),
    http_auth.MalformedAuth: (401, "malformed_auth"),
}


class NonceStoreFull(Exception):
    pass


class BoundedNonceStore:
    """Replay store with a time window AND a size bound (http_auth's default has no bound).

    Entries expire after `retention` seconds (>= the freshness window, so an expired entry can
    only be replayed once it is stale anyway). When `max_entries` live entries exist, new
    nonces are refused (the miner answers 503) rather than forgetting live ones, which would
    reopen replay."""

    def __init__(self, retention: float = 30.0, max_entries: int = 100_000,
                 clock=time.monotonic):
        self.retention = retention
        self.max_entries = max_entries
        self._clock = clock
        self._seen: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool:
        key = (hotkey_ss58, int(nonce_ns))
        now = self._clock()
        with self._lock:
            while self._seen:
                oldest_key, expiry = next(iter(self._seen.items()))
                if expiry > now:
                    break
                del self._seen[oldest_key]
            if key in self._seen:
                return False
            if len(self._seen) >= self.max_entries:
                raise NonceStoreFull("replay store is full")
            self._seen[key] = now + self.retention
            return True


def has_auth_headers(headers: Mapping[str, str]) -> bool:
    return any(k.lower() in _AUTH_LOWER for k in headers)


def claimed_hotkey(headers: Mapping[str, str]) -> str | None:
    """The sender hotkey a request CLAIMS (unverified): lets cheap checks run first."""
    for key, value in headers.items():
        if key.lower() == http_auth.HEADER_HOTKEY.lower():
            return value
    return None


def sign_request(wallet, *, method: str, path: str, body: bytes, receiver: str,
                 nonce_ns: int | None = None) -> dict[str, str]:
    """btauth/1 headers for one request to the hotkey `receiver` (sign each send afresh)."""
    return http_auth.sign(wallet, method=method, path=path, body=body, receiver_ss58=receiver,
                          nonce_ns=nonce_ns)


@dataclass
class RequestVerifier:
    """Verifies incoming requests for the miner hotkey `self_hotkey`.

    `not_before_ns` (wall-clock ns; the miner passes its start): a nonce older than it is
    refused. The replay store is memory only, so without it a request captured before a
    restart could be sent again within its freshness window; an honest client signs each
    send afresh, so no fresh request predates this process."""

    self_hotkey: str
    max_age: float = http_auth.DEFAULT_MAX_AGE
    allowed_skew: float = http_auth.DEFAULT_ALLOWED_SKEW
    nonce_store: BoundedNonceStore | None = None
    not_before_ns: int | None = None

    def __post_init__(self) -> None:
        if self.nonce_store is None:
            self.nonce_store = BoundedNonceStore(retention=self.max_age + self.allowed_skew + 5)

    def verify(self, headers: Mapping[str, str], body: bytes, *, method: str,
               path: str) -> str:
        """The authenticated caller hotkey, or AuthFailure."""
        if not has_auth_headers(headers):
            raise AuthFailure(401, "unsigned", "sign requests with bittensor.http_auth "
                              "(btauth/1 headers)")
        try:
            caller = http_auth.verify(
                dict(headers), body, method=method, path=path,
                self_hotkey_ss58=self.self_hotkey, max_age=self.max_age,
                allowed_skew=self.allowed_skew, require_receiver=True,
                nonce_store=self.nonce_store,
            )
        except NonceStoreFull:
            raise AuthFailure(503, "busy", "replay store full; retry later") from None
        except http_auth.AuthError as exc:
            detail = str(exc) + (_clock_gap(headers) if isinstance(exc, http_auth.StaleRequest)
                                 else "")
            for cls, (status, reason) in _REASONS.items():
                if isinstance(exc, cls):
                    raise AuthFailure(status, reason, detail) from None
            raise AuthFailure(401, "unauthorized", str(exc)) from None
        if self.not_before_ns is not None and caller.nonce_ns < self.not_before_ns:
            raise AuthFailure(401, "stale_request", "signed before this miner started "
                              "(a restart forgets earlier nonces); sign the request again")
        return caller.hotkey_ss58


def _clock_gap(headers: Mapping[str, str]) -> str:
    """How far the signer's clock is from ours, by its nonce (for both operators' logs)."""
    raw = next((v for k, v in headers.items() if k.lower() == http_auth.HEADER_NONCE.lower()),
               "")
    try:
        gap = int(raw) / 1e9 - time.time()
    except (ValueError, OverflowError):  # not a number, or more digits than a float holds
        return ""
    return (f" (the signer's clock is {abs(gap):.1f}s {'ahead of' if gap > 0 else 'behind'} "
            "this miner's: check NTP on both)")


# ----------------------------------------------------------------------------- responses
def sign_response(keypair, request_id: str, image_sha256: str,
                  states_digest: str = NO_STATES, *, version: int = PROTOCOL_VERSION) -> str:
    """Hex signature of the miner hotkey over the response message of protocol `version`."""
    message = response_signing_message(request_id, image_sha256, states_digest,
                                       version=version)
    return "0x" + bytes(keypair.sign(message)).hex()


def verify_response(hotkey_ss58: str, request_id: str, image_sha256: str,
                    signature: str, states_digest: str = NO_STATES, *,
                    version: int = PROTOCOL_VERSION) -> bool:
    """True when `signature` is `hotkey_ss58`'s over (request_id, image_sha256, states) in
    protocol `version`'s message. Anything that is not such a signature (None, bytes, a
    number: whatever a hostile answer decodes to) is False, never an exception."""
    if not isinstance(signature, str):
        return False
    try:
        raw = bytes.fromhex(signature.removeprefix("0x"))
        message = response_signing_message(request_id, image_sha256, states_digest,
                                           version=version)
        return bool(_sr_verify(message, raw, hotkey_ss58, CRYPTO_SR25519))
    except (ValueError, TypeError):
        return False
