"""The gateway's parts wired together, and one request from key to images."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from niche.gateway.catalog import ModelCatalog
from niche.gateway.directory import MinerDirectory
from niche.gateway.errors import SERVER_ERROR, GatewayError, bad_request
from niche.gateway.keys import ApiKey, KeyStore, Quota
from niche.gateway.metrics import GatewayMetrics
from niche.gateway.router import RETRY_ROOM, Delivered, Router, cancel_all, work
from niche.gateway.schemas import ImageData, ImagesRequest, ImagesResponse, Usage
from niche.gateway.store import ImageStore
from niche.imaging import (
    ANSWER_FORMATS,
    ImageLimits,
    bytes_to_image,
    encode_image,
    to_png,
)
from niche.models.spec import ModelSpec
from niche.protocol import MAX_SEED, GenerationParams
from niche.validator.client import MinerTarget
from niche.validator.organic import OrganicQueue, QueueError

log = logging.getLogger("niche.gateway")


@dataclass
class GatewayConfig:
    deadline: float = 60.0
    """Seconds a request may take when the client does not say (`timeout`), at least: a
    request larger than its model's defaults gets more (`default_deadline`)."""
    audit_fraction: float = 0.1
    """Share of delivered images queued for the validator's audit."""
    refresh_interval: float = 30.0
    public_url: str | None = None
    """Base of `url` answers (default: the URL the request came to)."""
    url_ttl: float = 3600.0
    url_max_bytes: int = 2 << 30
    """Bytes of `url` answers kept at once (the oldest go first past it)."""
    max_body_bytes: int = 32 * 1024 * 1024
    cors_origins: tuple[str, ...] = ()
    """Browser origins allowed to call the API (CORS); empty: none."""
    stream_heartbeat: float = 5.0
    """Seconds between progress comments on a streamed answer."""
    body_timeout: float = 30.0
    """Seconds a client has to send its whole request body (a 32 MB upload at 10 Mbit/s
    takes 27 s); a slower one gets 408, so a trickled body cannot hold a connection."""
    max_inflight_per_key: int = 16
    """Requests one key may have open at once (uploads, generations, streams); one more
    gets 429."""

    def __post_init__(self) -> None:
        from niche.errors import ConfigError

        if not 0.0 <= self.audit_fraction <= 1.0:
            raise ConfigError("--gateway.audit_fraction must be in [0, 1]")
        if self.deadline <= 0 or self.refresh_interval <= 0 or self.url_ttl <= 0:
            raise ConfigError("--gateway.deadline, refresh_interval and url_ttl must be > 0")
        if self.body_timeout <= 0 or self.max_inflight_per_key < 1:
            raise ConfigError("gateway body_timeout must be > 0 and max_inflight_per_key >= 1")


@dataclass
class Job:
    """One checked, charged request on its way to the miners."""

    key: ApiKey
    request: ImagesRequest
    model: str
    seeds: list[int]
    params: list[GenerationParams]
    quota: Quota
    started: float
    deadline: float
    day: str
    """The day (UTC) its images were charged to, where undelivered ones go back."""

    @property
    def size(self) -> str:
        return f"{self.params[0].width}x{self.params[0].height}"

    def usage(self, images: int) -> Usage:
        return Usage(images=images, steps=images * int(self.params[0].steps or 0))


@dataclass
class Bill:
    """A charged job's tally (`Gateway.billing`): the images the client was sent, and the
    refusal that ended the job, if one did."""

    sent: int = 0
    refusal: GatewayError | None = None


def not_the_callers(refusal: GatewayError) -> bool:
    """A refusal made before any miner was asked, so its request is given back too: the
    subnet saturated (429 `capacity_exhausted`) or no miner serving the model (503). A
    request miners worked on (502 all failed, 504 past the deadline) keeps counting against
    the key's rate: a request that makes every miner fail must not be free to repeat."""
    return refusal.code in ("capacity_exhausted", "no_miner_available")


EARLY_REFRESH = 5.0
"""Seconds between directory refreshes until the validator's round rate is measured."""
MAX_QUEUE_WRITES = 32
"""Organic answers whose audit-queue write may wait at once (each holds an answer of up to
~6 MiB): past that the queue file is stuck, and more are counted and let go."""
QUEUE_WRITE_TIMEOUT = 15.0
"""Seconds a stopping gateway waits for the audit-queue writes still running."""
ANSWER_LIMITS = ImageLimits(max_side=8192, max_pixels=8192 * 8192, formats=ANSWER_FORMATS)
"""What an answer's bytes are read under when the client's decoded image is not at hand."""


def answer_png(item: Delivered) -> bytes:
    """The miner's image as PNG, from the pixels the client already decoded and checked."""
    if item.result.image is not None:
        return encode_image(item.result.image, "PNG")
    return to_png(item.result.image_bytes or b"", limits=ANSWER_LIMITS)


def reencode(item: Delivered, fmt: str, compression: int | None) -> bytes:
    """The miner's image as WebP or JPEG; `compression` is OpenAI's 0..100 (100, the
    default: lossless WebP, JPEG quality 95)."""
    image = item.result.image
    if image is None:
        image = bytes_to_image(item.result.image_bytes or b"", limits=ANSWER_LIMITS)
    quality = 100 if compression is None else compression
    out = io.BytesIO()
    if fmt == "webp":
        image.save(out, "WEBP", lossless=quality >= 100, quality=quality)
    else:
        image.convert("RGB").save(out, "JPEG", quality=min(95, max(1, quality)))
    return out.getvalue()


class Gateway:
    def __init__(self, config: GatewayConfig, catalog: ModelCatalog, keys: KeyStore,
                 images: ImageStore, directory: MinerDirectory, router: Router,
                 metrics: GatewayMetrics, queue: OrganicQueue | None = None,
                 rng: random.Random | None = None):
        self.config = config
        self.catalog = catalog
        self.keys = keys
        self.images = images
        self.directory = directory
        self.router = router
        self.metrics = metrics
        self.queue = queue
        self.rng = rng or random.Random(secrets.randbits(64))
        self.audit_queue_wait = 1.0
        """Seconds an answer waits for its audit-queue write before it goes to the user."""
        self._refresher: asyncio.Task | None = None
        self._queue_writer = ThreadPoolExecutor(1, thread_name_prefix="organic-queue")
        """The queue's writes, one at a time and apart from the default pool: a queue file
        locked by another process holds its writes, never the re-encodes users wait for."""
        self._queue_writes: set[asyncio.Future] = set()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.router.http = self.router.client._http()
        await self.directory.refresh()
        self._update_gauges()
        self._refresher = asyncio.create_task(self._refresh_loop())

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self._queue_writes:  # answers drawn for audit are not dropped at a clean stop
            await asyncio.wait(self._queue_writes, timeout=QUEUE_WRITE_TIMEOUT)
        self._queue_writer.shutdown(wait=False, cancel_futures=True)
        await self.router.close()
        if self.router.http is not None:
            await self.router.http.close()

    async def _refresh_loop(self) -> None:
        while True:
            # until the validator's round rate is measured from its file, read it often:
            # the challenges' share of each miner's rate depends on it
            await asyncio.sleep(self.config.refresh_interval if self.directory.pace_measured
                                else min(self.config.refresh_interval, EARLY_REFRESH))
            try:
                await self.directory.refresh()
                self._update_gauges()
            except Exception:  # never let the refresher die: the next one may work
                log.exception("directory refresh failed")

    def _update_gauges(self) -> None:
        for model in self.catalog.specs:
            self.metrics.miners.labels(model).set(len(self.directory.serving(model)))
        if self.queue is not None:
            try:
                for status, count in self.queue.counts().items():
                    self.metrics.audits.labels(status).set(count)
            except Exception as exc:
                log.warning("organic queue unreadable: %s", exc)

    # ------------------------------------------------------------------ one request
    async def prepare(self, key: ApiKey, request: ImagesRequest) -> Job:
        """Everything checked and the images charged, before any miner is asked: a bad
        request or an exhausted key costs no miner work. The key's request was taken
        before its body was read (`KeyStore.take_request`)."""
        started = time.monotonic()
        spec = self.catalog.spec(request.model)
        if request.partial_images:
            raise bad_request("partial_images: miners return only finished images, so there "
                              "are no partial images to stream; send stream=true with "
                              "partial_images=0 for one completed event per image",
                              "partial_images")
        if request.output_compression is not None and request.output_format == "png":
            raise bad_request("output_compression is for output_format webp or jpeg (png is "
                              "the miner's lossless image)", "output_compression")
        if request.seed is not None:
            seeds = [(request.seed + i) % (MAX_SEED + 1) for i in range(request.n)]
        else:
            seeds = [self.rng.randrange(MAX_SEED + 1) for _ in range(request.n)]
        all_params = self.catalog.params(request, seeds)
        if request.image:
            await asyncio.to_thread(self.catalog.check_image, spec, request.image)
        if not self.directory.serving(spec.name):
            self.keys.refund(key, 0, request=True)  # not the caller's doing (not_the_callers)
            raise GatewayError(503, f"no miner serves {spec.name} right now; retry later "
                                    "(GET /v1/models lists what is served)",
                               type=SERVER_ERROR, code="no_miner_available")
        charge = self.keys.charge_images(key, request.n)
        deadline = started + (request.timeout or default_deadline(
            spec, all_params[0], self.config.deadline))
        return Job(key, request, spec.name, seeds, all_params, charge.quota, started, deadline,
                   charge.day)

    async def deliver(self, job: Job, heartbeat: float | None = None
                      ) -> AsyncIterator[tuple[int, Delivered] | None]:
        """(index, image) as each image arrives, None every `heartbeat` seconds without one;
        the first failure is raised and the other images are cancelled."""
        tasks = {asyncio.ensure_future(self.router.generate(p, job.request.image,
                                                            job.deadline)): index
                 for index, p in enumerate(job.params)}
        pending = set(tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, timeout=heartbeat,
                                                   return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    yield None
                # the images that arrived first (a stream sends them), then the first failure
                for task in sorted(done, key=lambda t: t.cancelled() or t.exception() is not None):
                    item = task.result()
                    self.metrics.miner_latency.labels(job.model).observe(
                        item.result.latency or 0.0)
                    yield tasks[task], item
        finally:
            await cancel_all(pending)
            for task in tasks:  # every failure read: none is logged as never retrieved
                if task.done() and not task.cancelled():
                    task.exception()

    async def generate(self, job: Job, base_url: str) -> tuple[ImagesResponse, dict[str, str]]:
        """All `n` images of a charged job, or the first error (the others cancelled); the
        caller settles the key's bill (`billing`), as it alone knows what was sent."""
        got: dict[int, Delivered] = {}
        async for event in self.deliver(job):
            if event is not None:
                got[event[0]] = event[1]
        delivered = [got[i] for i in range(len(job.params))]
        data = [await self.image_data(item, job.request, base_url) for item in delivered]
        self.finished(job, len(data))
        headers = {"x-niche-seeds": ",".join(str(s) for s in job.seeds),
                   "x-niche-miners": ",".join(str(d.candidate.target.uid) for d in delivered),
                   **job.quota.headers()}
        return ImagesResponse(created=int(time.time()), data=data,
                              output_format=job.request.output_format, size=job.size,
                              usage=job.usage(len(data))), headers

    @contextlib.contextmanager
    def billing(self, job: Job) -> Iterator[Bill]:
        """The job's bill, settled however the block ends (an answer, a refusal, a client
        that hung up, the gateway stopping): the key pays for the `bill.sent` images only,
        the rest of the quota charged up front goes back, and so does the request when the
        refusal was not the caller's doing (`not_the_callers`)."""
        bill = Bill()
        try:
            yield bill
        except GatewayError as exc:
            bill.refusal = exc
            raise
        finally:
            refused = bill.refusal is not None and not_the_callers(bill.refusal)
            self.keys.refund(job.key, len(job.params) - bill.sent, request=refused,
                             day=job.day)

    def finished(self, job: Job, images: int) -> None:
        self.metrics.images.labels(job.model).inc(images)
        self.metrics.latency.labels(job.model).observe(time.monotonic() - job.started)

    async def image_data(self, item: Delivered, request: ImagesRequest,
                         base_url: str) -> ImageData:
        params = item.request.params
        assert item.result.image_bytes is not None
        # always written here from the checked pixels: the miner's own bytes (a PNG's text
        # chunks, padding, a colour profile) never reach the user; the audit gets them
        if request.output_format == "png":
            data = await asyncio.to_thread(answer_png, item)
        else:
            data = await asyncio.to_thread(reencode, item, request.output_format,
                                           request.output_compression)
        b64, url = None, None
        if request.response_format == "url":
            token = await asyncio.to_thread(self.images.put, data)
            url = (f"{(self.config.public_url or base_url).rstrip('/')}/v1/files/{token}."
                   f"{request.output_format}")
        else:
            b64 = base64.b64encode(data).decode()
        if self.queue is not None and self.rng.random() < self.config.audit_fraction:
            await self._queue_in_background(item)
        return ImageData(b64_json=b64, url=url, seed=params.seed, pipeline=params.pipeline.value,
                         steps=int(params.steps or 0),
                         width=int(params.width or 0), height=int(params.height or 0),
                         miner_uid=item.candidate.target.uid,
                         miner_hotkey=item.candidate.target.hotkey,
                         seconds=round(item.result.latency or 0.0, 4), attempts=item.attempts)

    async def _queue_in_background(self, item: Delivered) -> None:
        """Queue the answer for audit, waiting at most `audit_queue_wait` for the write (a
        few ms, unless another process holds the queue file): the user's image never waits
        on the audit queue, and the write finishes behind the answer."""
        if len(self._queue_writes) >= MAX_QUEUE_WRITES:
            self.metrics.audits_not_queued.inc()
            log.warning("organic answer not queued for audit: %d writes already wait on %s",
                        len(self._queue_writes), self.queue.path if self.queue else "-")
            return
        write = asyncio.get_running_loop().run_in_executor(self._queue_writer,
                                                           self._queue_audit, item)
        self._queue_writes.add(write)
        write.add_done_callback(self._queue_writes.discard)
        await asyncio.wait({write}, timeout=self.audit_queue_wait)

    def _queue_audit(self, item: Delivered) -> None:
        """The answer as the miner signed it (its own bytes, not the user's PNG)."""
        assert self.queue is not None and item.result.response is not None
        target: MinerTarget = item.candidate.target
        try:
            if self.queue.submit(target, item.request, item.result.response,
                                 item.result.latency, image=item.result.image_bytes):
                self.metrics.audits_queued.inc()
        except QueueError as exc:  # the user still gets the image
            self.metrics.audits_not_queued.inc()
            log.warning("organic answer not queued for audit: %s", exc)


def default_paths(root: Path) -> tuple[Path, Path]:
    """(gateway database, organic queue) under a folder."""
    return root / "gateway.sqlite", root / "organic.sqlite"


def build_gateway(chain, wallet, netuid: int, *, models: list[str], db_path: Path,
                  queue_path: Path | None, validator_state: Path | None,
                  model_root: Path | None = None, config: GatewayConfig | None = None,
                  hedge_after: float | None = None, cooldown: float = 30.0) -> Gateway:
    """Every part from paths and flags: what `niche gateway serve` and the tests run."""
    from niche.gateway.db import GatewayDB
    from niche.validator.client import MinerClient

    config = config or GatewayConfig()
    db = GatewayDB(db_path)
    client = MinerClient(wallet, grace=0.0)
    metrics = GatewayMetrics()
    directory = MinerDirectory(chain, netuid, client, own_hotkey=wallet.hotkey.ss58_address,
                               validator_state=validator_state)
    catalog = ModelCatalog.load(models, model_root)
    router = Router(directory, client, metrics, cooldown=cooldown, hedge_after=hedge_after,
                    limit=lambda params: honest_seconds(catalog.specs[params.model], params))
    queue = (OrganicQueue(queue_path, signer=wallet.hotkey.ss58_address,
                          draw=config.audit_fraction or 1.0)
             if queue_path is not None else None)
    images = ImageStore(db, ttl=config.url_ttl, max_bytes=config.url_max_bytes)
    return Gateway(config, catalog, KeyStore(db), images, directory, router, metrics, queue)


def honest_seconds(spec: ModelSpec, params: GenerationParams) -> float:
    """Seconds an honest miner may take for `params`: the model's timeout
    (`spec.defaults.timeout`, what the validator's challenges allow at the default size and
    steps) scaled by pixels x steps when the request is larger."""
    d = spec.defaults
    explicit = params.model_copy(update={"width": params.width or d.width,
                                         "height": params.height or d.height,
                                         "steps": params.steps or d.steps})
    return d.timeout * max(1.0, work(explicit) / (d.width * d.height * d.steps))


def default_deadline(spec: ModelSpec, params: GenerationParams, floor: float) -> float:
    """Seconds a request may take when the client sends no `timeout`: `floor`
    (`--gateway.deadline`), or more for a request larger than the model's defaults, with room
    for a retry. A 1536x1536, 50-step FLUX.1-dev image (4x the work of its 1024x1024, 28-step
    default) would otherwise be cut off at 60 s while an honest miner computes it. Room for
    RETRY_ROOM attempts: a second miner when the first fails or stalls."""
    return max(floor, RETRY_ROOM * honest_seconds(spec, params))
