"""Bounded loopback load through the gateway, side by side with calling the miner directly.

Builds a throw-away subnet in this process (LocalChain file, real wallets, one real miner
server on the tiny FLUX checkpoint, the real gateway app), then `--clients` clients each
send `--requests` pairs back to back: the same kind of request once straight to the miner
with the validator's MinerClient (signed, verified) and once through the gateway's OpenAI
endpoint (key, routing, signing, verification, b64 answer). Interleaving the two arms in
one run puts both under the same machine load.

Printed: per arm sent / ok / lost, p50 / p99 latency; the gateway's added latency as
p99(gateway) - p99(direct) and as the p50 / p99 of (gateway total - its miner leg) per
request. Target: lost = 0 on both arms.

    .venv/bin/python bench/gateway_load.py [--requests 20] [--clients 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _client(index: int, n: int, gw_url: str, key: str, miner, client, out: dict) -> None:
    from niche.protocol import GenerateRequest, GenerationParams

    async with httpx.AsyncClient(timeout=120, trust_env=False) as http:
        for i in range(n):
            seed = index * 100_000 + i
            request = GenerateRequest(request_id=uuid.uuid4().hex, params=GenerationParams(
                model="flux-schnell", prompt="a lighthouse at dusk", seed=seed, steps=4,
                guidance=0.0, width=64, height=64), timeout=60)
            started = time.perf_counter()
            result = await client.query(miner, request)
            out["direct"].append(time.perf_counter() - started if result.ok else None)
            started = time.perf_counter()
            try:
                resp = await http.post(gw_url + "/v1/images/generations", headers={
                    "Authorization": f"Bearer {key}"}, json={
                    "model": "flux-schnell", "prompt": "a lighthouse at dusk", "size": "64x64",
                    "seed": seed + 50_000})
                total = time.perf_counter() - started
                ok = resp.status_code == 200
                out["gateway"].append(total if ok else None)
                if ok:
                    out["overhead"].append(total - resp.json()["data"][0]["seconds"])
                else:
                    out["errors"].append(resp.text[:200])
            except httpx.HTTPError as exc:
                out["gateway"].append(None)
                out["errors"].append(repr(exc))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20, help="pairs per client (20)")
    parser.add_argument("--clients", type=int, default=2, help="concurrent clients (2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures")
    args = parser.parse_args(argv)

    from niche.chain.local import LocalChain
    from niche.chain.wallets import create_wallet
    from niche.devnet.servers import BackgroundServer
    from niche.devnet.tiny import ensure_tiny_models
    from niche.gateway.app import create_app as gateway_app
    from niche.gateway.service import GatewayConfig, build_gateway
    from niche.miner.server import create_app as miner_app
    from niche.miner.service import MinerConfig, MinerService
    from niche.models.engine import Engine
    from niche.validator.client import MinerClient, MinerTarget

    root = Path(tempfile.mkdtemp(prefix="niche-gwload-"))
    tiny = ensure_tiny_models()
    wallets = {n: create_wallet(n, "hot", root / "wallets") for n in ("validator", "miner")}
    chain = LocalChain(root / "chain.db", create=True)
    chain.create_subnet(1, max_validators=4, min_validator_stake=1.0)
    chain.register(1, wallets["validator"], stake=1000.0)
    uid = chain.register(1, wallets["miner"])
    engine = Engine(models=["flux-schnell"], model_root=tiny, device="cpu")
    service = MinerService(engine, wallets["miner"], MinerConfig(
        netuid=1, requests_per_minute=0, max_inflight_per_ip=0,
        allow_hotkeys=(wallets["validator"].hotkey.ss58_address,)), chain=chain)
    out: dict[str, list] = {"direct": [], "gateway": [], "overhead": [], "errors": []}
    with BackgroundServer(miner_app(service, refresh_metagraph=False)) as miner:
        service.announce("127.0.0.1", miner.port)
        gateway = build_gateway(chain, wallets["validator"], 1, models=["flux-schnell"],
                                db_path=root / "gw.sqlite", queue_path=root / "organic.sqlite",
                                validator_state=None, model_root=tiny,
                                config=GatewayConfig(audit_fraction=0.1))
        key, _ = gateway.keys.create("bench", per_minute=100_000, per_day=1_000_000)
        with BackgroundServer(gateway_app(gateway)) as gw:
            client = MinerClient(wallets["validator"])
            target = MinerTarget(uid, service.hotkey, miner.url)

            async def run() -> None:
                await _client(99, 1, gw.url, key, target, client, {  # warm-up, not counted
                    "direct": [], "gateway": [], "overhead": [], "errors": []})
                await asyncio.gather(*[_client(i, args.requests, gw.url, key, target, client,
                                               out) for i in range(args.clients)])

            started = time.perf_counter()
            asyncio.run(run())
            seconds = time.perf_counter() - started
    service.close()
    chain.close()

    figures: dict = {"clients": args.clients, "seconds": round(seconds, 1)}
    for arm in ("direct", "gateway"):
        ok = [v for v in out[arm] if v is not None]
        figures[arm] = {"sent": len(out[arm]), "ok": len(ok), "lost": len(out[arm]) - len(ok),
                        "p50": round(_p(ok, 0.5), 4), "p99": round(_p(ok, 0.99), 4),
                        "mean": round(statistics.fmean(ok), 4) if ok else None}
    figures["added_p99"] = round(figures["gateway"]["p99"] - figures["direct"]["p99"], 4)
    figures["overhead_p50"] = round(_p(out["overhead"], 0.5), 4)
    figures["overhead_p99"] = round(_p(out["overhead"], 0.99), 4)
    print(f"gateway load: {args.clients} clients x {args.requests} pairs in {seconds:.1f}s "
          "(tiny flux-schnell 64x64, 4 steps, one miner, loopback)")
    print(f"{'arm':<9} {'sent':>5} {'ok':>5} {'lost':>5} {'p50 s':>8} {'p99 s':>8}")
    for arm in ("direct", "gateway"):
        f = figures[arm]
        print(f"{arm:<9} {f['sent']:>5} {f['ok']:>5} {f['lost']:>5} {f['p50']:>8.3f} "
              f"{f['p99']:>8.3f}")
    print(f"added by the gateway: p99 {figures['added_p99'] * 1000:+.0f} ms (p99 gateway - "
          f"p99 direct); per request (total - miner leg) p50 "
          f"{figures['overhead_p50'] * 1000:.0f} ms, p99 {figures['overhead_p99'] * 1000:.0f} ms")
    for error in out["errors"][:5]:
        print("  error:", error)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    lost = figures["direct"]["lost"] + figures["gateway"]["lost"]
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
