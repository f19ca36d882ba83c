"""Shared pieces of the miner / client tests: a real local chain with real wallets, a running
miner on 127.0.0.1, and a small engine double for HTTP-layer tests.

StubEngine is a TEST DOUBLE of the Engine contract (resolve / check_image / generate / served /
spec): the HTTP-layer tests need to hold a generation open, fail one on purpose and count
calls, which the real engine cannot do on demand. The real Engine on tiny checkpoints is
exercised end to end in test_miner_e2e.py.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from niche.auth import sign_request
from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.devnet.servers import BackgroundServer
from niche.errors import InvalidRequest
from niche.metrics_server import start_metrics_server
from niche.miner.server import create_app
from niche.miner.service import MinerConfig, MinerService
from niche.protocol import GenerateRequest, GenerationParams, ModelInfo, PipelineKind
from niche.validator.client import MinerClient

NETUID = 1
STAKES = {"hi": 100.0, "mid": 50.0, "lo": 10.0, "low": 2.0}
MIN_STAKE = 5.0
NICHE = str(Path(sys.executable).with_name("niche"))


class StubEngine:
    """Engine contract double: deterministic flat image per seed; 'explode' raises;
    `hold()` makes the next generations wait until `release()`."""

    model = "stub"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.images: list[Image.Image | None] = []  # the conditioning image of each call
        self._hold: threading.Event | None = None
        self.running = threading.Event()
        self._lock = threading.Lock()

    def hold(self) -> None:
        self._hold = threading.Event()
        self.running.clear()

    def release(self) -> None:
        if self._hold is not None:
            self._hold.set()
        self._hold = None

    def spec(self, model: str):
        if model != self.model:
            raise InvalidRequest(f"model '{model}' is not served here", field="model")
        return SimpleNamespace(limits=SimpleNamespace(max_image_pixels=1024 * 1024))

    def served(self) -> list[ModelInfo]:
        return [ModelInfo(model=self.model,
                          pipelines=[PipelineKind.TXT2IMG, PipelineKind.CONTROLNET_CANNY])]

    def resolve(self, params: GenerationParams) -> GenerationParams:
        self.spec(params.model)
        if params.pipeline not in (PipelineKind.TXT2IMG, PipelineKind.CONTROLNET_CANNY):
            raise InvalidRequest("pipeline not served", field="pipeline")
        if params.width is not None and params.width > 256:
            raise InvalidRequest(f"{params.width} not in [16, 256]", field="width")
        return params.model_copy(update=dict(steps=params.steps or 2, guidance=0.0,
                                             width=params.width or 32,
                                             height=params.height or 32))

    def check_image(self, params: GenerationParams, image) -> None:
        if params.pipeline.needs_image and image is None:
            raise InvalidRequest("needs a conditioning image", field="image")
        if not params.pipeline.needs_image and image is not None:
            raise InvalidRequest("txt2img takes no conditioning image", field="image")

    def generate(self, params: GenerationParams, image=None) -> Image.Image:
        with self._lock:
            self.calls.append(params.prompt)
            self.images.append(None if image is None else image.copy())
        hold = self._hold
        self.running.set()
        if hold is not None:
            hold.wait(20)
        if params.prompt == "explode":
            raise RuntimeError("boom")
        s = params.seed
        return Image.new("RGB", (params.width, params.height), (s % 256, s // 256 % 256, 7))

    def generate_with_states(self, params: GenerationParams, image=None
                             ) -> tuple[Image.Image, list[torch.Tensor]]:
        """The stub's image plus one small float32 state per step, derived from the seed."""
        picture = self.generate(params, image)
        gen = torch.Generator().manual_seed(params.seed)
        states = [torch.randn((1, 4, 4, 4), generator=gen) for _ in range(params.steps or 2)]
        return picture, states

    def compute_dtype(self, model: str) -> str:
        return "float32"


def make_request(prompt: str = "a cat", seed: int = 1, *, model: str = "stub",
                 timeout: float = 20.0, image: str | None = None, **params) -> GenerateRequest:
    return GenerateRequest(
        request_id=uuid.uuid4().hex,
        params=GenerationParams(model=model, prompt=prompt, seed=seed, **params),
        image=image, timeout=timeout)


def build_net(root) -> SimpleNamespace:
    """A LocalChain file with a subnet, a registered miner and callers of known stake."""
    wallets = {name: create_wallet(name, "hot", root / "wallets")
               for name in ("miner", *STAKES, "nopermit", "stranger")}
    chain = LocalChain(root / "chain.db", create=True)
    chain.create_subnet(NETUID, max_validators=8, min_validator_stake=1.0)
    chain.register(NETUID, wallets["miner"])
    for name, stake in STAKES.items():
        chain.register(NETUID, wallets[name], stake=stake)
    chain.register(NETUID, wallets["nopermit"])
    return SimpleNamespace(chain=chain, wallets=wallets, root=root,
                           miner_hotkey=wallets["miner"].hotkey.ss58_address)


class RecordingClient(MinerClient):
    """The validator's client, noting (path, Accept sent, media type received) of every
    signed request it makes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.exchanges: list[tuple[str, str, str]] = []

    async def _exchange(self, http, method, url, path, body, receiver, cap,
                        accept="application/json"):
        status, media, raw = await super()._exchange(http, method, url, path, body, receiver,
                                                     cap, accept)
        self.exchanges.append((path, accept, media))
        return status, media, raw


def module_net(name: str):
    """A module-scoped `net` fixture: `build_net` in a temporary folder named `name`, its
    chain closed after the module (`net = module_net("mynet")` in a test module)."""

    @pytest.fixture(scope="module")
    def net(tmp_path_factory):
        built = build_net(tmp_path_factory.mktemp(name))
        yield built
        built.chain.close()

    return net


@contextlib.contextmanager
def announced_miners(chain, miners: Mapping[str, tuple[Any, Any, MinerConfig]]
                     ) -> Iterator[dict[str, SimpleNamespace]]:
    """One real miner server per name -> (engine, wallet, config) on 127.0.0.1, its endpoint
    published on `chain` (what a validator round finds)."""
    running: dict[str, SimpleNamespace] = {}
    try:
        for name, (engine, wallet, config) in miners.items():
            service = MinerService(engine, wallet, config, chain=chain)
            server = BackgroundServer(create_app(service, refresh_metagraph=False)).start()
            service.announce("127.0.0.1", server.port)
            running[name] = SimpleNamespace(service=service, server=server, url=server.url,
                                            hotkey=service.hotkey)
        yield running
    finally:
        for miner in running.values():
            miner.server.stop()
            miner.service.close()


@contextlib.contextmanager
def running_miner(net, engine, **config) -> Iterator[SimpleNamespace]:
    config.setdefault("min_stake", MIN_STAKE)
    config.setdefault("requests_per_minute", 0)
    service = MinerService(engine, net.wallets["miner"], MinerConfig(netuid=NETUID, **config),
                           chain=net.chain)
    server = BackgroundServer(create_app(service)).start()
    metrics = start_metrics_server(service.metrics.registry, 0)
    try:
        yield SimpleNamespace(service=service, server=server, url=server.url,
                              hotkey=service.hotkey, engine=engine, metrics_url=metrics.url)
    finally:
        metrics.close()
        server.stop()
        service.close()


def signed_post(miner, wallet, body: bytes, *, receiver: str | None = None,
                path: str = "/v1/generate", **sign_kw) -> httpx.Response:
    headers = sign_request(wallet, method="POST", path=path, body=body,
                           receiver=receiver or miner.hotkey, **sign_kw) if wallet else {}
    return httpx.post(miner.url + path, content=body,
                      headers={**headers, "Content-Type": "application/json"}, timeout=30)


def round_with_two_versions(tmp_path, engine, versions: Mapping[str, tuple[int, ...]],
                            make_client, seed: int) -> SimpleNamespace:
    """One whole validator round (info, challenge, answer, states fetch, step-check audit,
    scores, weights) over an "old" and a "new" miner speaking `versions`, with the client
    `make_client(wallet)`: both answers must be verified and both miners weighted. Returns
    the client and the miners' hotkeys for the version-specific checks."""
    from niche.validator.service import Validator, ValidatorConfig
    from niche.validator.state import ValidatorState

    wallets = {n: create_wallet(n, "hot", tmp_path / "w") for n in ("validator", *versions)}
    chain = LocalChain(tmp_path / "chain.db", create=True)
    chain.create_subnet(NETUID, weights_rate_limit=0)
    chain.register(NETUID, wallets["validator"], stake=100.0)
    uids = {n: chain.register(NETUID, wallets[n]) for n in versions}
    miners = {name: (engine, wallets[name], MinerConfig(
        netuid=NETUID, requests_per_minute=0, protocol_versions=spoken))
        for name, spoken in versions.items()}
    config = ValidatorConfig(netuid=NETUID, models=("flux-schnell",), rounds=1,
                             round_interval=0, audit_fraction=1.0, seed=seed, epoch_length=1)
    client = make_client(wallets["validator"])
    try:
        with announced_miners(chain, miners), \
                ValidatorState(tmp_path / "state.db") as state:
            validator = Validator(config, chain, wallets["validator"], engine, client, state)
            assert validator.run() == 0
    finally:
        chain.close()
    (report,) = validator.reports
    by_uid = {o.uid: o for o in report.outcomes}
    table = validator.format_report(report)
    for name in versions:
        outcome = by_uid[uids[name]]
        assert outcome.status == "ok" and outcome.audited and outcome.audit_passed, table
    assert report.weights is not None and set(report.weights) == set(uids.values()), table
    return SimpleNamespace(client=client, hotkeys={n: wallets[n].hotkey.ss58_address
                                                   for n in versions})


class MinerProcess:
    """`niche miner` serving the tiny FLUX, states kept in `states`."""

    def __init__(self, root: Path, port: int, states: Path,
                 env: Mapping[str, str] | None = None):
        self.root, self.port, self.states = root, port, states
        self.env = dict(env or {})
        self.log = root / "miner.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.spawn()
        self.wait_healthy()

    def spawn(self) -> None:
        """Start the process and return at once (its models load in the background)."""
        argv = [NICHE, "miner", "--netuid", str(NETUID), "--subtensor.network", "localnet",
                "--localnet.path", str(self.root / "chain.db"), "--wallet.name", "miner",
                "--wallet.hotkey", "hot", "--wallet.path", str(self.root / "wallets"),
                "--axon.ip", "127.0.0.1", "--axon.port", str(self.port), "--tiny",
                "--model", "flux-schnell", "--device", "cpu", "--dtype", "float32", "--states.path",
                str(self.states), "--metagraph.refresh", "3600"]
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})

    def wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"miner exited {self.proc.returncode}:\n"
                                     f"{self.log.read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"miner not up in 120 s:\n{self.log.read_text()}")

    def wait_written(self, request_id: str, timeout: float = 30.0) -> None:
        """Until the miner's states file holds `request_id`'s states."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(sqlite3.Error):
                with contextlib.closing(sqlite3.connect(
                        f"file:{self.states}?mode=ro", uri=True)) as db:
                    if db.execute("SELECT 1 FROM states WHERE request_id=?",
                                  (request_id,)).fetchone():
                        return
            time.sleep(0.01)
        raise AssertionError(f"states of {request_id} not on disk within {timeout:.0f}s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


def wait_for(predicate, what: str, timeout: float = 60.0):
    """`predicate()`'s first truthy value, polled every 50 ms; AssertionError naming `what`
    after `timeout` seconds (a deadline for hangs only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
