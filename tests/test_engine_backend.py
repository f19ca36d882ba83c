"""The engine-backend flags and the pieces of the Ray backend that need no Ray instance:
flag checks, the one-line advice when Ray is missing, request deadlines across threads,
and the miner's concurrency from its engine. Fast: no model, no Ray (tests/test_ray_backend.py
runs the real replicas)."""
from __future__ import annotations

import sys
import threading
import time

import pytest

from niche.cli import build_parser
from niche.commands.miner import config_from_args
from niche.errors import ConfigError
from niche.miner.service import engine_concurrency
from niche.models.deadline import remaining_seconds, request_deadline


def _miner(*extra: str):
    return build_parser().parse_args(["miner", "--netuid", "3", "--axon.ip", "127.0.0.1",
                                      *extra])


def test_backend_flags_parse_with_local_defaults():
    args = _miner()
    assert (args.engine_backend, args.engine_replicas, args.engine_gpus_per_replica,
            args.engine_cpus_per_replica, args.ray_address) == ("local", 1, None, 1.0, None)
    args = _miner("--engine.backend", "ray", "--engine.replicas", "2",
                  "--engine.gpus_per_replica", "0.5", "--ray.address", "auto")
    assert (args.engine_backend, args.engine_replicas, args.engine_gpus_per_replica,
            args.ray_address) == ("ray", 2, 0.5, "auto")
    assert config_from_args(args).netuid == 3


@pytest.mark.parametrize("extra, message", [
    (("--engine.replicas", "2"), "need --engine.backend ray"),
    (("--ray.address", "auto"), "need --engine.backend ray"),
    (("--engine.backend", "ray", "--engine.replicas", "0"), "must be >= 1"),
])
def test_backend_flag_mistakes_are_one_line_errors(extra, message):
    with pytest.raises(ConfigError, match=message):
        config_from_args(_miner(*extra))


def test_missing_ray_says_how_to_install_it(monkeypatch):
    from niche.models import ray_backend

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'niche\[ray\]'"):
        ray_backend._ray()
    with pytest.raises(ConfigError, match="niche\\[ray\\]"):
        ray_backend.RayEngine({}, ray_backend.RayConfig())


def test_ray_config_refuses_nonsense():
    from niche.models.ray_backend import RayConfig

    with pytest.raises(ConfigError, match="replicas"):
        RayConfig(replicas=0)
    with pytest.raises(ConfigError, match="per_replica"):
        RayConfig(gpus_per_replica=-1)


def test_request_deadline_is_per_thread_and_nests():
    assert remaining_seconds() is None
    seen: list[float | None] = []
    with request_deadline(30.0):
        left = remaining_seconds()
        assert left is not None and 29.0 < left <= 30.0
        worker = threading.Thread(target=lambda: seen.append(remaining_seconds()))
        worker.start()
        worker.join()
        with request_deadline(-5.0):
            assert remaining_seconds() == 0.0
        assert remaining_seconds() > 29.0
    assert seen == [None] and remaining_seconds() is None
    with request_deadline(0.05):
        time.sleep(0.06)
        assert remaining_seconds() == 0.0


def test_concurrency_comes_from_the_engine():
    class Replicated:
        concurrency = 3

    class Odd:
        concurrency = "many"

    assert engine_concurrency(object()) == 1
    assert engine_concurrency(Replicated()) == 3
    assert engine_concurrency(Odd()) == 1


def test_localnet_passes_backend_flags_to_miner1(tiny_root, tmp_path, capsys):
    """`niche localnet --miner1-args "..."` runs miner1 with those flags (a Ray-backed
    miner among plain ones: docs/miner.md); the others keep the defaults."""
    import json

    from niche.cli import main

    assert main(["localnet", "--prepare-only", "--json", "--workdir", str(tmp_path / "ln"),
                 "--miners", "2", "--models", "flux-schnell", "--model-path", str(tiny_root),
                 "--miner1-args", "--engine.backend ray --engine.replicas 2"]) == 0
    plan = json.loads(capsys.readouterr().out)
    first, second = (p["args"] for p in plan["processes"] if p["role"] == "miner")
    assert first[-4:] == ["--engine.backend", "ray", "--engine.replicas", "2"]
    assert "--engine.backend" not in second
    parsed = build_parser().parse_args(first)
    assert (parsed.engine_backend, parsed.engine_replicas) == ("ray", 2)


def test_miner_reports_replicas_and_refuses_with_503_when_all_are_lost(tmp_path):
    """The miner's side of the backend contract over real HTTP: /healthz, /metrics and
    /v1/info show the engine's replicas; a generation lost with every replica is a 503
    `replicas_unavailable` and the miner keeps serving. The engine is the HTTP tests'
    StubEngine with the Ray engine's replica surface (tests/test_ray_backend.py runs the
    real one)."""
    import httpx
    from miner_support import StubEngine, build_net, make_request, running_miner, signed_post

    from niche.errors import EngineUnavailable
    from niche.models.ray_backend import ReplicaStats

    class Replicated(StubEngine):
        concurrency = 2

        def live_replicas(self):
            return 1

        def stats(self):
            return ReplicaStats(configured=2, up=1, busy=0, restarted=3,
                                states={"RUNNING": 1, "STARTING": 1})

        def resolve(self, params):
            if params.prompt == "lost early":
                raise EngineUnavailable("no replica answered the request's checks in time")
            return super().resolve(params)

        def generate_with_states(self, params, image=None):
            if params.prompt == "lost":
                raise EngineUnavailable("engine replica lost and none answered in time")
            return super().generate_with_states(params, image)

    net = build_net(tmp_path)
    with running_miner(net, Replicated()) as miner:
        assert miner.service.gate.slots == 2
        health = httpx.get(miner.url + "/healthz").json()
        assert health["ok"] is True
        assert health["replicas"] == {"configured": 2, "up": 1, "busy": 0, "restarted": 3}
        assert httpx.get(miner.url + "/v1/info").json()["concurrency"] == 1
        metrics = httpx.get(miner.metrics_url).text
        assert 'niche_miner_replicas{state="up"} 1.0' in metrics
        assert "niche_miner_replicas_restarted 3.0" in metrics
        lost = signed_post(miner, net.wallets["hi"],
                           make_request("lost").model_dump_json().encode())
        assert lost.status_code == 503 and lost.json()["reason"] == "replicas_unavailable"
        early = signed_post(miner, net.wallets["hi"],
                            make_request("lost early").model_dump_json().encode())
        assert early.status_code == 503 and "checks" in early.json()["detail"]
        fine = signed_post(miner, net.wallets["hi"],
                           make_request("a cat").model_dump_json().encode())
        assert fine.status_code == 200
