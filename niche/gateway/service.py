"""The gateway's parts wired together, and one request from key to images."""
from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from niche.gateway.catalog import ModelCatalog
from niche.gateway.directory import MinerDirectory
from niche.gateway.errors import GatewayError
from niche.gateway.keys import ApiKey, KeyStore
from niche.gateway.metrics import GatewayMetrics
from niche.gateway.router import Delivered, Router
from niche.gateway.schemas import ImageData, ImagesRequest, ImagesResponse
from niche.gateway.store import ImageStore
from niche.protocol import MAX_SEED
from niche.validator.client import MinerTarget
from niche.validator.organic import OrganicQueue, QueueError

log = logging.getLogger("niche.gateway")


@dataclass
class GatewayConfig:
    deadline: float = 60.0
    """Seconds a request may take when the client does not say (`timeout`)."""
    audit_fraction: float = 0.1
    """Share of delivered images queued for the validator's audit."""
    refresh_interval: float = 30.0
    public_url: str | None = None
    """Base of `url` answers (default: the URL the request came to)."""
    url_ttl: float = 3600.0
    max_body_bytes: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        from niche.errors import ConfigError

        if not 0.0 <= self.audit_fraction <= 1.0:
            raise ConfigError("--gateway.audit_fraction must be in [0, 1]")
        if self.deadline <= 0 or self.refresh_interval <= 0 or self.url_ttl <= 0:
            raise ConfigError("--gateway.deadline, refresh_interval and url_ttl must be > 0")


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
        self._refresher: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.router.http = self.router.client._http()
        await self.directory.refresh()
        self._update_gauges()
        self._refresher = asyncio.create_task(self._refresh_loop())

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self.router.http is not None:
            await self.router.http.aclose()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_interval)
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
    async def generate(self, key: ApiKey, request: ImagesRequest, base_url: str
                       ) -> tuple[ImagesResponse, dict[str, str]]:
        started = time.monotonic()
        spec = self.catalog.spec(request.model)
        if request.seed is not None:
            seeds = [(request.seed + i) % (MAX_SEED + 1) for i in range(request.n)]
        else:
            seeds = [self.rng.randrange(MAX_SEED + 1) for _ in range(request.n)]
        all_params = self.catalog.params(request, seeds)
        if request.image:
            await asyncio.to_thread(self.catalog.check_image, spec, request.image)
        self.keys.admit(key, request.n)
        deadline = started + (request.timeout or self.config.deadline)
        try:
            delivered = await asyncio.gather(*[
                self.router.generate(p, request.image, deadline) for p in all_params])
        except GatewayError:
            self.keys.refund(key, request.n)
            raise
        data = []
        for item in delivered:
            data.append(await self._image_data(item, request.response_format, base_url))
            self.metrics.miner_latency.labels(spec.name).observe(item.result.latency or 0.0)
        self.metrics.images.labels(spec.name).inc(len(data))
        self.metrics.latency.labels(spec.name).observe(time.monotonic() - started)
        headers = {"x-niche-seeds": ",".join(str(s) for s in seeds),
                   "x-niche-miners": ",".join(str(d.candidate.target.uid) for d in delivered)}
        return ImagesResponse(created=int(time.time()), data=data), headers

    async def _image_data(self, item: Delivered, response_format: str,
                          base_url: str) -> ImageData:
        answer, params = item.result.response, item.request.params
        assert answer is not None and item.result.image_bytes is not None
        b64, url = None, None
        if response_format == "url":
            token = await asyncio.to_thread(self.images.put, item.result.image_bytes)
            url = f"{(self.config.public_url or base_url).rstrip('/')}/v1/files/{token}.png"
        else:
            b64 = answer.image
        if self.queue is not None and self.rng.random() < self.config.audit_fraction:
            await asyncio.to_thread(self._queue_audit, item)
        return ImageData(b64_json=b64, url=url, seed=params.seed, steps=int(params.steps or 0),
                         width=int(params.width or 0), height=int(params.height or 0),
                         miner_uid=item.candidate.target.uid,
                         miner_hotkey=item.candidate.target.hotkey,
                         seconds=round(item.result.latency or 0.0, 4), attempts=item.attempts)

    def _queue_audit(self, item: Delivered) -> None:
        assert self.queue is not None and item.result.response is not None
        target: MinerTarget = item.candidate.target
        try:
            if self.queue.submit(target, item.request, item.result.response,
                                 item.result.latency):
                self.metrics.audits_queued.inc()
        except QueueError as exc:  # the user still gets the image
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
    router = Router(directory, client, metrics, cooldown=cooldown, hedge_after=hedge_after)
    queue = OrganicQueue(queue_path) if queue_path is not None else None
    return Gateway(config, ModelCatalog.load(models, model_root), KeyStore(db),
                   ImageStore(db, ttl=config.url_ttl), directory, router, metrics, queue)
