"""How tiny checkpoints react to their inputs: PSNR of request variants against a reference.

A verifier calibrated on tiny checkpoints is only meaningful if those checkpoints respond like
real models: another prompt, seed or conditioning image must change the picture a lot, fewer
steps must change it clearly more than bfloat16 rounding does, and bfloat16 must stay close.
Used by bench/tiny_fidelity.py (full table + contact sheet) and tests/test_tiny_fidelity.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image

from niche.devnet.training import data

#: the thresholds of the issue ("done when")
MAX_OTHER_DB = 25.0  # other prompt / seed / conditioning
MIN_HALF_STEPS_GAP_DB = 10.0  # half steps at least this far below the bfloat16 figure
MIN_BF16_DB = 35.0


def psnr(a: PIL.Image.Image, b: PIL.Image.Image) -> float:
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


SceneArgs = tuple[str, str, str, str]
"""shape, colour, background, position: what scene_image draws."""


def scene_image(shape: str, colour: str, background: str, position: str = "center",
                size: str = "large", px: int = 64) -> PIL.Image.Image:
    """A rendered scene (conditioning / reference image); strong luminance contrast so that
    Canny (thresholds 100/200) finds its edges."""
    lo, hi = data.SIZES[size]
    cx, cy = data.POSITIONS[position]
    scene = data.Scene(shape=shape, colour=colour, background=background, style="plain",
                       size=(lo + hi) / 2, cx=cx, cy=cy, size_word=size, position_word=position,
                       depth=0.9)
    return PIL.Image.fromarray(data.render(scene, px))


@dataclass(frozen=True)
class Case:
    model: str
    pipeline: str
    prompt: str
    other_prompt: str
    image: SceneArgs | None = None  # scene_image(*image): the conditioning image
    other_image: SceneArgs | None = None
    seed: int = 0


TXT2IMG = [
    ("a red circle on a blue background", "a yellow square on a black background"),
    ("a large white triangle in the left on a green background",
     "a small purple ring in the right on a orange background"),
    ("a small yellow cross on a purple gradient background",
     "a large cyan stripe on a brown background"),
]
CONDITIONED = [
    ("a white triangle in the left on a black background",
     "a yellow ring in the right on a purple background",
     ("triangle", "white", "black", "left"), ("ring", "yellow", "purple", "right")),
    ("a yellow circle on a blue background", "a black cross in the top on a white background",
     ("circle", "yellow", "blue", "center"), ("cross", "black", "white", "top")),
    ("a black square in the right on a orange background",
     "a white stripe in the bottom on a green background",
     ("square", "black", "orange", "right"), ("stripe", "white", "green", "bottom")),
]


def default_cases(quick: bool = False) -> list[Case]:
    n = 1 if quick else len(TXT2IMG)
    cases = []
    for p, o in TXT2IMG[:n]:
        cases.append(Case("flux-schnell", "txt2img", p, o))
        cases.append(Case("kolors", "txt2img", p, o))
    for p, o, im, other in CONDITIONED[:n]:
        for pipe in ("controlnet-canny", "controlnet-depth", "ip-adapter"):
            cases.append(Case("kolors", pipe, p, o, image=im, other_image=other))
    return cases


@dataclass
class Row:
    case: Case
    db: dict[str, float] = field(default_factory=dict)

    def failures(self) -> list[str]:
        out = []
        for key in ("other prompt", "other seed", "other image"):
            if key in self.db and self.db[key] >= MAX_OTHER_DB:
                out.append(f"{key} {self.db[key]:.1f} dB >= {MAX_OTHER_DB}")
        if self.db.get("bfloat16", 99.0) <= MIN_BF16_DB:
            out.append(f"bfloat16 {self.db['bfloat16']:.1f} dB <= {MIN_BF16_DB}")
        if "half steps" in self.db and "bfloat16" in self.db and \
                self.db["half steps"] > self.db["bfloat16"] - MIN_HALF_STEPS_GAP_DB:
            out.append(f"half steps {self.db['half steps']:.1f} dB not {MIN_HALF_STEPS_GAP_DB} dB "
                       f"below bfloat16 {self.db['bfloat16']:.1f}")
        return out


def _params(case: Case, **over):
    from niche.protocol import GenerationParams

    fields: dict[str, Any] = {"model": case.model, "pipeline": case.pipeline,
                              "prompt": case.prompt, "seed": case.seed}
    fields.update(over)
    return GenerationParams(**fields)


def measure(engine32, engine16, case: Case) -> tuple[Row, PIL.Image.Image]:
    """PSNR of every variant of ``case`` against its float32 reference; returns the reference."""
    image = other = None
    if case.image is not None and case.other_image is not None:
        image = scene_image(*case.image)
        other = scene_image(*case.other_image)
    base = engine32.resolve(_params(case))
    ref = engine32.generate(base, image)
    row = Row(case)

    def variant(**update) -> float:
        return psnr(ref, engine32.generate(_params(case, **update), image))

    row.db["other prompt"] = variant(prompt=case.other_prompt)
    row.db["other seed"] = variant(seed=case.seed + 1)
    row.db["half steps"] = variant(steps=max(1, base.steps // 2))
    if image is not None:
        row.db["other image"] = psnr(ref, engine32.generate(_params(case), other))
        scale = "ip_adapter_scale" if case.pipeline == "ip-adapter" else "controlnet_scale"
        row.db["scale 0"] = psnr(ref, engine32.generate(_params(case, **{scale: 0.0}), image))
    if engine16 is not None:
        row.db["bfloat16"] = psnr(ref, engine16.generate(_params(case), image))
    return row, ref


def engines(root, models: list[str], bf16: bool = True, threads: int = 1):
    from niche.models.engine import Engine

    e32 = Engine(models=models, model_root=root, dtype="float32", num_threads=threads)
    e16 = (Engine(models=models, model_root=root, dtype="bfloat16", num_threads=threads)
           if bf16 else None)
    return e32, e16


def contact_sheet(engine, prompts: list[str], seeds: int = 4, model: str = "flux-schnell",
                  scale: int = 2) -> PIL.Image.Image:
    """One row per prompt, one column per seed."""
    tiles = [[engine.generate(_params(Case(model, "txt2img", p, p), seed=s)) for s in range(seeds)]
             for p in prompts]
    w, h = tiles[0][0].size
    sheet = PIL.Image.new("RGB", (w * seeds, h * len(prompts)))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            sheet.paste(tile, (c * w, r * h))
    return sheet.resize((sheet.width * scale, sheet.height * scale), PIL.Image.Resampling.NEAREST)
