"""Dishonest miners for the local subnet, so a newcomer can watch the validator catch them.

The wrapper changes what is computed, never what is claimed: the answer still says it is the
requested model, seed and steps, exactly as a cheating miner on a real network would.
"""
from __future__ import annotations

from typing import Any, Optional

import PIL.Image

from niche.protocol import GenerationParams

CHEATS = ("other-seed", "fewer-steps")


class CheatingEngine:
    """An Engine that answers every request with a cheaper or wrong computation."""

    def __init__(self, engine: Any, cheat: str):
        if cheat not in CHEATS:
            raise ValueError(f"unknown cheat {cheat!r}; choose from {CHEATS}")
        self._engine, self.cheat = engine, cheat

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _tamper(self, params: GenerationParams) -> GenerationParams:
        params = self._engine.resolve(params)
        if self.cheat == "other-seed":
            return params.model_copy(update={"seed": (params.seed + 1) % 2**32})
        return params.model_copy(update={"steps": max(1, (params.steps or 2) // 2)})

    def generate(self, params: GenerationParams,
                 image: Optional[PIL.Image.Image] = None) -> PIL.Image.Image:
        return self._engine.generate(self._tamper(params), image)

    def generate_batch(self, items):
        return self._engine.generate_batch([(self._tamper(p), img) for p, img in items])
