"""What each piece of the 1024x1024 answer path costs on this machine, one at a time, in
the order the path runs them: the parts bench/overhead.py (b) measures all together.

Miner: PNG encode (niche.imaging.PNG_COMPRESS_LEVEL), sha256 of the PNG, sha256 of four
1 MiB float32 states (the commitment), base64 of the PNG, the response JSON, the sr25519
response signature; then the HTTP transfer of the body on 127.0.0.1 (uvicorn + httpx, what
the path uses); validator: JSON parse, base64 decode, PNG decode, sha256, signature check.

    .venv/bin/python bench/breakdown.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import httpx
    import torch
    from fastapi import FastAPI
    from fastapi.responses import Response
    from PIL import Image

    from niche.auth import sign_response, verify_response
    from niche.chain.wallets import create_wallet
    from niche.devnet.servers import BackgroundServer
    from niche.devnet.tiny import ensure_tiny_models
    from niche.imaging import PNG_COMPRESS_LEVEL, bytes_to_image, encode_image, to_b64
    from niche.models.engine import Engine
    from niche.models.quiet import quiet_libraries
    from niche.protocol import GenerationParams
    from niche.states import commit

    quiet_libraries()
    engine = Engine(models=["flux-schnell"], model_root=ensure_tiny_models(), device="cpu")
    small = engine.generate(GenerationParams(model="flux-schnell", prompt="a harbour", seed=7))
    image = small.resize((1024, 1024), Image.Resampling.BICUBIC)  # image-like content
    states = [torch.randn((1, 4096, 64), generator=torch.Generator().manual_seed(i))
              for i in range(4)]
    png = encode_image(image)
    b64 = to_b64(png)
    commitment = commit(states, "bfloat16")
    with tempfile.TemporaryDirectory() as tmp:
        wallet = create_wallet("miner", "hot", Path(tmp) / "wallets")
        keypair = wallet.hotkey
        digest = hashlib.sha256(png).hexdigest()
        signature = sign_response(keypair, "req-1", digest, commitment.digest())
        body = json.dumps({"image": b64, "image_sha256": digest, "signature": signature,
                           "states": commitment.model_dump(mode="json")}).encode()
        app = FastAPI()

        @app.get("/answer")
        def answer() -> Response:
            return Response(body, media_type="application/json")

        server = BackgroundServer(app).start()
        client = httpx.Client(base_url=server.url)
        r = args.repeats
        rows = [
            (f"PNG encode (level {PNG_COMPRESS_LEVEL})",
             _median_ms(lambda: encode_image(image), r)),
            ("sha256 of the PNG", _median_ms(lambda: hashlib.sha256(png).hexdigest(), r)),
            ("sha256 of 4 x 1 MiB states", _median_ms(lambda: commit(states, "bfloat16"), r)),
            ("base64 encode of the PNG", _median_ms(lambda: to_b64(png), r)),
            ("response JSON dump", _median_ms(lambda: json.dumps({"image": b64}), r)),
            ("sr25519 response signature", _median_ms(
                lambda: sign_response(keypair, "req-1", digest, commitment.digest()), r)),
            ("HTTP transfer of the body (127.0.0.1)", _median_ms(
                lambda: client.get("/answer").content, r)),
            ("response JSON parse", _median_ms(lambda: json.loads(body), r)),
            ("base64 decode", _median_ms(lambda: base64.b64decode(b64, validate=True), r)),
            ("PNG decode", _median_ms(lambda: bytes_to_image(png), r)),
            ("signature check", _median_ms(lambda: verify_response(
                keypair.ss58_address, "req-1", digest, signature, commitment.digest()), r)),
        ]
        client.close()
        server.stop()
    print(f"1024x1024 answer: PNG {len(png) / 2**20:.2f} MiB, base64 {len(b64) / 2**20:.2f} "
          f"MiB, body {len(body) / 2**20:.2f} MiB; median of {args.repeats}, CPU "
          f"{torch.get_num_threads()} thread(s)")
    for name, ms in rows:
        print(f"  {name:<40} {ms:8.2f} ms")
    print(f"  {'sum':<40} {sum(ms for _, ms in rows):8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
