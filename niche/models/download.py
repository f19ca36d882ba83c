"""`niche models download`: the hub snapshots a model's config names, with the disk space
needed stated first (from the hub's own file metadata), progress bars on, HF_TOKEN honoured
(huggingface_hub reads it), and one-line errors when the hub cannot be reached.

Only what the loaders read is fetched: a pipeline repository's single-file duplicates at its
root (e.g. FLUX.1-schnell's flux1-schnell.safetensors, 24 GB) are skipped, so are .bin/.pt
copies of weights that also come as safetensors, and the fp16 variant files unless the model
runs in float16 (what `from_pretrained(variant=...)` would read, niche/models/families/base.py).
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from niche.errors import NicheError
from niche.models.spec import ComponentSource, ModelSpec

log = logging.getLogger("niche.models")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf",
                   ".onnx", ".onnx_data")
SKIPPED_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".mp4", ".md")
SKIPPED_NAMES = (".gitattributes",)


@dataclass
class RepoPlan:
    """One hub repository of a model: which files, how big, where they go."""

    model: str
    component: str
    repo: str
    revision: str | None
    files: dict[str, int] = field(default_factory=dict)
    """Selected file -> size in bytes (the hub's metadata)."""
    local_dir: Path | None = None
    """None: the hub cache (HF_HOME), where `niche miner` without --model-path looks."""
    present: set[str] = field(default_factory=set)
    """Files already on disk with the hub's size (not downloaded again)."""

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def missing_bytes(self) -> int:
        return sum(size for name, size in self.files.items() if name not in self.present)


def _variant_of(name: str, variant: str) -> str | None:
    """`unet/diffusion_pytorch_model.fp16.safetensors` -> the non-variant name, else None."""
    path = PurePosixPath(name)
    marker = f".{variant}"
    stem = path.name
    for suffix in WEIGHT_SUFFIXES:
        if stem.endswith(marker + suffix):
            return str(path.with_name(stem[: -len(marker + suffix)] + suffix))
        if f"{marker}-" in stem and stem.endswith(suffix):  # sharded: model.fp16-00001-of-2
            return str(path.with_name(stem.replace(marker, "", 1)))
    return None


def select_files(names: Iterable[str], comp: ComponentSource, dtype: str) -> list[str]:
    """The files of one repository that the loaders read (see the module docstring)."""
    names = [n for n in names if not n.endswith(SKIPPED_SUFFIXES)
             and PurePosixPath(n).name not in SKIPPED_NAMES]
    pipeline = "model_index.json" in names
    folders_with_safetensors = {str(PurePosixPath(n).parent) for n in names
                                if n.endswith(".safetensors")}
    use_variant = comp.variant is not None and dtype == "float16"
    variant_twins = ({_variant_of(n, comp.variant) for n in names} - {None}
                     if comp.variant else set())
    chosen = []
    for name in names:
        path = PurePosixPath(name)
        is_weight = name.endswith(WEIGHT_SUFFIXES)
        if is_weight and pipeline and len(path.parts) == 1:
            continue  # a single-file copy of the whole pipeline
        if (is_weight and not name.endswith(".safetensors")
                and str(path.parent) in folders_with_safetensors):
            continue  # a .bin/.pt copy of safetensors weights
        if comp.weight_name and is_weight and len(path.parts) == 1 and name != comp.weight_name:
            continue  # an adapter repository: only the named weights
        if comp.variant and is_weight:
            is_variant = _variant_of(name, comp.variant) is not None
            if is_variant and not use_variant:
                continue
            if use_variant and not is_variant and name in variant_twins:
                continue
        chosen.append(name)
    return sorted(chosen)


def plan_model(spec: ModelSpec, dest: Path | None, api: Any, dtype: str | None = None
               ) -> list[RepoPlan]:
    """One RepoPlan per component repository, sized from the hub's file metadata."""
    plans = []
    for key, comp in spec.components.items():
        if comp.hub is None:  # a single file the operator places; no repository to fetch
            continue
        hub = comp.hub
        info = _hub_call(lambda comp=comp, hub=hub: api.model_info(hub, revision=comp.revision,
                                                          files_metadata=True), hub)
        sizes = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
        files = {name: sizes[name] for name in select_files(sizes, comp, dtype or spec.dtype)}
        local_dir = (dest / spec.name / comp.local).resolve() if dest is not None else None
        plan = RepoPlan(spec.name, key, hub, comp.revision, files, local_dir)
        plan.present = _present(plan)
        plans.append(plan)
    return plans


def _present(plan: RepoPlan) -> set[str]:
    found = set()
    for name, size in plan.files.items():
        if plan.local_dir is not None:
            path: Path | None = plan.local_dir / name
        else:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(plan.repo, name, revision=plan.revision)
            path = Path(cached) if isinstance(cached, str) else None
        if path is not None and path.is_file() and path.stat().st_size == size:
            found.add(name)
    return found


def target_dir(dest: Path | None) -> Path:
    if dest is not None:
        return dest
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def free_bytes(folder: Path) -> int:
    """Free space on the file system that will hold `folder` (it may not exist yet)."""
    probe = folder.resolve()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def check_space(plans: list[RepoPlan], folder: Path) -> str:
    """The summary line, or a NicheError when the disk cannot hold what is missing."""
    needed = sum(p.missing_bytes for p in plans)
    have = sum(p.total_bytes - p.missing_bytes for p in plans)
    free = free_bytes(folder)
    files = sum(len(p.files) - len(p.present) for p in plans)
    line = (f"{gigabytes(needed)} to download ({files} files from {len(plans)} repositories; "
            f"{gigabytes(have)} already here) into {folder}; {gigabytes(free)} free")
    if needed > free:
        raise NicheError(f"not enough disk space: {line}; free some space or pass --dest "
                         "on a bigger disk")
    return line


def endpoint() -> str | None:
    """HF_ENDPOINT at call time (the hub library reads it once, at import)."""
    value = os.environ.get("HF_ENDPOINT")
    return value.rstrip("/") if value else None


def _hub_call(call, repo: str):
    """Run one hub call; its failures become one line with advice."""
    try:
        return call()
    except NicheError:
        raise
    except Exception as exc:  # the hub's errors come from several libraries (httpx, requests)
        raise NicheError(hub_error(exc, repo)) from None


def hub_error(exc: BaseException, repo: str) -> str:
    name = type(exc).__name__
    status = getattr(getattr(exc, "response", None), "status_code", None)
    where = endpoint() or "https://huggingface.co"
    if name == "GatedRepoError" or status in (401, 403):
        return (f"{repo} is gated or private on {where}: accept its licence there and set "
                "HF_TOKEN to a token with read access")
    if name in ("RepositoryNotFoundError", "RevisionNotFoundError") or status == 404:
        return f"{repo} (or its revision) is not on {where}: check the model config"
    first = (str(exc).strip().splitlines() or [name])[0][:200]
    return (f"cannot reach the hub at {where} for {repo} ({name}: {first}): offline? copy the "
            "checkpoint folders over and pass --model-path, or set HF_ENDPOINT to a mirror")


def download(plans: list[RepoPlan]) -> list[Path]:
    """Fetch every plan's files (progress bars on); returns where each repository landed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()
    out = []
    for plan in plans:
        log.info("%s %s: %s (%d files, %s)", plan.model, plan.component, plan.repo,
                 len(plan.files), gigabytes(plan.total_bytes))
        where = _hub_call(lambda plan=plan: snapshot_download(
            plan.repo, revision=plan.revision, allow_patterns=sorted(plan.files) or None,
            local_dir=plan.local_dir, endpoint=endpoint()), plan.repo)
        out.append(Path(where))
    return out


def missing_on_disk(spec: ModelSpec, folder: Path | None) -> list[str]:
    """What of `spec` is not on this machine, without the network: component folders (or
    hub snapshots) that are absent, and pipeline sub-folders without weights."""
    missing = []
    for key, comp in spec.components.items():
        if folder is not None:
            root = (Path(folder) / comp.local).resolve()
            if not root.exists():
                missing.append(f"{root} (component {key})")
                continue
        elif comp.hub is None:
            missing.append(f"component {key} has no hub id: put its file under --model-path")
            continue
        else:
            from huggingface_hub import snapshot_download

            try:
                root = Path(snapshot_download(comp.hub, revision=comp.revision,
                                              local_files_only=True))
            except Exception:  # not in the cache (LocalEntryNotFoundError and kin)
                missing.append(f"{comp.hub} (component {key}, not in the hub cache)")
                continue
        missing.extend(_missing_in_pipeline(root))
    return missing


def _missing_in_pipeline(root: Path) -> list[str]:
    """Sub-folders model_index.json names that hold no config or no weights."""
    import json

    index = root / "model_index.json"
    if not index.is_file():
        return []
    try:
        entries = json.loads(index.read_text())
    except (OSError, ValueError):
        return [f"{index} (unreadable)"]
    missing = []
    for name, value in entries.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        sub = root / name
        if not sub.is_dir():
            missing.append(str(sub))
            continue
        files = [p.name for p in sub.iterdir()]
        needs_weights = any(f.endswith("config.json") for f in files) and name not in (
            "scheduler", "tokenizer", "tokenizer_2", "feature_extractor")
        if needs_weights and not any(f.endswith(WEIGHT_SUFFIXES) for f in files):
            missing.append(f"{sub}/ weights")
    return missing


def fetch_command(model: str, folder: Path | None) -> str:
    """The command that fetches `model` to where the engine looked (the download writes
    DEST/<model>/, so that is `folder` only when the folder is named after the model)."""
    if folder is None:
        return f"niche models download --model {model}"
    folder = Path(folder)
    if folder.name == model:
        return f"niche models download --model {model} --dest {folder.parent}"
    return f"niche models download --model {model} --dest {folder}"


def fetch_advice(model: str, folder: Path | None) -> str:
    """`fetch it with `COMMAND``, plus the --model-dir that then finds the files when the
    folder the engine looked in is not named after the model (--model-dir MODEL=DIR)."""
    advice = f"fetch it with `{fetch_command(model, folder)}`"
    if folder is not None and Path(folder).name != model:
        advice += (f" and pass --model-dir {model}={Path(folder) / model} (the download "
                   f"writes DEST/{model}/)")
    return advice
