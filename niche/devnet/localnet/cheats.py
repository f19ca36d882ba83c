"""Dishonest miners for the local subnet, so a newcomer can watch the validator catch them.

The wrapper changes what is computed, never what is claimed: the answer still says it is the
requested model, seed and steps, exactly as a cheating miner on a real network would.
"""
from __future__ import annotations

from collections.abc import Sequence

import PIL.Image

from niche.models.engine import ImageEngine
from niche.models.spec import ModelSpec
from niche.protocol import GenerationParams, ModelInfo

CHEATS = ("other-seed", "fewer-steps")


class CheatingEngine:
    """An Engine that answers every request with a cheaper or wrong computation."""

    def __init__(self, engine: ImageEngine, cheat: str):
        if cheat not in CHEATS:
            raise ValueError(f"unknown cheat {cheat!r}; choose from {CHEATS}")
        self._engine, self.cheat = engine, cheat

    def spec(self, model: str) -> ModelSpec:
        return self._engine.spec(model)

    def served(self) -> list[ModelInfo]:
        return self._engine.served()

    def resolve(self, params: GenerationParams) -> GenerationParams:
        return self._engine.resolve(params)

    def check_image(self, params: GenerationParams, image: PIL.Image.Image | None) -> None:
        self._engine.check_image(params, image)

    def _tamper(self, params: GenerationParams) -> GenerationParams:
        params = self._engine.resolve(params)
        if self.cheat == "other-seed":
            return params.model_copy(update={"seed": (params.seed + 1) % 2**32})
        return params.model_copy(update={"steps": max(1, (params.steps or 2) // 2)})

    def generate(self, params: GenerationParams,
                 image: PIL.Image.Image | None = None) -> PIL.Image.Image:
        return self._engine.generate(self._tamper(params), image)

    def generate_batch(self, requests: Sequence[tuple[GenerationParams, PIL.Image.Image | None]],
                       fuse: bool | None = None) -> list[PIL.Image.Image]:
        return self._engine.generate_batch([(self._tamper(p), img) for p, img in requests],
                                           fuse)
