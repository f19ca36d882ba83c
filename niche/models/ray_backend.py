"""The `ray` engine backend: the same `Engine`, as a Ray Serve deployment with N replicas.

The miner's axon stays one process (auth, blacklist, limits, stake queue); only the engine
calls cross to the replicas, through a `DeploymentHandle`. Serve's router sends each call
to the less loaded of two replicas (power of two choices; with two replicas, the less
loaded one); each replica runs one generation at a time (the engine's lock), like one
GPU, while its cheap calls (resolve, check_image) run beside it. Every replica builds
`Engine` with the same arguments, thread count included, so it returns the local engine's
bits (tests/test_ray_backend.py).

A replica that dies mid-call is replaced by Serve's controller; the call is retried on a
live replica until the request's deadline (`niche.models.deadline`), then refused with
`EngineUnavailable` (the miner answers 503 `replicas_unavailable`).

Ray is an optional dependency (`pip install 'niche[ray]'`): imported only here, lazily.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from niche.errors import ConfigError, EngineUnavailable, NicheError
from niche.models.deadline import remaining_seconds
from niche.models.engine import ImageArg
from niche.models.spec import ModelSpec
from niche.protocol import GenerationParams, ModelInfo

log = logging.getLogger(__name__)

DEPLOYMENT = "NicheEngine"
GENERATIONS = frozenset({"generate", "generate_batch", "generate_with_states"})
"""The calls that hold a replica's GPU (what `busy` counts)."""
MAX_ONGOING = 4
"""Calls one replica holds at once: one generation plus the axon's cheap checks of the
next requests; the miner's queue keeps generations in flight at the replica count."""
STATUS_TTL = 2.0
"""Seconds a read of the replicas' states is reused (healthz, metrics and info ask often)."""


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ConfigError("--engine.backend ray needs Ray Serve: pip install 'niche[ray]' "
                          "(or pip install 'ray[serve]')") from None
    return ray, serve


STORE_MB_PER_REPLICA = 160
"""Object store per replica: room for one answer at the largest settings (~115 MiB)."""


@dataclass(frozen=True)
class RayConfig:
    """How many replicas, what each holds, and which Ray cluster runs them."""

    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    address: str | None = None
    """An existing cluster (`ray start --head`; "auto" or host:port); None: start a local
    Ray instance sized for the replicas."""
    app_name: str = "niche-engine"
    object_store_mb: int | None = None
    """Object store of a local Ray instance (images and states pass through it); None:
    `STORE_MB_PER_REPLICA` per replica, at least 256. A replica's answer at the largest
    settings (1536x1536, 50 FLUX.1-dev steps) is ~115 MiB of states and image, so four
    replicas answering together spilled a fixed 256 MiB store to disk."""
    retry_seconds: float = 30.0
    """How long a call is retried after a replica failure when no request deadline is set."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Environment for the replicas' processes (NICHE_NUM_THREADS travels this way)."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError("--engine.replicas must be >= 1")
        if self.gpus_per_replica < 0 or self.cpus_per_replica < 0:
            raise ConfigError("--engine.gpus_per_replica and cpus_per_replica must be >= 0")
        if self.object_store_mb is not None and self.object_store_mb < 78:
            raise ConfigError("--ray.object_store_mb must be >= 78 (Ray's own minimum)")

    def store_mb(self) -> int:
        """MiB of object store a local Ray instance gets."""
        if self.object_store_mb is not None:
            return self.object_store_mb
        return max(256, STORE_MB_PER_REPLICA * self.replicas)


class EngineReplica:
    """One replica: a plain `Engine` in its own Ray worker process. `call` runs one of the
    engine's methods and hands back (replica id, outcome): a refusal the caller can act on
    (InvalidRequest, ConfigError) travels as a value so it keeps its type and field."""

    def __init__(self, engine_kwargs: dict[str, Any]):
        from niche.models.engine import Engine

        self.engine = Engine(**engine_kwargs)
        self.pid = os.getpid()

    async def call(self, method: str, args: tuple, kwargs: dict) -> tuple[int, bool, Any]:
        """In a thread, so cheap calls (resolve, check_image) are not stuck behind a running
        generation; the engine's own lock keeps generations one at a time."""
        try:
            value = await asyncio.to_thread(getattr(self.engine, method), *args, **kwargs)
            return self.pid, True, value
        except NicheError as exc:
            return self.pid, False, exc

    async def describe(self) -> dict[str, Any]:
        """What the axon needs without a round trip per request: specs, dtypes, threads."""
        names = [m.model for m in self.engine.served()]
        return {"pid": self.pid, "served": self.engine.served(),
                "specs": {n: self.engine.spec(n) for n in names},
                "dtypes": {n: self.engine.compute_dtype(n) for n in names},
                "num_threads": self.engine.num_threads}


@dataclass
class ReplicaStats:
    """What /healthz and the metrics show of the replicas."""

    configured: int
    up: int
    busy: int
    restarted: int
    states: dict[str, int]


class RayEngine:
    """`ImageEngine` over a Ray Serve deployment of `Engine` (see the module docstring)."""

    def __init__(self, engine_kwargs: Mapping[str, Any], config: RayConfig):
        ray, serve = _ray()
        self.config = config
        self.concurrency = config.replicas
        self._started_ray = False
        if not ray.is_initialized():
            init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                    "runtime_env": {"env_vars": dict(config.env)}}
            if config.address:
                init["address"] = config.address
            else:
                # a busy machine can take more than Ray's default 30 s to start a raylet
                os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
                need = max(1, int(round(config.replicas * config.cpus_per_replica + 0.499)))
                init.update(num_cpus=need,
                            object_store_memory=config.store_mb() * 1024 * 1024)
            try:
                ray.init(**init)
            except ConnectionError as exc:
                raise ConfigError(f"--ray.address {config.address}: cannot reach the Ray "
                                  f"cluster ({exc}); start it with `ray start --head`") from None
            self._started_ray = not config.address
        options: dict[str, Any] = {"num_cpus": config.cpus_per_replica,
                                   "runtime_env": {"env_vars": dict(config.env)}}
        if config.gpus_per_replica:
            options["num_gpus"] = config.gpus_per_replica
        deployment = serve.deployment(
            EngineReplica, name=DEPLOYMENT, num_replicas=config.replicas,
            max_ongoing_requests=MAX_ONGOING, ray_actor_options=options,
            health_check_period_s=2.0, health_check_timeout_s=30.0,
            graceful_shutdown_timeout_s=5.0)
        serve.start(http_options={"location": "NoServer"})
        kwargs = {k: (str(v) if isinstance(v, Path) else v) for k, v in engine_kwargs.items()}
        log.info("starting %d engine replica(s) on Ray (%s cpu, %s gpu each)",
                 config.replicas, config.cpus_per_replica, config.gpus_per_replica)
        self.handle = serve.run(deployment.bind(kwargs), name=config.app_name,
                                route_prefix=None)
        about = self.handle.describe.remote().result()
        self._served: list[ModelInfo] = about["served"]
        self._specs: dict[str, ModelSpec] = about["specs"]
        self._dtypes: dict[str, str] = about["dtypes"]
        self.num_threads: int = about["num_threads"]
        self._lock = threading.Lock()
        self._busy = 0
        self._failures = 0
        self._pids: set[int] = {about["pid"]}
        self._replica_names: set[str] = set()
        """Every replica actor seen alive: beyond `replicas`, each one replaced a dead one."""
        self._status: tuple[float, dict[str, int]] | None = None
        self.replica_states()  # learn the first replicas' names, to count replacements

    # ---------------------------------------------------------------- dispatch
    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        _ray()
        from ray.exceptions import ActorUnavailableError, RayActorError

        lost: tuple[type[BaseException], ...] = (RayActorError, ActorUnavailableError)
        try:
            from ray.serve.exceptions import BackPressureError

            lost += (BackPressureError,)
        except ImportError:  # pragma: no cover - older Serve
            pass
        left = remaining_seconds()
        deadline = time.monotonic() + (self.config.retry_seconds if left is None else left)
        attempt = 0
        generation = method in GENERATIONS
        with self._lock:
            self._busy += generation
        try:
            while True:
                attempt += 1
                try:
                    response = self.handle.call.remote(method, args, kwargs)
                    pid, ok, value = response.result(
                        timeout_s=max(0.1, deadline - time.monotonic()))
                except lost as exc:
                    with self._lock:
                        self._failures += 1
                    self._status = None
                    if time.monotonic() >= deadline:
                        raise EngineUnavailable(
                            f"engine replica lost ({type(exc).__name__}) and no replica "
                            f"answered within the request's deadline ({attempt} tries)"
                        ) from None
                    log.warning("engine replica lost during %s (%s); retrying on another "
                                "replica", method, type(exc).__name__)
                    time.sleep(min(0.25 * attempt, 1.0))
                    continue
                except TimeoutError:
                    raise EngineUnavailable(f"no replica finished {method} within the "
                                            "request's deadline") from None
                with self._lock:
                    self._pids.add(pid)
                if not ok:
                    raise value
                return value
        finally:
            with self._lock:
                self._busy -= generation

    # ---------------------------------------------------------------- replicas
    def replica_states(self) -> dict[str, int]:
        """Replica count by Serve state (RUNNING, STARTING, ...), cached for STATUS_TTL."""
        now = time.monotonic()
        cached = self._status
        if cached is not None and now - cached[0] < STATUS_TTL:
            return cached[1]
        ray, serve = _ray()
        try:
            app = serve.status().applications[self.config.app_name]
            states = dict(app.deployments[DEPLOYMENT].replica_states)
            prefix = f"SERVE_REPLICA::{self.config.app_name}#{DEPLOYMENT}#"
            names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if str(a.get("name", "")).startswith(prefix)}
            with self._lock:
                self._replica_names |= names
        except Exception as exc:  # the controller is busy or gone: report nothing up
            log.warning("cannot read the replicas' states: %s", exc)
            states = {}
        self._status = (now, states)
        return states

    def stats(self) -> ReplicaStats:
        states = self.replica_states()
        with self._lock:
            busy, failures = self._busy, self._failures
            replaced = max(0, len(self._replica_names) - self.config.replicas)
        # a loss Serve retried by itself is seen only as a replacement replica
        return ReplicaStats(configured=self.config.replicas, up=int(states.get("RUNNING", 0)),
                            busy=min(busy, self.config.replicas),
                            restarted=max(failures, replaced),
                            states=states)

    @property
    def generating(self) -> int:
        """Generations dispatched to the replicas and not yet answered (no RPC)."""
        with self._lock:
            return self._busy

    def live_replicas(self) -> int:
        return int(self.replica_states().get("RUNNING", 0))

    def close(self) -> None:
        ray, serve = _ray()
        try:
            serve.delete(self.config.app_name)
            if self._started_ray:
                serve.shutdown()
        finally:
            if self._started_ray and ray.is_initialized():
                ray.shutdown()

    # ---------------------------------------------------------------- ImageEngine
    def spec(self, model: str) -> ModelSpec:
        from niche.models.engine import spec_served

        return spec_served(self._specs, model)

    def served(self) -> list[ModelInfo]:
        return list(self._served)

    def compute_dtype(self, model: str) -> str:
        self.spec(model)
        return self._dtypes[model]

    def resolve(self, params: GenerationParams) -> GenerationParams:
        return self._call("resolve", params)

    def check_image(self, params: GenerationParams, image: ImageArg) -> None:
        self._call("check_image", params, image)

    def generate(self, params: GenerationParams, image: ImageArg = None) -> PIL.Image.Image:
        return self._call("generate", params, image)

    def generate_batch(self, requests: Sequence[tuple[GenerationParams, ImageArg]],
                       fuse: bool | None = None) -> list[PIL.Image.Image]:
        return self._call("generate_batch", list(requests), fuse)

    def generate_with_states(self, params: GenerationParams, image: ImageArg = None
                             ) -> tuple[PIL.Image.Image, list[torch.Tensor]]:
        return self._call("generate_with_states", params, image)

    def decode_state(self, params: GenerationParams, state: torch.Tensor,
                     kernels: Mapping[str, str] | None = None) -> PIL.Image.Image:
        return self._call("decode_state", params, state, kernels)

    def kernels(self, model: str) -> dict[str, str]:
        return self._call("kernels", model)

    def initial_state(self, params: GenerationParams) -> torch.Tensor:
        return self._call("initial_state", params)

    def state_shape(self, params: GenerationParams) -> tuple[int, ...]:
        return self._call("state_shape", params)

    def recompute_steps(self, params: GenerationParams, image: ImageArg,
                        states: Mapping[int, torch.Tensor],
                        kernels: Mapping[str, str] | None = None) -> dict[int, torch.Tensor]:
        return self._call("recompute_steps", params, image, dict(states), kernels)
