"""Lossless image codecs for a 1024x1024 answer, side by side on this machine: what the
answer codec was chosen by (docs/models.md, "Overhead of the signed path").

Three contents: photo-like (1/f noise per channel with hard-edged shapes and a little
sensor noise: about as hard to compress as a photograph), flat (an illustration: flat
colour regions and gradients) and a real tiny-model generation upscaled to 1024x1024. For
each codec: encode, decode (to an RGB array the validator can use), sha256 of the bytes,
bytes, and the sum plus the time those bytes take on a 1 Gbit/s link. Codecs whose library
is not installed are listed as such, not measured.

    .venv/bin/python bench/image_codecs.py [--repeats 7] [--no-model]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIDE = 1024
LINK_BYTES_PER_S = 1e9 / 8


def photo_like(seed: int = 0) -> np.ndarray:
    """1/f amplitude spectrum with random phases per channel, plus shapes and noise."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(SIDE)[:, None]
    fx = np.fft.rfftfreq(SIDE)[None, :]
    radius = np.sqrt(fx * fx + fy * fy)
    radius[0, 0] = 1.0
    channels = []
    for _ in range(3):
        spectrum = (rng.standard_normal(radius.shape) + 1j * rng.standard_normal(radius.shape))
        field = np.fft.irfft2(spectrum / radius, s=(SIDE, SIDE))
        field = (field - field.mean()) / field.std()
        channels.append(field)
    img = np.stack(channels, axis=-1) * 40 + 128
    yy, xx = np.mgrid[:SIDE, :SIDE]
    for _ in range(12):  # hard edges: rectangles and discs of a flat-ish colour
        colour = rng.uniform(0, 255, 3)
        x0, y0 = rng.integers(0, SIDE, 2)
        if rng.random() < 0.5:
            w, h = rng.integers(40, 300, 2)
            mask = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
        else:
            r = rng.integers(30, 200)
            mask = (xx - x0) ** 2 + (yy - y0) ** 2 < r * r
        img[mask] = img[mask] * 0.3 + colour * 0.7
    img += rng.normal(0, 2.0, img.shape)  # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


def flat(seed: int = 1) -> np.ndarray:
    """An illustration: a vertical gradient sky and flat-coloured shapes."""
    rng = np.random.default_rng(seed)
    img = np.zeros((SIDE, SIDE, 3), np.float64)
    img[...] = np.linspace(0, 1, SIDE)[:, None, None] * np.array([60, 90, 120]) + [120, 160, 220]
    yy, xx = np.mgrid[:SIDE, :SIDE]
    for _ in range(20):
        colour = rng.integers(0, 255, 3)
        x0, y0 = rng.integers(0, SIDE, 2)
        r = rng.integers(20, 250)
        img[(xx - x0) ** 2 + (yy - y0) ** 2 < r * r] = colour
    return img.astype(np.uint8)


def tiny_model_output() -> np.ndarray:
    from niche.devnet.tiny import ensure_tiny_models
    from niche.models.engine import Engine
    from niche.models.quiet import quiet_libraries
    from niche.protocol import GenerationParams

    quiet_libraries()
    engine = Engine(models=["flux-schnell"], model_root=ensure_tiny_models(), device="cpu")
    small = engine.generate(engine.resolve(GenerationParams(
        model="flux-schnell", prompt="a harbour at dusk", seed=7)))
    return np.asarray(small.resize((SIDE, SIDE), Image.Resampling.BICUBIC).convert("RGB"))


# ----------------------------------------------------------------------------- codecs
Codec = tuple[Callable[[np.ndarray], bytes], Callable[[bytes], np.ndarray]]


def _pil_encode(fmt: str, **kwargs: Any) -> Callable[[np.ndarray], bytes]:
    def encode(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format=fmt, **kwargs)
        return buf.getvalue()
    return encode


def _pil_decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def codecs() -> dict[str, Codec | str]:
    """name -> (encode, decode), or the reason it is not measured."""
    from niche import rawimage  # the answer format chosen here (imaging's full decode path)

    def niche_decode(data: bytes) -> np.ndarray:
        return np.asarray(rawimage.decode(data, max_side=4096, max_pixels=4096 * 4096))

    out: dict[str, Codec | str] = {
        "RGB-ZSTD: sub filter + zstd 1 (niche)": (
            lambda a: rawimage.encode(Image.fromarray(a)), niche_decode),
        "Pillow PNG level 1": (_pil_encode("PNG", compress_level=1), _pil_decode),
        "Pillow PNG level 6": (_pil_encode("PNG", compress_level=6), _pil_decode),
        "WebP lossless (method 0)": (_pil_encode("WEBP", lossless=True, quality=0, method=0,
                                                exact=True), _pil_decode),
        "WebP lossless (method 4)": (_pil_encode("WEBP", lossless=True, quality=100, method=4,
                                                exact=True), _pil_decode),
    }
    try:
        import fpng  # noqa: F401  (registers nothing we use; the extension does the work)
        from fpng import fpng_ext

        def fpng_encode(a: np.ndarray) -> bytes:
            return fpng_ext.encode_image_to_memory(a.tobytes(), a.shape[1], a.shape[0], 3)

        out["fpng (PNG) + Pillow decode"] = (fpng_encode, _pil_decode)
    except ImportError:
        out["fpng (PNG)"] = "not installed (pip install fpng)"
    try:
        import imagecodecs

        out["libpng+zlib-ng level 1 (imagecodecs)"] = (
            lambda a: imagecodecs.png_encode(a, level=1, strategy=3, filter=16),
            imagecodecs.png_decode)
        out["QOI (imagecodecs)"] = (imagecodecs.qoi_encode, imagecodecs.qoi_decode)
    except ImportError:
        out["QOI / libpng (imagecodecs)"] = "not installed (pip install imagecodecs)"
    try:
        import zstandard

        def zstd_codec(level: int, threads: int = 0) -> Codec:
            compressor = zstandard.ZstdCompressor(level=level, threads=threads)
            decompressor = zstandard.ZstdDecompressor()

            def decode(data: bytes) -> np.ndarray:
                raw = decompressor.decompress(data, max_output_size=SIDE * SIDE * 3)
                return np.frombuffer(raw, np.uint8).reshape(SIDE, SIDE, 3)
            return (lambda a: compressor.compress(a.tobytes())), decode

        out["zstd level 1 on raw RGB"] = zstd_codec(1)
        out["zstd level 1 on raw RGB, 2 threads"] = zstd_codec(1, threads=2)
        out["zstd level 3 on raw RGB"] = zstd_codec(3)
    except ImportError:
        out["zstd on raw RGB"] = "not installed (pip install zstandard)"
    try:
        import lz4.frame

        def lz4_decode(data: bytes) -> np.ndarray:
            return np.frombuffer(lz4.frame.decompress(data), np.uint8).reshape(SIDE, SIDE, 3)

        out["lz4 frame on raw RGB"] = (
            lambda a: lz4.frame.compress(a.tobytes(), store_size=True), lz4_decode)
    except ImportError:
        out["lz4 on raw RGB"] = "not installed (pip install lz4)"
    return out


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of `repeats` calls after one warm-up (overhead.py uses it too)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-model", action="store_true",
                        help="skip the tiny-model image (no checkpoint build)")
    args = parser.parse_args()
    contents = {"photo-like": photo_like(), "flat": flat()}
    if not args.no_model:
        contents["tiny model, upscaled"] = tiny_model_output()
    table = codecs()
    print(f"{os.cpu_count()} CPU(s), load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the start")
    for label, array in contents.items():
        print(f"\n{label} {SIDE}x{SIDE} RGB (raw {array.nbytes / 2**20:.2f} MiB), median of "
              f"{args.repeats}; 'sum' = encode + decode + sha256, '+1Gb/s' adds the transfer")
        print(f"  {'codec':<38} {'encode':>8} {'decode':>8} {'sha256':>7} {'MiB':>6} "
              f"{'sum':>7} {'+1Gb/s':>7}")
        for name, codec in table.items():
            if isinstance(codec, str):
                print(f"  {name:<38} {codec}")
                continue
            encode, decode = codec
            data = encode(array)
            if not np.array_equal(decode(data), array):
                print(f"  {name:<38} NOT LOSSLESS")
                continue
            enc = median_ms(lambda encode=encode, array=array: encode(array), args.repeats)
            dec = median_ms(lambda decode=decode, data=data: decode(data), args.repeats)
            sha = median_ms(lambda data=data: hashlib.sha256(data).digest(), args.repeats)
            total = enc + dec + sha
            wire = len(data) / LINK_BYTES_PER_S * 1000
            print(f"  {name:<38} {enc:6.1f}ms {dec:6.1f}ms {sha:5.1f}ms "
                  f"{len(data) / 2**20:6.2f} {total:5.1f}ms {total + wire:5.1f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
