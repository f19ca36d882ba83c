"""Killing the miner a request was routed to, mid-generation, still gets the user an image:
two real `niche miner` processes on a real local chain, SIGKILL to the busy one."""
from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from gateway_support import NETUID, Gate, Only, make_chain, running_gateway, running_miners
from PIL import Image

from niche.devnet.localnet.supervisor import free_port

NICHE = [str(Path(sys.executable).with_name("niche"))]


def _miner(net, name: str, port: int, tiny_root: Path, log: Path) -> subprocess.Popen:
    args = ["miner", "--netuid", str(NETUID), "--subtensor.network", "localnet",
            "--localnet.path", str(net.root / "chain.db"), "--wallet.name", name,
            "--wallet.hotkey", "hot", "--wallet.path", str(net.root / "wallets"),
            "--axon.ip", "127.0.0.1", "--axon.port", str(port), "--model", "flux-schnell",
            "--model-path", str(tiny_root), "--blacklist.allow_hotkeys", net.validator_hotkey,
            "--limits.requests_per_minute", "0"]
    return subprocess.Popen(NICHE + args, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _wait_up(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "miner exited while starting"
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not up after {timeout}s")


def _busy(url: str) -> bool:
    """The miner is generating (its /healthz counts generations running)."""
    try:
        return httpx.get(url + "/healthz", timeout=1).json()["busy"] >= 1
    except (httpx.HTTPError, ValueError, KeyError):
        return False


@pytest.mark.slow
def test_killing_the_routed_miner_mid_request_still_delivers(tmp_path, tiny_root):
    net = make_chain(tmp_path, miners=2)
    ports = {name: free_port() for name in ("miner1", "miner2")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    procs = {name: _miner(net, name, ports[name], tiny_root, tmp_path / f"{name}.log")
             for name in ports}
    try:
        for name in procs:
            _wait_up(urls[name], procs[name])
        with running_gateway(net, tiny_root, models=("flux-schnell",),
                             expect_miners=2) as gw:
            assert gw.gateway.directory.counts() == {"flux-schnell": 2}
            client = openai.OpenAI(api_key=gw.key, base_url=gw.base_url, max_retries=0)
            answers: list = []
            request = threading.Thread(target=lambda: answers.append(
                client.images.generate(model="flux-schnell", prompt="a lighthouse",
                                       size="128x128", extra_body={"steps": 8, "seed": 5})))
            request.start()
            killed = None
            deadline = time.monotonic() + 60
            while killed is None and time.monotonic() < deadline and request.is_alive():
                for name, url in urls.items():
                    if _busy(url):
                        procs[name].send_signal(signal.SIGKILL)
                        procs[name].wait(10)
                        killed = name
                        break
            request.join(120)
            assert killed is not None, "no miner was seen generating"
            assert answers, "the request failed after its miner was killed"
            item = answers[0].data[0]
            survivor = next(n for n in urls if n != killed)
            assert item.miner_hotkey == net.wallets[survivor].hotkey.ss58_address
            assert item.attempts == 2
            assert Image.open(io.BytesIO(base64.b64decode(item.b64_json))).size == (128, 128)
            metrics = gw.gateway.metrics.render().decode()  # what --metrics.port serves
            assert 'niche_gateway_retries_total{model="flux-schnell"} 1.0' in metrics
            assert 'niche_gateway_miner_failures_total{status="unreachable"} 1.0' in metrics
            # the dead miner is in cooldown: the next request goes straight to the survivor
            again = client.images.generate(model="flux-schnell", prompt="x", size="64x64")
            assert again.data[0].attempts == 1
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)
        net.chain.close()


def test_a_slow_miner_is_hedged_and_the_first_good_answer_wins(tmp_path, tiny_engine,
                                                               tiny_root):
    net = make_chain(tmp_path, miners=2)
    slow = Gate(tiny_engine, "flux-schnell")
    fast = Only(tiny_engine, "flux-schnell")
    try:
        with running_miners(net, {"miner1": slow, "miner2": fast}), \
                running_gateway(net, tiny_root, models=("flux-schnell",),
                                hedge_after=0.5, expect_miners=2) as gw:
            gw.gateway.router.order = lambda model: sorted(  # the slow miner first
                gw.gateway.directory.serving(model), key=lambda c: c.target.uid)
            client = openai.OpenAI(api_key=gw.key, base_url=gw.base_url, max_retries=0)
            item = client.images.generate(model="flux-schnell", prompt="hedged").data[0]
            assert slow.waiting.is_set()
            assert item.miner_uid == net.uids["miner2"] and item.attempts == 2
            metrics = gw.gateway.metrics.render().decode()  # what --metrics.port serves
            assert 'niche_gateway_hedges_total{model="flux-schnell"} 1.0' in metrics
    finally:
        slow.open.set()
    net.chain.close()


def test_deadline_and_all_failed_are_504_and_502(tmp_path, tiny_engine, tiny_root):
    net = make_chain(tmp_path, miners=2)
    hung, broken = Gate(tiny_engine, "flux-schnell"), Gate(tiny_engine, "flux-schnell", True)
    try:
        with running_miners(net, {"miner1": hung, "miner2": broken}), \
                running_gateway(net, tiny_root, models=("flux-schnell",),
                                expect_miners=2) as gw:
            client = openai.OpenAI(api_key=gw.key, base_url=gw.base_url, max_retries=0)
            with pytest.raises(openai.APIStatusError) as caught:
                client.images.generate(model="flux-schnell", prompt="x",
                                       extra_body={"timeout": 2.0})
            assert caught.value.status_code == 504
            assert caught.value.body["code"] == "deadline_exceeded"
            hung.broken = True  # now both fail fast: every miner failed, before the deadline
            hung.open.set()
            gw.gateway.router.cooldown = 0.0
            with pytest.raises(openai.APIStatusError) as caught:
                client.images.generate(model="flux-schnell", prompt="y")
            assert caught.value.status_code == 502
            assert caught.value.body["code"] == "all_miners_failed"
            assert "http_error" in caught.value.body["message"]
    finally:
        hung.open.set()
    net.chain.close()
