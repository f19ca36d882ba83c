"""Bounded load test of a real miner process: does it answer everything, stay fast and keep
its memory flat under sustained signed traffic (and some hostile junk)?

It builds a throw-away local network (LocalChain file + real bittensor wallets), starts
`niche miner` as a subprocess on tiny checkpoints, allow-lists the client wallets, then runs
`--clients` signed clients back to back for `--seconds`, each through the validator's own
MinerClient (signature, sha256 and image of every answer verified). `--junk-clients` more
send unsigned, forged and malformed requests at the same time; every one must be refused.

Printed: requests answered / refused (429, 503) / lost (no answer, connection error) /
invalid (an answer that failed verification), p50/p99 latency of answered requests, and
the miner's resident memory after warm-up and at the end. Targets: lost = 0, invalid = 0,
memory growth <= 10 %.

    .venv/bin/python bench/load.py [--seconds 120] [--clients 4] [--junk-clients 1]
                                   [--model flux-schnell] [--model-path DIR]
                                   [--requests-per-minute 0] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
NETUID = 1
REFUSED = {429, 503}


@dataclass
class Tally:
    answered: int = 0
    refused: int = 0
    lost: int = 0
    invalid: int = 0
    junk_sent: int = 0
    junk_refused: int = 0
    junk_accepted: int = 0
    junk_lost: int = 0
    latencies: list[float] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)

    def note(self, reason: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def build_network(root: Path, clients: int):
    from niche.chain.local import LocalChain
    from niche.chain.wallets import create_wallet

    wallets = root / "wallets"
    miner = create_wallet("miner", "hot", wallets)
    callers = [create_wallet(f"client{i}", "hot", wallets) for i in range(clients)]
    chain = LocalChain(root / "chain.db", create=True)
    chain.create_subnet(NETUID)
    chain.register(NETUID, miner)
    chain.close()
    return miner, callers


def start_miner(root: Path, args, port: int, allow: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "niche.cli", "miner", "--netuid", str(NETUID),
           "--subtensor.network", "localnet", "--localnet.path", str(root / "chain.db"),
           "--wallet.name", "miner", "--wallet.hotkey", "hot",
           "--wallet.path", str(root / "wallets"), "--axon.ip", "127.0.0.1",
           "--axon.port", str(port), "--model", args.model, "--model-path", str(args.model_path),
           "--device", "cpu", "--limits.requests_per_minute", str(args.requests_per_minute),
           "--blacklist.allow_hotkeys", *allow]
    log = open(root / "miner.log", "w")  # noqa: SIM115 - the miner process owns it
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"miner exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"miner not ready after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def make_request(model: str, seed: int):
    from niche.protocol import GenerateRequest, GenerationParams

    return GenerateRequest(request_id=uuid.uuid4().hex,
                           params=GenerationParams(model=model, prompt=f"load test {seed}",
                                                   seed=seed), timeout=30.0)


async def signed_client(client, target, model: str, stop: float, tally: Tally, base: int):
    from niche.validator.client import QueryStatus

    seed = base
    async with client._http() as http:
        while time.monotonic() < stop:
            seed += 1
            result = await client.query(target, make_request(model, seed), http=http)
            if result.status is QueryStatus.OK:
                tally.answered += 1
                tally.latencies.append(result.latency)
            elif result.status is QueryStatus.HTTP_ERROR and result.http_status in REFUSED:
                tally.refused += 1
                tally.note(f"{result.http_status} {result.error.reason if result.error else ''}")
                await asyncio.sleep(0.05)  # a refused caller backs off a little
            elif result.status in (QueryStatus.TIMEOUT, QueryStatus.UNREACHABLE,
                                   QueryStatus.ERROR):
                tally.lost += 1
                tally.note(f"lost {result.status}: {result.reason[:80]}")
            else:
                tally.invalid += 1
                tally.note(f"invalid {result.status}: {result.reason[:80]}")


async def junk_client(url: str, miner_hotkey: str, forger, stop: float, tally: Tally):
    """Unsigned, forged (signed for another receiver / body swapped) and malformed posts."""
    from niche.auth import sign_request

    kinds = ("unsigned", "garbage", "wrong_receiver", "swapped_body", "huge_declared")
    async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
        i = 0
        while time.monotonic() < stop:
            kind = kinds[i % len(kinds)]
            i += 1
            body = make_request("flux-schnell", i).model_dump_json().encode()
            headers = {"Content-Type": "application/json"}
            if kind == "garbage":
                body = os.urandom(256)
                headers.update(sign_request(forger, method="POST", path="/v1/generate",
                                            body=body, receiver=miner_hotkey))
            elif kind == "wrong_receiver":
                headers.update(sign_request(forger, method="POST", path="/v1/generate",
                                            body=body, receiver=forger.hotkey.ss58_address))
            elif kind == "swapped_body":
                headers.update(sign_request(forger, method="POST", path="/v1/generate",
                                            body=b"{}", receiver=miner_hotkey))
            tally.junk_sent += 1
            try:
                if kind == "huge_declared":  # a 1 GB upload announced, never sent
                    status = await _raw_post(url, {**headers, **sign_request(
                        forger, method="POST", path="/v1/generate", body=body,
                        receiver=miner_hotkey), "Content-Length": str(10**9)})
                else:
                    resp = await http.post(url + "/v1/generate", content=body, headers=headers)
                    status = resp.status_code
            except (httpx.HTTPError, OSError, ValueError):
                tally.junk_lost += 1
                continue
            if 400 <= status < 500 or status == 503:
                tally.junk_refused += 1
            else:
                tally.junk_accepted += 1
                tally.note(f"junk {kind} got {status}")
            await asyncio.sleep(0.01)


async def _raw_post(url: str, headers: dict) -> int:
    """Headers only (the body never follows): the status line the miner answers with."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        lines = ["POST /v1/generate HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)
        return int(status_line.split()[1])
    finally:
        writer.close()


async def drive(args, url: str, miner_hotkey: str, callers, stop: float, tally: Tally):
    from niche.validator.client import MinerClient, MinerTarget

    target = MinerTarget(0, miner_hotkey, url)
    jobs = [signed_client(MinerClient(w), target, args.model, stop, tally, 10**6 * i)
            for i, w in enumerate(callers)]
    # junk is signed by a real allow-listed key where a signature is involved: the forgeries
    # must fail on the signature / receiver / body binding, not on the blacklist
    jobs += [junk_client(url, miner_hotkey, callers[0], stop, tally)
             for _ in range(args.junk_clients)]
    await asyncio.gather(*jobs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--junk-clients", type=int, default=1)
    parser.add_argument("--model", default="flux-schnell")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="checkpoint root (default: the tiny checkpoints)")
    parser.add_argument("--requests-per-minute", type=float, default=0.0,
                        help="miner's per-hotkey rate limit (default 0: off, to load the "
                             "serving path; set e.g. 60 to see 429s)")
    parser.add_argument("--warmup", type=int, default=20, help="requests before measuring")
    parser.add_argument("--sample-every", type=float, default=10.0,
                        help="seconds between RSS samples (default 10)")
    parser.add_argument("--json", type=Path, default=None, help="also write figures here")
    args = parser.parse_args(argv)
    if args.model_path is None:
        from niche.devnet.tiny import ensure_tiny_models

        args.model_path = ensure_tiny_models()

    from niche.validator.client import MinerClient, MinerTarget, QueryStatus

    with tempfile.TemporaryDirectory(prefix="niche-load-") as tmp:
        root = Path(tmp)
        miner_wallet, callers = build_network(root, args.clients)
        miner_hotkey = miner_wallet.hotkey.ss58_address
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        proc = start_miner(root, args, port, [w.hotkey.ss58_address for w in callers])
        try:
            wait_ready(proc, url, root / "miner.log")
            ready_s = time.monotonic() - started
            rss_ready = rss_mib(proc.pid)
            warm = MinerClient(callers[0])
            for i in range(args.warmup):
                r = asyncio.run(warm.query(MinerTarget(0, miner_hotkey, url),
                                           make_request(args.model, 10**9 + i)))
                if r.status is not QueryStatus.OK:
                    raise SystemExit(f"warm-up request failed: {r.status} {r.reason}")
            rss_start = rss_mib(proc.pid)
            tally = Tally()
            samples: list[tuple[float, float]] = []
            sampling = threading.Event()

            def sample() -> None:  # RSS every few seconds: growth vs a plateau
                while not sampling.wait(args.sample_every):
                    samples.append((time.monotonic() - t0, rss_mib(proc.pid)))

            t0 = time.monotonic()
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            asyncio.run(drive(args, url, miner_hotkey, callers, t0 + args.seconds, tally))
            elapsed = time.monotonic() - t0
            sampling.set()
            sampler.join(5)
            rss_end = rss_mib(proc.pid)
            health = httpx.get(url + "/healthz", timeout=5).json()
            proc.send_signal(signal.SIGTERM)
            exit_code = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    growth = (rss_end - rss_start) / rss_start * 100
    half = [mib for t, mib in samples if t >= elapsed / 2]
    second_half = (max(half) - min(half)) if half else float("nan")
    total = tally.answered + tally.refused + tally.lost + tally.invalid
    figures = {
        "seconds": round(elapsed, 1), "clients": args.clients, "junk_clients": args.junk_clients,
        "model": args.model, "requests": total, "answered": tally.answered,
        "refused": tally.refused, "lost": tally.lost, "invalid": tally.invalid,
        "answered_per_s": round(tally.answered / elapsed, 2),
        "p50_ms": round(percentile(tally.latencies, 50) * 1000, 1),
        "p99_ms": round(percentile(tally.latencies, 99) * 1000, 1),
        "max_ms": round(max(tally.latencies, default=float("nan")) * 1000, 1),
        "junk_sent": tally.junk_sent, "junk_refused": tally.junk_refused,
        "junk_accepted": tally.junk_accepted, "junk_lost": tally.junk_lost,
        "rss_ready_mib": round(rss_ready, 1), "rss_start_mib": round(rss_start, 1),
        "rss_end_mib": round(rss_end, 1), "rss_growth_pct": round(growth, 2),
        "rss_samples_mib": [round(mib, 1) for _, mib in samples],
        "rss_second_half_range_mib": round(second_half, 1),
        "startup_s": round(ready_s, 1), "healthz_after": health.get("ok"),
        "exit_code_after_sigterm": exit_code, "reasons": tally.reasons,
    }
    print(f"load: {args.clients} signed clients + {args.junk_clients} junk client(s), "
          f"{elapsed:.0f}s against `niche miner` ({args.model}, {args.model_path})")
    print(f"  requests  {total}: answered {tally.answered} ({figures['answered_per_s']}/s), "
          f"refused {tally.refused} (429/503), lost {tally.lost}, invalid {tally.invalid}")
    print(f"  latency   p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms, "
          f"max {figures['max_ms']} ms (validator's clock, answer verified)")
    print(f"  junk      {tally.junk_sent} sent: {tally.junk_refused} refused, "
          f"{tally.junk_accepted} accepted, {tally.junk_lost} lost")
    print(f"  memory    RSS {rss_ready:.0f} MiB ready, {rss_start:.0f} MiB after warm-up, "
          f"{rss_end:.0f} MiB at end ({growth:+.1f}%); every {args.sample_every:g}s: "
          + " ".join(f"{mib:.0f}" for _, mib in samples)
          + f" (second half spans {second_half:.1f} MiB)")
    print(f"  after     healthz ok={health.get('ok')}, SIGTERM exit code {exit_code}")
    if tally.reasons:
        print("  reasons   " + ", ".join(f"{k}: {v}" for k, v in sorted(tally.reasons.items())))
    ok = (tally.lost == 0 and tally.invalid == 0 and tally.junk_accepted == 0
          and growth <= 10.0 and exit_code == 0 and tally.answered > 0)
    print(f"  verdict   {'PASS' if ok else 'FAIL'} (lost 0, invalid 0, junk accepted 0, "
          "RSS growth <= 10%, clean exit)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
