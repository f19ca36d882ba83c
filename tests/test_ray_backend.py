"""The Ray Serve engine backend on the real path: a local Ray instance (2 CPUs, small object
store, no dashboard), two replicas of the real Engine on the tiny FLUX checkpoint, the real
miner app on 127.0.0.1, a real validator round against it, and a replica process killed
with SIGKILL in the middle of two requests.

One Ray instance for the module (starting one takes most of a minute on the 2-core box).
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import httpx
import pytest
import torch

pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install "
                                        "'niche[ray]'")

from miner_support import build_net, make_request, running_miner  # noqa: E402

from niche.models.engine import Engine  # noqa: E402
from niche.protocol import GenerationParams  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "flux-schnell"


@pytest.fixture(scope="module")
def ray_engine(tiny_root, tiny_engine):
    """Two replicas with the session engine's thread count (the validator's audits use it)."""
    from niche.models.ray_backend import RayConfig, RayEngine

    engine = RayEngine({"models": [MODEL], "model_root": tiny_root, "device": "cpu",
                        "num_threads": tiny_engine.num_threads},
                       RayConfig(replicas=2, cpus_per_replica=1.0, object_store_mb=128,
                                 app_name="niche-test"))
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def local_engine(tiny_root, ray_engine):
    """The in-process engine with the replicas' thread count: the bits to match."""
    return Engine(models=[MODEL], model_root=tiny_root, device="cpu",
                  num_threads=ray_engine.num_threads)


def _replica_pids(engine, want: int = 2, tries: int = 60) -> set[int]:
    """The replicas' process ids (Serve's router picks an idle replica at random)."""
    pids: set[int] = set()
    for _ in range(tries):
        pids.add(engine.handle.describe.remote().result()["pid"])
        if len(pids) >= want:
            break
    return pids


def _post(miner, wallet, request) -> httpx.Response:
    """A signed generate request with a timeout that outlasts a replica's replacement."""
    from niche.auth import sign_request

    body = request.model_dump_json().encode()
    headers = sign_request(wallet, method="POST", path="/v1/generate", body=body,
                           receiver=miner.hotkey)
    return httpx.post(miner.url + "/v1/generate", content=body, timeout=180,
                      headers={**headers, "Content-Type": "application/json"})


def _wait(predicate, timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"{what} not within {timeout:.0f}s")


def test_every_replica_gives_the_local_engines_bits(ray_engine, local_engine):
    params = [ray_engine.resolve(GenerationParams(model=MODEL, prompt=f"a red fox {i}",
                                                  seed=11 + i)) for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # both replicas at work
        remote = list(pool.map(ray_engine.generate_with_states, params))
    assert len(ray_engine._pids) >= 2, "both replicas should have answered"
    for p, (image, states) in zip(params, remote, strict=True):
        want_image, want_states = local_engine.generate_with_states(p)
        assert image.tobytes() == want_image.tobytes()
        assert len(states) == len(want_states) == p.steps
        assert all(torch.equal(a, b) for a, b in zip(states, want_states, strict=True))
    # the axon's checks cross too, with their field
    from niche.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as caught:
        ray_engine.resolve(GenerationParams(model=MODEL, prompt="x", seed=1, steps=99))
    assert caught.value.field == "steps"
    assert ray_engine.compute_dtype(MODEL) == local_engine.compute_dtype(MODEL)
    assert ray_engine.num_threads == local_engine.num_threads


def test_killing_a_replica_mid_request_loses_no_request(ray_engine, local_engine, tmp_path):
    net = build_net(tmp_path)
    pids = _replica_pids(ray_engine)
    assert len(pids) == 2
    restarted_before = ray_engine.stats().restarted
    requests = [make_request(f"a lighthouse {i}", seed=70 + i, model=MODEL, width=128,
                             height=128, steps=8, timeout=120.0) for i in range(4)]
    with running_miner(net, ray_engine) as miner:
        assert miner.service.concurrency == 2 and miner.service.gate.slots == 2
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(_post, miner, net.wallets["hi"], r) for r in requests]
            # both replicas generating (one each: the router picks the less loaded one)
            _wait(lambda: ray_engine.generating == 2 or any(f.done() for f in futures), 60,
                  "two generations on the replicas", poll=0.005)
            assert not any(f.done() for f in futures), [f.result().text for f in futures
                                                        if f.done()]
            victim = sorted(pids)[0]
            os.kill(victim, signal.SIGKILL)
            answers = [f.result(timeout=240) for f in futures]
        assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
        for request, answer in zip(requests, answers, strict=True):
            body = answer.json()
            want, _ = local_engine.generate_with_states(ray_engine.resolve(request.params))
            import base64
            import hashlib
            import io

            from PIL import Image

            got = Image.open(io.BytesIO(base64.b64decode(body["image"]))).convert("RGB")
            assert got.tobytes() == want.tobytes()
            assert body["image_sha256"] == hashlib.sha256(base64.b64decode(body["image"])
                                                          ).hexdigest()
        # Serve notices the death (health checks), replaces the replica and /healthz counts it;
        # the miner keeps serving meanwhile. Right after the answers Serve may still list the
        # dead replica as running, so wait for the replacement itself, then for both up.
        def replicas() -> dict:
            return httpx.get(miner.url + "/healthz", timeout=30).json()["replicas"]

        _wait(lambda: replicas()["restarted"] > restarted_before, 180, "the replica replaced")
        _wait(lambda: replicas()["up"] == 2, 180, "the replaced replica up")
        assert replicas()["configured"] == 2
        assert victim not in _replica_pids(ray_engine)
        metrics = httpx.get(miner.metrics_url, timeout=30).text
        assert 'niche_miner_replicas{state="up"} 2.0' in metrics
        assert "niche_miner_replicas_restarted" in metrics
        info = httpx.get(miner.url + "/v1/info", timeout=30).json()
        assert info["concurrency"] == 2


def test_ray_miner_serves_a_validator_round(ray_engine, tiny_engine, tmp_path):
    """Done-when: a miner with two Ray replicas answers a validator's round, its volume
    probe included, and every answer passes the step-check audit."""
    from niche.chain.local import LocalChain
    from niche.chain.wallets import create_wallet
    from niche.devnet.servers import BackgroundServer
    from niche.miner.server import create_app
    from niche.miner.service import MinerConfig, MinerService
    from niche.validator.client import MinerClient
    from niche.validator.service import Validator, ValidatorConfig
    from niche.validator.state import ValidatorState

    assert tiny_engine.num_threads == ray_engine.num_threads
    # a replica replaced by an earlier test (or a health check lagging on a loaded box) may
    # not be RUNNING yet: the miner then rightly declares one; this round wants both
    _wait(lambda: ray_engine.live_replicas() == 2, 180, "both replicas running")
    wallets = {n: create_wallet(n, "hot", tmp_path / "wallets") for n in ("validator", "ray")}
    chain = LocalChain(tmp_path / "chain.db", create=True)
    chain.create_subnet(1, weights_rate_limit=2, max_validators=4)
    chain.register(1, wallets["validator"], stake=100.0)
    uid = chain.register(1, wallets["ray"])
    service = MinerService(ray_engine, wallets["ray"], MinerConfig(netuid=1,
                                                                   requests_per_minute=0),
                           chain=chain)
    server = BackgroundServer(create_app(service, refresh_metagraph=False)).start()
    try:
        service.announce("127.0.0.1", server.port)
        config = ValidatorConfig(netuid=1, models=(MODEL,), rounds=1, seed=5,
                                 state_path=tmp_path / "state.db", audit_fraction=1.0,
                                 epoch_length=1000, round_interval=0, info_timeout=30.0)
        validator = Validator(config, chain, wallets["validator"], tiny_engine,
                              MinerClient(wallets["validator"]), ValidatorState(
                                  config.state_path))
        assert validator.run() == 0
    finally:
        server.stop()
        service.close()
        chain.close()
    (report,) = validator.reports
    (outcome,) = [o for o in report.outcomes if o.uid == uid]
    table = validator.format_report(report)
    assert outcome.status == "ok" and outcome.audit_passed, table
    assert outcome.probes == 2 and outcome.verified == 2, table
    assert report.rewards[uid] > 0, table
    assert json.dumps(report.rewards)  # plain numbers, as persisted
