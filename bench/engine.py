"""Engine benchmark on the tiny checkpoints (CPU unless --device says otherwise).

For every model x pipeline, in its own subprocess (clean RSS): load only that pipeline,
warm up once, then time --repeat images; print seconds per image and peak RSS. Then the
Kolors weight-sharing ratio: memory of all Kolors pipelines loaded together, less the
adapters' own weights (controlnets, image encoder, IP layers, depth model), divided by Kolors
text-to-image alone; as exact unique-storage bytes and as resident memory above an
imports-only baseline process.

    .venv/bin/python bench/engine.py [--repeat 5] [--device cpu] [--root DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PAIRS = [("flux-schnell", "txt2img"), ("kolors", "txt2img"), ("kolors", "controlnet-canny"),
         ("kolors", "controlnet-depth"), ("kolors", "ip-adapter")]


def rss_bytes() -> int:
    """Resident bytes after a GC and returning freed heap to the OS (less allocator noise)."""
    import ctypes
    import gc

    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(job: dict) -> dict:
    """One measurement in this (fresh) process."""
    from niche.models.quiet import quiet_libraries

    quiet_libraries()
    # Code, not weights: import everything any job uses so the baseline holds it too.
    import cv2  # noqa: F401
    import numpy as np
    import PIL.Image
    import torch  # noqa: F401
    from diffusers import ControlNetModel, FluxPipeline, KolorsPipeline  # noqa: F401
    from transformers import (  # noqa: F401
        AutoImageProcessor,
        AutoModelForDepthEstimation,
        CLIPImageProcessor,
        CLIPVisionModelWithProjection,
        DepthAnythingForDepthEstimation,
        DPTImageProcessor,
    )

    import niche.models.conditioning
    import niche.models.flux
    import niche.models.kolors
    import niche.models.kolors_controlnet  # noqa: F401
    from niche.models.engine import Engine
    from niche.models.footprint import pipeline_modules, unique_bytes
    from niche.protocol import GenerationParams

    if job["kind"] == "baseline":
        return {"rss": rss_bytes()}
    if job["kind"] == "unshared":  # the contrast: four independent Kolors base pipelines
        import pathlib

        keep = [KolorsPipeline.from_pretrained(str(pathlib.Path(job["root"]) / "kolors"),
                                               local_files_only=True) for _ in range(4)]
        return {"rss_loaded": rss_bytes(), "n": len(keep)}
    pipes = job["pipelines"]
    engine = Engine(models=[job["model"]], model_root=job["root"], device=job["device"],
                    pipelines={job["model"]: pipes})
    loaded_rss = rss_bytes()
    out = {"rss_loaded": loaded_rss}
    fam = engine.family(job["model"])
    if job["model"] == "kolors":
        own = list(fam.own_modules().values())
        allm = [m for p in fam.pipelines().values() for m in pipeline_modules(p)]
        out["weights_all"] = unique_bytes(allm + own)
        out["weights_own"] = unique_bytes(own)
        out["weights_base"] = unique_bytes(pipeline_modules(fam.base))
    if job["kind"] == "memory":
        return out
    pipeline = pipes[0]
    image = None
    if pipeline != "txt2img":
        rng = np.random.default_rng(0)
        image = PIL.Image.fromarray((rng.random((96, 96, 3)) * 255).astype(np.uint8))
    times = []
    for i in range(job["repeat"] + 1):
        params = GenerationParams(model=job["model"], pipeline=pipeline,
                                  prompt="a photo of a cat on a red chair", seed=i)
        start = time.perf_counter()
        engine.generate(params, image)
        if i:  # the first call warms up
            times.append(time.perf_counter() - start)
    spec = engine.spec(job["model"])
    out.update(seconds=statistics.median(times), peak_rss=peak_rss_bytes(),
               threads=engine.num_threads, steps=spec.defaults.steps,
               size=f"{spec.defaults.width}x{spec.defaults.height}")
    return out


def run_worker(job: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker {job} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--root", default=None, help="model root (default: the tiny checkpoints)")
    ap.add_argument("--memory-only", action="store_true", help="skip the timings")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    root = args.root
    if root is None:
        from niche.models.tiny import ensure_tiny_models

        root = str(ensure_tiny_models())
    mib = 1024 * 1024
    print(f"engine bench: root={root} device={args.device} repeat={args.repeat} "
          f"cpus={os.cpu_count()}")
    print(f"{'model':<14}{'pipeline':<18}{'size':>8}{'steps':>6}{'s/image':>10}"
          f"{'peak RSS MiB':>14}")
    for model, pipeline in [] if args.memory_only else PAIRS:
        r = run_worker({"kind": "time", "model": model, "pipelines": [pipeline], "root": root,
                        "device": args.device, "repeat": args.repeat})
        print(f"{model:<14}{pipeline:<18}{r['size']:>8}{r['steps']:>6}{r['seconds']:>10.4f}"
              f"{r['peak_rss'] / mib:>14.1f}")
    base = run_worker({"kind": "baseline"})["rss"]
    alone = run_worker({"kind": "memory", "model": "kolors", "pipelines": ["txt2img"],
                        "root": root, "device": args.device})
    together = run_worker({"kind": "memory", "model": "kolors",
                           "pipelines": ["txt2img", "controlnet-canny", "controlnet-depth",
                                         "ip-adapter"], "root": root, "device": args.device})
    unshared = run_worker({"kind": "unshared", "root": root})
    w_ratio = (together["weights_all"] - together["weights_own"]) / alone["weights_base"]
    naive = (4 * alone["weights_base"] + together["weights_own"]) / alone["weights_base"]
    rss_ratio = ((together["rss_loaded"] - base - together["weights_own"])
                 / (alone["rss_loaded"] - base))
    print(f"kolors weights: txt2img {alone['weights_base'] / mib:.2f} MiB; all pipelines "
          f"{together['weights_all'] / mib:.2f} MiB of which adapters' own "
          f"{together['weights_own'] / mib:.2f} MiB")
    print(f"kolors sharing ratio (unique weight bytes, adapters apart): {w_ratio:.3f} "
          f"(target <= 1.15; four unshared copies would be {naive:.2f} incl. adapters)")
    print(f"kolors sharing ratio (resident memory above a {base / mib:.0f} MiB imports-only "
          f"process, adapters apart): {rss_ratio:.3f} (txt2img {alone['rss_loaded'] / mib:.0f}"
          f" MiB, all {together['rss_loaded'] / mib:.0f} MiB)")
    print(f"contrast: four unshared Kolors base pipelines, resident memory above baseline / "
          f"one: {(unshared['rss_loaded'] - base) / (alone['rss_loaded'] - base):.3f}")


if __name__ == "__main__":
    main()
