"""A miner whose hotkey is replaced on its subnet mid-run: ERROR line, /healthz not ok, and
by default a stop with DEREGISTERED_EXIT_CODE; and a restart inside the serving rate limit
that neither re-serves an unchanged endpoint nor crashes on a changed one. Real LocalChain
file, real wallets, real uvicorn on 127.0.0.1 via `niche.miner.server.serve`."""
from __future__ import annotations

import functools
import logging
import threading

import httpx
import miner_support
import pytest

from niche.chain.base import Endpoint
from niche.chain.local import LocalChain
from niche.chain.registration import DEREGISTERED_EXIT_CODE
from niche.chain.wallets import create_wallet
from niche.miner.server import serve
from niche.miner.service import MinerConfig, MinerService
from tests.miner_support import StubEngine

NETUID = 1


@pytest.fixture
def net(tmp_path):
    wallets = {n: create_wallet(n, "hot", tmp_path / "wallets")
               for n in ("val", "miner", "newcomer")}
    chain = LocalChain(tmp_path / "chain.db", create=True)
    # full at 2 uids, nobody immune: a new registration replaces the miner (the validator's
    # permit protects it)
    chain.create_subnet(NETUID, max_uids=2, immunity_period=0, min_validator_stake=1.0,
                        serving_rate_limit=1000)
    chain.register(NETUID, wallets["val"], stake=100.0)
    chain.register(NETUID, wallets["miner"])
    yield chain, wallets
    chain.close()


wait_for = functools.partial(miner_support.wait_for, timeout=60.0)


class Running:
    """serve() in a thread (no signal handlers off the main thread); its return code kept."""

    def __init__(self, service: MinerService):
        self.service = service
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.code = serve(self.service, "127.0.0.1", 0)

    def url(self, chain) -> str:
        endpoint = wait_for(lambda: chain.endpoint_of(NETUID, self.service.hotkey),
                            "the endpoint on chain")
        return endpoint.url

    def stop(self) -> None:
        if self.service.request_stop is not None:
            self.service.request_stop()
        self.thread.join(20)


def health(url: str) -> httpx.Response:
    return httpx.get(url + "/healthz", timeout=10)


def start(chain, wallets, **config) -> Running:
    service = MinerService(StubEngine(), wallets["miner"],
                           MinerConfig(netuid=NETUID, metagraph_refresh=0.1, **config),
                           chain=chain)
    running = Running(service)
    running.thread.start()
    return running


def test_deregistered_miner_logs_error_and_stops_with_code_3(net, caplog):
    chain, wallets = net
    caplog.set_level(logging.ERROR, logger="niche.miner")
    miner = start(chain, wallets)
    url = miner.url(chain)
    wait_for(lambda: health(url).status_code == 200, "a healthy miner")
    uid = miner.service.registration.uid
    assert chain.register(NETUID, wallets["newcomer"]) == uid  # replaces the miner
    miner.thread.join(60)
    assert not miner.thread.is_alive() and miner.code == DEREGISTERED_EXIT_CODE == 3
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("DEREGISTERED" in m and f"uid {uid} now belongs to "
               f"{wallets['newcomer'].hotkey.ss58_address}" in m for m in errors), errors
    with pytest.raises(httpx.ConnectError):
        health(url)


def test_keep_running_when_deregistered_serves_with_healthz_not_ok(net, caplog):
    chain, wallets = net
    caplog.set_level(logging.ERROR, logger="niche.miner")
    miner = start(chain, wallets, keep_running_when_deregistered=True)
    try:
        url = miner.url(chain)
        assert health(url).json()["ok"] is True
        chain.register(NETUID, wallets["newcomer"])
        reply = wait_for(lambda: (r := health(url)).status_code == 503 and r,
                         "/healthz not ok")
        assert reply.json()["ok"] is False and "deregistered" in reply.json()["reason"]
        assert miner.thread.is_alive() and miner.service.exit_code == 0
        assert any("DEREGISTERED" in r.getMessage() for r in caplog.records)
    finally:
        miner.stop()
    assert miner.code == 0


def test_restart_inside_the_serving_rate_limit(net, caplog):
    """Restarted on the same endpoint: not served again; on a new one: a warning, the miner
    serves anyway and publishes the endpoint once the limit allows."""
    chain, wallets = net
    hotkey = wallets["miner"].hotkey.ss58_address
    caplog.set_level(logging.INFO)
    chain.serve(NETUID, wallets["miner"], "127.0.0.1", 1)  # the window starts now
    service = MinerService(StubEngine(), wallets["miner"],
                           MinerConfig(netuid=NETUID, metagraph_refresh=0.1), chain=chain)
    service.announce("127.0.0.1", 1)
    assert any("already served" in r.getMessage() for r in caplog.records)
    service.announce("127.0.0.1", 2)  # inside the limit: no exception
    assert any("serving rate limit" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    assert chain.endpoint_of(NETUID, hotkey) == Endpoint("127.0.0.1", 1)
    service.close()


def test_rate_limited_endpoint_is_published_by_the_refresh_loop(tmp_path, caplog):
    wallets = {n: create_wallet(n, "hot", tmp_path / "w") for n in ("miner",)}
    chain = LocalChain(tmp_path / "c.db", create=True, block_time=0.5)
    chain.create_subnet(NETUID, serving_rate_limit=4)
    chain.register(NETUID, wallets["miner"])
    chain.serve(NETUID, wallets["miner"], "127.0.0.1", 1)
    caplog.set_level(logging.WARNING, logger="niche.miner")
    miner = start(chain, wallets)
    try:
        endpoint = wait_for(lambda: (e := chain.endpoint_of(NETUID, miner.service.hotkey))
                            and e.port != 1 and e, "the deferred endpoint on chain")
        assert health(endpoint.url).json()["ok"] is True
        assert any("serving rate limit" in r.getMessage() for r in caplog.records)
    finally:
        miner.stop()
        chain.close()
    assert miner.code == 0


def test_registration_watch_edges(caplog):
    from niche.chain.base import Metagraph, Neuron
    from niche.chain.registration import RegistrationWatch

    log = logging.getLogger("niche.test")
    caplog.set_level(logging.ERROR, logger="niche.test")
    me = Neuron(uid=4, hotkey="5Me", coldkey="5C", stake=0.0, validator_permit=False,
                endpoint=None, last_update=0)
    watch = RegistrationWatch("5Me", 1, "miner")
    assert watch.check(Metagraph(1, 10, ()), log) is None  # never seen: start-up's job
    assert watch.check(Metagraph(1, 11, (me,)), log) is None and watch.uid == 4
    gone = Metagraph(1, 12, ())
    first = watch.check(gone, log)
    assert first is not None and "uid 4 is empty" in first and watch.deregistered
    assert watch.check(gone, log) is not None
    assert sum("DEREGISTERED" in r.getMessage() for r in caplog.records) == 1  # logged once
