"""Engine benchmark (CPU unless --device says otherwise).

tiny (the cached tiny checkpoints): for every model x pipeline, in its own subprocess (clean
RSS): load only that pipeline, warm up once, then time --repeat images; print seconds per image
and peak RSS. Then the Kolors weight-sharing ratio: memory of all Kolors pipelines loaded
together, less the adapters' own weights (controlnets, image encoder, IP layers, depth model),
divided by Kolors text-to-image alone; as exact unique-storage bytes and as resident memory above
an imports-only baseline process. At this scale (1.5 MiB of base weights) the resident ratio
measures per-pipeline Python objects, not weights.

medium (Kolors built with tiny.KOLORS_MEDIUM into a temp folder: ~290 MiB of base weights):
the same ratio where weights dominate. Fresh processes, one at a time: (a) txt2img alone,
(b) all four Kolors pipelines on one set of weights, (c) the four pipelines loaded unshared
(four engines); each loads, then makes one image per pipeline; peak RSS (VmHWM), RSS at the
end (after GC) and PSS at the end. On CPU the float32 safetensors weights stay mmapped:
they become resident when a generation touches them, which is why every process here
generates before it is measured.

    .venv/bin/python bench/engine.py [--scale tiny|medium|both] [--repeat 5] [--device cpu]
                                     [--root DIR] [--medium-root DIR]
"""
from __future__ import annotations

import argparse
import contextlib
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
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB, = VmHWM


def _proc_bytes(path: str, field: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return 0


def rss_file_bytes() -> int:
    """File-backed resident bytes (RssFile): safetensors weights stay mmapped on CPU."""
    return _proc_bytes("/proc/self/status", "RssFile")


def pss_bytes() -> int:
    """Proportional set size: RSS counts a file page once per mapping (four unshared loads of
    one file: four times); PSS counts it once, split among the processes mapping it."""
    return _proc_bytes("/proc/self/smaps_rollup", "Pss")


KOLORS_PIPELINES = ["txt2img", "controlnet-canny", "controlnet-depth", "ip-adapter"]


def _draw_each(engine, model: str, pipelines: list[str]) -> None:
    """One image per pipeline (a conditioning image where the pipeline needs one)."""
    import numpy as np
    import PIL.Image

    from niche.protocol import GenerationParams

    image = PIL.Image.fromarray(
        (np.random.default_rng(0).random((96, 96, 3)) * 255).astype(np.uint8))
    for pipeline in pipelines:
        engine.generate(GenerationParams(model=model, pipeline=pipeline, seed=0,
                                         prompt="a photo of a cat on a red chair"),
                        None if pipeline == "txt2img" else image)


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
    import niche.models.families.flux
    import niche.models.families.kolors
    import niche.models.families.kolors_controlnet  # noqa: F401
    from niche.devnet.footprint import pipeline_modules, unique_bytes
    from niche.models.engine import Engine
    from niche.protocol import GenerationParams

    if job["kind"] == "baseline":
        return {"rss": rss_bytes()}
    if job["kind"] == "unshared-engines":  # the contrast: every Kolors pipeline on its own copy
        engines = [Engine(models=["kolors"], model_root=job["root"], device=job["device"],
                          pipelines={"kolors": [p]}) for p in KOLORS_PIPELINES]
        own = [m for e in engines for m in e.family("kolors").own_modules().values()]
        for engine, pipeline in zip(engines, KOLORS_PIPELINES, strict=False):
            _draw_each(engine, "kolors", [pipeline])
        return {"weights_own": unique_bytes(own), "peak_rss": peak_rss_bytes(),
                "rss_after": rss_bytes(), "rss_file": rss_file_bytes(), "pss": pss_bytes()}
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
        if job.get("generate"):  # one image per loaded pipeline, then peak and resident
            _draw_each(engine, job["model"], pipes)
            out.update(peak_rss=peak_rss_bytes(), rss_after=rss_bytes(),
                       rss_file=rss_file_bytes(), pss=pss_bytes())
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


def tiny_section(args, root: str) -> None:
    mib = 1024 * 1024
    print(f"engine bench (tiny): root={root} device={args.device} repeat={args.repeat} "
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
    together = run_worker({"kind": "memory", "model": "kolors", "pipelines": KOLORS_PIPELINES,
                           "root": root, "device": args.device})
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
          f" MiB, all {together['rss_loaded'] / mib:.0f} MiB; at this scale: Python objects)")
    print(f"contrast: four unshared Kolors base pipelines, resident memory above baseline / "
          f"one: {(unshared['rss_loaded'] - base) / (alone['rss_loaded'] - base):.3f}")


def medium_section(args, root: str | None) -> None:
    """The Kolors memory ratio of issue 3 on checkpoints where weights dominate."""
    import tempfile
    from pathlib import Path

    mib = 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="niche-medium-") as tmp:
        if root is None:
            from niche.devnet.tiny import build_tiny_models

            start = time.perf_counter()
            root = str(build_tiny_models(Path(tmp), scale="medium"))
            built = f"built in {time.perf_counter() - start:.0f} s"
        else:
            built = "prebuilt"
        disk = sum(p.stat().st_size for p in (Path(root) / "kolors").rglob("*.safetensors"))
        job = {"kind": "memory", "model": "kolors", "root": root, "device": args.device,
               "generate": True}
        jobs = [{"kind": "baseline"}, {**job, "pipelines": ["txt2img"]},
                {**job, "pipelines": KOLORS_PIPELINES},
                {"kind": "unshared-engines", "root": root, "device": args.device}]
        # One at a time (side by side saves nothing on 2 cores, and would split PSS).
        base, alone, together, unshared = map(run_worker, jobs)
    base = base["rss"]
    own, own_c = together["weights_own"], unshared["weights_own"]
    print(f"engine bench (medium kolors, {disk / mib:.0f} MiB of safetensors, {built}): "
          f"fresh processes one after another, one image per pipeline; "
          f"cpus={os.cpu_count()} device={args.device}")
    print(f"kolors weights: txt2img {alone['weights_base'] / mib:.1f} MiB; adapters' own "
          f"(2 ControlNets, IP-Adapter projection + attention, CLIP image encoder, depth "
          f"model) {own / mib:.1f} MiB; imports-only process {base / mib:.0f} MiB")
    print(f"{'MiB':<40}{'peak RSS':>10}{'RSS at end':>12}{'of it mmapped':>15}"
          f"{'adapters own':>14}")
    for name, r, o in (("(a) txt2img alone", alone, 0),
                       ("(b) all four pipelines, shared weights", together, own),
                       ("(c) all four pipelines, unshared", unshared, own_c)):
        print(f"{name:<40}{r['peak_rss'] / mib:>10.0f}{r['rss_after'] / mib:>12.0f}"
              f"{r['rss_file'] / mib:>15.0f}{o / mib:>14.1f}")

    def ratios(key: str, r: dict, o: int) -> tuple[float, float, float]:
        x, y = alone[key], r[key]
        return y / x, (y - o) / x, (y - base - o) / (x - base)

    peak, end = ratios("peak_rss", together, own), ratios("rss_after", together, own)
    worst = max(peak[1], end[1])
    verdict = "met" if worst <= 1.15 else "NOT met"
    print(f"kolors memory ratio, all pipelines / txt2img alone: peak RSS {peak[0]:.3f}, at end "
          f"{end[0]:.3f}; adapters' own weights apart: peak {peak[1]:.3f}, at end {end[1]:.3f} "
          f"(target <= 1.15: {verdict}); the same above the imports-only process: peak "
          f"{peak[2]:.3f}, at end {end[2]:.3f}")
    cpeak, cend = ratios("peak_rss", unshared, own_c), ratios("rss_after", unshared, own_c)
    print(f"contrast, four pipelines unshared / txt2img alone: peak {cpeak[0]:.3f}, at end "
          f"{cend[0]:.3f}; adapters apart: peak {cpeak[1]:.3f}, at end {cend[1]:.3f}; above "
          f"imports, adapters apart: peak {cpeak[2]:.3f}, at end {cend[2]:.3f}")
    print(f"PSS at end (a file page counted once): (a) {alone['pss'] / mib:.0f}, (b) "
          f"{together['pss'] / mib:.0f}, (c) {unshared['pss'] / mib:.0f} MiB; (b - own)/a "
          f"{(together['pss'] - own) / alone['pss']:.3f}, (c - own)/a "
          f"{(unshared['pss'] - own_c) / alone['pss']:.3f}: on CPU, unshared loads of one "
          f"mmapped file share its pages; on a GPU (weights copied) they would not")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=["tiny", "medium", "both"], default="both",
                    help="tiny: timings + sharing on the tiny checkpoints; medium: the Kolors "
                         "memory ratio on medium-size checkpoints; both (default)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--root", default=None, help="model root (default: the tiny checkpoints)")
    ap.add_argument("--medium-root", default=None,
                    help="a prebuilt medium root (default: built into a temp folder)")
    ap.add_argument("--memory-only", action="store_true", help="skip the timings")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    start = time.perf_counter()
    if args.scale in ("tiny", "both"):
        root = args.root
        if root is None:
            from niche.devnet.tiny import ensure_tiny_models

            root = str(ensure_tiny_models())
        tiny_section(args, root)
    if args.scale in ("medium", "both"):
        medium_section(args, args.medium_root)
    print(f"bench took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
