"""Procedural prompt/image pairs for training tiny checkpoints.

A scene is one coloured shape on a plain (or two-tone) background. The prompt names
some of its attributes; the ones it leaves out are drawn at random, so the seed still
matters for a fixed prompt while the prompt decides what the image mostly looks like.
Everything is drawn from an explicit ``numpy.random.Generator``: same seed, same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (250, 140, 20),
    "purple": (140, 40, 180),
    "cyan": (30, 210, 220),
    "pink": (250, 130, 190),
    "grey": (128, 128, 128),
    "brown": (120, 70, 30),
}
SHAPES = ("circle", "square", "triangle", "ring", "cross", "stripe")
SIZES = {"small": (0.18, 0.26), "medium": (0.28, 0.36), "large": (0.4, 0.5)}
POSITIONS = {
    "left": (0.3, 0.5),
    "right": (0.7, 0.5),
    "top": (0.5, 0.3),
    "bottom": (0.5, 0.7),
    "center": (0.5, 0.5),
}
BACKGROUNDS = ("plain", "gradient", "split")

#: every word a training prompt can contain (tiny tokenizers must cover them)
VOCABULARY = sorted(
    set(COLOURS) | set(SHAPES) | set(SIZES) | set(POSITIONS) | set(BACKGROUNDS)
    | {"a", "an", "on", "in", "the", "background", "of", "image", "photo", "with"}
)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    style: str  # plain / gradient / split
    size: float  # radius as a fraction of the side
    cx: float
    cy: float
    size_word: str
    position_word: str
    depth: float  # 0..1, nearer is larger


def sample_scene(rng: np.random.Generator) -> Scene:
    colour, background = rng.choice(list(COLOURS), size=2, replace=False)
    size_word = str(rng.choice(list(SIZES)))
    lo, hi = SIZES[size_word]
    position_word = str(rng.choice(list(POSITIONS)))
    px, py = POSITIONS[position_word]
    jitter = rng.uniform(-0.08, 0.08, size=2)
    return Scene(
        shape=str(rng.choice(SHAPES)),
        colour=str(colour),
        background=str(background),
        style=str(rng.choice(BACKGROUNDS, p=[0.6, 0.2, 0.2])),
        size=float(rng.uniform(lo, hi)),
        cx=float(np.clip(px + jitter[0], 0.2, 0.8)),
        cy=float(np.clip(py + jitter[1], 0.2, 0.8)),
        size_word=size_word,
        position_word=position_word,
        depth=float(rng.uniform(0.4, 1.0)),
    )


def describe(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Prompt for a scene; with ``rng``, size/position/style words are dropped at random."""
    keep_size = keep_pos = keep_style = True
    if rng is not None:
        keep_size, keep_pos, keep_style = (rng.random(3) < [0.5, 0.5, 0.6]).tolist()
    words = ["a"]
    if keep_size:
        words.append(scene.size_word)
    words += [scene.colour, scene.shape]
    if keep_pos:
        words += ["in", "the", scene.position_word]
    words += ["on", "a", scene.background]
    if keep_style and scene.style != "plain":
        words.append(scene.style)
    words.append("background")
    return " ".join(words)


def _masks(scene: Scene, size: int) -> np.ndarray:
    """Boolean mask of the shape on a ``size`` x ``size`` grid (pixel centres)."""
    ys, xs = (np.mgrid[0:size, 0:size] + 0.5) / size
    dx, dy, r = xs - scene.cx, ys - scene.cy, scene.size
    if scene.shape == "circle":
        return dx**2 + dy**2 <= r**2
    if scene.shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if scene.shape == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if scene.shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if scene.shape == "cross":
        return ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r)) | (
            (np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r)
        )
    if scene.shape == "stripe":
        return (np.abs(dy) <= r * 0.35) & (np.abs(dx) <= r * 1.2)
    raise ValueError(scene.shape)


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """RGB uint8 image (size, size, 3). Supersampled 2x for soft edges."""
    big = size * 2
    ys, xs = (np.mgrid[0:big, 0:big] + 0.5) / big
    bg = np.array(COLOURS[scene.background], dtype=np.float32)
    img = np.broadcast_to(bg, (big, big, 3)).copy()
    if scene.style == "gradient":
        img *= (0.45 + 0.75 * ys)[..., None]
    elif scene.style == "split":
        img[xs > 0.5] = 255.0 - bg
    mask = _masks(scene, big)
    img[mask] = np.array(COLOURS[scene.colour], dtype=np.float32)
    img = img.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def render_depth(scene: Scene, size: int = 64) -> np.ndarray:
    """Depth-style map (uint8 HxWx3, near = bright): a floor ramp plus the shape."""
    ys, _ = (np.mgrid[0:size, 0:size] + 0.5) / size
    depth = 0.1 + 0.35 * ys
    mask = _masks(scene, size)
    depth = np.where(mask, scene.depth, depth)
    d = (depth * 255).astype(np.uint8)
    return np.stack([d, d, d], axis=-1)


def render_canny(image: np.ndarray) -> np.ndarray:
    """Canny edge map of an RGB uint8 image, as RGB uint8 (same recipe as inference)."""
    import cv2

    edges = cv2.Canny(image, 100, 200)
    return np.stack([edges, edges, edges], axis=-1)


def batch(rng: np.random.Generator, n: int, size: int = 64
          ) -> tuple[list[Scene], list[str], np.ndarray]:
    """``n`` scenes, their (randomly abbreviated) prompts, and images (n, size, size, 3) uint8."""
    scenes = [sample_scene(rng) for _ in range(n)]
    prompts = [describe(s, rng) for s in scenes]
    images = np.stack([render(s, size) for s in scenes])
    return scenes, prompts, images
