"""Tiny random-weight checkpoints of the REAL architectures, in the hub repositories' layout.

Tests, localnet and the validator run the real loading and generation code (diffusers
`from_pretrained` on a folder) on these, so they must be small (a few MB) and fast (a 64x64
image well under a second on CPU). Every component has one builder function returning the
module; `_finish` then initialises every parameter from an explicit generator seeded by the
component's name (no global RNG), puts it in eval mode and, where trained weights exist in
niche/devnet/tiny_weights/<model>/<component>.safetensors (`niche models train-tiny`), loads
those instead. Two builds are byte-identical.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TINY_VERSION = "tiny-v1"
MARKER = ".niche-tiny-complete"
TRAINED_WEIGHTS_DIR = Path(__file__).parent / "tiny_weights"

# A few dozen prompt-like lines: the vocabulary of every tiny tokenizer.
# The shape/colour lines cover every word of the tiny-training prompts
# (niche/devnet/training/data.py VOCABULARY): trained tiny weights depend on these tokens.
CORPUS = """a photo of a cat sitting on a red chair in the sun
a painting of a mountain lake at dawn, oil on canvas
an astronaut riding a horse on the moon, digital art
a bowl of fruit with apples, oranges and grapes on a wooden table
a portrait of an old man with a white beard, studio lighting
a futuristic city skyline at night with neon lights and flying cars
a small house in a forest covered with snow, winter evening
a dog running on the beach with waves and blue sky
a close up of a flower with water drops, macro photography
a dragon flying over a castle, fantasy illustration, highly detailed
a cup of coffee next to a laptop on a desk by the window
a street market in the rain, people with umbrellas, cinematic
a black and white sketch of a bird on a branch
a green field with yellow flowers and a tree under clouds
a robot reading a book in a library, warm light
an ancient temple in the jungle, mist, sunrise rays
a sailing boat on a calm sea, watercolor, soft colors
a bright kitchen with plants, modern interior design
a girl with a hat walking in a park in autumn leaves
a bridge over a river in an old town, evening glow
a small red circle in the left on a blue background
a medium green square in the right on a yellow gradient background
a large blue triangle in the top on a white split background
a small yellow ring in the bottom on a black background
a medium white cross in the center on a orange background
a large black stripe in the left on a purple gradient background
a small orange circle in the right on a cyan split background
a medium purple square in the top on a pink background
a large cyan triangle in the bottom on a grey background
a small pink ring in the center on a brown gradient background
a medium grey cross in the left on a red split background
a large brown stripe in the right on a green background
close-up, 4k, 8k, high quality, masterpiece, best quality, realistic, blurry, low quality
the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9
"""


# --------------------------------------------------------------------------- helpers
def _seed(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _init_parameters(module: torch.nn.Module, name: str) -> None:
    """Overwrite every parameter and floating buffer deterministically: weights ~ N(0, 1/fan_in),
    norm scales ~ 1, biases ~ small. Covers modules whose own init does nothing (ChatGLM's
    `_init_weights`, its RMSNorm built with torch.empty) and ControlNet's zero convolutions."""
    with torch.no_grad():
        for pname, param in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            g = torch.Generator().manual_seed(_seed(f"{name}/{pname}"))
            noise = torch.randn(param.shape, generator=g, dtype=torch.float32)
            leaf = pname.rsplit(".", 1)[-1]
            if param.ndim >= 2:
                fan_in = param[0].numel()
                value = noise / max(fan_in, 1) ** 0.5
            elif leaf == "bias":
                value = noise * 0.02
            else:  # norm scales, scalar gains
                value = 1.0 + noise * 0.02
            param.copy_(value.to(param.dtype))


def _trained_weights(model: str, component: str) -> Path | None:
    path = TRAINED_WEIGHTS_DIR / model / f"{component}.safetensors"
    return path if path.is_file() else None


def _finish(module: torch.nn.Module, model: str, component: str,
            adjust: Callable[[torch.nn.Module], None] | None = None) -> torch.nn.Module:
    """Initialise (then `adjust`), or load trained tiny weights (niche/devnet/training); eval()."""
    _init_parameters(module, f"{model}/{component}")
    trained = _trained_weights(model, component)
    if trained is None and adjust is not None:
        with torch.no_grad():
            adjust(module)
    if trained is not None:
        from safetensors.torch import load_file

        module.load_state_dict(load_file(str(trained)), strict=True)
        log.info("tiny %s/%s: trained weights from %s", model, component, trained)
    module.eval()
    return module


def _merged(overrides: dict, **defaults) -> dict:
    """A component's tiny config with another scale's overrides on top."""
    return {**defaults, **overrides}


def _no_global_rng(fn: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Constructors draw from torch's global RNG; keep the caller's state untouched."""
    with torch.random.fork_rng(devices=[]):
        return fn()


# --------------------------------------------------------------------------- tokenizers
def _words() -> list[str]:
    seen: dict[str, None] = {}
    for line in CORPUS.splitlines():
        for w in line.replace(",", " , ").split():
            seen.setdefault(w, None)
    return list(seen)


def _byte_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=False)}


def build_clip_tokenizer(out: Path) -> None:
    """CLIP BPE from a local vocab.json/merges.txt: every byte symbol, plus merges of the
    corpus words so common words are single tokens."""
    symbols = list(_byte_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    for s in symbols:
        vocab.setdefault(s + "</w>", len(vocab))
    merges: list[str] = []
    for word in sorted({w.lower() for w in _words() if w.isalpha()}):
        current = word[0]
        for i, ch in enumerate(word[1:], start=1):
            nxt = ch + ("</w>" if i == len(word) - 1 else "")
            merge = f"{current} {nxt}"
            current = current + nxt
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(current, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"))
    tok.model_max_length = 77
    tok.save_pretrained(str(out))


def build_t5_tokenizer(out: Path) -> None:
    """T5 from a `tokenizers` Unigram over the corpus words and single characters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = sorted({c for c in CORPUS if not c.isspace()})
    pieces += [(c, -5.0) for c in chars]
    pieces += [("▁" + w, -3.0) for w in _words()]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = 512
    tok.save_pretrained(str(out))


def build_chatglm_tokenizer(out: Path) -> None:
    """ChatGLM's sentencepiece model, trained here on the corpus (single thread: reproducible)."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 4),
        model_writer=buf,
        vocab_size=512,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    tok = ChatGLMTokenizer(vocab_file=str(out / "tokenizer.model"))
    tok.save_pretrained(str(out))


# --------------------------------------------------------------------------- flux components
FLUX_T5_DIM = 32
FLUX_CLIP_DIM = 32
FLUX_LATENT_CHANNELS = 4


def flux_transformer(num_layers: int = 2, num_single_layers: int = 2,
                     guidance_embeds: bool = False) -> torch.nn.Module:
    """schnell's by default; dev: the same with the guidance embedder; mini: 1 + 2 blocks
    (Flux-mini's 5 + 10 against dev's 19 + 38: half as many double as single blocks)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=FLUX_LATENT_CHANNELS * 4,
        # two double-stream and two single-stream blocks, 64 wide: the smallest size measured
        # to learn layouts as well as colours (one block of each at 32 wide drew only colour
        # texture however long it trained; docs/tiny-models.md)
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=FLUX_T5_DIM,
        pooled_projection_dim=FLUX_CLIP_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )


def _vae(latent_channels: int, **extra) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        # 2 groups, not 8: with one channel per group GroupNorm removes each channel's mean,
        # i.e. the image's colours, and a trained tiny VAE cannot reconstruct them
        norm_num_groups=2,
        sample_size=64,
        **extra,
    )


def flux_vae() -> torch.nn.Module:
    return _vae(
        FLUX_LATENT_CHANNELS,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def flux_clip_text(vocab_size: int, eos_id: int, bos_id: int) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=FLUX_CLIP_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=FLUX_CLIP_DIM,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return CLIPTextModel(cfg)


def flux_t5(vocab_size: int) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=FLUX_T5_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(cfg)


def flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )


FLUX_VARIANTS: dict[str, dict] = {
    "flux-schnell": {},
    "flux-dev": {"guidance_embeds": True},
    "flux-mini": {"guidance_embeds": True, "num_layers": 1, "num_single_layers": 2},
}
"""Transformer shapes per FLUX model; dev and mini share schnell's text encoders and VAE."""
GUIDANCE_GAIN = 0.1


def _from_schnell(transformer: torch.nn.Module) -> None:
    """dev/mini start from schnell's trained tiny transformer where names and shapes match
    (mini: its first blocks), so their pictures have layouts; the guidance embedder stays
    random, its output scaled down so that guidance steers without drowning the timestep."""
    trained = _trained_weights("flux-schnell", "transformer")
    if trained is not None:
        from safetensors.torch import load_file

        own = transformer.state_dict()
        for key, value in load_file(str(trained)).items():
            if key in own and own[key].shape == value.shape:
                own[key].copy_(value)
    guidance = getattr(transformer.time_text_embed, "guidance_embedder", None)
    if guidance is not None:
        guidance.linear_2.weight.mul_(GUIDANCE_GAIN)
        guidance.linear_2.bias.mul_(GUIDANCE_GAIN)


def build_flux(out: Path, model: str = "flux-schnell") -> None:
    """One tiny FLUX model (FLUX_VARIANTS), its diffusers folder plus, beside it in
    `<model>-files/`, the same weights as single files (niche/devnet/flux_files.py)."""
    from diffusers import FluxPipeline
    from transformers import CLIPTokenizer, T5Tokenizer

    from niche.devnet.flux_files import write_single_files

    tmp = out / "_tok"
    build_clip_tokenizer(tmp / "tokenizer")
    build_t5_tokenizer(tmp / "tokenizer_2")
    clip_tok = CLIPTokenizer.from_pretrained(str(tmp / "tokenizer"))
    t5_tok = T5Tokenizer.from_pretrained(str(tmp / "tokenizer_2"))
    m = "flux-schnell"  # shared components: schnell's (trained) weights for every variant
    shape = FLUX_VARIANTS[model]
    transformer = (_finish(_no_global_rng(flux_transformer), m, "transformer")
                   if model == m else
                   _finish(_no_global_rng(lambda: flux_transformer(**shape)), model,
                           "transformer", adjust=_from_schnell))
    pipe = FluxPipeline(
        scheduler=flux_scheduler(),
        vae=_finish(_no_global_rng(flux_vae), m, "vae"),
        text_encoder=_finish(_no_global_rng(lambda: flux_clip_text(
            len(clip_tok), clip_tok.eos_token_id, clip_tok.bos_token_id)), m, "text_encoder"),
        tokenizer=clip_tok,
        text_encoder_2=_finish(_no_global_rng(lambda: flux_t5(len(t5_tok))), m, "text_encoder_2"),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    shutil.rmtree(tmp)
    guided = bool(shape.get("guidance_embeds"))
    _write_overrides(out, {
        "cpu_threads": 1,
        # dev/mini: 6 steps at guidance 3.5 (production: 28 steps)
        "defaults": {"steps": 6 if guided else 4, "guidance": 3.5 if guided else 0.0,
                     "width": 64, "height": 64, "max_sequence_length": 64},
        # max_steps as in production (configs/models): audits run at production N too
        "limits": {"min_size": 32, "max_size": 128, "min_steps": 1,
                   "max_steps": 50 if guided else 8},
    })
    write_single_files(out, out.parent / f"{model}-files", model)


# --------------------------------------------------------------------------- kolors components
GLM_DIM = 32
KOLORS_CROSS_DIM = 64
KOLORS_TIME_DIM = 8


def kolors_text_encoder(vocab_size: int, **config) -> torch.nn.Module:
    """`config` overrides the tiny dimensions (the medium scale)."""
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    padded = (vocab_size + 15) // 16 * 16
    cfg = ChatGLMConfig(**_merged(config,
        num_layers=2,
        padded_vocab_size=padded,
        hidden_size=GLM_DIM,
        ffn_hidden_size=64,
        kv_channels=16,
        num_attention_heads=2,
        seq_length=256,
        multi_query_attention=True,
        multi_query_group_num=1,
        original_rope=True,
        rmsnorm=True,
        add_qkv_bias=True,
        post_layer_norm=True,
        torch_dtype="float32",
    ))
    return ChatGLMModel(cfg)


def kolors_unet(**config) -> torch.nn.Module:
    """`config` overrides the tiny dimensions (the medium scale)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**_merged(config,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        norm_num_groups=8,
        cross_attention_dim=KOLORS_CROSS_DIM,
        encoder_hid_dim=GLM_DIM,
        encoder_hid_dim_type="text_proj",
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=KOLORS_TIME_DIM,
        projection_class_embeddings_input_dim=6 * KOLORS_TIME_DIM + GLM_DIM,
    ))


def kolors_vae() -> torch.nn.Module:
    return _vae(4, scaling_factor=0.13025, force_upcast=True)


def kolors_scheduler():
    """Kolors' own EulerDiscrete settings, except that the tiny UNet predicts v, not epsilon.

    Why: an epsilon UNet's output error reaches the denoised estimate multiplied by sigma (29 at
    the first step), so its bfloat16 rounding at high noise decided the picture's error; a v
    UNet's error reaches it with a factor of at most 1. Trained to the same objective
    (training/kolors.py: loss_weights), bfloat16 vs float32 rose from a mean of 37.3 dB
    (two requests under 35) to 40-42 dB (docs/tiny-models.md). Production Kolors checkpoints
    bring their own scheduler config (epsilon), and the pipelines read it from there.
    """
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1100, beta_start=0.00085, beta_end=0.014,
        beta_schedule="scaled_linear", prediction_type="v_prediction", steps_offset=1,
        timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
    )


def kolors_controlnet(unet: torch.nn.Module,
                      conditioning: tuple[int, ...] = (4, 8, 8, 8)) -> torch.nn.Module:
    """ControlNetModel.from_unet keeps the UNet's text_proj; its conditioning embedding
    downsamples by 8 (four stages), matching the VAE."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning)


CONTROL_GAIN = 60.0


def _strong_control(controlnet: torch.nn.Module) -> None:
    """At random init the control image's path (conditioning embedding) is weak next to the
    latents: amplify its last conv so the conditioning image, not just its presence, steers."""
    controlnet.controlnet_cond_embedding.conv_out.weight.mul_(CONTROL_GAIN)


IMAGE_ENCODER_SIZE = 32
CLIP_VISION_DIM = 32
IP_HIDDEN = 64  # IP-Adapter Plus resampler: heads = width // 64


def kolors_image_encoder(**config) -> torch.nn.Module:
    """`config` overrides the tiny dimensions (the medium scale)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(**_merged(config,
        hidden_size=CLIP_VISION_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, image_size=IMAGE_ENCODER_SIZE, patch_size=8,
        projection_dim=CLIP_VISION_DIM,
    ))
    return CLIPVisionModelWithProjection(cfg)


def kolors_ip_adapter_state(unet: torch.nn.Module, num_queries: int = 4, *,
                            clip_dim: int = CLIP_VISION_DIM, hidden: int = IP_HIDDEN,
                            model: str = "kolors") -> dict[str, torch.Tensor]:
    """IP-Adapter Plus weights in the original file layout (image_proj.* resampler with four
    blocks, ip_adapter.<k>.to_{k,v}_ip per cross-attention, k = 1, 3, 5...).
    `clip_dim`: the image encoder's width; `hidden`: the resampler's (64 per head)."""
    cross = unet.config.cross_attention_dim
    inner = hidden // 64 * 64  # heads x 64, as diffusers' converter reads it from to_q
    shapes: dict[str, tuple[int, ...]] = {
        "image_proj.latents": (1, num_queries, hidden),
        "image_proj.proj_in.weight": (hidden, clip_dim),
        "image_proj.proj_in.bias": (hidden,),
        "image_proj.proj_out.weight": (cross, hidden),
        "image_proj.proj_out.bias": (cross,),
        "image_proj.norm_out.weight": (cross,),
        "image_proj.norm_out.bias": (cross,),
    }
    for i in range(4):
        p = f"image_proj.layers.{i}"
        for norm in ("0.norm1", "0.norm2", "1.0"):
            shapes[f"{p}.{norm}.weight"] = (hidden,)
            shapes[f"{p}.{norm}.bias"] = (hidden,)
        shapes[f"{p}.0.to_q.weight"] = (inner, hidden)
        shapes[f"{p}.0.to_kv.weight"] = (2 * inner, hidden)
        shapes[f"{p}.0.to_out.weight"] = (hidden, inner)
        shapes[f"{p}.1.1.weight"] = (hidden * 4, hidden)
        shapes[f"{p}.1.3.weight"] = (hidden, hidden * 4)
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = unet.get_submodule(name[: -len(".processor")])
        shapes[f"ip_adapter.{key_id}.to_k_ip.weight"] = tuple(attn.to_k.weight.shape)
        shapes[f"ip_adapter.{key_id}.to_v_ip.weight"] = tuple(attn.to_v.weight.shape)
        key_id += 2
    state: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        g = torch.Generator().manual_seed(_seed(f"{model}/ip_adapter/{key}"))
        if len(shape) >= 2:
            fan_in = int(torch.tensor(shape[1:]).prod())
            state[key] = torch.randn(shape, generator=g) / fan_in**0.5
        elif key.endswith("bias"):
            state[key] = torch.randn(shape, generator=g) * 0.02
        else:
            state[key] = 1.0 + torch.randn(shape, generator=g) * 0.02
    trained = _trained_weights(model, "ip_adapter")
    if trained is not None:
        from safetensors.torch import load_file

        state = load_file(str(trained))
    return state


# Medium scale, for bench/engine.py's Kolors memory ratio: the same architectures with float32
# weights of a few hundred MB (UNet and ChatGLM ~150 MB each), so that per-pipeline Python
# objects (a few MiB) no longer outweigh the weights as they do at tiny scale. Random (seeds
# under "kolors-medium": trained tiny weights never apply), built into a temp folder, never cached.
MEDIUM_GLM_DIM = 1024
MEDIUM_TIME_DIM = 128
MEDIUM_CLIP_DIM = 256
KOLORS_MEDIUM: dict = {
    "text_encoder": {"num_layers": 4, "hidden_size": MEDIUM_GLM_DIM, "ffn_hidden_size": 2048,
                     "kv_channels": 64, "num_attention_heads": 16, "multi_query_group_num": 2},
    "unet": {
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (64, 128, 256), "layers_per_block": 2,
        "attention_head_dim": (1, 2, 4),  # diffusers reads these as head counts (64 wide)
        "transformer_layers_per_block": (1, 1, 2), "norm_num_groups": 32,
        "cross_attention_dim": 512, "encoder_hid_dim": MEDIUM_GLM_DIM,
        "addition_time_embed_dim": MEDIUM_TIME_DIM,
        "projection_class_embeddings_input_dim": 6 * MEDIUM_TIME_DIM + MEDIUM_GLM_DIM},
    "vae": {"block_out_channels": (32, 64, 128, 128), "layers_per_block": 1,
            "norm_num_groups": 32},
    "controlnet": (16, 32, 96, 256),
    "image_encoder": {"hidden_size": MEDIUM_CLIP_DIM, "intermediate_size": 1024,
                      "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": 64,
                      "patch_size": 16, "projection_dim": MEDIUM_CLIP_DIM},
    "ip_adapter": {"clip_dim": MEDIUM_CLIP_DIM, "hidden": 256, "num_queries": 16},
    "overrides": {"cpu_threads": 1,  # the bench runs its workers side by side
                  "defaults": {"steps": 2, "guidance": 5.0, "width": 64, "height": 64,
                               "max_sequence_length": 64},
                  "limits": {"min_size": 32, "max_size": 128, "max_steps": 8}},
}
SCALES = ("tiny", "medium")


def kolors_vae_medium() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, sample_size=64,
        scaling_factor=0.13025, force_upcast=True, **KOLORS_MEDIUM["vae"])


def build_kolors(out: Path, scale: str = "tiny") -> None:
    """`scale`: "tiny" (the cached test checkpoints) or "medium" (KOLORS_MEDIUM)."""
    from diffusers import KolorsPipeline
    from diffusers.pipelines.kolors import ChatGLMTokenizer
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor

    medium = scale == "medium"
    dims = KOLORS_MEDIUM if medium else {}
    m = "kolors-medium" if medium else "kolors"
    tmp = out / "_tok"
    build_chatglm_tokenizer(tmp)
    tok = ChatGLMTokenizer.from_pretrained(str(tmp))
    unet = _finish(_no_global_rng(lambda: kolors_unet(**dims.get("unet", {}))), m, "unet")
    pipe = KolorsPipeline(
        vae=_finish(_no_global_rng(kolors_vae_medium if medium else kolors_vae), m, "vae"),
        text_encoder=_finish(_no_global_rng(lambda: kolors_text_encoder(
            len(tok), **dims.get("text_encoder", {}))), m, "text_encoder"),
        tokenizer=tok,
        unet=unet,
        scheduler=kolors_scheduler(),
        force_zeros_for_empty_prompt=False,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    shutil.rmtree(tmp)
    for kind in ("canny", "depth"):
        cn = _finish(_no_global_rng(lambda: kolors_controlnet(
            unet, *[dims["controlnet"]] if medium else [])), m, f"controlnet-{kind}",
            adjust=_strong_control)
        cn.save_pretrained(str(out / f"controlnet-{kind}"), safe_serialization=True)
    ip_dir = out / "ip-adapter"
    encoder = _finish(_no_global_rng(lambda: kolors_image_encoder(
        **dims.get("image_encoder", {}))), m, "image_encoder")
    encoder.save_pretrained(str(ip_dir / "image_encoder"), safe_serialization=True)
    enc_size = encoder.config.image_size
    CLIPImageProcessor(
        size={"shortest_edge": enc_size},
        crop_size={"height": enc_size, "width": enc_size},
    ).save_pretrained(str(ip_dir / "image_encoder"))
    save_file(kolors_ip_adapter_state(unet, **dims.get("ip_adapter", {}), model=m),
              str(ip_dir / "ip_adapter_plus_general.safetensors"), metadata={"format": "pt"})
    build_depth(out / "depth-estimator")
    # 8 steps at guidance 4: less guidance amplifies less rounding (bfloat16 vs float32, mean
    # of 12 requests: guidance 5 39.7 dB, 4 41.5), and 10 steps came too close to 5 (half
    # steps 7.7 dB below bfloat16 on one request; 8 steps: >= 12.6); docs/tiny-models.md
    _write_overrides(out, dims["overrides"] if medium else {
        "cpu_threads": 1,
        "defaults": {"steps": 8, "guidance": 4.0, "width": 64, "height": 64},
        "limits": {"min_size": 32, "max_size": 128, "max_steps": 50},
    })


# --------------------------------------------------------------------------- depth model
def depth_model() -> torch.nn.Module:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
        image_size=28, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    cfg = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=16, patch_size=14,
        neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16, head_hidden_size=8,
        reassemble_factors=[4, 2, 1, 0.5], depth_estimation_type="relative",
    )
    return DepthAnythingForDepthEstimation(cfg)


def build_depth(out: Path) -> None:
    from transformers import DPTImageProcessor

    model = _finish(_no_global_rng(depth_model), "kolors", "depth")
    model.save_pretrained(str(out), safe_serialization=True)
    DPTImageProcessor(
        do_resize=True, size={"height": 28, "width": 28}, keep_aspect_ratio=False,
        ensure_multiple_of=14, do_rescale=True, do_normalize=True,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(str(out))


# --------------------------------------------------------------------------- entry points
def _write_overrides(out: Path, data: dict) -> None:
    import yaml

    text = "# Tiny checkpoint: small sizes and few steps so tests and localnet are fast.\n"
    (out / "niche_model.yaml").write_text(text + yaml.safe_dump(data, sort_keys=True))


BUILDERS: dict[str, Callable[[Path], None]] = {
    "flux-schnell": build_flux,
    "flux-dev": lambda out: build_flux(out, "flux-dev"),
    "flux-mini": lambda out: build_flux(out, "flux-mini"),
    "kolors": build_kolors,
}


def build_tiny_models(out: Path, models: list[str] | None = None, scale: str = "tiny") -> Path:
    """Write every tiny checkpoint under out/<model>/ (overwrites). Returns out.
    scale="medium": Kolors only (the default then), a few hundred MB (KOLORS_MEDIUM); its
    marker never matches build_id(), so ensure_tiny_models never takes it for a tiny cache."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, not {scale!r}")
    medium = scale == "medium"
    if medium and set(models or ["kolors"]) != {"kolors"}:
        raise ValueError("the medium scale exists for kolors only")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad():
        for name in models or (["kolors"] if medium else list(BUILDERS)):
            target = out / name
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            if medium:
                build_kolors(target, scale)
            else:
                BUILDERS[name](target)
    (out / MARKER).write_text(build_id() + (":medium" if medium else "") + "\n")
    return out


def default_tiny_dir() -> Path:
    env = os.environ.get("NICHE_TINY_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "niche" / TINY_VERSION


def build_id() -> str:
    """Fingerprint of what a build would write: this builder's source, the single-file writer
    and the key table it reads (their order is the GGUF files' byte order), and any trained
    tiny weights. A cache whose marker holds another id is stale and gets rebuilt."""
    import hashlib

    from niche.devnet import flux_files
    from niche.models import single_file

    h = hashlib.sha256()
    for source in (__file__, flux_files.__file__, single_file.__file__):
        h.update(Path(source).read_bytes())
    if TRAINED_WEIGHTS_DIR.is_dir():
        for f in sorted(TRAINED_WEIGHTS_DIR.rglob("*.safetensors")):
            h.update(str(f.relative_to(TRAINED_WEIGHTS_DIR)).encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return f"{TINY_VERSION}:{h.hexdigest()[:16]}"


def _is_current(root: Path) -> bool:
    marker = root / MARKER
    return marker.is_file() and marker.read_text().strip() == build_id()


def ensure_tiny_models(root: Path | None = None) -> Path:
    """Build the tiny checkpoints once and return their root. The build goes to a temporary
    sibling folder renamed into place, so a concurrent or interrupted build is never used; a
    cache built by another version of this builder (or other trained weights) is replaced."""
    root = Path(root) if root else default_tiny_dir()
    if _is_current(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-build-", dir=root.parent))
    try:
        build_tiny_models(tmp)
        if _is_current(root):  # another process finished first
            return root
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}-old-", dir=root.parent))
            with contextlib.suppress(FileNotFoundError):
                os.rename(root, old / "stale")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_current(root):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
