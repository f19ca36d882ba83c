"""`niche models train-tiny`: train every tiny checkpoint briefly on CPU and write the fixtures.

Order matters: each VAE first (so latents mean something), then the diffusion model on its
latents, then the depth estimator, the ControlNets and the IP-Adapter on the frozen UNet.
Everything is seeded from one base seed with explicit generators and a fixed thread count,
so the same command on the same software gives the same weights. ``--minutes`` caps wall time
per stage proportionally (a guard for busy machines); a capped run is recorded as such.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from niche.devnet.training.fresh import fresh_checkpoints, save_component, write_manifest

#: procedural samples encoded once per model: FLUX's 64-wide transformer, 16000 steps of 16,
#: was measured on 8192 (encoding them takes seconds); Kolors' stages were tuned on 2048 (8192
#: ignored the control images on some prompts: docs/tiny-models.md)
DATASET = {"flux-schnell": 8192, "kolors": 2048}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tiny_weights"


@dataclass(frozen=True)
class Stage:
    name: str
    steps: int


STAGES = (
    Stage("flux-schnell/vae", 1600),
    Stage("flux-schnell/transformer", 16000),
    Stage("kolors/depth", 300),
    Stage("kolors/unet", 4000),
    Stage("kolors/controlnet-canny", 4000),  # 2000 steps: other control image 20-26 dB
    Stage("kolors/controlnet-depth", 4000),
    Stage("kolors/ip_adapter", 1000),
)


def _kept_weights(out: Path, names: set[str]) -> Path:
    """A copy of ``out`` without the components the selected stages train: those restart from
    tiny.py's init (a partial run retrains a stage, it does not continue it)."""
    retrained = set(names)  # stage names are <model>/<component>
    keep = Path(tempfile.mkdtemp(prefix="niche-keep-"))
    for f in Path(out).rglob("*.safetensors"):
        rel = f.relative_to(out).with_suffix("").as_posix()
        if rel not in retrained:
            (keep / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, keep / f.relative_to(out))
    return keep


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_tiny(out: Path = DEFAULT_OUT, minutes: float | None = None, seed: int = 0,
               threads: int = 1, only: list[str] | None = None, scale: float = 1.0) -> dict:
    """Train the stages (all, or those whose name starts with one of ``only``) into ``out``;
    returns this run's record (a partial run's is also merged into the manifest).

    ``scale`` multiplies every stage's step count (quick experiments)."""
    from diffusers import FluxPipeline, KolorsPipeline

    from niche.devnet.training import cache, flux, ip_adapter, kolors, vae
    from niche.devnet.training import depth as depth_training
    from niche.models.conditioning import DepthEstimator, canny, depth
    from niche.models.spec import load_spec

    torch.set_num_threads(threads)
    stages = [s for s in STAGES if not only or any(s.name.startswith(o) for o in only)]
    total = sum(s.steps for s in stages)
    budget = {s.name: (minutes * 60 * s.steps / total if minutes else None) for s in stages}
    steps = {s.name: max(1, int(s.steps * scale)) for s in stages}
    index = {s.name: i for i, s in enumerate(STAGES)}
    record: dict = {"seed": seed, "threads": threads, "minutes": minutes, "scale": scale,
                    "command": "niche models train-tiny " + " ".join(sys.argv[3:]),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "stages": {}, "files": {}}
    import diffusers

    record["diffusers"] = diffusers.__version__
    started = time.monotonic()
    names = {s.name for s in stages}
    models = ["flux-schnell", "kolors"]  # Kolors reuses the FLUX VAE: build both

    def run(name: str, fn) -> None:
        result = fn(seed=seed * 1000 + index[name], steps=steps[name], seconds=budget[name])
        record["stages"][name] = asdict(result) | {"planned_steps": steps[name]}

    def save(module, model: str, component: str) -> None:
        path = save_component(module, out, model, component)
        record["files"][f"{model}/{component}.safetensors"] = _sha256(path)

    keep = _kept_weights(out, names) if only else None
    with torch.inference_mode(False), fresh_checkpoints(models, keep) as root:
        if "flux-schnell" in models:
            m = "flux-schnell"
            pipe = FluxPipeline.from_pretrained(str(root / m))
            msl = load_spec(m, None, root / m).defaults.max_sequence_length
            if f"{m}/vae" in names:
                run(f"{m}/vae", lambda **kw: vae.train_vae(pipe.vae, **kw))
            if f"{m}/transformer" in names:
                with torch.no_grad():
                    ds = cache.encode(pipe, "flux", n=DATASET[m], seed=seed * 1000 + 99, size=64,
                                      max_sequence_length=msl)
                run(f"{m}/transformer", lambda **kw: flux.train_flux(pipe, ds, **kw))
            for comp in ("vae", "transformer", "text_encoder", "text_encoder_2"):
                if f"{m}/vae" in names or f"{m}/transformer" in names:
                    save(getattr(pipe, comp), m, comp)
            del pipe
        if "kolors" in models:
            m = "kolors"
            pipe = KolorsPipeline.from_pretrained(str(root / m))
            defaults = load_spec(m, None, root / m).defaults
            msl = defaults.max_sequence_length
            if f"{m}/unet" in names:  # FLUX's trained VAE, re-expressed for Kolors' factors
                from diffusers import AutoencoderKL

                src = out / "flux-schnell" / "vae.safetensors"
                flux_vae = AutoencoderKL.from_pretrained(str(root / "flux-schnell" / "vae"))
                from safetensors.torch import load_file

                flux_vae.load_state_dict(load_file(str(src)))
                vae.transplant(flux_vae, pipe.vae)
            estimator = DepthEstimator(root / m / "depth-estimator")
            if f"{m}/depth" in names:
                run(f"{m}/depth", lambda **kw: depth_training.train_depth(estimator, **kw))
                save(estimator.model, m, "depth")
            if not names & {f"{m}/{c}" for c in ("unet", "controlnet-canny",
                                                   "controlnet-depth", "ip_adapter")}:
                ds = None  # nothing below needs samples
            else:
                with torch.no_grad():
                    ds = cache.encode(pipe, "kolors", n=DATASET[m], seed=seed * 1000 + 98,
                                      size=64, max_sequence_length=msl)
            if f"{m}/unet" in names:
                run(f"{m}/unet", lambda **kw: kolors.train_unet(pipe, ds, **kw))
            for comp in ("vae", "unet", "text_encoder"):
                if f"{m}/unet" in names:
                    save(getattr(pipe, comp), m, comp)
            from diffusers import ControlNetModel

            makers = {"canny": lambda im, w, h: canny(im, w, h, defaults.canny_low,
                                                      defaults.canny_high),
                      "depth": lambda im, w, h: depth(im, w, h, estimator)}
            for kind, maker in makers.items():
                name = f"{m}/controlnet-{kind}"
                if name not in names:
                    continue
                cn = ControlNetModel.from_pretrained(str(root / m / f"controlnet-{kind}"))
                with torch.no_grad():
                    cache.add_control(ds, kind, maker)
                run(name, lambda cn=cn, kind=kind, **kw: kolors.train_controlnet(
                    pipe, cn, ds, kind, **kw))
                save(cn, m, f"controlnet-{kind}")
            if f"{m}/ip_adapter" in names:
                state: dict[str, torch.Tensor] = {}
                encoder = None

                def train_ip(**kw):
                    nonlocal state, encoder
                    result, state, encoder = ip_adapter.train_ip_adapter(
                        pipe, ds, root / m / "ip-adapter", scale=defaults.ip_adapter_scale, **kw)
                    return result

                run(f"{m}/ip_adapter", train_ip)
                save(state, m, "ip_adapter")
                save(encoder, m, "image_encoder")
    record["seconds"] = round(time.monotonic() - started, 1)
    if keep is not None:
        shutil.rmtree(keep, ignore_errors=True)
    manifest = Path(out) / "manifest.json"
    if only and manifest.is_file():  # a partial run: keep the other stages' records
        import json

        old = json.loads(manifest.read_text())
        old["stages"].update(record["stages"])
        old["files"].update(record["files"])
        old.setdefault("partial_runs", []).append({k: record[k] for k in ("command", "seconds")})
        write_manifest(out, old)
        return record  # this run's stages, not the merged history
    write_manifest(out, record)
    return record
