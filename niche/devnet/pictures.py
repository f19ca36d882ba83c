"""Procedural conditioning pictures for tests and benches: shapes on a gradient, so edge
maps and depth maps have something to find. No data set needed."""
from __future__ import annotations

import numpy as np
import PIL.Image


def shapes_picture(seed: int, size: tuple[int, int] = (96, 80)) -> PIL.Image.Image:
    """A gradient with four random discs, drawn from an explicit generator seeded by `seed`."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / w, y * 255 / h, np.full_like(x, 128.0)], -1)
    for _ in range(4):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(6, 20)
        arr[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    return PIL.Image.fromarray(arr.astype(np.uint8))
