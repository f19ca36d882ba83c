"""Procedural prompts: millions of distinct, plausible prompts from a seeded generator.

A fixed prompt list lets miners pre-compute or cache answers; a grammar over subjects,
attributes, styles and settings gives every round fresh text with no data set to ship.
An operator file (one prompt per line) can replace the grammar.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from niche.errors import ConfigError
from niche.protocol import MAX_PROMPT_CHARS

SUBJECTS = (
    "a red fox", "an old lighthouse", "a steam locomotive", "a bowl of ramen", "a snow leopard",
    "a glass teapot", "a medieval castle", "a hot air balloon", "a vintage motorcycle",
    "a sleeping cat", "a bonsai tree", "a koi pond", "a robot gardener", "a violin",
    "a desert caravan", "a sailboat", "a mountain cabin", "a city tram", "an astronaut",
    "a hummingbird", "a stack of books", "a wooden bridge", "a jellyfish", "a windmill",
    "a chess board", "a street market", "a grand piano", "a waterfall", "a paper lantern",
    "a polar bear", "a spiral staircase", "a bicycle", "a treehouse", "a giant tortoise",
    "a coffee cup", "a samurai", "a ballet dancer", "a lemon tree", "a submarine",
    "an owl", "a carousel", "a greenhouse", "a fishing village", "a dragon kite",
    "a pair of boots", "a typewriter", "a cathedral", "a peacock", "a desert cactus",
    "a harbor crane", "a market stall of spices", "a mechanical watch", "a basket of apples",
    "a train station", "a racing car", "a swan", "a clock tower", "a fire truck",
    "a beehive", "a canyon", "a ceramic vase", "a lion", "a zeppelin", "a tea garden",
)
ATTRIBUTES = (
    "ancient", "tiny", "enormous", "glowing", "rusty", "crystal", "floating", "golden",
    "weathered", "neon-lit", "snow-covered", "overgrown", "mechanical", "paper-cut",
    "porcelain", "translucent", "moss-covered", "futuristic", "abandoned", "colorful",
    "minimalist", "ornate", "hand-painted", "frozen", "burning", "striped", "patchwork",
    "origami", "chrome", "velvet", "wooden", "marble", "inflatable", "knitted",
    "bioluminescent", "sunlit", "rain-soaked", "dusty", "polished", "holographic",
)
STYLES = (
    "oil painting", "watercolor", "35mm photograph", "studio photograph", "pencil sketch",
    "ink drawing", "3d render", "pixel art", "ukiyo-e print", "art nouveau poster",
    "charcoal drawing", "low-poly model", "claymation still", "gouache illustration",
    "isometric illustration", "macro photograph", "film noir still", "pastel drawing",
    "stained glass", "mosaic", "linocut", "comic panel", "vaporwave artwork",
    "cinematic still", "polaroid photo", "technical blueprint", "impressionist painting",
    "baroque painting", "children's book illustration", "tilt-shift photograph",
)
SETTINGS = (
    "at sunrise", "at dusk", "under a starry sky", "in heavy fog", "in a snowstorm",
    "on a rainy street", "in a bamboo forest", "on a quiet beach", "in a busy city",
    "on the moon", "inside a cave", "in a flower field", "on a frozen lake",
    "in an autumn forest", "under the sea", "in a desert at noon", "on a mountain peak",
    "in a cozy kitchen", "in a library", "in a greenhouse", "on a rooftop",
    "in a train carriage", "by a river", "in a castle courtyard", "at a night market",
    "in a rice field", "on a volcanic island", "in a cyberpunk alley", "in a museum hall",
    "in a snowy village", "in a canyon", "on a cliff edge", "in a meadow", "in the clouds",
    "at a harbor", "in a temple garden", "in a sandstorm", "in an old workshop",
    "at a carnival", "in the rain",
)
LIGHTING = (
    "soft light", "dramatic lighting", "golden hour light", "rim lighting", "moonlight",
    "overcast light", "candlelight", "harsh noon sun", "volumetric light", "neon glow",
    "backlit", "studio lighting",
)
DETAILS = (
    "highly detailed", "shallow depth of field", "wide angle", "close-up", "symmetrical",
    "muted colors", "vibrant colors", "high contrast", "soft focus background",
    "sharp focus", "intricate textures", "long exposure",
)


class PromptSource:
    """Draws prompts from the grammar (or an operator's list) with a caller-owned RNG.

    The RNG is always passed in: the validator derives one per round from its own seed, so
    a round's prompts are reproducible by the validator and unpredictable to miners.
    """

    def __init__(self, prompts: Sequence[str] | None = None):
        self._prompts = tuple(prompts) if prompts else None

    @classmethod
    def from_file(cls, path: Path) -> PromptSource:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read prompt file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"prompt file {path} is not UTF-8 text (byte {exc.start}): "
                              "save it as UTF-8, one prompt per line") from None
        lines = []
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line[:MAX_PROMPT_CHARS])
        if not lines:
            raise ConfigError(f"prompt file {path} holds no prompts")
        return cls(lines)

    @property
    def size(self) -> int:
        """How many distinct prompts this source can produce."""
        if self._prompts is not None:
            return len(set(self._prompts))
        return len(SUBJECTS) * len(ATTRIBUTES) * len(STYLES) * len(SETTINGS) * (
            len(LIGHTING) + 1) * (len(DETAILS) + 1)

    def draw(self, rng: np.random.Generator) -> str:
        if self._prompts is not None:
            return self._prompts[int(rng.integers(len(self._prompts)))]

        def pick(options: Sequence[str]) -> str:
            return options[int(rng.integers(len(options)))]

        subject = pick(SUBJECTS)
        attribute = pick(ATTRIBUTES)
        # "a red fox" -> "a glowing red fox"; keep the article grammatical.
        article, _, rest = subject.partition(" ")
        article = "an" if attribute[0] in "aeiou" else "a"
        parts = [f"{pick(STYLES)} of {article} {attribute} {rest} {pick(SETTINGS)}"]
        lighting = int(rng.integers(len(LIGHTING) + 1))
        if lighting < len(LIGHTING):
            parts.append(LIGHTING[lighting])
        detail = int(rng.integers(len(DETAILS) + 1))
        if detail < len(DETAILS):
            parts.append(DETAILS[detail])
        return ", ".join(parts)
