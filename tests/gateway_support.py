"""A real subnet for the gateway tests, in this process: a LocalChain file with a validator
and miners (real wallets), real miner servers on 127.0.0.1 running the given engines (the
session's tiny Engine, or a wrapper of it), and the real gateway app under uvicorn."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace

from miner_support import announced_miners

from niche.chain.local import LocalChain
from niche.chain.wallets import create_wallet
from niche.devnet.servers import BackgroundServer
from niche.gateway.app import create_app as gateway_app
from niche.gateway.service import GatewayConfig, build_gateway
from niche.miner.server import ConnectionLimits
from niche.miner.service import MinerConfig

NETUID = 1


def make_chain(root: Path, miners: int) -> SimpleNamespace:
    """Chain file, the validator (stake, permit) and `miners` registered miners."""
    names = ["validator"] + [f"miner{i + 1}" for i in range(miners)]
    wallets = {n: create_wallet(n, "hot", root / "wallets") for n in names}
    chain = LocalChain(root / "chain.db", create=True)
    chain.create_subnet(NETUID, max_validators=4, min_validator_stake=1.0)
    chain.register(NETUID, wallets["validator"], stake=1000.0)
    uids = {n: chain.register(NETUID, wallets[n]) for n in names[1:]}
    return SimpleNamespace(chain=chain, wallets=wallets, uids=uids, root=root,
                           validator=wallets["validator"],
                           validator_hotkey=wallets["validator"].hotkey.ss58_address)


@contextlib.contextmanager
def running_miners(net: SimpleNamespace, engines: Mapping[str, object]
                   ) -> Iterator[dict[str, SimpleNamespace]]:
    """One real miner server per name -> engine, its endpoint published on chain."""
    config = MinerConfig(netuid=NETUID, requests_per_minute=0,
                         allow_hotkeys=(net.validator_hotkey,))
    with announced_miners(net.chain, {name: (engine, net.wallets[name], config)
                                      for name, engine in engines.items()}) as running:
        yield running


@contextlib.contextmanager
def running_gateway(net: SimpleNamespace, tiny_root: Path, *,
                    models: tuple[str, ...] = ("flux-schnell", "kolors"),
                    validator_state: Path | None = None, config: GatewayConfig | None = None,
                    expect_miners: int = 0, limits: ConnectionLimits | None = None,
                    **kwargs) -> Iterator[SimpleNamespace]:
    """The gateway app on 127.0.0.1 with one ready key (`key`, 600/min, 1000/day);
    `expect_miners`: wait until its directory lists that many (a miner whose /v1/info was
    slow at the gateway's start on a loaded box is listed only at the next refresh)."""
    gateway = build_gateway(net.chain, net.validator, NETUID, models=list(models),
                            db_path=net.root / "gateway.sqlite",
                            queue_path=net.root / "organic.sqlite",
                            validator_state=validator_state, model_root=tiny_root,
                            config=config or GatewayConfig(audit_fraction=1.0), **kwargs)
    gateway.audit_queue_wait = 60.0  # tests read the queue right after the answer
    key, _ = gateway.keys.create("tests", per_minute=600, per_day=1000)
    with BackgroundServer(gateway_app(gateway), limits=limits) as server:
        if expect_miners:
            _await_directory(gateway, expect_miners)
        yield SimpleNamespace(gateway=gateway, server=server, url=server.url, key=key,
                              base_url=server.url + "/v1")


def _await_directory(gateway, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(gateway.directory.candidates) < count and time.monotonic() < deadline:
        asyncio.run(gateway.directory.refresh())
    assert len(gateway.directory.candidates) >= count, gateway.directory.last_error


@contextlib.contextmanager
def shared_subnet(tmp_path_factory, tiny_engine, tiny_root) -> Iterator[SimpleNamespace]:
    """Two FLUX.1-schnell miners, two Kolors miners (every pipeline; two, as the gateway
    sends a miner no more requests at once than its advertised concurrency), a gateway offering
    flux-schnell, kolors and flux-dev (no miner: the 503 case) with one allowed CORS origin,
    and an official openai client (`client`) on its key."""
    import openai

    net = make_chain(tmp_path_factory.mktemp("gwnet"), miners=4)
    engines = {"miner1": Only(tiny_engine, "flux-schnell"),
               "miner2": Only(tiny_engine, "flux-schnell"),
               "miner3": Only(tiny_engine, "kolors"),
               "miner4": Only(tiny_engine, "kolors")}
    config = GatewayConfig(audit_fraction=1.0, cors_origins=(CORS_ORIGIN,))
    try:
        with running_miners(net, engines) as miners, running_gateway(
                net, tiny_root, models=("flux-schnell", "kolors", "flux-dev"),
                config=config) as gw:
            gw.miners, gw.net = miners, net
            gw.client = openai.OpenAI(api_key=gw.key, base_url=gw.base_url, max_retries=0)
            yield gw
    finally:
        net.chain.close()


CORS_ORIGIN = "http://app.example"


class Only:
    """The given engine, advertising (and so being routed) only `model`."""

    def __init__(self, engine, model: str):
        self._engine, self._model = engine, model

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def served(self):
        return [m for m in self._engine.served() if m.model == self._model]


class Switch(Only):
    """The given engine serving `model`, switchable at run time: `mode` "ok", "fail" (a GPU
    error on every generation) or "stall" (hangs, without an error, until `release` is set).
    `calls` counts the generations it was asked for."""

    def __init__(self, engine, model: str):
        super().__init__(engine, model)
        self.mode = "ok"
        self.calls = 0
        self.release = threading.Event()

    def generate_with_states(self, params, image=None):
        self.calls += 1
        if self.mode == "fail":
            raise RuntimeError("CUDA error: an illegal memory access")
        if self.mode == "stall":
            self.release.wait(60)
        return self._engine.generate_with_states(params, image)


def reset_routing(gw: SimpleNamespace) -> None:
    """Forget what the router learnt (cooldowns, drawn order patches) between tests that
    share one subnet; the observed pace is kept (it is what a running gateway has)."""
    router = gw.gateway.router
    router._cooling.clear()
    router.__dict__.pop("order", None)  # a test's fixed order, back to the weighted draw


class Gate(Only):
    """The tiny engine behind a gate: generations wait until `open` is set (a slow or hung
    miner), or fail (`broken`: a miner whose GPU errs)."""

    def __init__(self, engine, model: str, broken: bool = False):
        super().__init__(engine, model)
        self.open = threading.Event()
        self.waiting = threading.Event()
        self.broken = broken

    def generate_with_states(self, params, image=None):
        if self.broken:
            raise RuntimeError("CUDA error: an illegal memory access")
        self.waiting.set()
        self.open.wait(60)
        return self._engine.generate_with_states(params, image)
