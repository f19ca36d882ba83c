"""FLUX components from single files, the BFL/ComfyUI layout operators download.

A FLUX model folder may hold, instead of (or beside) diffusers weights, the files the FLUX
guides name: the transformer (`flux1-dev.safetensors`, `flux1-dev-fp8.safetensors`,
`flux1-dev-Q8_0.gguf`, `flux-mini.safetensors`), `ae.safetensors` (VAE), `clip_l.safetensors`
and `t5xxl_fp16.safetensors` / `t5xxl_fp8_e4m3fn.safetensors`. The small diffusers config
files (model_index.json, scheduler/, tokenizer*/ and each component's config.json) must be in
the folder too: nothing is fetched from a hub, and a single file does not say its own
architecture (Flux-mini's file is FLUX.1-dev's key layout with 5 + 10 blocks).

Which file is which (`component_files`): a YAML `components.<name>.file` first; else by name
at the folder's top level: `ae*.safetensors` VAE, `clip_l*.safetensors` CLIP-L, `t5xxl*` T5,
any other `*.safetensors` / `*.gguf` the transformer (picked by the model's `quant`).

The transformer's BFL keys are converted here (`bfl_to_diffusers`), not by diffusers'
`convert_flux_transformer_checkpoint_to_diffusers`: that one hard-codes FLUX's 3072 width,
so it cannot read any narrower distillate (nor the project's tiny checkpoints); the mapping is
the same, with the widths read from the tensors. The converted dict then goes through
diffusers' real `from_single_file` (with `GGUFQuantizationConfig` for GGUF files). The VAE and
text encoders use diffusers' / transformers' own loaders. Every mismatch is a ConfigError
naming the component, the file and what was expected.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from niche.errors import ConfigError
from niche.models.spec import ModelSpec

log = logging.getLogger(__name__)

TRANSFORMER, VAE, CLIP, T5 = "transformer", "vae", "text_encoder", "text_encoder_2"
COMPONENTS = (TRANSFORMER, VAE, CLIP, T5)
WHAT = {TRANSFORMER: "FLUX transformer", VAE: "autoencoder (ae.safetensors)",
        CLIP: "CLIP-L text encoder (clip_l.safetensors)",
        T5: "T5-XXL text encoder (t5xxl_*.safetensors)"}
GGUF_TYPES = {"gguf-q8": ("Q8_0",), "gguf-q4": ("Q4_0", "Q4_1", "Q4_K")}
_BFL_PREFIX = "model.diffusion_model."


def _fail(component: str, path: Path, why: str) -> ConfigError:
    return ConfigError(f"component {component} ({WHAT[component]}), file {path}: {why}")


# --------------------------------------------------------------------------- which file
def component_files(spec: ModelSpec, folder: Path | None) -> dict[str, Path]:
    """{component: file} for the components of a FLUX model that load from single files."""
    files: dict[str, Path] = {}
    for key in COMPONENTS:
        comp = spec.components.get(key)
        if comp is not None and comp.file:
            path = Path(comp.file).expanduser()
            if not path.is_absolute():
                if folder is None:
                    raise ConfigError(f"model {spec.name}: component {key} file {comp.file} is "
                                      "relative but no model folder is given (--model-path)")
                path = folder / path
            if not path.is_file():
                raise _fail(key, path, "missing (set by components."
                            f"{key}.file in the model's YAML)")
            files[key] = path
    if folder is None or not folder.is_dir():
        return files
    found = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix in (".safetensors", ".gguf"))
    by_kind: dict[str, list[Path]] = {k: [] for k in COMPONENTS}
    for p in found:
        low = p.name.lower()
        kind = (VAE if low.startswith("ae") and p.suffix == ".safetensors" else
                CLIP if low.startswith("clip_l") else
                T5 if low.startswith("t5xxl") else TRANSFORMER)
        by_kind[kind].append(p)
    for key, candidates in by_kind.items():
        if key in files or not candidates:
            continue
        pick = _pick(spec, key, candidates)
        if pick is not None:
            files[key] = pick
    if spec.quant.startswith("gguf") and TRANSFORMER not in files:
        raise ConfigError(f"model {spec.name}: quant {spec.quant} needs a .gguf transformer "
                          f"file in {folder} (none there); download one or set "
                          "components.transformer.file")
    return files


def _pick(spec: ModelSpec, key: str, candidates: list[Path]) -> Path | None:
    """One file among several of a kind, by the model's quant (fp8 names for fp8)."""
    if key == T5:
        fp8 = [p for p in candidates if "fp8" in p.name.lower()]
        rest = [p for p in candidates if p not in fp8]
        ranked = (fp8 or rest) if spec.text_encoder_quant == "fp8" else (rest or fp8)
        return ranked[0]
    if key != TRANSFORMER:
        return _only(spec, key, candidates)
    if spec.quant.startswith("gguf"):
        tags = [t.lower() for t in GGUF_TYPES[spec.quant]]
        pool = [p for p in candidates if p.suffix == ".gguf"
                and any(t in p.name.lower() for t in tags)]
        if not pool:
            raise ConfigError(f"model {spec.name}: quant {spec.quant} needs a .gguf "
                              f"transformer named like *{GGUF_TYPES[spec.quant][0]}.gguf; "
                              f"found {', '.join(p.name for p in candidates)}")
        return _only(spec, key, pool)
    pool = [p for p in candidates if p.suffix == ".safetensors"]
    if not pool:
        return None  # only GGUF files: a diffusers transformer/ folder may still be there
    fp8 = [p for p in pool if "fp8" in p.name.lower()]
    plain = [p for p in pool if p not in fp8]
    return _only(spec, key, (fp8 or plain) if spec.quant == "fp8" else (plain or fp8))


def _only(spec: ModelSpec, key: str, pool: list[Path]) -> Path:
    if len(pool) > 1:
        raise ConfigError(f"model {spec.name}: several {key} files fit "
                          f"({', '.join(p.name for p in pool)}); name one with "
                          f"components.{key}.file in the model's YAML")
    return pool[0]


# --------------------------------------------------------------------------- reading
def _read(component: str, path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".gguf":
            from diffusers.models.model_loading_utils import load_gguf_checkpoint

            return load_gguf_checkpoint(str(path))
        from safetensors.torch import load_file

        return load_file(str(path))
    except ImportError as exc:
        raise _fail(component, path, f"{exc} (pip install gguf)") from exc
    except Exception as exc:  # noqa: BLE001 - any reader error is a bad file
        raise _fail(component, path, f"not a readable {path.suffix} file ({exc})") from exc


def _config(component: str, path: Path, folder: Path) -> dict[str, Any]:
    cfg = folder / component / "config.json"
    if not cfg.is_file():
        raise _fail(component, path, f"no {cfg}: single files need the diffusers config "
                    f"files beside them ({component}/config.json)")
    return json.loads(cfg.read_text())


def logical_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """A tensor's shape as the model sees it (a GGUF tensor's bytes decode to more values)."""
    quant_shape = getattr(tensor, "quant_shape", None)
    return tuple(quant_shape) if quant_shape is not None else tuple(tensor.shape)


def check_against(component: str, path: Path, state: Mapping[str, torch.Tensor],
                  expected: Mapping[str, tuple[int, ...]],
                  optional: tuple[str, ...] = ()) -> None:
    """Every expected tensor there with the expected shape; unexpected ones are refused."""
    missing = sorted(k for k in expected if k not in state
                     and not any(o in k for o in optional))
    unexpected = sorted(k for k in state if k not in expected
                        and not any(o in k for o in optional))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise _fail(component, path, "; ".join(parts) + " against its config: another "
                    "model or size (e.g. a flux-mini file for flux-dev)?")
    for key, shape in expected.items():
        if key in state and logical_shape(state[key]) != tuple(shape):
            raise _fail(component, path, f"{key} has shape {logical_shape(state[key])}, "
                        f"the config expects {tuple(shape)} (another model size?)")


def _expected(cls, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls.from_config(dict(config)) if hasattr(cls, "from_config") else cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- transformer
def is_bfl(state: Mapping[str, Any]) -> bool:
    return any(k.removeprefix(_BFL_PREFIX).startswith("double_blocks.") for k in state)


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """BFL's final modulation is (shift, scale); diffusers' AdaLayerNormContinuous is
    (scale, shift). The swap is its own inverse."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


_WB = ("weight", "bias")
FINAL_MODULATION = ("final_layer.adaLN_modulation.1.{p}", "norm_out.linear.{p}")
# a double block's fused qkv per stream, and a single block's fused linear1, in diffusers' parts
DOUBLE_QKV = {"img": ("attn.to_q", "attn.to_k", "attn.to_v"),
              "txt": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


def block_indices(keys: Any, prefix: str) -> list[int]:
    """The block numbers present under `prefix` ("double_blocks.", "transformer_blocks.")."""
    return sorted({int(k.split(".")[1]) for k in keys if k.startswith(prefix)})


def bfl_renames(doubles: list[int], singles: list[int]) -> list[tuple[str, str]]:
    """Every one-to-one (BFL key, diffusers key) pair of a FLUX transformer with these blocks.
    The fused tensors (DOUBLE_QKV, SINGLE_LINEAR1) and FINAL_MODULATION are not renames and
    are handled by the two converters; this one table serves both directions."""
    pairs: list[tuple[str, str]] = []
    for bfl, ours in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                      ("guidance_in", "guidance_embedder")):
        for a, b in (("in_layer", "linear_1"), ("out_layer", "linear_2")):
            pairs += [(f"{bfl}.{a}.{p}", f"time_text_embed.{ours}.{b}.{p}") for p in _WB]
    for bfl, ours in (("txt_in", "context_embedder"), ("img_in", "x_embedder"),
                      ("final_layer.linear", "proj_out")):
        pairs += [(f"{bfl}.{p}", f"{ours}.{p}") for p in _WB]
    for i in doubles:
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for bfl, ours in (("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
                          ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
                          ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
                          ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out")):
            pairs += [(f"{b}{bfl}.{p}", f"{d}{ours}.{p}") for p in _WB]
        for side, (q, k) in (("img", ("norm_q", "norm_k")),
                             ("txt", ("norm_added_q", "norm_added_k"))):
            pairs += [(f"{b}{side}_attn.norm.query_norm.scale", f"{d}attn.{q}.weight"),
                      (f"{b}{side}_attn.norm.key_norm.scale", f"{d}attn.{k}.weight")]
    for i in singles:
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for bfl, ours in (("modulation.lin", "norm.linear"), ("linear2", "proj_out")):
            pairs += [(f"{b}{bfl}.{p}", f"{d}{ours}.{p}") for p in _WB]
        pairs += [(f"{b}norm.query_norm.scale", f"{d}attn.norm_q.weight"),
                  (f"{b}norm.key_norm.scale", f"{d}attn.norm_k.weight")]
    return pairs


def bfl_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL/ComfyUI FLUX transformer keys -> diffusers' FluxTransformer2DModel keys (the mapping
    of diffusers' converter, widths read from the tensors). Unknown keys are kept as they are
    so that the key check reports them."""
    sd = {k.removeprefix(_BFL_PREFIX): v for k, v in state.items()}
    doubles = block_indices(sd, "double_blocks.")
    singles = block_indices(sd, "single_blocks.")
    out = {ours: sd.pop(bfl) for bfl, ours in bfl_renames(doubles, singles) if bfl in sd}
    inner = int(out["x_embedder.weight"].shape[0]) if "x_embedder.weight" in out else 0
    for p in _WB:
        bfl, ours = (name.format(p=p) for name in FINAL_MODULATION)
        if bfl in sd:
            out[ours] = swap_halves(sd.pop(bfl))
        for i in doubles:
            for side, names in DOUBLE_QKV.items():
                key = f"double_blocks.{i}.{side}_attn.qkv.{p}"
                if key in sd:
                    for name, part in zip(names, torch.chunk(sd.pop(key), 3, dim=0),
                                          strict=True):
                        out[f"transformer_blocks.{i}.{name}.{p}"] = part
        for i in singles:
            key = f"single_blocks.{i}.linear1.{p}"
            if key in sd and inner:
                fused = sd.pop(key)
                sizes = [inner, inner, inner, int(fused.shape[0]) - 3 * inner]
                for name, part in zip(SINGLE_LINEAR1, torch.split(fused, sizes, dim=0),
                                      strict=True):
                    out[f"single_transformer_blocks.{i}.{name}.{p}"] = part
    out.update(sd)  # leftovers: reported as unexpected by the key check
    return out


def gguf_types(state: Mapping[str, torch.Tensor]) -> set[str]:
    names = set()
    for t in state.values():
        q = getattr(t, "quant_type", None)
        if q is not None:
            names.add(getattr(q, "name", str(q)))
    return names


def load_transformer(path: Path, folder: Path, dtype: torch.dtype, quant: str):
    """FluxTransformer2DModel from a BFL/ComfyUI (or diffusers-keyed) .safetensors or .gguf
    file, its architecture from folder/transformer/config.json."""
    from diffusers import FluxTransformer2DModel

    component = TRANSFORMER
    config = _config(component, path, folder)
    is_gguf = path.suffix == ".gguf"
    if quant.startswith("gguf") and not is_gguf:
        raise _fail(component, path, f"quant {quant} needs a .gguf file")
    if is_gguf and not quant.startswith("gguf"):
        raise _fail(component, path, f"a GGUF file, but the model's quant is {quant} "
                    "(set quant: gguf-q8 or gguf-q4)")
    state = _read(component, path)
    if not is_bfl(state) and not any(k.startswith("transformer_blocks.") for k in state):
        raise _fail(component, path, "not a FLUX transformer: expected BFL keys like "
                    "double_blocks.0.img_attn.qkv.weight (or diffusers' transformer_blocks.*)")
    if is_gguf:
        found = gguf_types(state)
        wanted = set(GGUF_TYPES[quant])
        if not found or not found <= wanted:
            raise _fail(component, path, f"holds {', '.join(sorted(found)) or 'no quantized'}"
                        f" tensors, quant {quant} expects {' or '.join(sorted(wanted))}")
    converted = bfl_to_diffusers(state) if is_bfl(state) else dict(state)
    check_against(component, path, converted, _expected(FluxTransformer2DModel, config))
    kwargs: dict[str, Any] = {}
    if is_gguf:
        from diffusers import GGUFQuantizationConfig

        kwargs["quantization_config"] = GGUFQuantizationConfig(compute_dtype=dtype)
    try:
        return FluxTransformer2DModel.from_single_file(
            converted, config=str(folder), subfolder=component, local_files_only=True,
            torch_dtype=dtype, **kwargs)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise _fail(component, path, f"diffusers could not load it ({exc})") from exc


# --------------------------------------------------------------------------- VAE
def load_vae(path: Path, folder: Path, dtype: torch.dtype):
    """AutoencoderKL from BFL's ae.safetensors (original LDM keys) through diffusers'
    `from_single_file` and its LDM conversion."""
    from diffusers import AutoencoderKL

    component = VAE
    _config(component, path, folder)
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # noqa: BLE001
        raise _fail(component, path, f"not a readable safetensors file ({exc})") from exc
    if not any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks."))
               for k in keys):
        raise _fail(component, path, "not an autoencoder: expected keys like "
                    "encoder.down.0.block.0.conv1.weight (BFL ae.safetensors)")
    try:
        return AutoencoderKL.from_single_file(str(path), config=str(folder),
                                              subfolder=component, local_files_only=True,
                                              torch_dtype=dtype)
    except (ValueError, KeyError, RuntimeError, IndexError) as exc:
        raise _fail(component, path, f"does not match {folder / component / 'config.json'} "
                    f"({str(exc).splitlines()[0][:200]})") from exc


# --------------------------------------------------------------------------- text encoders
def load_text_encoder(component: str, path: Path, folder: Path, dtype: torch.dtype):
    """CLIPTextModel / T5EncoderModel from a single file holding transformers' keys (the
    ComfyUI clip_l / t5xxl files), through transformers' own `from_pretrained` on a temporary
    folder linking the config and the file."""
    from safetensors import safe_open
    from transformers import AutoConfig, CLIPTextModel, T5EncoderModel

    cls = CLIPTextModel if component == CLIP else T5EncoderModel
    config_path = folder / component / "config.json"
    _config(component, path, folder)
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape())
                      for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as exc:  # noqa: BLE001
        raise _fail(component, path, f"not a readable safetensors file ({exc})") from exc
    cfg = AutoConfig.from_pretrained(str(folder / component), local_files_only=True)
    from accelerate import init_empty_weights

    with init_empty_weights():
        expected = {k: tuple(v.shape) for k, v in cls(cfg).state_dict().items()}
    # clip_l files carry the projection of CLIPTextModelWithProjection; T5 ties its embeddings
    optional = ("text_projection", "logit_scale", "position_ids", "embed_tokens")
    if component == T5 and "shared.weight" not in shapes \
            and "encoder.embed_tokens.weight" in shapes:
        shapes["shared.weight"] = shapes["encoder.embed_tokens.weight"]
    check_against(component, path, {k: torch.empty(s, device="meta") for k, s in shapes.items()},
                  expected, optional)
    with tempfile.TemporaryDirectory(prefix="niche-te-") as tmp:
        os.symlink(config_path, Path(tmp) / "config.json")
        os.symlink(path.resolve(), Path(tmp) / "model.safetensors")
        try:
            return cls.from_pretrained(tmp, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise _fail(component, path, f"transformers could not load it ({exc})") from exc
