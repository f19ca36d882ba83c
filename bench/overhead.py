"""What the node adds to a generation: the full signed path against a direct engine call,
measured side by side in one run on this machine.

The path: the validator's MinerClient signs the request -> HTTP POST on 127.0.0.1 -> the
miner's auth (bittensor http_auth), blacklist, rate limit, parse, stake queue -> engine
(with its sampler states) -> image encode, sha256, state commitment, answer signature
-> the body (protocol 4: binary, niche/wire.py, the image in RGB-ZSTD; protocol 3: JSON with
a base64 PNG) -> the client reads it, checks lengths, hash and signature and decodes the
image (niche/rawimage.py for RGB-ZSTD, Pillow for PNG).

The client is used as a validator round uses it: one event loop and one HTTP client for the
whole run (query_many shares one per round). A fresh event loop and httpx client for every
request, which the previous version of this bench did, costs 20-90 ms on this box (an SSL
context, a loop, a thread pool, a TCP connection): the box, not the path. (a) prints both.

(a) tiny model, 64x64, N requests as a validator's challenge is. Headline: each request's
    round trip over its own engine call (the miner times `generate_with_states` and says so in
    the answer's `generation_seconds`), the median of the N ratios and of the N differences.
    The tiny engine call varies by several ms from one call to the next on this box, so a
    ratio against a separate direct call carries that noise (+-0.03 over 150 pairs); against
    the same call it does not (the IQR is printed). Everything else the node does (resolve,
    auth, encode, hashes, signatures, both event loops, the thread hop) counts as added.
    Beside it, side by side: a direct `engine.generate_with_states` and the path for the
    same request back to back (the median of the N ratios), and the box's floor measured
    the same way as the headline: a bare FastAPI echo (no signing, no checks, the same
    uvicorn and HTTP client) around the same engine call in a worker thread. Last, the whole
    path around a replayed real answer (no engine time): back to back, and after 20 ms idle
    before each request. The two differ only in how cold this box's caches are when the
    path runs, which is what separates the path's own cost from the box's.
(b) 1024x1024: the same path around a stand-in engine that takes a fixed time (default
    1.0 s, what a GPU takes) and returns a 1024x1024 image (a real tiny-model generation
    upscaled, then photo-like content) and the states of a production answer:
    FLUX.1-schnell's 4 and FLUX.1-dev's 28 (1 MiB each; the most bytes any model commits),
    Kolors' 30 (256 KiB each), each handed over as its step ends, as
    `Engine.generate_with_states(on_state=...)` does; protocol 4
    (binary) and protocol 3 (JSON) interleaved; then each phase on the same payload, one at
    a time (the states' hashing, alone there, runs during the steps in the path).
(c) requests/second through the path at concurrency 1, 4 and 16 (tiny model), beside the
    direct engine's rate.
(d) an audit's states fetch at 1024x1024 for a 30-step Kolors answer (latent 1x4x128x128)
    and a 28-step FLUX.1-dev one (packed 1x4096x64): the states the Auditor's plan needs
    (step 0, the random steps it draws for N steps, x_N), in protocol 4 and protocol 3.

    .venv/bin/python bench/overhead.py [--requests 15] [--sleep 1.0] [--model flux-schnell]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from bittensor import resolve_signer
from fastapi import FastAPI, Request
from fastapi.responses import Response
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from image_codecs import median_ms  # noqa: E402  (bench/, on the path above)

from niche.auth import RequestVerifier, sign_request, sign_response, verify_response  # noqa: E402
from niche.chain.local import LocalChain  # noqa: E402
from niche.chain.wallets import create_wallet  # noqa: E402
from niche.devnet.servers import BackgroundServer  # noqa: E402
from niche.imaging import (  # noqa: E402
    ANSWER_FORMATS,
    ImageLimits,
    bytes_to_image,
    encode_image,
    image_sha256,
)
from niche.miner.server import create_app  # noqa: E402
from niche.miner.service import Answer, MinerConfig, MinerService  # noqa: E402
from niche.protocol import GenerateRequest, GenerateResponse, GenerationParams  # noqa: E402
from niche.states import commit  # noqa: E402
from niche.validator.client import MinerClient, QueryResult, QueryStatus  # noqa: E402
from niche.wire import pack_answer, unpack_answer  # noqa: E402

NETUID = 1
SIDE = 1024
FLUX_STATE = (1, 4096, 64)
KOLORS_STATE = (1, 4, 128, 128)
SCHNELL_STATES = ("FLUX.1-schnell, 4 steps", 4, FLUX_STATE)
DEV_STATES = ("FLUX.1-dev, 28 steps", 28, FLUX_STATE)
KOLORS_STATES = ("Kolors, 30 steps", 30, KOLORS_STATE)
"""(b)'s answers commit to the states of the subnet's production settings at 1024x1024:
FLUX's packed 1x4096x64 float32 latents (1 MiB each), schnell's 4 and FLUX.1-dev's 28 (the
most bytes any model commits), and Kolors' 30 of 1x4x128x128 (256 KiB each)."""


class FixedTimeEngine:
    """A stand-in for a GPU engine: takes `seconds`, answers a fixed image and fixed float32
    states. Only the node's own costs vary around it."""

    def __init__(self, real, seconds: float, image: Image.Image, states: list[torch.Tensor],
                 compute_dtype: str = "bfloat16"):
        self._real, self.seconds, self.image, self.states = real, seconds, image, states
        self._dtype = compute_dtype

    def __getattr__(self, name):
        return getattr(self._real, name)

    def resolve(self, params: GenerationParams) -> GenerationParams:
        return params.model_copy(update={"steps": len(self.states), "guidance": 0.0,
                                         "width": self.image.width,
                                         "height": self.image.height})

    def check_image(self, params, image) -> None:
        return None

    def compute_dtype(self, model: str) -> str:
        return self._dtype

    def generate_with_states(self, params, image=None, *, on_state=None):
        """As a GPU engine: each state is handed over as its step (seconds / N) ends. Each
        step ends on its own mark from the start, so the sleeps' overshoots do not add up
        (28 of them added 3-8 ms)."""
        started = time.perf_counter()
        for step, state in enumerate(self.states, start=1):
            left = started + self.seconds * step / len(self.states) - time.perf_counter()
            if left > 0:
                time.sleep(left)
            if on_state is not None:
                on_state(state)
        return self.image, list(self.states)


class ReplayEngine:
    """The real engine for everything but the generation, which answers a real answer (image
    and states) made once: the path's whole cost with no engine time in it ((a), warm and
    cold)."""

    def __init__(self, real, params: GenerationParams):
        self._real = real
        self.answer = real.generate_with_states(real.resolve(params))

    def __getattr__(self, name):
        return getattr(self._real, name)

    def generate_with_states(self, params, image=None):
        image_out, states = self.answer
        return image_out, list(states)


class CountingClient(MinerClient):
    """MinerClient that counts the body bytes it receives (for (d))."""

    received = 0

    async def _exchange(self, *args, **kwargs):
        status, media, raw = await super()._exchange(*args, **kwargs)
        self.received += len(raw)
        return status, media, raw


def _network(root: Path):
    wallets = {name: create_wallet(name, "hot", root / "wallets") for name in ("miner", "vali")}
    chain = LocalChain(root / "chain.db", create=True)
    chain.create_subnet(NETUID, max_validators=8, min_validator_stake=1.0)
    chain.register(NETUID, wallets["miner"])
    chain.register(NETUID, wallets["vali"], stake=1000.0)
    return chain, wallets


def _request(model: str, seed: int, version: int | None = None, **params) -> GenerateRequest:
    request = GenerateRequest(request_id=uuid.uuid4().hex, timeout=120.0,
                              params=GenerationParams(model=model, seed=seed,
                                                      prompt="a red circle on a blue "
                                                      "background", **params))
    if version is not None:
        request = request.model_copy(update={"protocol_version": version})
    return request


def _challenge(engine, model: str, seed: int) -> GenerateRequest:
    """A request as a validator's challenge is (validator/challenges.py): its parameters
    resolved by the model (size, steps, guidance explicit), so the validator knows the size
    it checks the answer against."""
    request = _request(model, seed)
    return request.model_copy(update={"params": engine.resolve(request.params)})


def _serve(engine, chain, wallets):
    config = MinerConfig(netuid=NETUID, requests_per_minute=0, max_queue=64,
                         max_inflight_per_ip=0)
    service = MinerService(engine, wallets["miner"], config, chain=chain)
    return service, BackgroundServer(create_app(service, refresh_metagraph=False)).start()


async def _answered(client: MinerClient, target, request, http) -> tuple[float, QueryResult]:
    """(seconds, result) of one query through the path; exits unless it answered OK in the
    request's protocol version."""
    started = time.perf_counter()
    result = await client.query(target, request, http=http)
    elapsed = time.perf_counter() - started
    if result.status is not QueryStatus.OK:
        raise SystemExit(f"the path failed: {result.status} {result.reason}")
    if result.response is None or result.response.protocol_version != request.protocol_version:
        raise SystemExit(f"asked in protocol {request.protocol_version}, answered in "
                         f"{result.response and result.response.protocol_version}")
    return elapsed, result


async def _timed_query(client: MinerClient, target, request, http) -> float:
    return (await _answered(client, target, request, http))[0]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


# ----------------------------------------------------------------------------- (a), (c)
async def tiny(engine, client: MinerClient, target, model: str, n: int) -> dict[str, list[float]]:
    """Interleaved, the same seed each: direct engine call, the path on the round's client
    (with the miner's own timing of the engine call inside it), the path with a fresh client
    per request (what the old bench paid, minus the loop)."""
    out: dict[str, list[float]] = {"direct": [], "path": [], "engine": [], "fresh": []}
    async with client._http() as http:
        for seed in range(3):  # warm-up: first calls allocate
            await _timed_query(client, target, _challenge(engine, model, seed), http)
        for i in range(n):
            request = _challenge(engine, model, 100 + i)
            started = time.perf_counter()
            engine.generate_with_states(engine.resolve(request.params))
            out["direct"].append(time.perf_counter() - started)
            elapsed, result = await _answered(client, target,
                                              _challenge(engine, model, 100 + i), http)
            out["path"].append(elapsed)
            assert result.response is not None  # _answered checked it
            out["engine"].append(result.response.generation_seconds)
            started = time.perf_counter()
            async with client._http() as own:
                await _timed_query(client, target, _challenge(engine, model, 100 + i), own)
            out["fresh"].append(time.perf_counter() - started)
    return out


def http_floor(engine, model: str, n: int) -> list[tuple[float, float]]:
    """(round trip, engine seconds) of a bare HTTP echo around the same engine call as (a)'s
    path, in a worker thread (a FastAPI echo under the same uvicorn, the same HTTP client
    library as MinerClient, bodies of the path's sizes; no signing, no checks): what any
    HTTP service around this engine costs on this box."""
    import aiohttp

    app = FastAPI()
    worker = ThreadPoolExecutor(1)
    params = _challenge(engine, model, 0).params

    def generate(seed: int) -> float:
        started = time.perf_counter()
        engine.generate_with_states(engine.resolve(params.model_copy(update={"seed": seed})))
        return time.perf_counter() - started

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        body = await request.body()
        seconds = await asyncio.get_running_loop().run_in_executor(worker, generate, len(body))
        return Response(b"x" * 2048, media_type="application/octet-stream",
                        headers={"x-engine-seconds": repr(seconds)})

    async def run() -> list[tuple[float, float]]:
        pairs = []
        async with aiohttp.ClientSession(trust_env=False) as http:
            for i in range(n + 3):
                started = time.perf_counter()
                async with http.post(server.url + "/echo", data=b"y" * (1536 + i)) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise SystemExit(f"the bare echo answered HTTP {resp.status}")
                    seconds = float(resp.headers["x-engine-seconds"])
                if i >= 3:
                    pairs.append((time.perf_counter() - started, seconds))
        return pairs

    with BackgroundServer(app) as server:
        result = asyncio.run(run())
    worker.shutdown()
    return result


def replayed_path(engine, chain, wallets, client: MinerClient, model: str, n: int
                  ) -> dict[str, float]:
    """Median ms of the whole path around ReplayEngine (no engine time): back to back (warm
    caches), and with 20 ms idle before each request, as the engine call leaves the node's
    threads (the box's caches go cold while they wait)."""
    replay = ReplayEngine(engine, _challenge(engine, model, 0).params)
    service, server = _serve(replay, chain, wallets)
    target = (1, service.hotkey, server.url)

    async def run(pause: float) -> float:
        times = []
        async with client._http() as http:
            for i in range(n + 3):
                if pause:
                    await asyncio.sleep(pause)
                elapsed = await _timed_query(client, target, _challenge(engine, model, i), http)
                if i >= 3:
                    times.append(elapsed)
        return statistics.median(times) * 1000

    try:
        return {"warm": asyncio.run(run(0.0)), "cold": asyncio.run(run(0.020))}
    finally:
        server.stop()
        service.close()


def per_call(totals: list[float], engine_seconds: list[float]) -> dict[str, float]:
    """Median ratio and added ms of round trips over their own engine calls, with the
    added time's interquartile range."""
    added = [t - e for t, e in zip(totals, engine_seconds, strict=True)]
    low, _, high = statistics.quantiles(added, n=4)
    return {"ratio": statistics.median(t / e for t, e in zip(totals, engine_seconds,
                                                             strict=True)),
            "added": statistics.median(added) * 1000, "low": low * 1000, "high": high * 1000,
            "engine": statistics.median(engine_seconds) * 1000,
            "total": statistics.median(totals) * 1000}


async def throughput(engine, client: MinerClient, target, model: str, concurrency: int,
                     total: int) -> float:
    queue = [_challenge(engine, model, 1000 + i) for i in range(total)]
    async with client._http() as http:
        async def worker() -> None:
            while queue:
                await _timed_query(client, target, queue.pop(), http)

        started = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return total / (time.perf_counter() - started)


# ----------------------------------------------------------------------------- (b)
async def big_path(client: MinerClient, target, model: str, n: int) -> dict[int, list[float]]:
    """Protocol 4 (`client`, RGB-ZSTD in a binary body) and 3 (a client that speaks only 3:
    a base64 PNG in JSON), interleaved. A client sends every request in the version it
    negotiated, so each version needs its own client."""
    clients = {4: client, 3: MinerClient(client.wallet, protocol_versions=(3,))}
    out: dict[int, list[float]] = {4: [], 3: []}
    async with client._http() as http:
        for version in (4, 3):
            await _timed_query(clients[version], target, _request(model, 1, version), http)
        for i in range(n):
            for version in (4, 3):
                out[version].append(await _timed_query(
                    clients[version], target, _request(model, 300 + i, version), http))
    return out


def phases(image: Image.Image, states: list[torch.Tensor], wallet, repeats: int
           ) -> list[tuple[str, float, float]]:
    """(phase, protocol 4 ms, protocol 3 ms) on one 1024x1024 answer, one at a time."""
    keypair = wallet.hotkey
    png, fast = encode_image(image), encode_image(image, "RGB-ZSTD")
    digest = image_sha256(png)
    commitment = commit(states, "bfloat16")
    signature = sign_response(keypair, "req-00000001", digest, commitment.digest())
    response = GenerateResponse(request_id="req-00000001", model="flux-schnell", image="",
                                image_sha256=digest, miner_hotkey=keypair.ss58_address,
                                signature=signature, generation_seconds=1.0,
                                miner_version="x", states=commitment)
    answer = Answer(response, png)
    binary = Answer(response.model_copy(update={"image_sha256": image_sha256(fast)}), fast,
                    "rgb-zstd").binary_body()
    text = answer.json_body()
    fast_limits = ImageLimits(formats=ANSWER_FORMATS)
    request_body = _request("flux-schnell", 1).model_dump_json().encode()
    verifier = RequestVerifier(keypair.ss58_address)
    signer = resolve_signer(wallet, role="hotkey")  # once, as MinerClient holds it

    def request_auth() -> None:
        headers = sign_request(signer, method="POST", path="/v1/generate", body=request_body,
                               receiver=keypair.ss58_address)
        verifier.verify(headers, request_body, method="POST", path="/v1/generate")

    def json_read() -> None:
        parsed = GenerateResponse.model_validate_json(text)
        import base64
        base64.b64decode(parsed.image, validate=True)

    app = FastAPI()

    @app.get("/v4")
    def v4() -> Response:
        return Response(binary, media_type="application/octet-stream")

    @app.get("/v3")
    def v3() -> Response:
        return Response(text, media_type="application/json")

    r = repeats
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url) as http:
        transfer4 = median_ms(lambda: http.get("/v4").content, r)
        transfer3 = median_ms(lambda: http.get("/v3").content, r)
    encode = median_ms(lambda: encode_image(image), r)
    encode4 = median_ms(lambda: encode_image(image, "RGB-ZSTD"), r)
    sha = median_ms(lambda: image_sha256(png), r)
    sha4 = median_ms(lambda: image_sha256(fast), r)
    decode = median_ms(lambda: bytes_to_image(png), r)
    decode4 = median_ms(lambda: bytes_to_image(fast, limits=fast_limits), r)
    sign = median_ms(lambda: sign_response(keypair, "req-00000001", digest,
                                            commitment.digest()), r)
    verify = median_ms(lambda: verify_response(keypair.ss58_address, "req-00000001", digest,
                                                signature, commitment.digest()), r)
    return [
        ("request signature + its check (auth)", *[median_ms(request_auth, r)] * 2),
        ("image encode (4: RGB-ZSTD / 3: PNG by fpng)", encode4, encode),
        ("sha256 of the image bytes", sha4, sha),
        (f"sha256 of {len(states)} states ({states[0].numel() * 4 / 2**20:g} MiB), in steps",
         *[median_ms(lambda: commit(states, "bfloat16"), r)] * 2),
        ("answer signature (sr25519)", sign, sign),
        ("body: binary pack / base64 + JSON dump",
         median_ms(lambda: pack_answer(response, fast, "rgb-zstd"), r),
         median_ms(answer.json_body, r)),
        ("HTTP transfer of the body (127.0.0.1)", transfer4, transfer3),
        ("body: unpack + header / JSON + base64 decode",
         median_ms(lambda: unpack_answer(binary), r), median_ms(json_read, r)),
        ("sha256 of the image bytes (validator)", sha4, sha),
        ("signature check", verify, verify),
        ("image decode, capped (RGB-ZSTD / Pillow PNG)", decode4, decode),
    ]


# ----------------------------------------------------------------------------- (d)
def audit_indices(n_steps: int, seed: int = 0) -> list[int]:
    from niche.validator.audit import random_steps_needed
    from niche.validator.steps import choose_steps, states_needed

    plan = choose_steps(random.Random(seed), n_steps, k=random_steps_needed(n_steps))
    return states_needed(plan, n_steps)


async def audit_fetch(engine, chain, wallets, label: str, shape: tuple[int, ...],
                      n_steps: int, repeats: int) -> None:
    states = [torch.randn(shape, generator=torch.Generator().manual_seed(i))
              for i in range(n_steps)]
    small = FixedTimeEngine(engine, 0.0, Image.new("RGB", (64, 64), (1, 2, 3)), states)
    service, server = _serve(small, chain, wallets)
    target = (1, service.hotkey, server.url)
    indices = audit_indices(n_steps)
    state_mib = states[0].numel() * 4 / 2**20
    print(f"    {label}: {n_steps} states of {'x'.join(map(str, shape))} "
          f"({state_mib:.2f} MiB each); the audit fetches {len(indices)}: {indices}")
    try:
        for version in (4, 3):
            client = CountingClient(wallets["vali"], protocol_versions=(version,))
            times, sizes = [], []
            for i in range(repeats + 1):
                async with client._http() as http:
                    result = await client.query(target, _request("flux-schnell", i), http=http)
                assert result.ok and result.response is not None, result.reason
                commitment = result.response.states
                assert commitment is not None
                client.received = 0
                started = time.perf_counter()
                fetched = await client.fetch_states(target, result.response.request_id,
                                                    commitment, indices)
                elapsed = time.perf_counter() - started
                if not fetched.ok:
                    raise SystemExit(f"states fetch failed: {fetched.reason}")
                if i:  # the first is a warm-up
                    times.append(elapsed)
                    sizes.append(client.received)
            print(f"      protocol {version}: {statistics.median(times) * 1000:7.1f} ms "
                  f"(median of {repeats}), {statistics.median(sizes) / 2**20:6.2f} MiB on the "
                  f"wire per audit ({len(indices) * state_mib:.2f} MiB of states)")
    finally:
        server.stop()
        service.close()


# ----------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=15, help="requests per measurement")
    parser.add_argument("--pairs", type=int, default=150,
                        help="(a): direct/path pairs; the tiny engine call varies by +-8 ms "
                        "between calls on a shared box, so 2 ms needs ~150 pairs (~15 s)")
    parser.add_argument("--sleep", type=float, default=1.0,
                        help="seconds the 1024x1024 stand-in engine takes (default 1.0)")
    parser.add_argument("--model", default="flux-schnell")
    parser.add_argument("--parts", default="abcd", help="which of (a)-(d) to run (default all)")
    args = parser.parse_args()

    from niche.models.quiet import quiet_libraries

    quiet_libraries()  # before the engine's imports: they warn about optional backends
    from niche.devnet.tiny import ensure_tiny_models
    from niche.models.engine import Engine

    engine = Engine(models=[args.model], model_root=ensure_tiny_models(), device="cpu")
    n = args.requests
    print(f"{os.cpu_count()} CPU(s), load average {_load()} at the start")
    with tempfile.TemporaryDirectory() as tmp:
        chain, wallets = _network(Path(tmp))
        client = MinerClient(wallets["vali"])

        # (a) tiny and (c) throughput
        if "a" in args.parts or "c" in args.parts:
            service, server = _serve(engine, chain, wallets)
            target = (1, service.hotkey, server.url)
            a = asyncio.run(tiny(engine, client, target, args.model, args.pairs))
            rates = {c: asyncio.run(throughput(engine, client, target, args.model, c, n * 2))
                     for c in (1, 4, 16)} if "c" in args.parts else {}
            server.stop()
            service.close()
        if "a" in args.parts:
            path = per_call(a["path"], a["engine"])
            d = statistics.median(a["direct"])
            paired = [p / x for p, x in zip(a["path"], a["direct"], strict=True)]
            paired_ms = statistics.median(
                p - x for p, x in zip(a["path"], a["direct"], strict=True)) * 1000
            floor = per_call(*zip(*http_floor(engine, args.model, args.pairs), strict=True))
            print(f"(a) tiny {args.model} 64x64, {args.pairs} requests as a validator's "
                  f"challenge, CPU {torch.get_num_threads()} thread(s)")
            print(f"    the engine call, timed inside the miner {path['engine']:8.1f} ms "
                  "(median)")
            print(f"    the validator's signed round trip       {path['total']:8.1f} ms")
            print(f"    ratio {path['ratio']:.3f}   added {path['added']:.1f} ms "
                  f"(IQR {path['low']:.1f}-{path['high']:.1f})   (target <= 1.10, < 10 ms)")
            print("      per request: the round trip over its own engine call (the answer's "
                  "generation_seconds); the median of the ratios")
            print(f"    side by side with a direct engine call: direct {d * 1000:.1f} ms, "
                  f"paired ratio {statistics.median(paired):.3f}, added "
                  f"{paired_ms:.1f} ms")
            print("      (the same request direct then through the path, back to back; the "
                  "engine's call-to-call noise stays in)")
            print(f"    with a new HTTP client per request (not the validator's path): "
                  f"{statistics.median(a['fresh']) * 1000:.1f} ms")
            print(f"    the box's floor, measured as the headline: a bare HTTP echo around "
                  f"the same engine call adds {floor['added']:.1f} ms "
                  f"(ratio {floor['ratio']:.3f}); the node's own work: "
                  f"{path['added'] - floor['added']:.1f} ms")
            replayed = replayed_path(engine, chain, wallets, client, args.model, args.pairs)
            print(f"    the whole path with no engine time (a real answer replayed): "
                  f"{replayed['warm']:.2f} ms back to back, {replayed['cold']:.2f} ms after "
                  f"20 ms idle")
            print("      (the same code and bytes; the difference is this box's caches going "
                  "cold while a thread waits, which the engine call does to every request)")
        if "b" in args.parts:
            big_answer(engine, chain, wallets, client, args.model, args.sleep, n)
        if "c" in args.parts:
            print(f"(c) requests/second through the signed path (tiny model; the engine "
                  f"alone: {1 / statistics.median(a['direct']):.1f}/s)")
            for c, rate in rates.items():
                print(f"    concurrency {c:>2}: {rate:6.1f} req/s")
        if "d" in args.parts:
            print("(d) an audit's states fetch at 1024x1024 (127.0.0.1)")
            for label, shape, steps in (("Kolors 30 steps", (1, 4, 128, 128), 30),
                                        ("FLUX.1-dev 28 steps", (1, 4096, 64), 28)):
                asyncio.run(audit_fetch(engine, chain, wallets, label, shape, steps,
                                        max(5, n // 3)))
        chain.close()
    print(f"load average {_load()} at the end")
    return 0


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def big_answer(engine, chain, wallets, client: MinerClient, model: str, sleep: float,
               n: int) -> None:
    """(b): for a smooth image (a tiny-model generation upscaled) and a photo-like one (1/f
    noise with edges, bench/image_codecs.py), the path around the stand-in, protocol 4 and 3
    interleaved, then each phase alone."""
    small = engine.generate(engine.resolve(_request(model, 7).params))
    smooth = small.resize((SIDE, SIDE), Image.Resampling.BICUBIC)
    from image_codecs import photo_like

    photo = Image.fromarray(photo_like())
    for content, image, states in (("tiny model upscaled", smooth, SCHNELL_STATES),
                                   ("photo-like", photo, SCHNELL_STATES),
                                   ("photo-like", photo, DEV_STATES),
                                   ("photo-like", photo, KOLORS_STATES)):
        _big_answer(engine, chain, wallets, client, model, sleep, n, content, image, states)


def _big_answer(engine, chain, wallets, client: MinerClient, model: str, sleep: float,
                n: int, content: str, big: Image.Image,
                states: tuple[str, int, tuple[int, ...]]) -> None:
    setting, steps, shape = states
    answer_states = [torch.randn(shape, generator=torch.Generator().manual_seed(i))
                     for i in range(steps)]
    state_mib = answer_states[0].numel() * 4 / 2**20
    stand_in = FixedTimeEngine(engine, sleep, big, answer_states)
    service, server = _serve(stand_in, chain, wallets)
    target = (1, service.hotkey, server.url)
    m = max(5, n // 2)
    runs = asyncio.run(big_path(client, target, model, m))
    server.stop()
    service.close()
    png, fast = encode_image(big), encode_image(big, "RGB-ZSTD")
    print(f"(b) 1024x1024 {content} answer (RGB-ZSTD {len(fast) / 2**20:.2f} MiB, PNG "
          f"{len(png) / 2**20:.2f} MiB; + commitment to "
          f"{steps} x {state_mib:g} MiB states, {setting}) around a {sleep:.2f} s stand-in, "
          f"{m} requests each, interleaved")
    for version, label in ((4, "protocol 4 (binary)"), (3, "protocol 3 (JSON)  ")):
        b = statistics.median(runs[version])
        print(f"    {label} {_ms(b)} (median)   ratio {b / sleep:.3f}   added "
              f"{(b - sleep) * 1000:.1f} ms")
    print("    target: the node adds < 30 ms")
    rows = phases(big, answer_states, wallets["miner"], 7)
    print(f"    each phase alone (median of 7)        {'protocol 4':>11} {'protocol 3':>11}")
    for name, v4, v3 in rows:
        print(f"      {name:<44} {v4:7.2f} ms  {v3:7.2f} ms")
    print(f"      {'sum':<44} {sum(r[1] for r in rows):7.2f} ms  "
          f"{sum(r[2] for r in rows):7.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
