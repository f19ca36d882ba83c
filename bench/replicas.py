"""Engine replicas on Ray Serve against the in-process engine, side by side in one run.

Measures on the tiny FLUX checkpoint (CPU, one torch thread per engine):
  - the in-process engine, requests one after another: seconds per request, requests/s;
  - one Ray replica, the same requests: the latency Ray's hop adds (pickling the request,
    the router, the replica's thread, the image and the states coming back);
  - two Ray replicas, the requests two at a time: throughput against one replica.

Every answer is checked against the in-process engine's bits (a replica that drifted
would make the figures meaningless).

    PYTHONPATH=. .venv/bin/python bench/replicas.py [--requests 12] [--size 128] [--steps 4]

Needs the ray extra (pip install 'niche[ray]'); starts a local Ray instance with 2 CPUs.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import time

from niche.protocol import GenerationParams


def _params(engine, n: int, size: int, steps: int) -> list[GenerationParams]:
    return [engine.resolve(GenerationParams(model="flux-schnell", prompt=f"a harbour {i}",
                                            seed=100 + i, width=size, height=size,
                                            steps=steps)) for i in range(n)]


def _run(engine, params: list[GenerationParams], parallel: int) -> tuple[float, list[float],
                                                                         list]:
    """(wall seconds, per-request seconds, results) with `parallel` requests in flight."""
    def one(p):
        started = time.perf_counter()
        out = engine.generate_with_states(p)
        return time.perf_counter() - started, out

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        done = list(pool.map(one, params))
    wall = time.perf_counter() - started
    return wall, [d[0] for d in done], [d[1] for d in done]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)

    import os

    import ray

    from niche.devnet.tiny import ensure_tiny_models
    from niche.models.engine import Engine
    from niche.models.ray_backend import RayConfig, RayEngine

    root = ensure_tiny_models()
    kwargs = {"models": ["flux-schnell"], "model_root": root, "device": "cpu",
              "num_threads": 1}
    local = Engine(**kwargs)
    params = _params(local, args.requests, args.size, args.steps)
    _run(local, params[:2], 1)  # warm-up: first calls allocate
    ray.init(num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False)
    rows = []
    try:
        wall, each, want = _run(local, params, 1)
        rows.append(("in-process engine", 1, 1, wall, each))
        for replicas, parallel in ((1, 1), (2, 2)):
            engine = RayEngine(kwargs, RayConfig(replicas=replicas, object_store_mb=256,
                                                 app_name=f"bench-{replicas}"))
            try:
                _run(engine, params[:2], parallel)  # warm-up on every replica
                wall, each, got = _run(engine, params, parallel)
                for (img, states), (want_img, want_states) in zip(got, want, strict=True):
                    if img.tobytes() != want_img.tobytes() or any(
                            not a.equal(b) for a, b in zip(states, want_states, strict=True)):
                        raise SystemExit("a replica's answer differs from the in-process "
                                         "engine's: the figures would mean nothing")
                rows.append((f"ray, {replicas} replica{'s' if replicas > 1 else ''}",
                             replicas, parallel, wall, each))
            finally:
                from ray import serve

                serve.delete(engine.config.app_name)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    cores = os.cpu_count()
    print(f"tiny flux-schnell {args.size}x{args.size}, {args.steps} steps, {args.requests} "
          f"requests, 1 torch thread per engine, {cores} cores (bits checked: identical)")
    print(f"{'engine':<20}{'replicas':>9}{'in flight':>10}{'req/s':>8}{'s/request':>11}"
          f"{'vs local':>10}")
    base = rows[0][3]
    for name, replicas, parallel, wall, each in rows:
        print(f"{name:<20}{replicas:>9}{parallel:>10}{len(each) / wall:>8.2f}"
              f"{statistics.median(each):>11.3f}{base / wall:>9.2f}x")
    hop = statistics.median(rows[1][4]) - statistics.median(rows[0][4])
    print(f"latency added by Ray's hop (1 replica vs in-process, median): {hop * 1000:.1f} ms "
          f"({hop / statistics.median(rows[0][4]):+.0%})")
    print(f"throughput, 2 replicas over 1: {rows[1][3] / rows[2][3]:.2f}x")


if __name__ == "__main__":
    main()
