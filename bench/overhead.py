"""What the node adds to a generation: the full signed path against a direct engine call,
measured side by side in one run on this machine.

The path: the validator's MinerClient signs the request -> HTTP POST on 127.0.0.1 -> the
miner's auth (bittensor http_auth), blacklist, rate limit, parse, stake queue -> engine
(with its sampler states) -> PNG encode, sha256, state commitment, answer signature -> the
client reads the body, decodes the PNG and checks hash and signature.

(a) tiny model, 64x64: median latency of the path / median of a direct
    `engine.generate_with_states` of the same request and dtype, and the milliseconds added.
(b) production payload, 1024x1024: the same path around a stand-in engine that sleeps a
    fixed time (default 1.0 s, what a GPU takes) and returns a 1024x1024 image and four
    FLUX-sized states (1 MiB each): what the node adds to a real GPU's answer. The image is
    a real generation of the tiny model upscaled, so PNG sees image-like content.
(c) requests/second through the path at concurrency 1, 4 and 16 (tiny model).

    .venv/bin/python bench/overhead.py [--requests 15] [--sleep 1.0] [--model flux-schnell]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from niche.chain.local import LocalChain  # noqa: E402
from niche.chain.wallets import create_wallet  # noqa: E402
from niche.devnet.servers import BackgroundServer  # noqa: E402
from niche.miner.server import create_app  # noqa: E402
from niche.miner.service import MinerConfig, MinerService  # noqa: E402
from niche.protocol import GenerateRequest, GenerationParams  # noqa: E402
from niche.validator.client import MinerClient, QueryStatus  # noqa: E402

NETUID = 1


class FixedTimeEngine:
    """A stand-in for a GPU engine: takes `seconds`, answers a fixed 1024x1024 image and
    four FLUX-sized float32 states. Only the node's own costs vary around it."""

    def __init__(self, real, seconds: float, image: Image.Image):
        self._real, self.seconds, self.image = real, seconds, image
        self.states = [torch.randn((1, 4096, 64), generator=torch.Generator().manual_seed(i))
                       for i in range(4)]

    def __getattr__(self, name):
        return getattr(self._real, name)

    def resolve(self, params: GenerationParams) -> GenerationParams:
        return params.model_copy(update={"steps": 4, "guidance": 0.0, "width": 1024,
                                         "height": 1024})

    def check_image(self, params, image) -> None:
        return None

    def generate_with_states(self, params, image=None):
        time.sleep(self.seconds)
        return self.image, list(self.states)


def _network(root: Path):
    wallets = {name: create_wallet(name, "hot", root / "wallets") for name in ("miner", "vali")}
    chain = LocalChain(root / "chain.db", create=True)
    chain.create_subnet(NETUID, max_validators=8, min_validator_stake=1.0)
    chain.register(NETUID, wallets["miner"])
    chain.register(NETUID, wallets["vali"], stake=1000.0)
    return chain, wallets


def _request(model: str, seed: int, **params) -> GenerateRequest:
    return GenerateRequest(request_id=uuid.uuid4().hex, timeout=120.0,
                           params=GenerationParams(model=model, prompt="a red circle on a blue "
                                                   "background", seed=seed, **params))


async def _path_latencies(client: MinerClient, target, requests) -> list[float]:
    out = []
    for request in requests:
        started = time.perf_counter()
        result = await client.query(target, request)
        out.append(time.perf_counter() - started)
        if result.status is not QueryStatus.OK:
            raise SystemExit(f"the path failed: {result.status} {result.reason}")
    return out


async def _throughput(client: MinerClient, target, model: str, concurrency: int,
                      total: int) -> float:
    queue = [_request(model, 1000 + i) for i in range(total)]

    async def worker() -> None:
        while queue:
            result = await client.query(target, queue.pop())
            if result.status is not QueryStatus.OK:
                raise SystemExit(f"throughput run failed: {result.status} {result.reason}")

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return total / (time.perf_counter() - started)


def _serve(engine, chain, wallets):
    config = MinerConfig(netuid=NETUID, requests_per_minute=0, max_queue=64,
                         max_inflight_per_ip=0)
    service = MinerService(engine, wallets["miner"], config, chain=chain)
    return service, BackgroundServer(create_app(service, refresh_metagraph=False)).start()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=15, help="requests per measurement")
    parser.add_argument("--sleep", type=float, default=1.0,
                        help="seconds the 1024x1024 stand-in engine takes (default 1.0)")
    parser.add_argument("--model", default="flux-schnell")
    args = parser.parse_args()

    from niche.devnet.tiny import ensure_tiny_models
    from niche.models.engine import Engine
    from niche.models.quiet import quiet_libraries

    quiet_libraries()
    engine = Engine(models=[args.model], model_root=ensure_tiny_models(), device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        chain, wallets = _network(Path(tmp))
        client = MinerClient(wallets["vali"])

        # (a) tiny: direct engine call vs the full path, interleaved per request
        service, server = _serve(engine, chain, wallets)
        target = (1, service.hotkey, server.url)
        for seed in range(2):  # warm-up: first calls allocate
            asyncio.run(_path_latencies(client, target, [_request(args.model, seed)]))
        direct, path = [], []
        for i in range(args.requests):
            request = _request(args.model, 100 + i)
            started = time.perf_counter()
            engine.generate_with_states(engine.resolve(request.params))
            direct.append(time.perf_counter() - started)
            path += asyncio.run(_path_latencies(client, target, [_request(args.model, 200 + i)]))
        d, p = statistics.median(direct), statistics.median(path)
        print(f"(a) tiny {args.model} 64x64, {args.requests} requests, CPU "
              f"{torch.get_num_threads()} thread(s)")
        print(f"    direct engine   {d * 1000:8.1f} ms (median)")
        print(f"    signed path     {p * 1000:8.1f} ms (median)")
        print(f"    ratio {p / d:.3f}   added {(p - d) * 1000:.1f} ms   (target <= 1.10, < 10 ms)")

        rates = {c: asyncio.run(_throughput(client, target, args.model, c, args.requests * 2))
                 for c in (1, 4, 16)}
        server.stop()
        service.close()

        # (b) 1024x1024 payload around a fixed-time stand-in
        small = engine.generate(engine.resolve(_request(args.model, 7).params))
        big = small.resize((1024, 1024), Image.Resampling.BICUBIC)
        stand_in = FixedTimeEngine(engine, args.sleep, big)
        service, server = _serve(stand_in, chain, wallets)
        target = (1, service.hotkey, server.url)
        asyncio.run(_path_latencies(client, target, [_request(args.model, 1)]))
        n = max(3, args.requests // 3)
        big_path = asyncio.run(_path_latencies(
            client, target, [_request(args.model, 300 + i) for i in range(n)]))
        server.stop()
        service.close()
        b = statistics.median(big_path)
        print(f"(b) 1024x1024 answer (PNG + 4 x 1 MiB state commitment) around a "
              f"{args.sleep:.2f} s stand-in, {n} requests")
        print(f"    signed path     {b * 1000:8.1f} ms (median)")
        print(f"    ratio {b / args.sleep:.3f}   added {(b - args.sleep) * 1000:.1f} ms   "
              f"(target <= 1.05, < 50 ms)")
        print("(c) requests/second through the signed path (tiny model)")
        for c, rate in rates.items():
            print(f"    concurrency {c:>2}: {rate:6.1f} req/s")
        chain.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
