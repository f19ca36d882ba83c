"""The miner's policy, independent of HTTP: who may call, in which order, and how an image
is made, encoded and signed.

Order of checks on a generate request (cheapest and least trusting first):
  1. from the headers, before the body is read: btauth headers present (401), claimed hotkey
     allowed by the metagraph snapshot (403); then the HTTP layer bounds requests in flight
     (503; per address the base cap, whatever hotkey is claimed) and the body size (413),
  2. signature over the exact body, receiver, freshness, replay, not signed before this
     process started (401/403); then the signer's own per-address cap (503),
  3. per-hotkey rate limit (429),
  4. protocol version, schema, engine.resolve, image decode (400/422) - before queueing,
  5. stake-priority queue admission (429/503), generation in a GPU worker thread (one per
     replica; 503 when every replica is lost past the deadline, 500 on any other failure),
     PNG encode, sha256, response signature. A waiter leaves the queue with 429 once it
     can no longer finish in time, and when its caller disconnects.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import PIL.Image
from pydantic import BaseModel, ValidationError

from niche import __version__
from niche.auth import AuthFailure, RequestVerifier, claimed_hotkey, has_auth_headers, sign_response
from niche.chain.base import Chain, ChainError, Endpoint, Metagraph, Neuron
from niche.chain.publish import publish_endpoint
from niche.chain.registration import DEREGISTERED_EXIT_CODE, RegistrationWatch
from niche.errors import EngineUnavailable, InvalidRequest
from niche.imaging import ImageLimits, decode_image, encode_image, image_sha256, to_b64
from niche.miner.limits import (
    PriorityGate,
    RateLimiter,
    Refusal,
    Work,
    inflight_cap,
    unless_gone,
)
from niche.miner.metrics import MinerMetrics
from niche.miner.state_store import StateStore
from niche.models.deadline import DeadlinePassed, request_deadline, stop_at
from niche.models.memory import is_out_of_memory, memory_advice, release_cached_memory
from niche.protocol import (
    MAX_IMAGE_B64_CHARS,
    SUPPORTED_PROTOCOL_VERSIONS,
    GenerateRequest,
    GenerateResponse,
    GenerationParams,
    InfoResponse,
    RuntimeInfo,
    StateBlob,
    StatesCommitment,
    StatesRequest,
    StatesResponse,
    first_validation_error,
)
from niche.runtime import runtime_info
from niche.states import StreamedHashes, commit_raw, states_bytes
from niche.wire import BINARY_SINCE, pack_answer, pack_states

if TYPE_CHECKING:
    from bittensor import Wallet

    from niche.models.engine import ImageEngine, StreamsStates

log = logging.getLogger("niche.miner")

Body = TypeVar("Body", bound=BaseModel)


@dataclass
class MinerConfig:
    netuid: int
    min_stake: float = 0.0
    """Callers with less stake are refused (403 low_stake)."""
    allow_hotkeys: tuple[str, ...] = ()
    """Hotkeys always let through the blacklist (registration, permit, stake not checked)."""
    allow_non_validators: bool = False
    """Dev only: serve registered hotkeys without a validator permit."""
    requests_per_minute: float = 60.0
    """Per-hotkey token bucket; 0 disables. With stake_proportional_rate, the total shared by
    stake among permitted validators."""
    stake_proportional_rate: bool = False
    max_queue: int = 16
    max_body_bytes: int = MAX_IMAGE_B64_CHARS + 64 * 1024
    metagraph_refresh: float = 60.0
    auth_max_age: float = 40.0
    """Seconds a signature stays fresh, counted when the whole body has arrived: at least
    `body_timeout`. A validator sends a round's requests at once, and ~96 of them carry a
    1024x1024 conditioning image (~280 MiB in all: 22 s at 100 Mbit/s); at bittensor's 10 s
    the last ones were refused as stale. Replays stay refused: the nonce store keeps every
    nonce for this long, and nothing signed before the miner started is taken."""
    auth_allowed_skew: float = 2.0
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    initial_estimate: float | None = None
    """Generation seconds assumed before any is measured (None: admit until measured)."""
    max_concurrent_decodes: int = 2
    max_inflight: int = 48
    """Generate requests held at once (reading, checking, queued, running); more get 503
    before their body is read, so memory stays under max_inflight x max_body_bytes."""
    max_inflight_per_ip: int = 8
    """Of those, at most this many from one peer address (0: no per-address bound), so one
    host claiming a validator's hotkey cannot hold every slot. With stake-proportional
    limits a verified caller's address may hold its stake share instead, but requests whose
    signature is not checked yet never more than this."""
    max_connections: int = 1024
    """Open connections in all (uvicorn's limit_concurrency); a request over it gets a
    one-line 503 `busy`."""
    max_connections_per_ip: int = 64
    """Open connections from one peer address (an IPv6 peer: its /64); one more is closed at
    once (0: no bound), so one host's idle connections cannot take `max_connections`."""
    send_timeout: float = 30.0
    """Seconds a peer may leave an answer unread (the miner's send buffer full, no progress)
    before its connection is dropped; a peer that never reads would hold the answer's
    memory for ever."""
    states_requests_per_minute: float = 240.0
    """Per-hotkey token bucket for /v1/states, apart from generate's (an audit of one answer
    takes two requests); 0 disables."""
    states_inflight_per_caller: int = 2
    """/v1/states requests one hotkey may have in flight (read, encoded or being sent); more
    get 429. A validator fetches one answer's states one request after another."""
    states_inflight: int = 8
    """/v1/states requests in flight from every caller together; more get 503 (an answer of
    8 FLUX.1-dev states is ~11 MB of JSON)."""
    stuck_after: float = 60.0
    """Seconds a generation may run past its request's timeout before /healthz says not ok
    (a hung engine or GPU: the queue would wait behind it for ever)."""
    header_timeout: float = 15.0
    """Seconds a connection may take to send a request's headers (also the idle limit between
    keep-alive requests); uvicorn alone would hold a half-sent request for ever."""
    body_timeout: float = 30.0
    """Seconds to receive a request body once its headers passed; a slower body gets 408
    (the claimed hotkey is only proven by the signature over the complete body)."""
    states_max_bytes: int = 512 * 1024 * 1024
    """Memory for the sampler states of recent answers, kept for the validators' audits
    (at 1024x1024 a 4-step FLUX.1-schnell answer holds 4 MiB, a 28-step FLUX.1-dev one
    28 MiB, a 30-step Kolors one 7.5 MiB)."""
    states_disk_max_bytes: int | None = None
    """Disk for the same states (`states_path`); None (auto): every answer for the ttl while
    the disk keeps 10 % (at least 4 GiB) free (`state_store.DiskStates`), so organic
    answers, audited minutes later, still have theirs however many GPUs answer (FLUX.1-dev
    is 28 MiB an answer at 1024x1024: 60 answers a minute hold 16.4 GiB over 600 s)."""
    states_ttl: float = 600.0
    """Seconds an answer's states stay fetchable."""
    states_path: Path | None = None
    """SQLite file that also keeps the states (same caps), so they survive a restart
    between an answer and its audit; None: memory only."""
    protocol_versions: tuple[int, ...] = SUPPORTED_PROTOCOL_VERSIONS
    """Protocol versions answered (advertised in /v1/info); a request in another is refused."""
    keep_running_when_deregistered: bool = False
    """Keep serving (with /healthz not ok) after the hotkey lost its uid, instead of
    stopping with DEREGISTERED_EXIT_CODE."""


@dataclass(frozen=True)
class Answer:
    """A signed answer before it is put on the wire: the response with an empty `image`, and
    the image bytes its signature covers."""

    response: GenerateResponse
    image: bytes
    image_format: str = "png"

    def json_body(self) -> bytes:
        """Protocol 2-3 (or a client that did not ask for binary): base64 inside JSON."""
        return self.response.model_copy(update={"image": to_b64(self.image)}).model_dump_json(
            ).encode()

    def binary_body(self) -> bytes:
        """Protocol 4+: the header, then the image bytes as they are (niche/wire.py)."""
        return pack_answer(self.response, self.image, self.image_format)


def streams_states(engine: object) -> bool:
    """Whether `engine.generate_with_states` takes `on_state` (models.engine.StreamsStates),
    read from the method itself: a wrapper that forwards other attributes to an Engine (the
    localnet's cheats, a bench's stand-in) has its own method and may not take it."""
    method = getattr(engine, "generate_with_states", None)
    try:
        return method is not None and "on_state" in inspect.signature(method).parameters
    except (TypeError, ValueError):  # a builtin or a proxy without a signature
        return False


class MinerService:
    """Engine + wallet + chain view + limits. One per process and GPU."""

    def __init__(self, engine: ImageEngine, wallet: Wallet, config: MinerConfig,
                 chain: Chain | None = None, metagraph: Metagraph | None = None, *,
                 clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.wallet = wallet
        self.keypair = wallet.hotkey
        self.hotkey: str = self.keypair.ss58_address
        self.config = config
        self.chain = chain
        self.clock = clock
        self.verifier = RequestVerifier(self.hotkey, max_age=config.auth_max_age,
                                        allowed_skew=config.auth_allowed_skew,
                                        not_before_ns=time.time_ns())
        self.limiter = RateLimiter(config.requests_per_minute,
                                   stake_proportional=config.stake_proportional_rate)
        self.states_limiter = RateLimiter(config.states_requests_per_minute)
        self.concurrency = engine_concurrency(engine)
        self._streams_states = streams_states(engine)
        self.gate = PriorityGate(config.max_queue, initial_estimate=config.initial_estimate,
                                 slots=self.concurrency, clock=clock)
        self.metrics = MinerMetrics()
        self.executor = ThreadPoolExecutor(max_workers=self.concurrency,
                                           thread_name_prefix="niche-gpu")
        self.states = StateStore(config.states_max_bytes, config.states_ttl, clock=clock,
                                 path=config.states_path,
                                 disk_max_bytes=config.states_disk_max_bytes)
        self.metrics.track(lambda: self.gate.depth, lambda: self.states.bytes_held)
        if callable(getattr(engine, "stats", None)):
            self.metrics.track_replicas(lambda: self.replica_stats() or {})
        self._decode_slots: asyncio.Semaphore | None = None
        self._neurons: dict[str, Neuron] = {}
        self._validator_stake = 0.0
        self.metagraph: Metagraph | None = None
        self._runtime: RuntimeInfo | None = None
        self.registration = RegistrationWatch(self.hotkey, config.netuid, "miner")
        self.exit_code = 0
        """What the process should exit with once the server stops (see request_stop)."""
        self.request_stop: Callable[[], None] | None = None
        """Set by the server: asks it to stop serving (the deregistration stop)."""
        self._endpoint: tuple[str, int] | None = None
        self._endpoint_published = True
        self._other_endpoint: Endpoint | None = None
        """The endpoint of another process the chain showed for this hotkey (warned once)."""
        if metagraph is not None:
            self.set_metagraph(metagraph)
        elif chain is not None:
            self.refresh_metagraph()

    # ------------------------------------------------------------------ chain view
    def set_metagraph(self, metagraph: Metagraph) -> None:
        self.metagraph = metagraph
        self._neurons = {n.hotkey: n for n in metagraph.neurons}
        self._validator_stake = sum(n.stake for n in metagraph.neurons if n.validator_permit)
        self.metrics.set_neuron(self._neurons.get(self.hotkey), metagraph.block)

    def refresh_metagraph(self) -> Metagraph:
        """Read the metagraph, then check this miner's own registration in it."""
        if self.chain is None:
            raise ChainError("no chain to read the metagraph from")
        metagraph = self.chain.metagraph(self.config.netuid)
        self.set_metagraph(metagraph)
        self.watch_registration(metagraph)
        return metagraph

    def watch_registration(self, metagraph: Metagraph) -> None:
        """Deregistered: /healthz turns not ok and, unless configured to keep running,
        the server is asked to stop with DEREGISTERED_EXIT_CODE."""
        if self.registration.deregistered or self.registration.check(metagraph, log) is None:
            return
        if self.config.keep_running_when_deregistered:
            log.error("still serving (--keep-running-when-deregistered); /healthz reports "
                      "not ok")
            return
        log.error("stopping: exit code %d (pm2 does not restart it; register the hotkey "
                  "again, then `pm2 restart`)", DEREGISTERED_EXIT_CODE)
        self.exit_code = DEREGISTERED_EXIT_CODE
        if self.request_stop is not None:
            self.request_stop()

    @property
    def health(self) -> tuple[bool, str]:
        """(ok, why not) for /healthz."""
        if self.registration.reason is not None:
            return False, self.registration.reason
        if getattr(self.engine, "loading", False):
            return False, "loading its models"
        overdue = self.gate.overdue()
        if overdue > self.config.stuck_after:
            return False, (f"a generation has run {overdue:.0f}s past its request's timeout: "
                           "the engine or GPU looks hung (restart the miner)")
        return True, ""

    def check_registered(self) -> Neuron:
        """This miner's own neuron, or a ChainError telling the operator to register."""
        if self.metagraph is None:
            raise ChainError("no metagraph read yet: cannot tell whether this miner is "
                             "registered")
        return self.metagraph.require(self.hotkey, "miner")

    def announce(self, ip: str, port: int) -> None:
        """Publish this miner's endpoint on chain (registers nothing). An unchanged endpoint
        is not served again; inside the chain's serving rate limit the miner serves anyway
        and retries the publication after each metagraph refresh."""
        if self.chain is None:
            return
        self._endpoint = (ip, port)
        outcome = publish_endpoint(self.chain, self.config.netuid, self.wallet, ip, port)
        self._endpoint_published = outcome.published
        if outcome.published:
            log.info("%s (hotkey %s)", outcome.message, self.hotkey)
        else:
            log.warning("%s", outcome.message)

    def needs_publishing(self, metagraph: Metagraph) -> bool:
        """Whether this miner's endpoint must be published again: the rate limit deferred it,
        or the chain shows another endpoint for this hotkey (another process served it and
        may have stopped since: validators would call a dead port for ever). One WARNING per
        other endpoint seen."""
        if self._endpoint is None:
            return False
        if not self._endpoint_published:  # deferred: the chain still shows an older one
            return True
        neuron = metagraph.by_hotkey(self.hotkey)
        shown = neuron.endpoint if neuron is not None else None
        ours = Endpoint(*self._endpoint)
        if shown is None:  # none, or none readable (0.0.0.0): serving again cannot help
            return False
        if same_endpoint(shown, ours):
            self._other_endpoint = None
            return False
        if shown != self._other_endpoint:
            self._other_endpoint = shown
            log.warning("chain endpoint for hotkey %s is %s:%d, this miner serves %s:%d: "
                        "another process may serve this hotkey; publishing ours again",
                        self.hotkey, shown.ip, shown.port, ours.ip, ours.port)
        return True

    async def refresh_loop(self) -> None:
        """Background task: keep the metagraph snapshot fresh (a failed read keeps the old),
        watch the registration, and publish the endpoint again when the chain does not show
        it (a publication the rate limit deferred, another process on this hotkey)."""
        while True:
            await asyncio.sleep(self.config.metagraph_refresh)
            try:
                mg = await asyncio.to_thread(self.refresh_metagraph)
                log.debug("metagraph refreshed: block %d, %d neurons", mg.block,
                          len(mg.neurons))
                if self._endpoint is not None and self.needs_publishing(mg):
                    await asyncio.to_thread(self.announce, *self._endpoint)
            except Exception as exc:  # the miner keeps serving with the last snapshot
                log.warning("metagraph refresh failed (keeping the last snapshot): %s", exc)

    # ------------------------------------------------------------------ who may call
    def caller_policy(self, hotkey: str) -> Neuron | None:
        """The caller's neuron if it may use this miner, else Refusal(403)."""
        neuron = self._neurons.get(hotkey)
        if hotkey in self.config.allow_hotkeys:
            return neuron
        if neuron is None:
            raise Refusal(403, "not_registered",
                          f"hotkey is not registered on subnet {self.config.netuid}")
        if not neuron.validator_permit and not self.config.allow_non_validators:
            raise Refusal(403, "no_validator_permit", "caller has no validator permit")
        if neuron.stake < self.config.min_stake:
            raise Refusal(403, "low_stake",
                          f"stake {neuron.stake:g} below the minimum {self.config.min_stake:g}")
        return neuron

    def precheck(self, headers: Mapping[str, str]) -> None:
        """Before the body is read: signed at all, and the CLAIMED hotkey may call us.
        Strangers cost us neither a body upload nor signature work."""
        if not has_auth_headers(headers):
            raise AuthFailure(401, "unsigned", "sign requests with bittensor.http_auth")
        claimed = claimed_hotkey(headers)
        if not claimed:
            raise AuthFailure(401, "malformed_auth", "missing X-Bittensor-Hotkey")
        self.caller_policy(claimed)

    def authenticate(self, headers: Mapping[str, str], body: bytes, *, method: str,
                     path: str) -> tuple[str, Neuron | None]:
        """(caller hotkey, neuron) from the signature; `precheck` ran on `headers` first."""
        hotkey = self.verifier.verify(headers, body, method=method, path=path)
        return hotkey, self.caller_policy(hotkey)

    def stake_share(self, neuron: Neuron | None) -> float:
        """The caller's share of the permitted validators' stake (1 when unknown)."""
        if neuron is not None and self._validator_stake > 0:
            return neuron.stake / self._validator_stake
        return 1.0

    def inflight_cap(self, hotkey: str | None) -> int:
        """Requests one address may hold in flight for the VERIFIED `hotkey`
        (limits.inflight_cap: scaled by its stake with stake-proportional limits); before the
        signature is checked only `max_inflight_per_ip` applies (PeerSlots)."""
        share = (self.stake_share(self._neurons.get(hotkey or ""))
                 if self.config.stake_proportional_rate else None)
        return inflight_cap(self.config.max_inflight_per_ip, self.config.max_inflight, share)

    def rate_check(self, hotkey: str, neuron: Neuron | None) -> None:
        share = self.stake_share(neuron)
        if not self.limiter.allow(hotkey, share):
            raise Refusal(429, "rate_limited",
                          f"more than {self.limiter.rate_for(share):g} requests per minute")

    def states_rate_check(self, hotkey: str) -> None:
        """/v1/states has its own budget: audits must not eat the challenges' rate."""
        if not self.states_limiter.allow(hotkey):
            raise Refusal(429, "rate_limited", f"more than {self.states_limiter.rpm:g} "
                          "states requests per minute")

    # ------------------------------------------------------------------ requests
    def parse(self, body: bytes) -> GenerateRequest:
        """Raw body -> GenerateRequest; protocol version checked before the schema."""
        return MinerService.parse_model(body, GenerateRequest, self.config.protocol_versions)

    @staticmethod
    def parse_model(body: bytes, model: type[Body],
                    versions: tuple[int, ...] = SUPPORTED_PROTOCOL_VERSIONS) -> Body:
        """Raw body -> `model`; protocol version (one of `versions`) checked before the
        schema."""
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):  # "[[[[..."
            raise Refusal(400, "malformed_json", "body is not JSON") from None
        if not isinstance(data, dict):
            raise Refusal(400, "malformed_json", "body must be a JSON object")
        version = data.get("protocol_version", max(versions))
        if isinstance(version, bool) or version not in versions:
            raise Refusal(400, "unsupported_protocol_version",
                          f"this miner speaks protocol {_span(versions)}, got {version!r}: "
                          "upgrade niche (answers commit to their sampler states since "
                          "protocol 2; see CHANGELOG.md)", field="protocol_version")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            where, message = first_validation_error(exc)
            raise Refusal(422, "invalid_request", f"{where}: {message}",
                          field=where or None) from None

    def _image_limits(self, model: str) -> ImageLimits:
        limits = self.config.image_limits
        spec_pixels = self.engine.spec(model).limits.max_image_pixels
        if spec_pixels < limits.max_pixels:
            limits = ImageLimits(limits.max_b64_chars, limits.max_bytes, spec_pixels,
                                 limits.max_side, limits.formats)
        return limits

    def _prepare_sync(self, request: GenerateRequest):
        params = self.engine.resolve(request.params)
        image = None
        if request.image is not None:
            image = decode_image(request.image, field="image",
                                 limits=self._image_limits(params.model))
        self.engine.check_image(params, image)
        return params, image

    async def prepare(self, request: GenerateRequest):
        """Resolve params and decode the image (in a thread, a few at a time); a txt2img
        request on an engine that resolves in-process is resolved inline (microseconds of
        checks, where a thread hop costs ~0.3 ms of a tiny answer's path)."""
        try:
            if request.image is None and getattr(self.engine, "resolves_in_process", False):
                return self._prepare_sync(request)
            if self._decode_slots is None:
                self._decode_slots = asyncio.Semaphore(self.config.max_concurrent_decodes)
            async with self._decode_slots:
                return await asyncio.to_thread(self._prepare_sync, request)
        except InvalidRequest as exc:
            reason = "invalid_image" if exc.field == "image" else "invalid_request"
            raise Refusal(400, reason, str(exc), field=exc.field) from None
        except EngineUnavailable as exc:  # the Ray backend checks requests on a replica
            raise Refusal(503, exc.reason, str(exc)) from None

    def _work(self, params: GenerationParams, image: PIL.Image.Image | None, request_id: str,
              caller: str, version: int, deadline: float | None = None,
              image_format: str = "png") -> tuple[float, bytes, str, StatesCommitment, str]:
        """GPU worker thread: generate (keeping the sampler states), encode in
        `image_format`, hash, sign."""
        hashes = StreamedHashes() if self._streams_states else None
        started = time.perf_counter()
        left = None if deadline is None else deadline - self.clock()
        with request_deadline(left) if left is not None else contextlib.nullcontext():
            if hashes is not None:  # the states are hashed while the next steps run
                on_state = hashes.add if deadline is None else stop_at(
                    deadline, self.clock, hashes.add)  # a late answer is read by nobody
                result, states = cast("StreamsStates", self.engine).generate_with_states(
                    params, image, on_state=on_state)
            else:
                result, states = self.engine.generate_with_states(params, image)
        seconds = time.perf_counter() - started
        data = encode_image(result, image_format)
        digest = image_sha256(data)
        streamed = hashes.finish(states) if hashes is not None else None
        if streamed is not None:
            shape, raw, digests = streamed
        else:
            (shape, raw), digests = states_bytes(states), None  # views, not copies
        commitment = commit_raw(shape, raw, self.engine.compute_dtype(params.model),
                                kernels=declared_kernels(self.engine, params.model, version),
                                sha256=digests)
        self.states.put_raw(caller, request_id, raw)
        signature = sign_response(self.keypair, request_id, digest, commitment.digest(),
                                  version=version)
        return seconds, data, digest, commitment, signature

    def _run_work(self, params: GenerationParams, image: PIL.Image.Image | None,
                  request: GenerateRequest, caller: str, deadline: float,
                  image_format: str, kind: Work | None = None) -> asyncio.Future:
        """`_work` on the GPU thread; the future of its result on this loop. The gate slot
        is released when the work ends, whatever becomes of the future (a cancelled
        handler does not free a GPU that is still busy). One callback on the loop settles
        both: run_in_executor + shield take two more loop turns to wake the handler."""
        loop = asyncio.get_running_loop()
        answered: asyncio.Future = loop.create_future()

        def settle(work: Future) -> None:  # on the loop
            error = None if work.cancelled() else work.exception()
            ok = not work.cancelled() and error is None
            self.gate.release(work.result()[0] if ok else None, kind)
            self.metrics.busy.set(self.gate.running)
            if answered.done():  # the handler was cancelled
                return
            if work.cancelled():  # the executor was shut down before it ran
                answered.cancel()
            elif error is None:
                answered.set_result(work.result())
            else:
                answered.set_exception(error)

        def finished(work: Future) -> None:  # on the GPU thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(settle, work)

        self.executor.submit(self._work, params, image, request.request_id, caller,
                             request.protocol_version, deadline, image_format
                             ).add_done_callback(finished)
        return answered

    async def generate(self, request: GenerateRequest, neuron: Neuron | None,
                       caller: str, *, image_format: str = "png",
                       gone: Callable[[], Awaitable[None]] | None = None) -> Answer:
        """Generate, encode (`image_format`: "png", or what a binary answer's Accept asked
        for), commit to the states, sign; Refusal for what the caller can act on. `gone`:
        returns when the caller disconnects; a request waiting in the queue then leaves it
        (watched only while it waits: a free GPU starts at once, at no cost)."""
        params, image = await self.prepare(request)
        stake = neuron.stake if neuron is not None else 0.0
        deadline = self.clock() + request.timeout
        kind = Work.of(params.model, params.width, params.height, params.steps,
                       params.pipeline.value)
        if gone is not None and (self.gate.busy or self.gate.depth):
            waited = await unless_gone(self.gate.acquire(stake, deadline, kind), gone)
        else:
            waited = await self.gate.acquire(stake, deadline, kind)
        self.metrics.queue_seconds.observe(waited)
        self.metrics.busy.set(self.gate.running)
        answered = self._run_work(params, image, request, caller, deadline, image_format,
                                  kind)
        try:
            seconds, data, digest, commitment, signature = await answered
        except EngineUnavailable as exc:
            log.warning("request %s refused: %s", request.request_id, exc)
            raise Refusal(503, exc.reason, str(exc)) from None
        except DeadlinePassed as exc:
            log.warning("request %s from %s stopped: %s (timeout %gs); the GPU goes to the "
                        "next request", request.request_id, short(caller), exc,
                        request.timeout)
            raise Refusal(504, "deadline_passed", f"{exc} (timeout {request.timeout:g}s); "
                          "the generation was stopped") from None
        except Exception as exc:
            if is_out_of_memory(exc):  # one line, not a traceback; the next request may fit
                release_cached_memory()
                advice = memory_advice(params.model, self._memory_mode(params.model))
                log.error("request %s: %s", request.request_id, advice)
                raise Refusal(503, "out_of_memory", advice) from None
            log.exception("generation failed for %s", request.request_id)
            raise Refusal(500, "generation_failed", type(exc).__name__) from None
        self.metrics.generation_seconds.labels(params.model).observe(seconds)
        return Answer(GenerateResponse(
            protocol_version=request.protocol_version, request_id=request.request_id,
            model=params.model, image="", image_sha256=digest,
            miner_hotkey=self.hotkey, signature=signature,
            generation_seconds=round(seconds, 6), queue_seconds=round(waited, 6),
            miner_version=__version__, states=commitment), data, image_format)

    def _memory_mode(self, model: str) -> str:
        mode = getattr(self.engine, "memory_mode", None)
        return str(mode(model)) if callable(mode) else "gpu"

    def fetch_states(self, body: bytes, caller: str, *, binary: bool = False
                     ) -> StatesResponse | bytes:
        """The states `caller` asks for of one of its own earlier answers: JSON with base64,
        or (`binary`, protocol 4+) a niche.wire states body with the raw float32 bytes."""
        request = self.parse_model(body, StatesRequest, self.config.protocol_versions)
        kept = self.states.get(caller, request.request_id)
        if kept is None:
            raise Refusal(404, "unknown_request", "no states kept for this request (never "
                          "answered for this caller, or expired)", field="request_id")
        missing = [i for i in request.indices if not 1 <= i <= len(kept)]
        if missing:
            raise Refusal(400, "invalid_request", f"states {missing} not among 1..{len(kept)}",
                          field="indices")
        indices = sorted(set(request.indices))
        if binary and request.protocol_version >= BINARY_SINCE:
            return pack_states(request.protocol_version, request.request_id,
                               [(i, kept[i - 1]) for i in indices])
        blobs = [StateBlob(index=i, data=base64.b64encode(kept[i - 1]).decode("ascii"))
                 for i in indices]
        return StatesResponse(protocol_version=request.protocol_version,
                              request_id=request.request_id, states=blobs)

    @property
    def runtime(self) -> RuntimeInfo:
        """Libraries, device, GPU and dtypes this miner's answers come from (read once)."""
        if self._runtime is None:
            self._runtime = runtime_info(self.engine)
        return self._runtime

    def live_concurrency(self) -> int:
        """Generations this miner can run at once now: its live replicas (1 locally)."""
        live = getattr(self.engine, "live_replicas", None)
        return max(0, min(int(live()), self.concurrency)) if callable(live) else 1

    def replica_stats(self) -> dict[str, int] | None:
        """Replicas configured, up, busy and restarted (None: a local, in-process engine)."""
        stats = getattr(self.engine, "stats", None)
        if not callable(stats):
            return None
        s = stats()
        return {"configured": s.configured, "up": s.up, "busy": s.busy,
                "restarted": s.restarted}

    def info(self) -> InfoResponse:
        est = self.gate.estimate()
        versions = sorted(set(self.config.protocol_versions))
        live = self.live_concurrency()
        return InfoResponse(protocol_version=versions[-1], protocol_versions=versions,
                            hotkey=self.hotkey, models=self.engine.served(),
                            capacity_per_minute=(60.0 * live / est) if est else 0.0,
                            miner_version=__version__, runtime=self.runtime,
                            concurrency=max(1, live),
                            requests_per_minute=self.config.requests_per_minute,
                            stake_proportional=self.config.stake_proportional_rate)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.states.close()


def _span(versions: tuple[int, ...]) -> str:
    low, high = min(versions), max(versions)
    return str(low) if low == high else f"{low}..{high}"
def declared_kernels(engine: Any, model: str, version: int) -> dict[str, str]:
    """The kernel choices an answer in protocol `version` declares (protocol 4+; an older
    validator cannot read them, so it gets none)."""
    kernels = getattr(engine, "kernels", None)
    return dict(kernels(model)) if version >= 4 and callable(kernels) else {}


def engine_concurrency(engine: Any) -> int:
    """Generations an engine runs at once: its `concurrency` (replicas), else 1."""
    value = getattr(engine, "concurrency", 1)
    return value if isinstance(value, int) and value >= 1 else 1


def same_endpoint(a: Endpoint, b: Endpoint) -> bool:
    """Equal endpoints, whichever way the chain spells an IPv6 address."""
    try:
        return a.port == b.port and ipaddress.ip_address(a.ip) == ipaddress.ip_address(b.ip)
    except ValueError:  # not an address: as written
        return a == b


def short(hotkey: Any) -> str:
    text = str(hotkey or "-")
    return text if len(text) <= 10 else f"{text[:5]}..{text[-3:]}"
