"""The one code path from a request to pixels, shared by the miner and the validator's audit.

Deterministic by construction: every request is validated and completed (`resolve`) before any
model runs; the seed goes into an explicit CPU `torch.Generator` that draws the initial noise
(so a seed means the same on every device); the thread count is pinned; pipeline calls are
serialised by a lock. Same request + same files + same machine setup = same bits.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Optional, Protocol

import PIL.Image
import torch

from niche.errors import ConfigError, InvalidRequest
from niche.models import conditioning
from niche.models.families import BatchItem, Family, family_class
from niche.models.kernels import (
    DEFAULT_ATTENTION,
    KernelUnavailable,
    attention_backend,
    attention_problem,
    check_attention,
    declared_attention,
)
from niche.models.memory import memory_advice
from niche.models.spec import (
    DTYPES,
    MEMORY_MODES,
    MemoryMode,
    ModelSpec,
    load_spec,
    with_quant,
)
from niche.protocol import GenerationParams, ModelInfo, PipelineKind

log = logging.getLogger(__name__)

ImageArg = Optional[PIL.Image.Image]  # noqa: UP045 (runtime alias)


def default_threads(hint: int | None = None) -> int:
    """$NICHE_NUM_THREADS, else the checkpoints' hint (tiny ones say 1: extra threads only
    add contention at that size), else min(4, cores). Bits match only at equal counts."""
    env = os.environ.get("NICHE_NUM_THREADS")
    if env:
        try:
            threads = int(env)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ConfigError(f"NICHE_NUM_THREADS={env!r}: expected a whole number >= 1 "
                              "(or unset it for the default)")
        return threads
    if hint:
        return hint
    return max(1, min(4, os.cpu_count() or 1))


def resolve_device(device: str) -> str:
    """`auto` is what an operator means on a GPU box, and it still runs on a laptop."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def no_cuda_reason(device: str) -> str:
    """Why `device` (a cuda one) cannot run here, with what to do about it."""
    if torch.version.cuda is None:
        return (f"device {device} requested but this torch ({torch.__version__}) is the CPU "
                "build: install the CUDA build with `NICHE_TORCH=cuda bash scripts/setup.sh` "
                "(it replaces the CPU build), or pass --device cpu")
    return (f"device {device} requested but torch (CUDA {torch.version.cuda} build) sees no "
            "CUDA device: check `nvidia-smi` and CUDA_VISIBLE_DEVICES, or pass --device cpu")


class ImageEngine(Protocol):
    """What the miner, the verifier and the validator need of an engine. `Engine` is the one
    that serves; the localnet's cheating wrapper and test doubles stand in for it."""

    def spec(self, model: str) -> ModelSpec: ...

    def served(self) -> list[ModelInfo]: ...

    def resolve(self, params: GenerationParams) -> GenerationParams: ...

    def check_image(self, params: GenerationParams, image: ImageArg) -> None: ...

    def generate(self, params: GenerationParams, image: ImageArg = None) -> PIL.Image.Image: ...

    def generate_batch(self, requests: Sequence[tuple[GenerationParams, ImageArg]],
                       fuse: bool | None = None) -> list[PIL.Image.Image]: ...

    def generate_with_states(self, params: GenerationParams, image: ImageArg = None
                             ) -> tuple[PIL.Image.Image, list[torch.Tensor]]: ...

    def compute_dtype(self, model: str) -> str: ...

    def decode_state(self, params: GenerationParams, state: torch.Tensor,
                     kernels: Mapping[str, str] | None = None) -> PIL.Image.Image: ...

    def kernels(self, model: str) -> dict[str, str]: ...

    def initial_state(self, params: GenerationParams) -> torch.Tensor: ...

    def state_shape(self, params: GenerationParams) -> tuple[int, ...]: ...

    def recompute_steps(self, params: GenerationParams, image: ImageArg,
                        states: Mapping[int, torch.Tensor],
                        kernels: Mapping[str, str] | None = None
                        ) -> dict[int, torch.Tensor]: ...


class StreamsStates(Protocol):
    """An engine whose `generate_with_states` also hands each state over as its step ends
    (`Engine`), so the miner hashes states during generation."""

    def generate_with_states(self, params: GenerationParams, image: ImageArg = None, *,
                             on_state: Callable[[torch.Tensor], None] | None = None
                             ) -> tuple[PIL.Image.Image, list[torch.Tensor]]: ...


class Engine:
    """Loads the given models once and generates images from GenerationParams.

    `fast` (None: each model's YAML `fast`) turns on the CUDA fast path in the families'
    load (channels_last VAE, fused QKV, SDPA, torch.compile); on CPU it changes nothing.
    `quant` {model: variant} overrides a model's YAML weight storage (spec.with_quant)."""

    resolves_in_process = True
    """`resolve` and `check_image` are checks in this process (the miner may call them on
    its event loop); the Ray backend's go to a replica."""

    def __init__(
        self,
        models: Sequence[str] = ("flux-schnell",),
        model_root: Path | None = None,
        device: str = "cpu",
        dtype: str | None = "float32",
        memory_mode: MemoryMode | None = None,
        num_threads: int | None = None,
        *,
        config_dir: Path | None = None,
        local_files_only: bool = False,
        model_paths: Mapping[str, Path] | None = None,
        fuse_batches: bool = False,
        pipelines: Mapping[str, Sequence[str]] | None = None,
        fast: bool | None = None,
        quant: Mapping[str, str] | None = None,
        attention: str = DEFAULT_ATTENTION,
    ):
        if dtype is not None and dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        if memory_mode is not None and memory_mode not in MEMORY_MODES:
            raise ConfigError(f"memory mode must be one of {', '.join(MEMORY_MODES)}")
        device = resolve_device(device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(no_cuda_reason(device))
        if not models:
            raise ConfigError("no models to serve")
        self.device = device
        self.attention = check_attention(attention, device)
        """The SDPA backend every call runs on (declared in answers: niche.models.kernels)."""
        self.fuse_batches = fuse_batches
        self.model_root = Path(model_root) if model_root is not None else None
        folders: dict[str, Path | None] = {}
        self._specs: dict[str, ModelSpec] = {}
        for name in models:
            folder = self.model_root / name if self.model_root is not None else None
            if model_paths and name in model_paths:
                folder = Path(model_paths[name])
            folders[name] = folder
            spec = load_spec(name, config_dir, folder)
            if pipelines and name in pipelines:
                spec = _restrict(spec, pipelines[name])
            if quant and name in quant:  # weight storage (FLUX: fp8, GGUF; spec.with_quant)
                spec = with_quant(spec, quant[name])
            self._specs[name] = spec
        hints = [s.cpu_threads for s in self._specs.values() if s.cpu_threads]
        self.num_threads = num_threads or default_threads(min(hints) if hints else None)
        torch.set_num_threads(self.num_threads)
        if device.startswith("cuda"):
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
            torch.backends.cuda.matmul.allow_tf32 = False
        self._lock = threading.RLock()
        self._families: dict[str, Family] = {}
        for name, spec in self._specs.items():
            family = family_class(spec.family)(
                spec, folders[name], device, dtype or spec.dtype, memory_mode or spec.memory_mode,
                local_files_only=local_files_only,
                fast=spec.fast if fast is None else fast)
            try:
                with torch.no_grad():
                    family.load()
            except torch.OutOfMemoryError:
                raise ConfigError(memory_advice(name, family.memory_mode)) from None
            except (OSError, ValueError, ConfigError) as exc:  # missing files, no network
                raise ConfigError(load_error(name, spec, folders[name], exc)) from exc
            self._families[name] = family
            log.info("loaded %s (%s) from %s on %s, %d threads", name, family.dtype_name,
                     folders[name] or "hub", device, self.num_threads)

    # ---------------------------------------------------------------- what is served
    def spec(self, model: str) -> ModelSpec:
        return spec_served(self._specs, model)

    def served(self) -> list[ModelInfo]:
        return [ModelInfo(model=name, pipelines=list(spec.pipelines))
                for name, spec in self._specs.items()]

    def compute_dtype(self, model: str) -> str:
        """The dtype `model`'s networks run in (what an answer declares with its states)."""
        return self.family(model).dtype_name

    def kernels(self, model: str) -> dict[str, str]:
        """The kernel choices that change `model`'s step bits, as answers declare them
        (`StatesCommitment.kernels`): the attention backend, the weight storage when it is
        not the plain dtype's, and torch.compile / fused QKV when the fast path applied them
        (inductor moved a bfloat16 FLUX.1-dev step by up to 4.3e-2 on CPU: more than a
        cache does)."""
        declared = {"attention": self.attention}
        quant = self.spec(model).quant
        if quant != "none":
            declared["weights"] = quant
        for applied in self.family(model).fast_applied:  # the CUDA fast path's bit-changers
            if applied.startswith("torch.compile"):
                declared["compile"] = applied.split()[-1]
            elif applied == "fused qkv":
                declared["fused_qkv"] = "on"
        return declared

    def memory_mode(self, model: str) -> str:
        """The memory mode `model` was loaded in (what an out-of-memory error advises on)."""
        return self.family(model).memory_mode

    def family(self, model: str) -> Family:
        self.spec(model)
        return self._families[model]

    # ---------------------------------------------------------------- validation
    def resolve(self, params: GenerationParams) -> GenerationParams:
        """Fill model defaults and check limits; raises InvalidRequest(field=...) early."""
        spec = self.spec(params.model)
        d, lim = spec.defaults, spec.limits
        if params.pipeline not in spec.pipelines:
            raise InvalidRequest(f"{params.model} does not serve pipeline '{params.pipeline.value}'"
                                 f" (serves: {', '.join(p.value for p in spec.pipelines)})",
                                 field="pipeline")
        steps = d.steps if params.steps is None else params.steps
        if not lim.min_steps <= steps <= lim.max_steps:
            raise InvalidRequest(f"{steps} not in [{lim.min_steps}, {lim.max_steps}]",
                                 field="steps")
        if lim.allowed_steps and steps not in lim.allowed_steps:
            raise InvalidRequest(f"{steps} not one of {lim.allowed_steps}", field="steps")
        guidance = d.guidance if params.guidance is None else params.guidance
        if guidance > lim.max_guidance:
            raise InvalidRequest(f"{guidance} above {lim.max_guidance}", field="guidance")
        width = d.width if params.width is None else params.width
        height = d.height if params.height is None else params.height
        for field, value in (("width", width), ("height", height)):
            if value % lim.size_multiple:
                raise InvalidRequest(f"{value} is not a multiple of {lim.size_multiple}",
                                     field=field)
            if not lim.min_size <= value <= lim.max_size:
                raise InvalidRequest(f"{value} not in [{lim.min_size}, {lim.max_size}]",
                                     field=field)
        if lim.allowed_sizes and (width, height) not in [tuple(s) for s in lim.allowed_sizes]:
            raise InvalidRequest(f"{width}x{height} not one of the allowed sizes", field="width")
        is_cn = params.pipeline in (PipelineKind.CONTROLNET_CANNY, PipelineKind.CONTROLNET_DEPTH)
        is_ip = params.pipeline is PipelineKind.IP_ADAPTER
        if params.controlnet_scale is not None and not is_cn:
            raise InvalidRequest("only for controlnet pipelines", field="controlnet_scale")
        if params.ip_adapter_scale is not None and not is_ip:
            raise InvalidRequest("only for the ip-adapter pipeline", field="ip_adapter_scale")
        family = self._families[params.model]
        limit = d.max_sequence_length
        for field in ("prompt", "negative_prompt"):
            text = getattr(params, field)
            if text and family.token_count(text) > limit:
                raise InvalidRequest(f"longer than {limit} tokens", field=field)
        negative = params.negative_prompt if family.uses_negative_prompt else ""
        return params.model_copy(update={
            "steps": steps, "guidance": guidance, "width": width, "height": height,
            "negative_prompt": negative,
            "controlnet_scale": (d.controlnet_scale if params.controlnet_scale is None
                              else params.controlnet_scale) if is_cn else None,
            "ip_adapter_scale": (d.ip_adapter_scale if params.ip_adapter_scale is None
                              else params.ip_adapter_scale) if is_ip else None,
        })

    def check_image(self, params: GenerationParams, image: ImageArg) -> None:
        """The conditioning image must be there exactly when the pipeline needs one."""
        if params.pipeline.needs_image and image is None:
            raise InvalidRequest(f"pipeline {params.pipeline.value} needs a conditioning image",
                                 field="image")
        if not params.pipeline.needs_image and image is not None:
            raise InvalidRequest("txt2img takes no conditioning image", field="image")
        if image is not None:
            if not isinstance(image, PIL.Image.Image):
                raise InvalidRequest("not a PIL image", field="image")
            w, h = image.size
            if w < 1 or h < 1 or w * h > self.spec(params.model).limits.max_image_pixels:
                raise InvalidRequest(f"{w}x{h} pixels is out of bounds", field="image")

    def conditioning_image(self, params: GenerationParams, image: ImageArg) -> ImageArg:
        """The pipeline-ready conditioning image at the request's size (params resolved)."""
        if image is None or params.controlnet_scale == 0.0 or params.ip_adapter_scale == 0.0:
            return None  # scale 0 runs the plain txt2img pipeline: no conditioning to compute
        d = self.spec(params.model).defaults
        w, h = params.size
        if params.pipeline is PipelineKind.CONTROLNET_CANNY:
            return conditioning.canny(image, w, h, d.canny_low, d.canny_high)
        if params.pipeline is PipelineKind.CONTROLNET_DEPTH:
            estimator = getattr(self._families[params.model], "depth_estimator", None)
            with torch.no_grad():
                return conditioning.depth(image, w, h, estimator)
        return conditioning.reference(image, w, h)

    # ---------------------------------------------------------------- generation
    def generate(self, params: GenerationParams, image: ImageArg = None) -> PIL.Image.Image:
        return self.generate_batch([(params, image)])[0]

    def generate_with_states(self, params: GenerationParams, image: ImageArg = None, *,
                             on_state: Callable[[torch.Tensor], None] | None = None
                             ) -> tuple[PIL.Image.Image, list[torch.Tensor]]:
        """`generate`'s image (the same bits) and the sampler states x_1..x_N after every
        denoising step: fresh float32 CPU tensors (the caller may keep them; the engine
        never writes to them again) with batch dimension 1 in the family's latent layout
        (FLUX: packed (1, tokens, 64); Kolors: (1, 4, h/8, w/8)). `on_state` is handed each
        of those tensors as soon as its step is done (the miner hashes them meanwhile)."""
        return self._generate([(params, image)], False, capture=True, on_state=on_state)[0]

    def generate_batch(
        self, requests: Sequence[tuple[GenerationParams, ImageArg]],
        fuse: bool | None = None,
    ) -> list[PIL.Image.Image]:
        """All requests are validated first. With `fuse` (default: the engine's fuse_batches),
        requests that differ only in prompt, negative prompt and seed (same conditioning image)
        run as one pipeline call with one generator per item: faster, but batched kernels round
        differently, so a fused item is NOT bit-identical to the same request run alone.
        Unfused, each item is exactly `generate(params, image)`."""
        return [img for img, _ in self._generate(requests, fuse, capture=False)]

    def generate_batch_with_states(
        self, requests: Sequence[tuple[GenerationParams, ImageArg]],
        fuse: bool | None = None,
    ) -> list[tuple[PIL.Image.Image, list[torch.Tensor]]]:
        """`generate_batch` plus each item's states x_1..x_N (as `generate_with_states`). A
        fused item's states are its own slice of the batch's, so, like its image, they are
        not what the item run alone (or `recompute_step`) gives bit for bit."""
        return self._generate(requests, fuse, capture=True)

    def _generate(self, requests: Sequence[tuple[GenerationParams, ImageArg]],
                  fuse: bool | None, capture: bool,
                  on_state: Callable[[torch.Tensor], None] | None = None
                  ) -> list[tuple[PIL.Image.Image, list[torch.Tensor]]]:
        fuse = self.fuse_batches if fuse is None else fuse
        resolved = []
        for params, image in requests:
            full = self.resolve(params)
            self.check_image(full, image)
            resolved.append((full, image))
        groups: dict[tuple, list[int]] = {}
        for i, (full, image) in enumerate(resolved):
            key = _group_key(full, image) if fuse else (i,)
            groups.setdefault(key, []).append(i)
        results: list[tuple[PIL.Image.Image, list[torch.Tensor]] | None] = [None] * len(resolved)
        for indices in groups.values():
            full, image = resolved[indices[0]]
            items = [BatchItem(prompt=resolved[i][0].prompt,
                               negative_prompt=resolved[i][0].negative_prompt,
                               generator=torch.Generator("cpu").manual_seed(resolved[i][0].seed))
                     for i in indices]
            states: list[list[torch.Tensor]] = [[] for _ in indices]

            def record(step: int, latents: torch.Tensor, states=states) -> None:
                for b, row in enumerate(states):
                    # one copy, whatever the device: `.to` then `.clone` copied a GPU state
                    # twice (the second on CPU, into fresh pages, while the GPU waits)
                    row.append(latents[b:b + 1].detach().to("cpu", torch.float32, copy=True))
                    if on_state is not None:
                        on_state(row[-1])

            with self._lock, torch.no_grad(), attention_backend(self.attention):
                cond = self.conditioning_image(full, image)
                images = self._families[full.model].run(full, items, cond,
                                                        record if capture else None)
            for b, (i, img) in enumerate(zip(indices, images, strict=False)):
                results[i] = (img.convert("RGB"), states[b])
        return results  # type: ignore[return-value]

    # ---------------------------------------------------------------- single steps
    def initial_state(self, params: GenerationParams) -> torch.Tensor:
        """x_0 of the request's chain, exactly as the pipeline starts from it (float32, CPU,
        batch 1): drawn from the request's seed, so a validator needs nothing from the miner."""
        full = self.resolve(params)
        generator = torch.Generator("cpu").manual_seed(full.seed)
        with self._lock, torch.no_grad():
            return self._families[full.model].initial_state(full, generator)

    def recompute_step(self, params: GenerationParams, image: ImageArg, step: int,
                       state: torch.Tensor) -> torch.Tensor:
        """x_{step+1} from x_step = `state` with the pipeline's own components, schedule,
        conditioning and CFG batching; bit-exact against `generate_with_states` on the same
        machine, dtype and thread count."""
        return self.recompute_steps(params, image, {step: state})[step]

    def recompute_steps(self, params: GenerationParams, image: ImageArg,
                        states: Mapping[int, torch.Tensor],
                        kernels: Mapping[str, str] | None = None) -> dict[int, torch.Tensor]:
        """`recompute_step` for several steps {step: x_step}, encoding the prompt and the
        conditioning once (what an audit costs: one encode, the steps, no full chain).
        `kernels`: the answer's declared kernel choices (None: this engine's own); the steps
        run on the declared attention backend, KernelUnavailable when it cannot run here."""
        attention = self._attention_for(kernels)
        full = self.resolve(params)
        self.check_image(full, image)
        n = int(full.steps or 0)
        family = self._families[full.model]
        shape = family.state_shape(full)
        for step, state in states.items():
            if not 0 <= step < n:
                raise InvalidRequest(f"step {step} not in [0, {n})", field="steps")
            if not isinstance(state, torch.Tensor) or tuple(state.shape) != shape:
                raise InvalidRequest(f"state for step {step} is not a tensor of shape {shape}",
                                     field="states")
        with self._lock, torch.no_grad(), attention_backend(attention):
            cond = self.conditioning_image(full, image)
            context = family.step_context(full, full.prompt, full.negative_prompt, cond)
            return {step: family.step(full, context, state.detach().to(torch.float32), step)
                    for step, state in states.items()}

    def _attention_for(self, kernels: Mapping[str, str] | None) -> str:
        """The attention backend to recompute an answer declaring `kernels` on (None: this
        engine's own), or KernelUnavailable when it does not run on this device."""
        attention = self.attention if kernels is None else declared_attention(kernels)
        problem = attention_problem(attention, self.device)
        if problem:
            raise KernelUnavailable(problem)
        return attention

    def state_shape(self, params: GenerationParams) -> tuple[int, ...]:
        """The shape of every state x_0..x_N of the request (batch dimension 1)."""
        full = self.resolve(params)
        return self._families[full.model].state_shape(full)

    def decode_state(self, params: GenerationParams, state: torch.Tensor,
                     kernels: Mapping[str, str] | None = None) -> PIL.Image.Image:
        """The image the pipeline outputs from x_N = `state` (generate's bits for an honest
        final state), on the declared attention backend (`kernels`, None: this engine's)."""
        attention = self._attention_for(kernels)
        full = self.resolve(params)
        with self._lock, torch.no_grad(), attention_backend(attention):
            return self._families[full.model].decode(full, state.detach().to(torch.float32)
                                                     ).convert("RGB")


def spec_served(specs: dict[str, ModelSpec], model: str) -> ModelSpec:
    """`model`'s spec, or the request error naming what is served (any ImageEngine)."""
    try:
        return specs[model]
    except KeyError:
        raise InvalidRequest(f"model '{model}' is not served here (serving: "
                             f"{', '.join(specs)})", field="model") from None


def _uses_single_files(spec: ModelSpec, folder: Path | None) -> bool:
    """The model loads some components from single files (YAML `file:` or files in its
    folder, the BFL/ComfyUI layout) rather than a diffusers folder alone."""
    if any(comp.file for comp in spec.components.values()):
        return True
    return folder is not None and Path(folder).is_dir() and any(
        p.is_file() and p.suffix in (".safetensors", ".gguf") for p in Path(folder).iterdir())


def load_error(name: str, spec: ModelSpec, folder: Path | None, exc: BaseException) -> str:
    """One line: what is missing and the command that fetches it, else the loader's reason
    (diffusers' own message may point at "the stacktrace above", which nobody prints)."""
    from niche.models.download import fetch_advice, missing_on_disk

    where = folder or "the hub (ids in its config)"
    if isinstance(exc, ConfigError) and _uses_single_files(spec, folder):
        # the single-file loader's own line names the component, file and mismatch; the
        # diffusers-folder inventory below does not apply to such a folder
        return f"cannot load model {name} from {where}: {exc}"
    missing = missing_on_disk(spec, folder)
    if missing:
        shown = ", ".join(missing[:4]) + (f" (+{len(missing) - 4} more)" if len(missing) > 4
                                          else "")
        return (f"model {name} is not complete on this machine: missing {shown}; "
                f"{fetch_advice(name, folder)}")
    text = str(exc).strip()
    first = text.splitlines()[0] if text else repr(exc)
    if _looks_damaged(text):
        return (f"cannot load model {name} from {where}: {first} (a weights file looks "
                f"truncated or corrupt, e.g. an interrupted download; "
                f"{fetch_advice(name, folder)})")
    return f"cannot load model {name} from {where}: {first}"


def _looks_damaged(text: str) -> bool:
    """Whether a loader's message says a weights file is unreadable (safetensors' header
    or length checks, torch's unpickler), as a cut-short or garbled download is."""
    lowered = text.lower()
    return any(sign in lowered for sign in (
        "unable to load weights", "safetensor", "header too large", "header too small",
        "incomplete metadata", "invalid header", "eof", "unexpected end", "corrupt",
        "invalid load key", "not a zip file", "failed to read"))


def _restrict(spec: ModelSpec, wanted: Sequence[str]) -> ModelSpec:
    """Serve (and load) only some of a model's pipelines."""
    kinds = []
    for w in wanted:
        try:
            kind = PipelineKind(w)
        except ValueError:
            raise ConfigError(f"unknown pipeline '{w}'") from None
        if kind not in spec.pipelines:
            raise ConfigError(f"{spec.name} has no pipeline '{w}'")
        kinds.append(kind)
    return spec.model_copy(update={"pipelines": kinds})


def _group_key(params: GenerationParams, image: ImageArg) -> tuple:
    base = params.model_copy(update={"prompt": "-", "negative_prompt": "", "seed": 0})
    digest = None
    if image is not None:
        digest = (image.mode, image.size, hashlib.sha256(image.tobytes()).hexdigest())
    return (base.model_dump_json(), digest)
