"""The validator's async client (our "dendrite"): signed requests to many miners at once.

Every answer is treated as hostile until proven otherwise: the body is streamed under a
byte cap, parsed with pydantic, checked for protocol version, request id and miner hotkey
echo, its image decoded under imaging's caps, its sha256 recomputed from the returned bytes
and the miner's signature over (request_id, sha256) verified against the hotkey we asked.
A miner's bad answer is a status in its QueryResult, never an exception. Latency is measured
on the caller's clock (the miner's own timing fields are informational only).

Protocol versions: `info()` negotiates, per miner hotkey, the highest version both sides
speak (`negotiate`); later requests to that miner are sent, and their answers verified, in
that version, so validators and miners one version apart keep working (CHANGELOG.md).
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import aiohttp
import certifi
import torch
from bittensor import resolve_signer
from PIL import Image
from pydantic import ValidationError

from niche import rawimage
from niche.auth import sign_request, verify_response
from niche.clock_skew import ClockOffsets
from niche.errors import InvalidRequest, OneLineReason
from niche.imaging import (
    ANSWER_FORMATS,
    ImageLimits,
    b64_to_bytes,
    bytes_to_image,
    image_sha256,
    lossy_webp,
)
from niche.protocol import (
    GENERATE_PATH,
    INFO_PATH,
    MAX_STATE_ELEMENTS,
    MAX_STATES_PER_FETCH,
    PROTOCOL_VERSION,
    STATES_PATH,
    SUPPORTED_PROTOCOL_VERSIONS,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    InfoResponse,
    StatesCommitment,
    StatesRequest,
    StatesResponse,
    first_validation_error,
    negotiate,
)
from niche.states import BadState, decode_state, decode_state_bytes
from niche.transport import BodyTooLarge, read_capped, within
from niche.validator.own_faults import VALIDATOR_ERROR as OWN_FAILURE
from niche.validator.own_faults import describe, local_os_error
from niche.wire import (
    ANSWER_MEDIA_TYPE,
    BINARY_SINCE,
    STATES_MEDIA_TYPE,
    BadBody,
    answer_accept,
    unpack_answer,
    unpack_states,
)

DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_INFO_BYTES = 256 * 1024
INLINE_CHECK_BYTES = 64 * 1024
INLINE_CHECK_PIXELS = 512 * 512
"""Answers this small (bytes, and pixels they may decode to) are checked on the event loop."""


class QueryStatus(str, Enum):
    OK = "ok"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    NO_ENDPOINT = "no_endpoint"
    HTTP_ERROR = "http_error"
    RESPONSE_TOO_LARGE = "response_too_large"
    INVALID_RESPONSE = "invalid_response"
    PROTOCOL_MISMATCH = "protocol_mismatch"
    WRONG_REQUEST_ID = "wrong_request_id"
    WRONG_HOTKEY = "wrong_hotkey"
    HASH_MISMATCH = "hash_mismatch"
    BAD_SIGNATURE = "bad_signature"
    INVALID_IMAGE = "invalid_image"
    ERROR = "error"
    VALIDATOR_ERROR = OWN_FAILURE
    """This validator could not make the request (its signer, its own resources): never
    the miner's failure (own_faults)."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class MinerTarget:
    uid: int
    hotkey: str
    url: str | None


@dataclass
class QueryResult(OneLineReason):
    uid: int
    hotkey: str
    status: QueryStatus
    latency: float | None = None
    """Seconds from send to last body byte, on the caller's clock (None if never sent)."""
    reason: str = ""
    http_status: int | None = None
    request_id: str | None = None
    response: GenerateResponse | None = None
    image: Image.Image | None = None
    image_bytes: bytes | None = None
    error: ErrorResponse | None = None
    answered_at: float | None = None
    """Wall-clock time (time.time()) the answer arrived: the miner keeps its states for
    --states.ttl from about then, which bounds when an audit may still fetch them."""

    @property
    def ok(self) -> bool:
        return self.status is QueryStatus.OK


@dataclass
class InfoResult(OneLineReason):
    uid: int
    hotkey: str
    status: QueryStatus
    info: InfoResponse | None = None
    latency: float | None = None
    reason: str = ""
    http_status: int | None = None
    protocol_version: int | None = None
    """The version negotiated with this miner (None: none in common, or no info)."""

    @property
    def ok(self) -> bool:
        return self.status is QueryStatus.OK


R = TypeVar("R", QueryResult, InfoResult)
TargetLike = MinerTarget | tuple | Any


def as_target(obj: TargetLike) -> MinerTarget:
    """MinerTarget from a MinerTarget, a (uid, hotkey, url) tuple or a chain Neuron."""
    if isinstance(obj, MinerTarget):
        return obj
    if isinstance(obj, tuple) and len(obj) == 3:
        uid, hotkey, url = obj
        return MinerTarget(int(uid), str(hotkey), url)
    endpoint = getattr(obj, "endpoint", None)
    return MinerTarget(int(obj.uid), str(obj.hotkey), endpoint.url if endpoint else None)


class _Undecodable(Exception):
    pass


class _OwnFailure(Exception):
    """The validator could not make its request (its signer, its own request body): its
    failure, never the miner's. Anything raised later, while reading what the miner sent,
    is the miner's answer."""


log = logging.getLogger("niche.validator")


def _raise_if_own(exc: BaseException) -> None:
    """`exc` as `_OwnFailure` when this machine's resources made it (own_faults)."""
    own = local_os_error(exc)
    if own is not None:
        raise _OwnFailure(describe(own)) from exc


def _unless_own(result: R, exc: BaseException) -> R:
    """`result` as VALIDATOR_ERROR when `exc` was this validator's own failure."""
    own = local_os_error(exc)
    if isinstance(exc, _OwnFailure) or own is not None:
        result.status = QueryStatus.VALIDATOR_ERROR
        result.reason = f"validator error: {describe(own) if own is not None else exc}"[:300]
        log.warning("uid %d: not asked for this validator's own failure: %s (not scored)",
                    result.uid, result.reason)
    return result

ENDPOINT_LOOKUP_TIMEOUT = 5.0
"""Seconds a states fetch waits for the chain to say where a miner that cannot be reached
serves now (past it, the fetch retries where it was)."""

_AWAY = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
         aiohttp.ClientResponseError)
"""Faults of availability on a request: refused, reset, a body cut short, a garbled
response; a states fetch retries them until its deadline."""


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for every HTTP session: a client builds (and loads the CA bundle into) a
    new one per client otherwise, 15-50 ms each on a busy 2-core box, paid per round and per
    audit's states fetch (bench/overhead.py (a))."""
    return ssl.create_default_context(cafile=certifi.where())


class MinerClient:
    """Signs with `wallet`'s hotkey. Safe to use from several event loops in turn (a fresh
    aiohttp session per batch), so `asyncio.run` per round works."""

    def __init__(self, wallet, *, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
                 max_connections: int = 256, image_limits: ImageLimits | None = None,
                 grace: float = 2.0,
                 protocol_versions: Sequence[int] = SUPPORTED_PROTOCOL_VERSIONS):
        self.wallet = wallet
        self._signer: Any = None
        self.protocol_versions = tuple(sorted(set(protocol_versions)))
        """Versions this validator speaks; the newest is used with a miner not asked yet."""
        self._negotiated: dict[str, int] = {}
        self.clock_offsets = ClockOffsets()
        """Each miner's clock as seen in its refusals: requests to it are signed by it."""
        self.endpoint_of: Callable[[str], Awaitable[str | None]] | None = None
        """A miner's endpoint URL on chain now (by hotkey), asked when a states fetch cannot
        connect (the validator sets it; None: fetch where the round found the miner)."""
        self.max_response_bytes = max_response_bytes
        self.max_connections = max_connections
        self.image_limits = image_limits or ImageLimits(max_side=8192, max_pixels=8192 * 8192,
                                                        formats=ANSWER_FORMATS)
        self.grace = grace
        """Seconds added to a request's own timeout for the network and encoding."""
        fast = rawimage.FORMAT in self.image_limits.formats
        self._answer_accept = answer_accept((rawimage.WIRE_NAME,) if fast else ())
        """Binary answers in RGB-ZSTD when this validator reads it (a 1024x1024 answer
        decodes in ~4 ms instead of Pillow's 7-18 ms for a PNG), else PNG; JSON from a
        miner that sends nothing else."""

    def _http(self, batch: int = 0) -> aiohttp.ClientSession:
        """A session for one batch (a round's queries, an audit's fetches), inside the event
        loop that uses it, with a connection for each of its `batch` requests at once (a
        request waiting for a pooled connection would spend its own timeout waiting for
        other miners' answers). aiohttp, not httpx: its client costs ~1 ms less per request
        on this box (bench/overhead.py (a)), which is 4 % of a tiny answer."""
        connector = aiohttp.TCPConnector(limit=max(self.max_connections, batch),
                                         limit_per_host=0, ssl=_tls_context())
        return aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     trust_env=False, timeout=aiohttp.ClientTimeout(total=None))

    def close(self) -> None:
        """Nothing to release: connections live only for one batch."""

    def version_for(self, hotkey: str) -> int:
        """The protocol version to speak with `hotkey`: negotiated by its last info, else
        this validator's newest."""
        return self._negotiated.get(hotkey, self.protocol_versions[-1])

    def in_version(self, request: GenerateRequest, hotkey: str) -> GenerateRequest:
        """`request` as sent to `hotkey`: in the version negotiated with it."""
        version = self.version_for(hotkey)
        if request.protocol_version == version:
            return request
        return request.model_copy(update={"protocol_version": version})

    def _answer_bounds(self, request: GenerateRequest) -> tuple[int, ImageLimits]:
        """Response byte cap and decode limits for an answer to `request`: at most twice the
        asked width and height (a wrong size is still scored as such), and bytes for such an
        image even if incompressible. Without them every miner could make the validator
        hold 32 MB, and decode 8192x8192 pixels (192 MB), per answer."""
        width, height = request.params.width, request.params.height
        if not (width and height):
            return self.max_response_bytes, self.image_limits
        side = min(self.image_limits.max_side, 2 * max(width, height))
        pixels = min(self.image_limits.max_pixels, 4 * width * height)
        limits = dataclasses.replace(self.image_limits, max_side=side, max_pixels=pixels)
        encoded = pixels * 3 * 11 // 10 + 64 * 1024  # PNG / WebP of noise, plus headers
        return min(self.max_response_bytes, encoded * 4 // 3 + 64 * 1024), limits

    async def _fetch(self, http: aiohttp.ClientSession, method: str, url: str, path: str,
                     body: bytes, receiver: str, cap: int) -> tuple[int, bytes]:
        status, _, raw = await self._exchange(http, method, url, path, body, receiver, cap)
        return status, raw

    async def _exchange(self, http: aiohttp.ClientSession, method: str, url: str, path: str,
                        body: bytes, receiver: str, cap: int, accept: str = "application/json"
                        ) -> tuple[int, str, bytes]:
        """(status, media type, body) of one signed request; the body read under `cap`.
        Refused as stale by a miner whose clock differs from ours, it is signed again by
        that miner's clock and sent once more (niche/clock_skew.py)."""
        for attempt in range(2):
            headers = self._signed_headers(method, path, body, receiver)
            headers["Content-Type"] = "application/json"
            headers["Accept"] = accept
            headers["Accept-Encoding"] = "identity"  # count the bytes that arrive; no bombs
            async with http.request(method, url.rstrip("/") + path, data=body or None,
                                    headers=headers, allow_redirects=False) as resp:
                encoding = resp.headers.get("content-encoding", "identity").lower()
                if encoding != "identity":
                    raise _Undecodable(f"content-encoding {encoding} not accepted")
                answer = await read_capped(resp.content.iter_any(), cap,
                                           resp.headers.get("content-length"))
                media = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                if attempt or not self.clock_offsets.learn(receiver, resp.status, answer,
                                                           resp.headers.get("date")):
                    break
        return resp.status, media, answer

    def _signed_headers(self, method: str, path: str, body: bytes, receiver: str
                        ) -> dict[str, str]:
        try:
            if self._signer is None:  # resolved once: a fresh one costs ~1.4 ms per request
                self._signer = resolve_signer(self.wallet, role="hotkey")
            return sign_request(self._signer, method=method, path=path, body=body,
                                receiver=receiver,
                                nonce_ns=self.clock_offsets.nonce_ns(receiver))
        except Exception as exc:
            raise _OwnFailure(f"signing: {type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------------ generate
    async def query(self, target: TargetLike, request: GenerateRequest, *,
                    timeout: float | None = None,
                    http: aiohttp.ClientSession | None = None) -> QueryResult:
        """One signed generate request; never raises for the miner's behaviour."""
        t = as_target(target)
        result = QueryResult(t.uid, t.hotkey, QueryStatus.ERROR, request_id=request.request_id)
        if not t.url:
            result.status, result.reason = QueryStatus.NO_ENDPOINT, "no endpoint on chain"
            return result
        limit = timeout if timeout is not None else request.timeout + self.grace
        request = self.in_version(request, t.hotkey)
        cap, limits = self._answer_bounds(request)
        body = request.model_dump_json(exclude_none=True).encode()
        accept = (self._answer_accept if request.protocol_version >= BINARY_SINCE
                  else "application/json")
        own = http is None
        http = http or self._http()
        started = time.monotonic()
        try:
            status, media, raw = await within(
                self._exchange(http, "POST", t.url, GENERATE_PATH, body, t.hotkey, cap,
                               accept), max(0.001, limit))
            result.latency = time.monotonic() - started
            result.answered_at = time.time()
        except asyncio.TimeoutError:
            result.latency = time.monotonic() - started
            result.status, result.reason = QueryStatus.TIMEOUT, f"no answer within {limit:.1f}s"
            return result
        except BodyTooLarge as exc:
            result.latency = time.monotonic() - started
            result.status, result.reason = QueryStatus.RESPONSE_TOO_LARGE, str(exc)
            return result
        except _Undecodable as exc:
            result.latency = time.monotonic() - started
            result.status, result.reason = QueryStatus.INVALID_RESPONSE, str(exc)
            return result
        except aiohttp.ClientError as exc:
            result.latency = time.monotonic() - started
            result.status = QueryStatus.UNREACHABLE
            result.reason = f"{type(exc).__name__}: {exc}"[:300]
            return _unless_own(result, exc)
        except Exception as exc:  # signing problems, odd URLs: still a result
            result.status, result.reason = QueryStatus.ERROR, f"{type(exc).__name__}: {exc}"
            return _unless_own(result, exc)
        finally:
            if own:
                await http.close()
        result.http_status = status
        if status != 200:
            result.status = QueryStatus.HTTP_ERROR
            result.error = ErrorResponse.read(raw)
            result.reason = (f"{status} {result.error.reason}: {result.error.detail}"[:300]
                             if result.error is not None else f"HTTP {status}")
            return result
        # Decoding a big PNG is CPU work: off the event loop, unless the answer is small and
        # so is what it may decode to (a thread round trip costs more on a busy box).
        try:
            if len(raw) <= INLINE_CHECK_BYTES and limits.max_pixels <= INLINE_CHECK_PIXELS:
                self._check_answer(result, request, raw, media, limits)
            else:
                await asyncio.to_thread(self._check_answer, result, request, raw, media,
                                        limits)
        except Exception as exc:  # raised by what the miner sent: its answer, not a crash
            log.warning("uid %d: checking its answer raised %s: scored as invalid", t.uid,
                        type(exc).__name__, exc_info=True)
            result.response = result.image = result.image_bytes = None
            result.status = QueryStatus.INVALID_RESPONSE
            result.reason = f"unreadable answer: {type(exc).__name__}: {exc}"[:300]
        return result

    def _check_answer(self, result: QueryResult, request: GenerateRequest, raw: bytes,
                      media: str = "application/json", limits: ImageLimits | None = None
                      ) -> None:
        """An answer is either binary (protocol 4+, `wire.ANSWER_MEDIA_TYPE`: the header,
        then the image bytes in the format it declares) or JSON with the image in base64 (any
        version); nothing else. The image is one of `limits.formats` (RGB-ZSTD, PNG or WebP
        for a validator: a JSON answer may carry RGB-ZSTD too, as the gateway's organic queue
        keeps one). Either way every check below runs on the bytes received."""
        def fail(status: QueryStatus, reason: str) -> None:
            result.status, result.reason = status, reason[:300]

        if limits is None:
            _, limits = self._answer_bounds(request)
        expected = request.protocol_version
        binary = media == ANSWER_MEDIA_TYPE
        if binary:
            if expected < BINARY_SINCE:
                return fail(QueryStatus.PROTOCOL_MISMATCH,
                            f"binary answer in protocol {expected} (binary since {BINARY_SINCE})")
            try:
                answer, data_bytes, fmt = unpack_answer(raw, max_image_bytes=limits.max_bytes)
            except BadBody as exc:
                return fail(QueryStatus.INVALID_RESPONSE, f"binary answer: {exc}")
            if fmt.upper() not in limits.formats:
                return fail(QueryStatus.INVALID_IMAGE, f"format {fmt} not accepted")
            limits = dataclasses.replace(limits, formats=(fmt.upper(),))
            if answer.protocol_version != expected:
                return fail(QueryStatus.PROTOCOL_MISMATCH,
                            f"protocol {answer.protocol_version!r}, expected {expected}")
        else:
            try:
                data = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):  # "[[[[..."
                return fail(QueryStatus.INVALID_RESPONSE, "body is not JSON")
            if isinstance(data, dict) and data.get("protocol_version", PROTOCOL_VERSION) \
                    != expected:
                return fail(QueryStatus.PROTOCOL_MISMATCH,
                            f"protocol {data.get('protocol_version')!r}, expected {expected}")
            try:
                answer = GenerateResponse.model_validate(data)
            except ValidationError as exc:
                where, message = first_validation_error(exc)
                return fail(QueryStatus.INVALID_RESPONSE, f"{where}: {message}")
        if answer.request_id != request.request_id:
            return fail(QueryStatus.WRONG_REQUEST_ID,
                        f"answered {answer.request_id!r}, asked {request.request_id!r}")
        if answer.miner_hotkey != result.hotkey:
            return fail(QueryStatus.WRONG_HOTKEY, f"answer claims hotkey {answer.miner_hotkey!r}")
        if answer.model != request.params.model:
            return fail(QueryStatus.INVALID_RESPONSE,
                        f"answered with model {answer.model!r}, asked {request.params.model!r}")
        if not binary:
            try:
                data_bytes = b64_to_bytes(answer.image, field="image", limits=limits)
            except InvalidRequest as exc:
                return fail(QueryStatus.INVALID_IMAGE, str(exc))
        if lossy_webp(data_bytes):
            return fail(QueryStatus.INVALID_IMAGE, "lossy or extended WebP answer: answers are "
                        "lossless (RGB-ZSTD, PNG, or simple lossless WebP)")
        digest = image_sha256(data_bytes)
        if digest != answer.image_sha256:
            return fail(QueryStatus.HASH_MISMATCH, "image_sha256 does not match the image bytes")
        if not verify_response(result.hotkey, answer.request_id, digest, answer.signature,
                               answer.states_digest(), version=expected):
            return fail(QueryStatus.BAD_SIGNATURE,
                        "response signature does not verify against the miner hotkey")
        try:
            image = bytes_to_image(data_bytes, field="image", limits=limits)
        except InvalidRequest as exc:
            return fail(QueryStatus.INVALID_IMAGE, str(exc))
        if answer.states is not None and request.params.steps is not None \
                and len(answer.states.sha256) != request.params.steps:
            return fail(QueryStatus.INVALID_RESPONSE,
                        f"committed {len(answer.states.sha256)} states for "
                        f"{request.params.steps} steps")
        result.response, result.image, result.image_bytes = answer, image, data_bytes
        result.status, result.reason = QueryStatus.OK, ""

    # ------------------------------------------------------------------ states
    async def fetch_states(self, target: TargetLike, request_id: str,
                           commitment: StatesCommitment, indices: Sequence[int], *,
                           timeout: float = 30.0, retry_delay: float = 0.5) -> StatesFetch:
        """The committed states `indices` (1..N) of an earlier answer, each checked against
        its hash; never raises for the miner's behaviour (a failed fetch says why).

        The states go in as many signed requests as `MAX_STATES_PER_FETCH` needs, one after
        another (a miner's in-flight cap stays free for challenges), all within `timeout`.
        A request that fails for availability (connection refused or reset, no answer in
        time, 5xx, 429, states unknown after a restart) is retried until the deadline; what
        still fails so is `unavailable` (a fault), anything else the miner sent is fraud."""
        t = as_target(target)
        wanted = sorted(set(indices))
        if not t.url:
            return StatesFetch({}, "no endpoint on chain", unavailable=True)
        if not wanted:
            return StatesFetch({})
        deadline = time.monotonic() + max(0.001, timeout)
        states: dict[int, torch.Tensor] = {}
        try:
            async with self._http() as http:
                for start in range(0, len(wanted), MAX_STATES_PER_FETCH):
                    chunk = wanted[start:start + MAX_STATES_PER_FETCH]
                    part = await self._fetch_chunk(http, t, request_id, commitment, chunk,
                                                   deadline, retry_delay, timeout)
                    if not part.ok:
                        return part
                    states.update(part.states)
        except _OwnFailure as exc:  # the validator's side, not the miner's
            log.warning("uid %d: states not fetched for this validator's own failure: %s "
                        "(the audit does not count)", t.uid, exc)
            return StatesFetch({}, f"validator error: {exc}"[:300], validator_error=True)
        except Exception as exc:  # raised by what the miner sent: a dodge must not be free
            log.warning("uid %d: reading its states answer raised %s: counted as a failed "
                        "fetch", t.uid, type(exc).__name__, exc_info=True)
            return StatesFetch({}, f"unreadable states answer: {type(exc).__name__}: "
                                   f"{exc}"[:300])
        return StatesFetch(states)

    async def _moved_to(self, t: MinerTarget, url: str) -> str:
        """Where `t` serves now, by the chain (`endpoint_of`), after a connection to `url`
        failed: a miner restarted on another port between its answer and the audit is
        fetched from there, not charged as unavailable."""
        if self.endpoint_of is None:
            return url
        try:
            now = await within(self.endpoint_of(t.hotkey), ENDPOINT_LOOKUP_TIMEOUT)
        except Exception as exc:  # the chain's hiccup: keep retrying where it was
            log.debug("endpoint lookup for %s failed: %s", t.hotkey, exc)
            return url
        if now and now != url:
            log.info("uid %d moved from %s to %s (its endpoint on chain): fetching there",
                     t.uid, url, now)
            return now
        return url

    async def _fetch_chunk(self, http: aiohttp.ClientSession, t: MinerTarget, request_id: str,
                           commitment: StatesCommitment, chunk: list[int], deadline: float,
                           retry_delay: float, timeout: float) -> StatesFetch:
        """One signed /v1/states request for at most MAX_STATES_PER_FETCH states, retried on
        faults of availability until `deadline`."""
        version = self.version_for(t.hotkey)
        try:
            body = StatesRequest(protocol_version=version, request_id=request_id,
                                 indices=chunk).model_dump_json().encode()
        except ValidationError as exc:
            raise _OwnFailure(f"states request: {exc}") from exc
        accept = (f"{STATES_MEDIA_TYPE}, application/json" if version >= BINARY_SINCE
                  else "application/json")  # protocol 4: the raw float32 states
        # the commitment's shape is bounded (StatesCommitment); the cap never trusts it more
        elements = min(math.prod(commitment.shape), MAX_STATE_ELEMENTS)
        cap = len(chunk) * (elements * 4 * 4 // 3 + 256) + 64 * 1024
        attempts = 0
        auth_refused = False  # the last try was a 401
        cut_off = True  # no HTTP answer yet
        url = t.url or ""
        while True:
            attempts += 1
            left = deadline - time.monotonic()
            fault = ""
            if left <= 0:
                return StatesFetch({}, f"states not sent within {timeout:.3g}s "
                                       f"({attempts - 1} tries)", unavailable=True,
                                   refused=auth_refused, cut_off=cut_off)
            auth_refused = False
            cut_off = True
            try:
                status, media, raw = await within(
                    self._exchange(http, "POST", url, STATES_PATH, body, t.hotkey, cap,
                                   accept), left)
            except asyncio.TimeoutError:
                fault = f"states not sent within {timeout:.3g}s"
            except _AWAY as exc:  # refused, reset, cut short, garbled: the miner is away
                _raise_if_own(exc)
                fault = f"{type(exc).__name__}: {exc}"[:200]
                url = await self._moved_to(t, url)
            except (BodyTooLarge, _Undecodable) as exc:
                return StatesFetch({}, str(exc))
            except (aiohttp.ClientError, ValueError) as exc:  # its endpoint is unusable
                _raise_if_own(exc)
                return StatesFetch({}, f"{type(exc).__name__}: {exc}"[:200], unavailable=True)
            else:
                cut_off = False
                if status == 200:
                    if media == STATES_MEDIA_TYPE and version < BINARY_SINCE:
                        return StatesFetch({}, f"binary states in protocol {version}")
                    reader = _read_binary_states if media == STATES_MEDIA_TYPE else _read_states
                    return await asyncio.to_thread(reader, raw, request_id, commitment, chunk)
                if status == 404:  # not kept (restarted without its store, or expired)
                    return StatesFetch({}, "states request refused: HTTP 404 (states not "
                                           "kept)", unavailable=True)
                if status == 403:  # this validator's permit or stake, as the miner sees it
                    return StatesFetch({}, f"states request refused: HTTP 403 "
                                           f"({_error_reason(raw)})", unavailable=True,
                                       refused=True)
                if status >= 500 or status in (401, 408, 429):
                    # 401: e.g. signed (by this clock) before the miner restarted; each try
                    # is signed afresh, so a retry cures what re-signing can
                    fault = f"states request refused: HTTP {status}"
                    if status == 401:
                        fault += f" ({_error_reason(raw)})"
                        auth_refused = True
                else:
                    return StatesFetch({}, f"states request refused: HTTP {status}")
            left = deadline - time.monotonic()
            if left <= retry_delay:
                return StatesFetch({}, f"{fault} ({attempts} tries)", unavailable=True,
                                   refused=auth_refused, cut_off=cut_off)
            await asyncio.sleep(min(retry_delay * attempts, left - retry_delay))

    async def query_many(
        self,
        targets: Sequence[Any],
        request_factory: Callable[[MinerTarget], GenerateRequest] | None = None,
        deadline: float | None = None,
    ) -> list[QueryResult]:
        """Query every target concurrently; results in the order of `targets`.

        Either `targets` are (target, GenerateRequest) pairs, or targets alone with
        `request_factory(target) -> GenerateRequest`. A target is a MinerTarget, a
        (uid, hotkey, url) tuple or a chain Neuron. `deadline`: seconds from now after which
        every unanswered query is a timeout (None: each request's timeout + grace)."""
        jobs: list[tuple[MinerTarget, GenerateRequest]] = []
        for item in targets:
            if request_factory is None:
                target, request = item
                jobs.append((as_target(target), request))
            else:
                t = as_target(item)
                jobs.append((t, request_factory(t)))
        if not jobs:
            return []
        async with self._http(len(jobs)) as http:
            coros = [self.query(t, r, http=http,
                                timeout=None if deadline is None else
                                min(deadline, r.timeout + self.grace))
                     for t, r in jobs]
            return list(await asyncio.gather(*coros))

    # ------------------------------------------------------------------ info
    async def info(self, url: str | None, hotkey: str, *, uid: int = -1,
                   timeout: float = 5.0, http: aiohttp.ClientSession | None = None
                   ) -> InfoResult:
        """GET /v1/info (signed, though miners may serve it unsigned); never raises."""
        result = InfoResult(uid, hotkey, QueryStatus.ERROR)
        if not url:
            result.status, result.reason = QueryStatus.NO_ENDPOINT, "no endpoint on chain"
            return result
        own = http is None
        http = http or self._http()
        started = time.monotonic()
        try:
            status, raw = await within(
                self._fetch(http, "GET", url, INFO_PATH, b"", hotkey, DEFAULT_MAX_INFO_BYTES),
                timeout)
        except asyncio.TimeoutError:
            result.status, result.reason = QueryStatus.TIMEOUT, f"no info within {timeout}s"
            return result
        except BodyTooLarge as exc:
            result.status, result.reason = QueryStatus.RESPONSE_TOO_LARGE, str(exc)
            return result
        except aiohttp.ClientError as exc:
            result.status = QueryStatus.UNREACHABLE
            result.reason = f"{type(exc).__name__}: {exc}"[:300]
            return _unless_own(result, exc)
        except Exception as exc:
            result.reason = f"{type(exc).__name__}: {exc}"[:300]
            return _unless_own(result, exc)
        finally:
            result.latency = time.monotonic() - started
            if own:
                await http.close()
        result.http_status = status
        if status != 200:
            result.status, result.reason = QueryStatus.HTTP_ERROR, f"HTTP {status}"
            return result
        try:
            info = InfoResponse.model_validate_json(raw)
        except ValidationError as exc:
            where, message = first_validation_error(exc)
            result.status, result.reason = QueryStatus.INVALID_RESPONSE, f"{where}: {message}"
            return result
        except ValueError as exc:
            result.status, result.reason = QueryStatus.INVALID_RESPONSE, str(exc)[:300]
            return result
        if info.hotkey != hotkey:
            result.status, result.reason = QueryStatus.WRONG_HOTKEY, "info from another hotkey"
            return result
        version = negotiate(info.speaks(), self.protocol_versions)
        if version is None:
            self._negotiated.pop(hotkey, None)
            result.status = QueryStatus.PROTOCOL_MISMATCH
            result.reason = (f"miner speaks protocol {info.speaks()}, this validator "
                             f"{list(self.protocol_versions)}: one of them must upgrade")
            return result
        self._negotiated[hotkey] = version
        result.status, result.info, result.protocol_version = QueryStatus.OK, info, version
        return result

    async def info_many(self, targets: Sequence[Any], *, timeout: float = 5.0
                        ) -> list[InfoResult]:
        """info() for each target (MinerTarget, (uid, hotkey, url) or Neuron), concurrently."""
        ts = [as_target(t) for t in targets]
        if not ts:
            return []
        async with self._http() as http:
            return list(await asyncio.gather(*[
                self.info(t.url, t.hotkey, uid=t.uid, timeout=timeout, http=http) for t in ts]))


@dataclass
class StatesFetch(OneLineReason):
    """States fetched for one answer (index -> float32 tensor), or why none can be used:
    `unavailable` for faults of availability (the miner could not be reached in time, or no
    longer had them), `validator_error` for the validator's own failures; neither is fraud.
    `refused` (with `unavailable`): the miner refused this validator itself (401 after
    fresh signatures until the deadline, or 403): about the caller's standing or clock, so
    never fraud; the round decides whether the miner or the validator is at fault."""

    states: dict[int, torch.Tensor]
    reason: str = ""
    unavailable: bool = False
    validator_error: bool = False
    refused: bool = False
    cut_off: bool = False
    """With `unavailable`: no HTTP answer at all (timed out, connection failed), as when this
    validator's own network is down; the batch decides whose fault (`audit.forgive_outage`)."""

    @property
    def ok(self) -> bool:
        return not self.reason


def _error_reason(raw: bytes) -> str:
    """The `reason` of a miner's error body (ErrorResponse), or "-"."""
    error = ErrorResponse.read(raw)
    return (error.reason[:60] if error is not None else "") or "-"


def _read_binary_states(raw: bytes, request_id: str, commitment: StatesCommitment,
                        wanted: list[int]) -> StatesFetch:
    """A protocol-4 binary states body (niche.wire): lengths against the committed shape
    before anything is read, then each state against its hash, as `_read_states` does."""
    elements = 1
    for size in commitment.shape:
        elements *= size
    try:
        header, parts = unpack_states(raw, state_bytes=elements * 4)
    except BadBody as exc:
        return StatesFetch({}, f"invalid states response: {exc}"[:300])
    if header.request_id != request_id:
        return StatesFetch({}, f"states for {header.request_id!r}, asked {request_id!r}")
    if sorted(parts) != wanted:
        return StatesFetch({}, f"sent states {list(parts)}, asked {wanted}")
    states = {}
    for index, data in parts.items():
        try:
            states[index] = decode_state_bytes(data, index, commitment)
        except BadState as exc:
            return StatesFetch({}, str(exc))
    return StatesFetch(states)


def _read_states(raw: bytes, request_id: str, commitment: StatesCommitment,
                 wanted: list[int]) -> StatesFetch:
    try:
        answer = StatesResponse.model_validate_json(raw)
    except (ValidationError, ValueError) as exc:
        where, message = (first_validation_error(exc) if isinstance(exc, ValidationError)
                          else ("", str(exc)))
        return StatesFetch({}, f"invalid states response: {where} {message}"[:300])
    if answer.request_id != request_id:
        return StatesFetch({}, f"states for {answer.request_id!r}, asked {request_id!r}")
    if sorted(blob.index for blob in answer.states) != wanted:
        return StatesFetch({}, f"sent states {[b.index for b in answer.states]}, "
                               f"asked {wanted}")
    states = {}
    for blob in answer.states:
        try:
            states[blob.index] = decode_state(blob.data, blob.index, commitment)
        except BadState as exc:
            return StatesFetch({}, str(exc))
    return StatesFetch(states)
