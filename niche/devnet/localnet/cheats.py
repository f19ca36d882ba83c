"""Dishonest miners for the local subnet, so a newcomer can watch the validator catch them.

The wrapper changes what is computed, never what is claimed: the answer still says it is the
requested model, seed and steps, and commits to N states, exactly as a cheating miner on a
real network would. The adaptive ones are what a cheater who read the step check tries:

- other-seed, fewer-steps: the plain cheats (fewer steps' states duplicated onto the grid);
- resampled-steps: half the steps, states interpolated onto the honest grid, image decoded
  from the claimed last state (it matches the honest grid where the two grids coincide);
- sharpened-fewer-steps: half the steps, the image unsharp-masked to restore the detail the
  image metric looks at;
- no-guidance: Kolors without classifier-free guidance (half the UNet work); FLUX has no
  guidance branch, so a FLUX miner told to do it skips steps instead;
- reused-prediction: every other step reuses the previous denoiser output.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import PIL.Image
import PIL.ImageFilter
import torch

from niche.devnet.localnet.cheat_names import CHEATS
from niche.models.engine import ImageEngine
from niche.models.spec import ModelSpec
from niche.protocol import GenerationParams, ModelInfo


class CheatingEngine:
    """An Engine that answers every request with a cheaper or wrong computation."""

    def __init__(self, engine: ImageEngine, cheat: str):
        if cheat not in CHEATS:
            raise ValueError(f"unknown cheat {cheat!r}; choose from {list(CHEATS)}")
        self._engine, self.cheat = engine, cheat

    def spec(self, model: str) -> ModelSpec:
        return self._engine.spec(model)

    def served(self) -> list[ModelInfo]:
        return self._engine.served()

    def resolve(self, params: GenerationParams) -> GenerationParams:
        return self._engine.resolve(params)

    def check_image(self, params: GenerationParams, image: PIL.Image.Image | None) -> None:
        self._engine.check_image(params, image)

    def compute_dtype(self, model: str) -> str:
        return self._engine.compute_dtype(model)

    def decode_state(self, params: GenerationParams, state: torch.Tensor,
                     kernels: Mapping[str, str] | None = None) -> PIL.Image.Image:
        return self._engine.decode_state(params, state, kernels)

    def kernels(self, model: str) -> dict[str, str]:
        return self._engine.kernels(model)

    def initial_state(self, params: GenerationParams) -> torch.Tensor:
        return self._engine.initial_state(params)

    def state_shape(self, params: GenerationParams) -> tuple[int, ...]:
        return self._engine.state_shape(params)

    def recompute_steps(self, params: GenerationParams, image: PIL.Image.Image | None,
                        states: Mapping[int, torch.Tensor],
                        kernels: Mapping[str, str] | None = None) -> dict[int, torch.Tensor]:
        return self._engine.recompute_steps(params, image, states, kernels)

    def generate_with_states(self, params: GenerationParams,
                             image: PIL.Image.Image | None = None
                             ) -> tuple[PIL.Image.Image, list[torch.Tensor]]:
        """The cheap computation's image and N claimed states (N = the request's steps)."""
        from niche.devnet import step_cheats
        from niche.models.engine import Engine

        full = self._engine.resolve(params)
        n = int(full.steps or 1)
        if self.cheat in ("other-seed", "fewer-steps"):
            picture, states = self._engine.generate_with_states(self._tamper(params), image)
            return picture, (states + [states[-1]] * n)[:n]
        engine = self._engine
        if not isinstance(engine, Engine):
            raise TypeError("adaptive cheats need the real engine underneath")
        if self.cheat == "no-guidance" and full.guidance and full.guidance > 1.0:
            chain = step_cheats.no_cfg(engine, full, image)
        elif self.cheat == "reused-prediction":
            chain = step_cheats.reused_prediction(engine, full, image)
        else:
            chain = step_cheats.fewer_steps(engine, full, image,
                                            resample=self.cheat == "resampled-steps")
        states = [chain[i] for i in range(1, n + 1)]
        picture = engine.decode_state(full, states[-1])
        if self.cheat == "sharpened-fewer-steps":
            picture = picture.filter(PIL.ImageFilter.UnsharpMask(radius=2, percent=80))
        return picture, states

    def _tamper(self, params: GenerationParams) -> GenerationParams:
        params = self._engine.resolve(params)
        if self.cheat == "other-seed":
            return params.model_copy(update={"seed": (params.seed + 1) % 2**32})
        return params.model_copy(update={"steps": max(1, (params.steps or 2) // 2)})

    def generate(self, params: GenerationParams,
                 image: PIL.Image.Image | None = None) -> PIL.Image.Image:
        return self.generate_with_states(params, image)[0]

    def generate_batch(self, requests: Sequence[tuple[GenerationParams, PIL.Image.Image | None]],
                       fuse: bool | None = None) -> list[PIL.Image.Image]:
        return [self.generate(p, img) for p, img in requests]
